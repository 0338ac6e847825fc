"""Build the frozen encoders and the trainable models from a ModelConfig (shared by all entry points)."""
from __future__ import annotations

from pathlib import Path

import torch

from alchemist.config import ConfigError, ModelConfig
from alchemist.models.blocks import compile_blocks
from alchemist.models.proxy import Proxy
from alchemist.models.rater import Rater
from alchemist.models.text import TextEncoder
from alchemist.models.vqvae import VQVAE, TokenizerMismatch, load_vqvae
from alchemist.utils.checkpoint import torch_load


def tokenizer_path(mcfg: ModelConfig) -> Path:
    """Where ``model.vae_ckpt`` points: itself when absolute, else inside ``model.ckpt_path`` (or relative
    to the working directory when no ckpt_path is set). The working directory is never searched
    first, so a stray file of the same name there cannot stand in for the configured one."""
    p = Path(mcfg.vae_ckpt)
    if p.is_absolute() or not mcfg.ckpt_path:
        return p
    return Path(mcfg.ckpt_path) / p


def build_tokenizer(mcfg: ModelConfig, device: torch.device) -> VQVAE:
    """The frozen multi-scale tokenizer; its geometry must match the config's."""
    path = tokenizer_path(mcfg)
    if not path.is_file():
        inside = "" if path == Path(mcfg.vae_ckpt) else f" inside model.ckpt_path={mcfg.ckpt_path!r}"
        raise FileNotFoundError(f"the tokenizer model.vae_ckpt={mcfg.vae_ckpt!r}{inside} does not exist "
                                f"({str(path)!r}); weights are never downloaded: point model.ckpt_path / "
                                "model.vae_ckpt at a local file (VAR's vae_ch160v4096z32.pth, or one made by "
                                "scripts/train_tokenizer.py)")
    try:
        vq = load_vqvae(path, vocab_size=mcfg.vocab_size, z_channels=mcfg.Cvae, ch=mcfg.vae_ch,
                        ch_mult=mcfg.vae_ch_mult, patch_nums=mcfg.patch_nums)
    except TokenizerMismatch as e:
        keys = {"vocab_size": "model.vocab_size", "z_channels": "model.Cvae", "ch": "model.vae_ch",
                "ch_mult": "model.vae_ch_mult", "patch_nums": "model.patch_nums"}
        name = lambda k: keys.get(k, k)  # noqa: E731
        raise ConfigError(f"tokenizer {str(path)!r} was trained with "
                          + ", ".join(f"{name(k)}={a}" for k, (a, _) in e.clash.items()) + " but the config sets "
                          + ", ".join(f"{name(k)}={b}" for k, (_, b) in e.clash.items())
                          + ": set them to match, or point model.vae_ckpt at the tokenizer for this config") from None
    got = (tuple(vq.patch_nums), vq.vocab_size, vq.Cvae, vq.downsample)
    want = (tuple(mcfg.patch_nums), mcfg.vocab_size, mcfg.Cvae, mcfg.patch_size)
    if got != want:
        raise ConfigError(f"tokenizer {str(path)!r} has (patch_nums, vocab_size, Cvae, patch_size) = {got} but the "
                          f"config asks for {want}: set model.* to match the tokenizer")
    return vq.to(device)


def build_text_encoder(mcfg: ModelConfig, device: torch.device) -> TextEncoder:
    return TextEncoder(mcfg.text_enc_path, max_len=mcfg.text_max_len, device=device)


def build_proxy(mcfg: ModelConfig, text_dim: int, device: torch.device) -> Proxy:
    """The proxy with ``model.attn_impl`` and, with ``model.compile``, compiled blocks."""
    proxy = Proxy.from_config(mcfg, text_dim)
    if mcfg.proxy_init:
        path = Path(mcfg.proxy_init)
        if not path.is_file():
            raise FileNotFoundError(f"model.proxy_init {str(path)!r} does not exist (a proxy checkpoint file)")
        state = torch_load(path, "proxy checkpoint (model.proxy_init)")
        proxy.load_state_dict(state.get("proxy", state.get("state_dict", state)))
    return compile_blocks(proxy.to(device), mcfg.compile)


def build_rater(mcfg: ModelConfig, text_dim: int, device: torch.device, double_softmax: bool = False) -> Rater:
    return compile_blocks(Rater.from_config(mcfg, text_dim, double_softmax=double_softmax).to(device), mcfg.compile)
