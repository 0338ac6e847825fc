"""The timing harness behind ``scripts/bench.py``: throughput, memory and MFU of rater training and scoring.

Everything runs through the production code: ``BilevelTrainer.train_step`` for the bilevel step,
``BilevelTrainer.plain_proxy_step`` for the plain proxy step, ``Featurizer`` for the frozen tokenizer and
text encoder, ``Rater.forward`` for scoring. Only the weights and the data are synthetic
(``alchemist.bench.synthetic``); FLOPs come from ``alchemist.bench.flops``.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from alchemist.bench.flops import H100_BF16_DENSE_TFLOPS, RULES, component_flops, step_flops
from alchemist.bench.report import Result, Row, format_row
from alchemist.bench.synthetic import (MODES, PRESETS, Preset, bench_config, cache_batch, caption_words,
                                       featurize_in_chunks, random_tokenizer, synthetic_raw, write_random_text_encoder)
from alchemist.bilevel.trainer import BilevelTrainer
from alchemist.build import build_proxy, build_rater, build_text_encoder
from alchemist.config import RaterConfig
from alchemist.data.sampler import ResumableSampler, Stream
from alchemist.data.tokens import Featurizer
from alchemist.runtime import encoder_amp_dtype, setup_runtime
from alchemist.utils.errors import UserError


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(fn: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Wall times of ``steps`` calls of ``fn`` after ``warmup`` untimed ones (synchronised on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":  # (a CPU's peak RSS cannot be reset; gc.collect alone costs ~0.5 s there)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """GPU: peak allocated since the last reset. CPU: the process's peak RSS so far (monotone)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


class Bench:
    """Models, encoders and batches of one preset on one device; a method per kind of step."""

    def __init__(self, cfg: RaterConfig, preset: Preset, workdir: Path, log: Callable[[str], None]):
        self.cfg, self.preset = cfg, preset
        rt = setup_runtime(cfg.optim.bs, cfg.seed)
        self.device = rt.device
        log(f"random text encoder ({preset.text.width} wide, {preset.text.layers} layers) -> {workdir}")
        write_random_text_encoder(cfg.model.text_enc_path, preset.text, cfg.model.text_max_len, cfg.seed)
        self.text = build_text_encoder(cfg.model, self.device)
        self.featurize = Featurizer(random_tokenizer(cfg.model, self.device), self.text, self.device,
                                    encoder_amp_dtype(cfg.model, cfg.optim, self.device))
        bs, pin = cfg.optim.bs, self.device.type == "cuda"
        words = caption_words(preset.text)
        mk = lambda n, seed: synthetic_raw(n, cfg.data.image_size, words, preset.caption_words, seed, pin)  # noqa: E731
        self.raw = {"train": mk(bs, 1), "val": mk(bs, 2), "score": mk(preset.score_bs, 3)}
        log(f"featurising the synthetic batches on {self.device}")
        # in training-size chunks: the scoring batch in one piece is the raw-scoring row's job (it may not fit)
        self.tokens = {k: featurize_in_chunks(self.featurize, v, bs) for k, v in self.raw.items()}
        self.cache = {k: cache_batch(v) for k, v in self.tokens.items()}
        if pin:
            self.cache = {k: {**v, "idx_BL": v["idx_BL"].pin_memory()} for k, v in self.cache.items()}
        self.text_len = max(tb.text.hidden_BTD.shape[1] for tb in self.tokens.values())

    def batches(self, mode: str, split: str):
        """A thunk giving the step's input for ``split`` in ``mode`` (featurised inside the step unless tokens)."""
        if mode == "tokens":
            return lambda: self.tokens[split]
        src = (self.raw if mode == "raw" else self.cache)[split]
        return lambda: self.featurize(src)

    def trainer(self, rule: str) -> BilevelTrainer:
        cfg = dataclasses.replace(self.cfg, bilevel=dataclasses.replace(self.cfg.bilevel, estimator=rule))
        torch.manual_seed(cfg.seed)
        proxy = build_proxy(cfg.model, self.text.width, self.device)
        rater = build_rater(cfg.model, self.text.width, self.device, cfg.bilevel.double_softmax)
        bs = cfg.optim.bs
        stream = lambda: Stream(lambda s: iter(()), ResumableSampler(100 * bs, shuffle=False), bs)  # noqa: E731
        return BilevelTrainer(cfg, proxy, rater, self.featurize, stream(), stream(), self.device, is_main=False)

    def bilevel_fn(self, trainer: BilevelTrainer, mode: str) -> Callable[[], None]:
        train, val = self.batches(mode, "train"), self.batches(mode, "val")

        def step():
            if trainer.train_step(train(), val()) is None:
                raise FloatingPointError("non-finite loss: the step returned early and its timing would be wrong")
        return step

    def plain_fn(self, trainer: BilevelTrainer, mode: str) -> Callable[[], None]:
        """One proxy step on the training batch alone (unweighted loss), same precision as the bilevel step."""
        train = self.batches(mode, "train")

        def step():
            trainer.plain_proxy_step(train())
        return step

    def score_fn(self, trainer: BilevelTrainer, mode: str) -> Callable[[], None]:
        """The scoring pass of ``score_table``: featurise, rater forward in eval mode under inference_mode,
        in the run's precision (bf16 autocast on a GPU, fp32 on a CPU, as ``scoring._amp``)."""
        batch, rater = self.batches(mode, "score"), trainer.rater

        def step():
            rater.eval()
            with torch.inference_mode(), trainer.autocast():
                rater(batch()).logit_B
        return step


def _measure(row: Row, fn: Callable[[], None], bench: Bench, warmup: int, steps: int, flops: int,
             peak_tflops: float | None) -> Row:
    _reset_peak(bench.device)
    try:
        times = step_times(fn, warmup, steps, bench.device)
        row.seconds, row.seconds_min = statistics.median(times), min(times)
    except Exception as e:  # noqa: BLE001 — one failing row (e.g. out of memory) must not lose the others
        first = (str(e).splitlines() or [""])[0][:160]
        row.error = f"{type(e).__name__}: {first}"
    if row.error:  # outside the handler: the traceback (and the tensors its frames hold) is gone
        _reset_peak(bench.device)
        return row
    row.peak_mem_gib = peak_memory_gib(bench.device)
    row.img_per_s = row.images / row.seconds
    row.gflop = flops / 1e9
    row.tflops = flops / row.seconds / 1e12
    if peak_tflops:
        row.mfu = row.tflops / peak_tflops
    return row


def run_benchmark(preset: Preset | str, rules: Sequence[str] = RULES, modes: Sequence[str] = MODES,
                  steps: int | None = None, warmup: int | None = None, peak_tflops: float | None = None,
                  overrides: Sequence[str] = (), log: Callable[[str], None] = lambda s: None) -> Result:
    """Time every (rule × mode) bilevel step, the plain proxy step per mode and scoring per mode.

    ``peak_tflops`` None: the H100 bf16 dense rate on a GPU, no MFU on a CPU."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    steps = preset.steps if steps is None else steps
    warmup = preset.warmup if warmup is None else warmup
    bad = [r for r in rules if r not in RULES] + [m for m in modes if m not in MODES]
    if bad:
        raise UserError(f"unknown rule or mode {bad}: rules are {', '.join(RULES)}, modes {', '.join(MODES)}")
    with tempfile.TemporaryDirectory(prefix="alchemist_bench_") as tmp:
        cfg = bench_config(preset, tmp, overrides)
        log(f"building {preset.name} models ...")
        bench = Bench(cfg, preset, Path(tmp), log)
        dev = bench.device
        if peak_tflops is None and dev.type == "cuda":
            peak_tflops = H100_BF16_DENSE_TFLOPS
        comp = component_flops(cfg.model, preset.text, bench.text_len)
        bs = cfg.optim.bs
        result = Result(_metadata(cfg, preset, dev, warmup, steps, peak_tflops, bench.text_len), comp)

        plain_s: dict[str, float] = {}
        for i, rule in enumerate(rules):
            trainer = bench.trainer(rule)

            def measure(row: Row, fn: Callable[[], None], kind_bs: int) -> Row:
                _measure(row, fn, bench, warmup, steps, step_flops(comp, row.kind, row.mode, kind_bs, row.rule or
                                                                   "penalty"), peak_tflops)
                if row.error:  # free what the failed step left behind before the next row
                    for opt in trainer.optimizers():
                        opt.zero_grad(set_to_none=True)
                if row.kind == "bilevel":
                    row.vs_plain = row.seconds / plain_s.get(row.mode, math.nan)
                result.rows.append(row)
                log(format_row(row))
                return row

            if i == 0:  # the reference: a plain proxy step with the same proxy, optimiser and precision
                for mode in modes:
                    plain_s[mode] = measure(Row("plain", mode, "", bs), bench.plain_fn(trainer, mode), bs).seconds
            for mode in modes:
                measure(Row("bilevel", mode, rule, 2 * bs), bench.bilevel_fn(trainer, mode), bs)
            if i == len(rules) - 1:
                for mode in modes:
                    measure(Row("score", mode, "", preset.score_bs), bench.score_fn(trainer, mode), preset.score_bs)
            del trainer
            _reset_peak(dev)
        return result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _metadata(cfg: RaterConfig, preset: Preset, device: torch.device, warmup: int, steps: int,
              peak_tflops: float | None, text_len: int) -> dict[str, Any]:
    m = cfg.model
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    amp = cfg.optim.fp16 if cfg.optim.fp16 >= 0 else (2 if device.type == "cuda" else 0)
    return {"preset": preset.name, "device": device.type, "device_name": name, "torch": torch.__version__,
            "precision": {0: "fp32", 1: "fp16", 2: "bf16"}[amp] + ("" if amp == 0 else " autocast"),
            "warmup": warmup, "steps": steps, "peak_tflops": peak_tflops,
            "bs": cfg.optim.bs, "score_bs": preset.score_bs, "depth": m.depth, "raterDepth": m.raterDepth,
            "image_size": cfg.data.image_size, "patch_nums": list(m.patch_nums), "tokens": m.num_tokens,
            "vocab_size": m.vocab_size, "text": dataclasses.asdict(preset.text), "text_len": text_len}
