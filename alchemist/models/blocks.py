"""The transformer design shared by the proxy and the rater (STAR-style, VAR backbone).

A sequence holds the tokens of all scales, coarse to fine. Every block is
pre-LN (no affine) → self-attention → cross-attention to the caption → tanh-GELU FFN, each a
residual branch with drop-path. Self-attention uses L2-normalised q, k with a learnable per-head
temperature and a 2D RoPE whose positions are normalised so that every scale's grid covers the
same range. Attention runs through ``F.scaled_dot_product_attention`` with explicit masks, so GPU
runs pick fused kernels; ``math_attention()`` forces the composite math kernel for passes that
need double backward or forward-mode AD.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from alchemist.batch import TextFeatures

LN_EPS = 1e-6
HEAD_DIM = 64  # width 64·depth with depth heads


# ----------------------------------------------------------------------------- attention kernel
@contextmanager
def math_attention():
    """Force SDPA's math backend: fused kernels support neither double backward nor jvp."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=LN_EPS)


# ----------------------------------------------------------------------------- scales, mask, RoPE
def scale_of_token(patch_nums: Sequence[int]) -> Tensor:
    """(L,) scale index of every token."""
    return torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(patch_nums)])


def block_causal_mask(patch_nums: Sequence[int]) -> Tensor:
    """(L, L) bool, True where query i may attend key j: j lies in i's own or a coarser scale."""
    s = scale_of_token(patch_nums)
    return s[:, None] >= s[None, :]


def rope_positions(patch_nums: Sequence[int], rope_norm: float) -> Tensor:
    """(L, 2) (y, x) of every token: cell centres of each pn×pn grid mapped onto [0, rope_norm].

    Centres (i + ½)/pn keep every scale symmetric in the range and place a coarse cell at the
    mean position of the finer cells it covers, so tokens about the same region get close angles.
    """
    pos = []
    for pn in patch_nums:
        c = (torch.arange(pn, dtype=torch.float64) + 0.5) / pn * rope_norm
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        pos.append(torch.stack([yy.flatten(), xx.flatten()], dim=-1))
    return torch.cat(pos)


def rope_angles(pos_L2: Tensor, head_dim: int, theta: float) -> Tensor:
    """(L, head_dim/2) rotation angle of each channel pair; y takes the first half of the pairs, x the second."""
    assert head_dim % 4 == 0, "2D RoPE needs head_dim divisible by 4"
    d_axis = head_dim // 2
    freqs = theta ** (-torch.arange(0, d_axis, 2, dtype=torch.float64) / d_axis)  # (head_dim/4,)
    return torch.cat([pos_L2[:, :1] * freqs, pos_L2[:, 1:] * freqs], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive channel pairs of x (..., L, d) by the angles whose cos/sin are (L, d/2)."""
    x_pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


# ----------------------------------------------------------------------------- layers
class SelfAttention(nn.Module):
    """Multi-head self-attention on L2-normalised q, k with a learned per-head temperature.

    Normalising q, k bounds the logits by the temperature (init 4, capped at 100), which keeps deep
    VAR-style models stable in low precision. With ``kv_caching(True)`` each call appends its keys
    and values, so scale-by-scale decoding attends to all earlier scales without a mask.
    """

    def __init__(self, C: int, num_heads: int):
        super().__init__()
        self.H = num_heads
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)
        self.log_scale_H = nn.Parameter(torch.full((num_heads,), math.log(4.0)))
        self.caching, self.cached_kv = False, None

    def kv_caching(self, enable: bool) -> None:
        self.caching, self.cached_kv = enable, None

    def forward(self, x_BLC: Tensor, cos_Ld: Tensor, sin_Ld: Tensor, mask_LL: Tensor | None,
                scale_ends: Sequence[int] | None = None) -> Tensor:
        """``scale_ends`` (the end of each scale's tokens) instead of a mask: block-causal attention as
        one unmasked call per scale, its queries against the keys of all scales up to it."""
        B, L, C = x_BLC.shape
        q, k, v = self.qkv(x_BLC).view(B, L, 3, self.H, C // self.H).permute(2, 0, 3, 1, 4).unbind(0)
        temp_H11 = self.log_scale_H.clamp(max=math.log(100.0)).exp().view(1, self.H, 1, 1)
        q = apply_rope(F.normalize(q, dim=-1), cos_Ld, sin_Ld) * temp_H11.to(q.dtype)
        k = apply_rope(F.normalize(k, dim=-1), cos_Ld, sin_Ld)
        if self.caching:
            if self.cached_kv is not None:
                k, v = torch.cat([self.cached_kv[0], k], dim=2), torch.cat([self.cached_kv[1], v], dim=2)
            self.cached_kv = (k, v)
        if scale_ends is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_LL, scale=1.0)
        else:
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, b:e], k[:, :, :e], v[:, :, :e], scale=1.0)
                             for b, e in zip((0, *scale_ends[:-1]), scale_ends)], dim=2)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    """Each sample's tokens attend to that sample's own caption states (padding masked out)."""

    def __init__(self, C: int, num_heads: int, text_dim: int):
        super().__init__()
        self.H = num_heads
        self.q = nn.Linear(C, C)
        self.kv = nn.Linear(text_dim, 2 * C)
        self.proj = nn.Linear(C, C)

    def text_kv(self, hidden_BTD: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, H, T, d); computed once per caption batch at generation time."""
        B, T, _ = hidden_BTD.shape
        k, v = self.kv(hidden_BTD).view(B, T, 2, self.H, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(self, x_BLC: Tensor, kv: tuple[Tensor, Tensor], mask_B11T: Tensor) -> Tensor:
        B, L, C = x_BLC.shape
        q = self.q(x_BLC).view(B, L, self.H, C // self.H).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask_B11T)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, C: int, mlp_ratio: float):
        super().__init__()
        hidden = round(C * mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(C, hidden), nn.Linear(hidden, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch for whole samples during training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x_BLC: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x_BLC
        keep_B11 = x_BLC.new_empty(x_BLC.shape[0], 1, 1).bernoulli_(1.0 - self.p)
        return x_BLC * keep_B11 / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class Block(nn.Module):
    """Pre-LN block: self-attention → cross-attention → FFN, each a drop-path residual."""

    def __init__(self, C: int, num_heads: int, text_dim: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.attn = SelfAttention(C, num_heads)
        self.cross = CrossAttention(C, num_heads, text_dim)
        self.ffn = FFN(C, mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x_BLC: Tensor, cos_Ld: Tensor, sin_Ld: Tensor, mask_LL: Tensor | None,
                text_kv: tuple[Tensor, Tensor], text_mask_B11T: Tensor, scale_ends: Sequence[int] | None = None) -> Tensor:
        x_BLC = x_BLC + self.drop_path(self.attn(layer_norm(x_BLC), cos_Ld, sin_Ld, mask_LL, scale_ends))
        x_BLC = x_BLC + self.drop_path(self.cross(layer_norm(x_BLC), text_kv, text_mask_B11T))
        return x_BLC + self.drop_path(self.ffn(layer_norm(x_BLC)))


def text_attn_mask(mask_BT: Tensor) -> Tensor:
    """(B, 1, 1, T) bool for SDPA. A caption with no real token attends to all positions rather
    than to none, which would give NaN and poison the whole batch."""
    mask_BT = mask_BT.bool()
    return (mask_BT | ~mask_BT.any(dim=1, keepdim=True))[:, None, None, :]


# ----------------------------------------------------------------------------- the shared trunk
class ScaleTransformer(nn.Module):
    """Multi-scale token embedding + block stack; the proxy adds a token head, the rater score heads.

    Sequence = [start token(s) from the pooled caption + learned start position] ++ Linear(Cvae→C)
    of the teacher-forcing input for scales 2..K, plus a learned embedding of each token's scale.
    Width 64·depth, depth heads, drop-path rising linearly to ``drop_path_rate`` over the blocks.
    """

    def __init__(self, depth: int, Cvae: int, patch_nums: Sequence[int], text_dim: int, causal: bool,
                 drop_path_rate: float, rope_norm: float, rope_theta: float, mlp_ratio: float):
        super().__init__()
        self.depth, self.C, self.num_heads = depth, HEAD_DIM * depth, depth
        self.Cvae, self.text_dim = Cvae, text_dim
        self.patch_nums = tuple(patch_nums)
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends = []
        cur = 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        C = self.C

        self.text_proj = nn.Linear(text_dim, C)  # pooled caption → start token
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.word_embed = nn.Linear(Cvae, C)
        self.lvl_embed = nn.Parameter(torch.zeros(len(self.patch_nums), C))
        self.register_buffer("lvl_L", scale_of_token(self.patch_nums), persistent=False)
        self.register_buffer("attn_mask_LL", block_causal_mask(self.patch_nums) if causal else None,
                             persistent=False)
        angles = rope_angles(rope_positions(self.patch_nums, rope_norm), HEAD_DIM, rope_theta)
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)

        self.scale_ends = tuple(e for _, e in self.begin_ends)
        self.attn_by_scale = False  # set_attn_impl("scales")
        self.drop_path_rate = drop_path_rate
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(C, self.num_heads, text_dim, mlp_ratio, dpr[i]) for i in range(depth))

    def init_weights(self) -> None:
        """VAR's rule: trunc-normal(std √(1/3C)) for linear layers and embeddings, zero biases, and
        the output projection of every residual branch divided by √(2·depth) so the residual
        stream starts near identity."""
        std = math.sqrt(1 / self.C / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.lvl_embed, std=std)
        for b in self.blocks:
            for proj in (b.attn.proj, b.cross.proj, b.ffn.fc2):
                proj.weight.data.div_(math.sqrt(2 * self.depth))

    def set_attn_impl(self, impl: str) -> None:
        """``mask``: one SDPA call with the block-causal mask, which no flash kernel takes; ``scales``: one
        unmasked call per scale (flash-eligible, 62 % of the masked call's products at paper scale).
        The same attention either way; a model without a mask (the rater) ignores it."""
        if impl not in ("mask", "scales"):
            raise ValueError(f"attention implementation must be mask or scales, got {impl!r}")
        self.attn_by_scale = impl == "scales"

    # -- embedding
    def start_tokens(self, pooled_BD: Tensor) -> Tensor:
        """(B, first_l, C) input of the first scale."""
        sos_B1C = self.text_proj(pooled_BD)[:, None, :]
        return sos_B1C + self.pos_start + self.lvl_embed[0]

    def scale_tokens(self, si: int, x_BlCvae: Tensor) -> Tensor:
        """(B, pn², C) input of scale si ≥ 1 from its teacher-forcing features."""
        return self.word_embed(x_BlCvae) + self.lvl_embed[si]

    def embed(self, x_BLC: Tensor, pooled_BD: Tensor) -> Tensor:
        word_BLC = self.word_embed(x_BLC) + self.lvl_embed[self.lvl_L[self.first_l:]]
        return torch.cat([self.start_tokens(pooled_BD), word_BLC], dim=1)

    # -- trunk
    def features(self, x_BLC: Tensor, text: TextFeatures) -> Tensor:
        """(B, L, C) last-block states (before any final norm)."""
        return self.trunk(self.embed(x_BLC, text.pooled_BD), text, self.rope_cos, self.rope_sin)

    def trunk(self, h_BLC: Tensor, text: TextFeatures, cos_Ld: Tensor, sin_Ld: Tensor) -> Tensor:
        """The block stack over already-embedded tokens with their rotary angles."""
        text_mask = text_attn_mask(text.mask_BT)
        mask, ends = self.attn_mask_LL, None
        if self.attn_by_scale and mask is not None:
            mask, ends = None, self.scale_ends
        for b in self.blocks:
            h_BLC = b(h_BLC, cos_Ld, sin_Ld, mask, b.cross.text_kv(text.hidden_BTD), text_mask, ends)
        return h_BLC


def compile_blocks(model: nn.Module, backend: str) -> nn.Module:
    """``torch.compile`` each block in place (``model.compile``; "" leaves the model eager). Blocks share
    one compiled graph; the weights' names do not change, so checkpoints stay interchangeable."""
    if backend:
        for b in model.blocks:
            b.compile(backend=backend)
    return model
