"""Benchmarks behind ``scripts/bench.py``, one idea per module:

- ``synthetic``: random-weight encoders, synthetic batches and the presets that size them;
- ``flops``: model FLOPs, counted on meta-device models and in closed form;
- ``harness``: timing of the bilevel, plain and scoring steps through the production code;
- ``report``: the result records and their Markdown tables;
- ``prune``: time and memory of pruning at scale, each case in a fresh process.

This file imports nothing, so a pruning case's process loads numpy and pandas, not torch.
"""
