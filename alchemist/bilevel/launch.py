"""Wire config -> data, models, trainer; then the shared run path. The one function train_rater.py calls."""
from __future__ import annotations

from typing import Any, Callable

from alchemist.bilevel.distill import needs_distillation, run_distillation, undo_distillation
from alchemist.bilevel.estimators import estimator_class
from alchemist.bilevel.trainer import BilevelTrainer
from alchemist.build import build_proxy, build_rater, build_text_encoder, build_tokenizer
from alchemist.config import ConfigError, RaterConfig
from alchemist.data.pairs import SkipLog, load_pairs
from alchemist.data.tokens import Featurizer
from alchemist.runtime import encoder_amp_dtype, make_stream, resume_checkpoint, setup_runtime
from alchemist.utils.io import check_writable, write_json
from alchemist.utils.metrics import check_wandb


def train_rater(cfg: RaterConfig, on_coefficients: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """``on_coefficients``: called after every rater step with that step's pair ids, the (centred)
    coefficients the rater learned from, and its logits (``BilevelTrainer``), for diagnostics."""
    # an unknown rule, a missing wandb key or a read-only output fails before any data is read
    estimator_class(cfg.bilevel.estimator)
    check_wandb(cfg.logging)
    check_writable(cfg.output.run_dir)
    resumed = resume_checkpoint(cfg.output)  # a bad or damaged checkpoint fails now too
    rt = setup_runtime(cfg.optim.bs, cfg.seed)
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

    featurize = Featurizer(vqvae, text_encoder, rt.device, encoder_amp_dtype(cfg.model, cfg.optim, rt.device))
    trainer = BilevelTrainer(cfg, proxy, rater, featurize, val, train, rt.device,
                             is_main=rt.is_main, on_skipped=skip_log.extend, on_coefficients=on_coefficients)
    summary = trainer.run(skip_log, rt.rank, rt.world, resumed)
    if needs_distillation(cfg, trainer.distilled):
        summary.update(run_distillation(cfg, trainer, train_table, val_table, rt))
        if rt.is_main:
            write_json(summary, cfg.output.run_dir / "summary.json")
    elif not cfg.bilevel.distill_steps and trainer.rater_online is not None:
        undo_distillation(trainer)
    return summary
