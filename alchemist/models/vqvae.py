"""VAR's residual multi-scale VQVAE: image ↔ K token maps of growing size (1×1 … h×w).

Behaviour and parameter names follow VAR's `VectorQuantizer2` / `VQVAE`, so the released
`vae_ch160v4096z32.pth` loads with ``strict=True`` and yields the same tokens
(spec: docs/method.md §4). The token pyramid is built by quantising a residual:
each scale codes what the coarser scales left over, upsampled to the latent size and mixed by φ.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alchemist.models.vqvae_blocks import Decoder, Encoder
from alchemist.utils.checkpoint import torch_load
from alchemist.utils.errors import UserError


class Phi(nn.Conv2d):
    """φ(h) = (1−r)·h + r·conv3×3(h): a residual refinement of each upsampled token map."""

    def __init__(self, channels: int, quant_resi: float):
        super().__init__(channels, channels, 3, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul(self.resi_ratio)


class PhiPartiallyShared(nn.Module):
    """`n` φ convs shared by K scales: scale si takes the one whose tick is nearest si/(K−1)."""

    def __init__(self, channels: int, quant_resi: float, n: int, num_scales: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, quant_resi) for _ in range(n))
        ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)
        self.phi_of_scale = [int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales)]

    def __getitem__(self, si: int) -> Phi:
        return self.qresi_ls[self.phi_of_scale[si]]


class QuantOutput(NamedTuple):
    idx_Bl: list[torch.Tensor]  # per scale (B, pn*pn)
    fhat_per_scale: list[torch.Tensor]  # accumulated f̂ after each scale, (B, C, h, w)
    z_NC: torch.Tensor  # every vector that was quantised (all scales): donors for dead-code restart


class ResidualQuantizer(nn.Module):
    """VAR's `VectorQuantizer2` (no z-normalisation): codebook, φ convs and usage statistics."""

    def __init__(self, vocab_size: int, Cvae: int, beta: float, quant_resi: float, share_quant_resi: int,
                 patch_nums: Sequence[int]):
        super().__init__()
        self.vocab_size, self.Cvae, self.beta = vocab_size, Cvae, beta
        self.patch_nums = tuple(patch_nums)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.record_hit = 0
        self.quant_resi = PhiPartiallyShared(Cvae, quant_resi, share_quant_resi, len(self.patch_nums))
        self.embedding = nn.Embedding(vocab_size, Cvae)
        self.register_load_state_dict_pre_hook(_keep_own_ema_on_scale_mismatch)

    # ------------------------------------------------------------------ scale helpers
    def _is_last(self, si: int) -> bool:
        return si == len(self.patch_nums) - 1

    def _down(self, x_BChw: torch.Tensor, si: int) -> torch.Tensor:
        """Area-downsample to scale si (identity at the last scale, as in VAR)."""
        pn = self.patch_nums[si]
        return x_BChw if self._is_last(si) else F.interpolate(x_BChw, size=(pn, pn), mode="area")

    def _h_full(self, h_BCpp: torch.Tensor, si: int) -> torch.Tensor:
        """Token map of scale si → its φ-mixed contribution at full latent size."""
        H = self.patch_nums[-1]
        if not self._is_last(si):
            h_BCpp = F.interpolate(h_BCpp, size=(H, H), mode="bicubic")
        return self.quant_resi[si](h_BCpp)

    def idx_to_h(self, idx_Bl: torch.Tensor, si: int) -> torch.Tensor:
        """Ids of scale si (B, pn*pn) → code map (B, C, pn, pn)."""
        pn = self.patch_nums[si]
        return self.embedding(idx_Bl).transpose(1, 2).reshape(idx_Bl.shape[0], self.Cvae, pn, pn)

    @torch.no_grad()
    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Nearest code by squared L2, expanded as |z|² + |e|² − 2z·e exactly like VAR (same argmin ties)."""
        e_VC = self.embedding.weight
        d_NV = z_NC.square().sum(1, keepdim=True) + e_VC.square().sum(1)
        d_NV.addmm_(z_NC, e_VC.T, alpha=-2, beta=1)
        return d_NV.argmin(dim=1)

    # ------------------------------------------------------------------ encode / decode
    def residual_quantize(self, f_BChw: torch.Tensor) -> QuantOutput:
        """Code f scale by scale; f̂ keeps gradients to the codebook and φ (for the VQ loss)."""
        B, C, H, W = f_BChw.shape
        if (H, W) != (self.patch_nums[-1],) * 2:
            raise ValueError(f"latent is {H}x{W} but the last patch_num is {self.patch_nums[-1]}: the image size must "
                             f"be patch_nums[-1] x the tokenizer's downsampling factor")
        f_rest = f_BChw.detach().float()
        f_hat = torch.zeros_like(f_rest)
        idx_Bl, fhat_per_scale, z_NCs = [], [], []
        with torch.autocast(f_rest.device.type, enabled=False):  # token choice in fp32, as VAR
            for si, pn in enumerate(self.patch_nums):
                z_NC = self._down(f_rest, si).permute(0, 2, 3, 1).reshape(-1, C)
                idx_N = self.nearest(z_NC)
                h_BChw = self._h_full(self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2), si)
                f_hat = f_hat + h_BChw
                f_rest = f_rest - h_BChw.detach()
                idx_Bl.append(idx_N.view(B, pn * pn))
                fhat_per_scale.append(f_hat)
                z_NCs.append(z_NC)
        return QuantOutput(idx_Bl, fhat_per_scale, torch.cat(z_NCs))

    def idxBl_to_fhat(self, idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        f_hat = 0
        for si, idx in enumerate(idx_Bl):
            f_hat = f_hat + self._h_full(self.idx_to_h(idx, si), si)
        return f_hat

    def idxBl_to_var_input(self, idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """f̂ after scale si, area-downsampled to scale si+1, for si < K−1; concatenated → (B, L−pn₀², C)."""
        return self.idxBl_to_inputs(idx_Bl)[0]

    def idxBl_to_inputs(self, idx_Bl: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher-forcing input (``idxBl_to_var_input``) and, from the same pass, the finished f̂
        as pn_K² tokens (B, pn_K², C): the only place the last scale's codes appear."""
        f_hat, next_BlC = 0, []
        for si in range(len(self.patch_nums)):
            f_hat = f_hat + self._h_full(self.idx_to_h(idx_Bl[si], si), si)
            if si < len(self.patch_nums) - 1:
                next_BlC.append(self._down(f_hat, si + 1).flatten(2).transpose(1, 2))
        return torch.cat(next_BlC, dim=1), f_hat.flatten(2).transpose(1, 2)

    def get_next_autoregressive_input(self, si: int, f_hat_BChw: torch.Tensor | None,
                                      h_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Generation step: add scale si's codes (B,C,pn,pn) to f̂ (None = zeros); next input is f̂ at scale si+1."""
        h_full = self._h_full(h_BChw, si)
        f_hat_BChw = h_full if f_hat_BChw is None else f_hat_BChw + h_full
        return f_hat_BChw, (f_hat_BChw if self._is_last(si) else self._down(f_hat_BChw, si + 1))

    # ------------------------------------------------------------------ training
    def forward(self, f_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, QuantOutput]:
        """Training path → (straight-through f̂, VQ loss, hits per scale (K, V), quantiser output)."""
        q = self.residual_quantize(f_BChw)
        f_BChw = f_BChw.float()
        f_detached = f_BChw.detach()
        vq_loss = sum(self.beta * F.mse_loss(fh.detach(), f_BChw) + F.mse_loss(fh, f_detached)
                      for fh in q.fhat_per_scale) / len(self.patch_nums)
        hit_SV = torch.stack([idx.flatten().bincount(minlength=self.vocab_size).float() for idx in q.idx_Bl])
        if self.training:
            self._update_ema(hit_SV)
        f_hat_ste = f_BChw + (q.fhat_per_scale[-1] - f_BChw).detach()
        return f_hat_ste, vq_loss, hit_SV, q

    @torch.no_grad()
    def _update_ema(self, hit_SV: torch.Tensor) -> None:
        momentum = 0.0 if self.record_hit == 0 else 0.9 if self.record_hit < 100 else 0.99
        self.ema_vocab_hit_SV.mul_(momentum).add_(hit_SV, alpha=1 - momentum)
        self.record_hit += 1

    @torch.no_grad()
    def usages(self, batch_size: int) -> list[float]:
        """Per scale: fraction of codes whose EMA hit count is ≥ 8 % of a uniform share of B·pn² tokens."""
        return [(self.ema_vocab_hit_SV[si] >= 0.08 * batch_size * pn * pn / self.vocab_size).float().mean().item()
                for si, pn in enumerate(self.patch_nums)]


def _keep_own_ema_on_scale_mismatch(module: ResidualQuantizer, state_dict, prefix, *_):
    """A checkpoint made for another number of scales carries a (K', V) usage buffer; keep ours."""
    key = prefix + "ema_vocab_hit_SV"
    if key in state_dict and state_dict[key].shape != module.ema_vocab_hit_SV.shape:
        state_dict[key] = module.ema_vocab_hit_SV.clone()


class TokenizerOutput(NamedTuple):
    rec_B3HW: torch.Tensor  # unclamped reconstruction from all scales
    vq_loss: torch.Tensor
    usages: list[float]
    hit_SV: torch.Tensor  # code hits of this batch per scale
    z_NC: torch.Tensor  # the vectors that were quantised


class VQVAE(nn.Module):
    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2, beta: float = 0.25,
                 quant_resi: float = 0.5, share_quant_resi: int = 4,
                 patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)):
        super().__init__()
        patch_nums, ch_mult = tuple(int(p) for p in patch_nums), tuple(int(m) for m in ch_mult)
        if len(patch_nums) < 2 or list(patch_nums) != sorted(set(patch_nums)):
            raise UserError(f"patch_nums must be at least 2 strictly increasing sizes, got {list(patch_nums)}")
        if ch % 32:
            raise UserError(f"ch must be a multiple of 32 (GroupNorm uses 32 groups), got {ch}")
        if share_quant_resi < 1:
            raise UserError(f"share_quant_resi must be >= 1 (number of φ convs), got {share_quant_resi}")
        self.config = dict(vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=ch_mult,
                           num_res_blocks=num_res_blocks, beta=beta, quant_resi=quant_resi,
                           share_quant_resi=share_quant_resi, patch_nums=patch_nums)
        self.vocab_size, self.Cvae, self.patch_nums = vocab_size, z_channels, patch_nums
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels)
        self.quantize = ResidualQuantizer(vocab_size, z_channels, beta, quant_resi, share_quant_resi, patch_nums)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, padding=1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    def img_to_f(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(img_B3HW))

    @torch.no_grad()
    def img_to_idxBl(self, img_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1,1] → token ids per scale, each (B, pn*pn). Every sample is coded independently."""
        return self.quantize.residual_quantize(self.img_to_f(img_B3HW)).idx_Bl

    @torch.no_grad()
    def idxBl_to_var_input(self, idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of scales 2..K, (B, L − patch_nums[0]², Cvae)."""
        return self.quantize.idxBl_to_var_input(idx_Bl)

    @torch.no_grad()
    def idxBl_to_inputs(self, idx_Bl: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher-forcing input, finished f̂ as pn_K² tokens): what the proxy and the rater read."""
        return self.quantize.idxBl_to_inputs(idx_Bl)

    @torch.no_grad()
    def idxBl_to_img(self, idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.fhat_to_img(self.quantize.idxBl_to_fhat(idx_Bl))

    def get_next_autoregressive_input(self, si: int, f_hat_BChw: torch.Tensor | None,
                                      h_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantize.get_next_autoregressive_input(si, f_hat_BChw, h_BChw)

    def embed_idx(self, idx: torch.Tensor) -> torch.Tensor:
        """Codebook lookup, (...) ids → (..., Cvae)."""
        return self.quantize.embedding(idx)

    def fhat_to_img(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp_(-1, 1)

    def forward_with_stats(self, img_B3HW: torch.Tensor) -> TokenizerOutput:
        """Training path plus what the trainer needs for usage statistics and dead-code restart."""
        f_hat, vq_loss, hit_SV, q = self.quantize(self.img_to_f(img_B3HW))
        rec_B3HW = self.decoder(self.post_quant_conv(f_hat))
        return TokenizerOutput(rec_B3HW, vq_loss, self.quantize.usages(img_B3HW.shape[0]), hit_SV, q.z_NC)

    def forward(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """Training path → (reconstruction, VQ loss, per-scale codebook usage fractions)."""
        out = self.forward_with_stats(img_B3HW)
        return out.rec_B3HW, out.vq_loss, out.usages


class TokenizerMismatch(UserError):
    """A stored tokenizer was trained with other settings than the ones asked for."""

    def __init__(self, path: Path, clash: dict[str, tuple[Any, Any]]):
        self.path, self.clash = path, clash
        super().__init__(f"tokenizer {str(path)!r} was trained with "
                         + ", ".join(f"{k}={a}" for k, (a, _) in clash.items()) + " but "
                         + ", ".join(f"{k}={b}" for k, (_, b) in clash.items()) + " was asked for")


def load_vqvae(path: str | Path, **model_kwargs) -> VQVAE:
    """Frozen tokenizer from a local file: VAR's plain state dict, or our {"state_dict", "config"} checkpoint.

    ``model_kwargs`` must agree with a stored config (TokenizerMismatch names what differs) and build
    a plain state dict's model (none stored: VAR's defaults apply). A file that is not a tokenizer
    checkpoint is a CheckpointError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer weights not found at {path}; weights are never downloaded: put VAR's "
                                f"vae_ch160v4096z32.pth there or train one with scripts/train_tokenizer.py")
    ckpt = torch_load(path, "tokenizer checkpoint", weights_only=True)
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        stored = ckpt.get("config", {})
        as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        clash = {k: (stored[k], v) for k, v in model_kwargs.items() if k in stored and as_tuple(stored[k]) != as_tuple(v)}
        if clash:
            raise TokenizerMismatch(path, clash)
        state_dict, kwargs = ckpt["state_dict"], {**stored, **model_kwargs}
    else:
        state_dict, kwargs = ckpt, dict(model_kwargs)
    model = VQVAE(**kwargs)
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, AttributeError, TypeError) as e:  # wrong shapes or keys; not a state dict at all
        first = (str(e).splitlines()[1:] or [str(e)])[0].strip()[:300]
        raise UserError(f"{path} does not fit a VQVAE built with {kwargs or 'the default VAR config'}; pass the "
                         f"matching vocab_size / z_channels / ch / ch_mult ({first})") from None
    return model.eval().requires_grad_(False)
