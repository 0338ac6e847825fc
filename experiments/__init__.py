"""Experiments on the demo data: the generated dataset with planted defects, the demo pipeline, the
selection experiment and the comparison of update rules. It imports ``alchemist``; ``alchemist``
never imports it. Its shared types sit at its bottom (``types.py``), so its modules form no circle:

  types.py       KINDS, Arm, ExperimentConfig, Inputs (imports only alchemist)
  demo_data.py   the demo dataset generator (procedural scenes, planted defects, defects.csv)
  planted.py     where the planted kinds land in a ranking (AUROC, rank deciles, kept share)
  attributes.py  the attribute classifier and the metrics it judges (GenEval-lite, FID-lite)
  demo.py        the demo pipeline (make demo) and the demo T2I model with its sample grid
  rules.py       the rater-update rules compared on the demo data
  arms.py        the selection experiment's arms: rankings and subsets
  runs.py        one downstream training run per arm and seed, and the pool that runs them
  report.py      results.json's summary, the Markdown section and the loss-curve figure
  experiment.py  the selection experiment put together
"""
