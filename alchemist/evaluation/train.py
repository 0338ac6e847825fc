"""Downstream text-to-image training on a subset: the proxy architecture trained on plain token
cross-entropy, with the held-out loss measured after every epoch. Same loop as the rater's."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import nn

from alchemist.batch import TokenBatch
from alchemist.build import build_proxy, build_text_encoder, build_tokenizer
from alchemist.config import ConfigError, T2IConfig
from alchemist.data.pairs import SkipLog, load_pairs
from alchemist.data.sampler import Stream
from alchemist.data.tokens import Featurizer
from alchemist.evaluation.metrics import heldout_token_loss
from alchemist.loop import TrainLoop
from alchemist.runtime import encoder_amp_dtype, make_stream, resume_checkpoint, setup_runtime
from alchemist.utils.dist import all_ranks, broadcast_params
from alchemist.utils.io import check_writable
from alchemist.utils.metrics import check_wandb, host_floats
from alchemist.utils.optim import build_optimizer, set_lr


class T2ITrainer(TrainLoop):
    desc = "t2i"
    progress_keys = ("loss", "lr", "img_per_s")

    def __init__(self, cfg: T2IConfig, proxy: nn.Module, featurize: Callable[[Any], TokenBatch | None],
                 train: Stream, evaluate: Callable[[], dict[str, float]], device: torch.device,
                 is_main: bool = True, on_skipped: Callable[[list], None] = lambda s: None):
        steps = train.sampler.per_rank() // train.batch_size
        if steps == 0:
            raise ConfigError(f"the training subset has fewer rows per process than optim.bs={cfg.optim.bs}")
        super().__init__(cfg, featurize, steps, device, is_main, on_skipped)
        self.proxy, self.train, self.evaluate = proxy, train, evaluate
        broadcast_params(proxy)
        o = cfg.optim
        self.opt = build_optimizer(proxy, o.opt, o.tlr, o.twd, (o.beta1, o.beta2))
        self.scaler = self.new_scaler()

    def epoch_batches(self) -> Iterator[tuple]:
        self.train.epoch = self.epoch
        for raw in self.train.epoch_batches():
            yield (raw,)
        self.train.used = 0

    def train_step(self, batch: TokenBatch) -> dict[str, float] | None:
        lr = self.cfg.optim.tlr * self.lr_factor()
        set_lr(self.opt, lr)
        self.proxy.train()
        with self.autocast():
            loss = self.proxy.per_sample_loss(batch).float().mean()
        if not all_ranks(torch.isfinite(loss)):  # every rank skips together
            return None
        gnorm = self.optimizer_step(self.proxy, self.opt, loss, self.scaler)
        return host_floats({"loss": loss, "lr": lr, "grad_norm": gnorm})

    def end_of_epoch(self) -> dict[str, float]:
        return self.evaluate()

    def final_summary(self) -> dict[str, Any]:
        return {"train_rows": self.train.sampler.n}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.opt]

    def extra_state(self) -> dict[str, Any]:
        return {"proxy": self.proxy.state_dict(), "opt": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                "train_pos": (self.train.epoch, self.train.used)}

    def load_extra_state(self, ckpt: dict[str, Any]) -> None:
        self.proxy.load_state_dict(ckpt["proxy"])
        self.opt.load_state_dict(ckpt["opt"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.train.epoch, self.train.used = ckpt["train_pos"]


def train_t2i(cfg: T2IConfig) -> dict[str, Any]:
    """Train the downstream model on ``data.train_csv_path``; evaluate on ``data.val_csv_path``."""
    check_wandb(cfg.logging)  # a missing wandb key or a read-only output fails before any data is read
    check_writable(cfg.output.run_dir)
    resumed = resume_checkpoint(cfg.output)  # a bad or damaged checkpoint fails now too
    rt = setup_runtime(cfg.optim.bs, cfg.seed)
    skip_log = SkipLog()
    train_table = load_pairs(cfg.data.train_csv_path, cfg.data, skip_log)
    val_table = load_pairs(cfg.data.val_csv_path, cfg.data, skip_log)
    train = make_stream(train_table, cfg.data, "train", rt, shuffle=True, drop_last=True,
                        caption_dropout=cfg.data.caption_dropout, seed=cfg.seed + 1)
    val = make_stream(val_table, cfg.data, "val", rt, shuffle=False, drop_last=False, caption_dropout=0.0, seed=0)
    vqvae = build_tokenizer(cfg.model, rt.device)
    text_encoder = build_text_encoder(cfg.model, rt.device)
    proxy = build_proxy(cfg.model, text_encoder.width, rt.device)
    featurize = Featurizer(vqvae, text_encoder, rt.device, encoder_amp_dtype(cfg.model, cfg.optim, rt.device))

    def evaluate() -> dict[str, float]:
        val.sampler.set_epoch(0)
        return {"heldout_loss": heldout_token_loss(proxy, featurize, val.make_loader(val.sampler))}

    trainer = T2ITrainer(cfg, proxy, featurize, train, evaluate, rt.device, rt.is_main, skip_log.extend)
    return trainer.run(skip_log, rt.rank, rt.world, resumed)
