"""Wire config -> data, models, estimator, trainer; resume; run. The one function train_rater.py calls."""
from __future__ import annotations

from typing import Any

from alchemist.bilevel.estimators import build_estimator
from alchemist.bilevel.trainer import BilevelTrainer
from alchemist.build import build_proxy, build_rater, build_text_encoder, build_tokenizer
from alchemist.config import ConfigError, RaterConfig, save_config
from alchemist.data.pairs import SkipLog, load_pairs
from alchemist.data.tokens import Featurizer
from alchemist.runtime import make_stream, resume_path, setup_runtime
from alchemist.utils.checkpoint import load_checkpoint


def train_rater(cfg: RaterConfig) -> dict[str, Any]:
    rt = setup_runtime(cfg.optim.bs, cfg.seed)
    run_dir = cfg.output.run_dir
    skip_log = SkipLog()
    val_table = load_pairs(cfg.data.val_csv_path, cfg.data, skip_log)
    train_table = load_pairs(cfg.data.train_csv_path, cfg.data, skip_log)
    if len(train_table) < cfg.optim.bs:
        raise ConfigError(f"the training table has {len(train_table)} usable rows, fewer than optim.bs={cfg.optim.bs}")
    p = cfg.data.caption_dropout
    val = make_stream(val_table, cfg.data, "val", rt, shuffle=True, drop_last=False, caption_dropout=p, seed=cfg.seed)
    train = make_stream(train_table, cfg.data, "train", rt, shuffle=True, drop_last=True, caption_dropout=p,
                        seed=cfg.seed + 1)

    vqvae = build_tokenizer(cfg.model, rt.device)
    text_encoder = build_text_encoder(cfg.model, rt.device)
    proxy = build_proxy(cfg.model, text_encoder.width, rt.device)
    rater = build_rater(cfg.model, text_encoder.width, rt.device, cfg.bilevel.double_softmax)

    def estimator_factory(p, make_opt):
        return build_estimator(cfg.bilevel, p, make_opt, cfg.optim.grad_clip)

    trainer = BilevelTrainer(cfg, proxy, rater, estimator_factory, Featurizer(vqvae, text_encoder, rt.device),
                             val, train, rt.device, is_main=rt.is_main, on_skipped=skip_log.extend)
    resume = resume_path(cfg.output)
    if resume is not None:
        trainer.load_state_dict(load_checkpoint(resume))
        if rt.is_main:
            print(f"resumed from {resume} at step {trainer.step_idx}")
    if rt.is_main:
        save_config(cfg, run_dir / "config.json")
    try:
        summary = trainer.fit()
    finally:
        skip_log.write(run_dir / ("skipped.csv" if rt.world == 1 else f"skipped_rank{rt.rank}.csv"))
    summary["skipped_rows"] = skip_log.count
    return summary
