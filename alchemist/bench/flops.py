"""Model FLOPs of rater training and scoring, counted and in closed form.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on copies of the models built
on the ``meta`` device (no memory, no time, any scale, any host), where SDPA runs as its math
decomposition, so attention counts as the full L×L products (masked entries included), the way
MFU is usually quoted. Matmuls and convolutions only; norms, softmax, RoPE and the optimiser are
not counted. ``proxy_flops_analytic`` is the closed form the counter is tested against. A step's
FLOPs are built from per-image components by ``step_flops``; each rule's extra passes come from
its estimator class (``Estimator.extra_passes``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from alchemist.batch import TextFeatures, TokenBatch
from alchemist.bench.synthetic import MODES, Preset, TextSpec, text_model_config
from alchemist.bilevel.estimators import ESTIMATORS
from alchemist.config import ModelConfig, RaterConfig
from alchemist.models.proxy import Proxy
from alchemist.models.rater import Rater
from alchemist.models.vqvae import VQVAE

RULES = tuple(ESTIMATORS)  # every registered rater-update rule
H100_BF16_DENSE_TFLOPS = 989.0


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as fc, _autocast_off_on_meta():
        fn()
    return int(fc.get_total_flops())


@contextlib.contextmanager
def _autocast_off_on_meta():
    """``torch.autocast("meta")`` raises (no meta backend); the models' fp32 regions are no-ops there."""
    real = torch.autocast

    def autocast(device_type, *args, **kwargs):
        return contextlib.nullcontext() if device_type == "meta" else real(device_type, *args, **kwargs)
    torch.autocast = autocast
    try:
        yield
    finally:
        torch.autocast = real


def proxy_flops_analytic(depth: int, patch_nums: Sequence[int], text_len: int, text_dim: int, vocab_size: int,
                         Cvae: int, mlp_ratio: float = 4.0, backward: bool = True) -> int:
    """Matmul FLOPs of one image through the proxy (forward, plus backward if asked), in closed form.

    Forward: the linear layers (2·in·out per row) and attention (4·L·L'·C for QKᵀ and AV). Backward
    doubles every product except the gradients w.r.t. inputs that need none: the pooled caption
    (start token), the teacher-forcing features (word embedding) and the caption states (cross k/v).
    """
    C, L, first = 64 * depth, sum(p * p for p in patch_nums), patch_nums[0] ** 2
    hidden, T, D = round(C * mlp_ratio), text_len, text_dim
    lin_with_input_grad = depth * (2 * L * C * 3 * C + 2 * L * C * C + 2 * L * C * C + 2 * L * C * C
                                   + 2 * 2 * L * C * hidden) + 2 * L * C * vocab_size
    lin_weight_grad_only = 2 * D * C + 2 * (L - first) * Cvae * C + depth * 2 * T * D * 2 * C
    attention = depth * (4 * L * L * C + 4 * L * T * C)
    fwd = lin_with_input_grad + lin_weight_grad_only + attention
    if not backward:
        return fwd
    return fwd + 2 * lin_with_input_grad + lin_weight_grad_only + 2 * attention


def meta_batch(B: int, mcfg: ModelConfig, T: int, D: int) -> TokenBatch:
    L = mcfg.num_tokens
    with torch.device("meta"):
        return TokenBatch(torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L - mcfg.patch_nums[0] ** 2, mcfg.Cvae),
                          TextFeatures(torch.zeros(B, T, D), torch.ones(B, T, dtype=torch.bool), torch.zeros(B, D)),
                          torch.zeros(B, mcfg.patch_nums[-1] ** 2, mcfg.Cvae))


def component_flops(mcfg: ModelConfig, spec: TextSpec, text_len: int) -> dict[str, int]:
    """FLOPs per image of every piece a step is made of, counted on meta-device models.

    ``text_len`` is the padded caption length T the batch carries (it sets the cross-attention cost)."""
    geometry = dataclasses.replace(mcfg, ckpt_path="", vae_ckpt="", proxy_init="", text_enc_path="")
    return dict(_component_flops(geometry, spec, text_len))


@functools.lru_cache(maxsize=8)  # a few seconds each (bicubic resizes decompose into many meta ops)
def _component_flops(mcfg: ModelConfig, spec: TextSpec, text_len: int) -> dict[str, int]:
    D = spec.width
    with torch.device("meta"):
        proxy = Proxy.from_config(mcfg, D)
        rater = Rater.from_config(mcfg, D)
        vq = VQVAE(vocab_size=mcfg.vocab_size, z_channels=mcfg.Cvae, ch=mcfg.vae_ch, ch_mult=mcfg.vae_ch_mult,
                   patch_nums=mcfg.patch_nums).requires_grad_(False)
        from transformers import CLIPTextModel

        text = CLIPTextModel(text_model_config(spec, mcfg.text_max_len)).requires_grad_(False)
        img = torch.zeros(1, 3, mcfg.patch_nums[-1] * mcfg.patch_size, mcfg.patch_nums[-1] * mcfg.patch_size)
        ids = torch.zeros(1, text_len, dtype=torch.long)
        idx_Bl = [torch.zeros(1, p * p, dtype=torch.long) for p in mcfg.patch_nums]
    b = meta_batch(1, mcfg, text_len, D)

    def fwd_bwd(model_loss):
        return lambda: model_loss().backward()

    out = {
        "proxy_fwd_bwd": count_flops(fwd_bwd(lambda: proxy.per_sample_loss(b).mean())),
        "proxy_fwd": count_flops(lambda: proxy.per_sample_loss(b)),
        "rater_fwd_bwd": count_flops(fwd_bwd(lambda: rater(b).weight_B.sum())),
        "rater_fwd": count_flops(lambda: rater(b)),
        "tokenizer_encode": count_flops(lambda: vq.img_to_idxBl(img)),
        "teacher_forcing_input": count_flops(lambda: vq.idxBl_to_var_input(idx_Bl)),
        "text_encoder": count_flops(lambda: text(input_ids=ids)),  # no padding: a mask would need .item()
    }
    out["proxy_fwd_bwd_analytic"] = proxy_flops_analytic(mcfg.depth, mcfg.patch_nums, text_len, D, mcfg.vocab_size,
                                                         mcfg.Cvae)
    return out


def step_flops(c: dict[str, int], kind: str, mode: str, B: int, rule: str = "penalty") -> int:
    """FLOPs of one step of ``kind`` (bilevel | plain | score) on ``B`` images per batch (bilevel: B
    train + B val), from the per-image components. Mirrors ``BilevelTrainer.train_step`` and the rules."""
    if kind == "score":
        model = c["rater_fwd"]
        batches = 1
    elif kind == "plain":
        model = c["proxy_fwd_bwd"]
        batches = 1
    else:
        # rater once on the train batch, proxy fwd+bwd on val and train batches, then the rule's extras
        model = c["rater_fwd_bwd"] + 2 * c["proxy_fwd_bwd"]
        model += sum(n * c[k] for k, n in ESTIMATORS[rule].extra_passes.items())
        batches = 2
    encode = {"tokens": 0, "cache": c["teacher_forcing_input"],
              "raw": c["tokenizer_encode"] + c["teacher_forcing_input"] + c["text_encoder"]}[mode]
    return B * (model + batches * encode)


def flops_summary(cfg: RaterConfig, preset: Preset, text_len: int, peak_tflops: float = H100_BF16_DENSE_TFLOPS,
                  score_bs: int | None = None) -> dict[str, Any]:
    """Model FLOPs of every step at ``cfg``'s scale and the time floor at ``peak_tflops``; needs no
    device and no memory (the models are built on ``meta``), so the paper scale can be counted anywhere."""
    comp = component_flops(cfg.model, preset.text, text_len)
    bs, sbs = cfg.optim.bs, score_bs or preset.score_bs
    steps = []
    cases = [("plain proxy", "plain", "", bs)] + [(f"bilevel {r}", "bilevel", r, 2 * bs) for r in RULES] + \
            [("rater scoring", "score", "", sbs)]
    for label, kind, rule, imgs in cases:
        for mode in MODES:
            f = step_flops(comp, kind, mode, sbs if kind == "score" else bs, rule or "penalty")
            floor = f / (peak_tflops * 1e12)
            steps.append({"step": label, "mode": mode, "images": imgs, "tflop": f / 1e12, "floor_s": floor,
                          "ceiling_img_per_s": imgs / floor, "img_per_s_at_35pct_mfu": 0.35 * imgs / floor})
    return {"preset": preset.name, "bs": bs, "score_bs": sbs, "text_len": text_len, "peak_tflops": peak_tflops,
            "per_image": comp, "steps": steps}
