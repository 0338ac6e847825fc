"""The proxy text-to-image model: a STAR-style scale-wise autoregressive transformer.

Scale k's tokens are predicted from the caption and all coarser scales (block-causal mask).
Unlike STAR-T2I / official Alchemist, cross-attention uses each sample's own caption (they add
sample 0's text to the whole batch).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alchemist.batch import TextFeatures, TokenBatch
from alchemist.config import ModelConfig
from alchemist.models.blocks import LN_EPS, ScaleTransformer, text_attn_mask


class Proxy(ScaleTransformer):
    def __init__(self, depth: int, vocab_size: int, Cvae: int, patch_nums: Sequence[int], text_dim: int,
                 drop_path_rate: float = -1.0, rope_norm: float = 64.0, rope_theta: float = 1e4,
                 mlp_ratio: float = 4.0):
        if drop_path_rate < 0:
            drop_path_rate = 0.1 * depth / 24
        super().__init__(depth, Cvae, patch_nums, text_dim, causal=True, drop_path_rate=drop_path_rate,
                         rope_norm=rope_norm, rope_theta=rope_theta, mlp_ratio=mlp_ratio)
        self.V = vocab_size
        self.head_norm = nn.LayerNorm(self.C, eps=LN_EPS, elementwise_affine=False)
        self.head = nn.Linear(self.C, vocab_size)
        self.init_weights()
        self.head.weight.data.mul_(0.02)  # VAR's init_head: near-uniform initial predictions

    @classmethod
    def from_config(cls, mcfg: ModelConfig, text_dim: int) -> Proxy:
        proxy = cls(mcfg.depth, mcfg.vocab_size, mcfg.Cvae, mcfg.patch_nums, text_dim,
                    drop_path_rate=mcfg.drop_path_rate, rope_norm=mcfg.rope_norm, rope_theta=mcfg.rope_theta)
        proxy.set_attn_impl(mcfg.attn_impl)
        return proxy

    def logits(self, h_BlC: Tensor) -> Tensor:
        """At least fp32 (under bf16/fp16 autocast the loss needs it); float64 models stay float64."""
        logits = self.head(self.head_norm(h_BlC))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def forward(self, x_BLC: Tensor, text: TextFeatures) -> Tensor:
        """Teacher-forced logits (B, L, V) of every token of every scale."""
        return self.logits(self.features(x_BLC, text))

    # ------------------------------------------------------------------ losses
    def per_token_loss(self, batch: TokenBatch) -> Tensor:
        """(B, L) token cross-entropy, no label smoothing."""
        logits_BLV = self(batch.x_BLC, batch.text)
        return F.cross_entropy(logits_BLV.flatten(0, 1), batch.idx_BL.flatten(), reduction="none").view_as(batch.idx_BL)

    def per_sample_loss(self, batch: TokenBatch) -> Tensor:
        """(B,) mean token loss of each sample: every token weighs 1/L, as in VAR / STAR."""
        return self.per_token_loss(batch).mean(dim=1)

    def per_scale_loss(self, loss_BL: Tensor) -> Tensor:
        """(K,) mean loss of each scale, for logging."""
        return torch.stack([loss_BL[:, b:e].mean() for b, e in self.begin_ends])

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, vqvae, text: TextFeatures, uncond: TextFeatures | None, cfg: float = 4.0,
                 top_k: int = 600, top_p: float = 0.8, seed: int = 0) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] (the tokenizer's range), see ``sample_tokens``."""
        _, f_hat = self.sample_tokens(vqvae, text, uncond, cfg, top_k, top_p, seed)
        return vqvae.fhat_to_img(f_hat)

    @torch.no_grad()
    def sample_tokens(self, vqvae, text: TextFeatures, uncond: TextFeatures | None, cfg: float = 4.0,
                      top_k: int = 600, top_p: float = 0.8, seed: int = 0) -> tuple[list[Tensor], Tensor]:
        """Scale-by-scale decoding with a self-attention KV cache → (ids per scale, final f̂).

        Classifier-free guidance runs cond and uncond as one doubled batch and mixes
        (1+t)·cond − t·uncond with t = cfg·si/(K−1). ``uncond`` may hold one row (the empty
        caption) or B rows; ``uncond=None`` decodes the conditional model alone. Runs in eval mode.
        """
        B, K = text.B, len(self.patch_nums)
        guided = uncond is not None
        if guided:
            if uncond.B != B:
                uncond = uncond.index(torch.zeros(B, dtype=torch.long, device=uncond.mask_BT.device))
            text = TextFeatures.cat([text, uncond])
        gen = torch.Generator(device=text.pooled_BD.device).manual_seed(seed)
        text_mask = text_attn_mask(text.mask_BT)
        text_kvs = [b.cross.text_kv(text.hidden_BTD) for b in self.blocks]

        was_training = self.training
        self.eval()
        for b in self.blocks:
            b.attn.kv_caching(True)
        try:
            idx_Bl, f_hat, x_BlC = [], None, self.start_tokens(text.pooled_BD)
            for si, (pn, (bg, ed)) in enumerate(zip(self.patch_nums, self.begin_ends)):
                for b, kv in zip(self.blocks, text_kvs):
                    x_BlC = b(x_BlC, self.rope_cos[bg:ed], self.rope_sin[bg:ed], None, kv, text_mask)
                logits_BlV = self.logits(x_BlC)
                if guided:
                    t = cfg * si / max(K - 1, 1)
                    logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
                idx_Bl.append(sample_top_k_top_p(logits_BlV, top_k, top_p, gen))
                h_BChw = vqvae.embed_idx(idx_Bl[-1]).transpose(1, 2).reshape(B, self.Cvae, pn, pn)
                f_hat, next_BChw = vqvae.get_next_autoregressive_input(si, f_hat, h_BChw)
                if si < K - 1:
                    x_BlC = self.scale_tokens(si + 1, next_BChw.flatten(2).transpose(1, 2))
                    if guided:
                        x_BlC = x_BlC.repeat(2, 1, 1)
        finally:
            for b in self.blocks:
                b.attn.kv_caching(False)
            self.train(was_training)
        return idx_Bl, f_hat


def sample_top_k_top_p(logits_BlV: Tensor, top_k: int, top_p: float, generator: torch.Generator) -> Tensor:
    """One id per position from softmax(logits) restricted to the top-k ids and the top-p mass.

    ``top_k <= 0`` or ``>= V`` and ``top_p >= 1`` disable the respective filter; the most likely
    id always survives.
    """
    B, l, V = logits_BlV.shape
    logits = logits_BlV.float()
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs > top_p  # mass of strictly better ids already > top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    probs_NV = logits.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs_NV, 1, generator=generator).view(B, l)
