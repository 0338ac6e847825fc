"""Synthetic models and data for the benchmark: nothing is downloaded or read.

A VQVAE and a CLIP-style text encoder with random weights (the text encoder is written to a temp dir
and loaded through ``TextEncoder`` like a real one), random images and captions of random words, and
the presets that set their scale. The inputs come in three modes, so a table can split the cost:
- ``raw``: collated images + captions; tokenizer and text encoder run inside the step
  (what ``train_rater.py`` does without ``data.cache_dir``);
- ``cache``: what the feature-cache loader yields (ids + text features on the host); the step moves
  them to the device and rebuilds the teacher-forcing input from the ids (``data.cache_dir`` set);
- ``tokens``: ``TokenBatch`` already on the device: the step alone.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from alchemist.batch import TokenBatch
from alchemist.config import ModelConfig, RaterConfig, load_config, parse_overrides
from alchemist.data.tokens import Featurizer
from alchemist.models.vqvae import VQVAE

MODES = ("raw", "cache", "tokens")


@dataclass(frozen=True)
class TextSpec:
    """A CLIP text transformer with random weights and a word-level tokenizer of ``vocab`` ids."""
    width: int
    layers: int
    heads: int
    ffn: int
    vocab: int


@dataclass(frozen=True)
class Preset:
    name: str
    overrides: dict[str, Any]  # RaterConfig keys
    text: TextSpec
    caption_words: tuple[int, int]  # caption length range in words (truncated at model.text_max_len)
    score_bs: int
    warmup: int
    steps: int
    threads: int | None = None  # CPU intra-op threads (None: torch's default)


PRESETS = {
    # Paper scale: proxy d16 (width 1024, 16 blocks), rater d8, 256 px, 10 scales = 680 tokens, VAR's
    # tokenizer geometry, a 1024-wide 24-layer CLIP text tower (OpenCLIP ViT-H/14's), bs 64 + 64.
    "paper": Preset("paper", {}, TextSpec(width=1024, layers=24, heads=16, ffn=4096, vocab=1024),
                    caption_words=(40, 120), score_bs=256, warmup=3, steps=10),
    # Tiny, for a CPU: same code path, runs in well under two minutes on 2 cores.
    "cpu": Preset("cpu", {"depth": 2, "raterDepth": 1, "image_size": 32, "patch_size": 8, "patch_nums": (1, 2, 3, 4),
                          "vocab_size": 64, "Cvae": 8, "vae_ch": 32, "vae_ch_mult": (1, 2, 2, 4), "text_max_len": 32,
                          "bs": 8},
                  TextSpec(width=64, layers=2, heads=2, ffn=128, vocab=256),
                  # one thread: tiny models are per-op overhead bound, and a shared host's
                  # cores make extra threads wait on each other
                  caption_words=(8, 40), score_bs=32, warmup=3, steps=10, threads=1),
}


def bench_config(preset: Preset, workdir: str | Path, overrides: Sequence[str] = ()) -> RaterConfig:
    """The preset's RaterConfig (+ ``--key=value`` overrides); nothing is read from or written to disk
    except the random text encoder under ``workdir``."""
    base = {**preset.overrides, "text_enc_path": str(Path(workdir) / "text_encoder"),
            "local_out_dir_path": str(Path(workdir) / "runs"), "num_workers": 0, "progress": False,
            "wandb": "disabled", "caption_dropout": 0.0,
            "gamma_start": 0.97}  # time the common step: at γ = 1 lookahead has no signal and skips its passes
    base = {k: (list(v) if isinstance(v, tuple) else v) for k, v in base.items()}
    return load_config(RaterConfig, None, {**base, **parse_overrides(RaterConfig, list(overrides))})


# ----------------------------------------------------------------------------- random encoders, synthetic data
def text_model_config(spec: TextSpec, max_len: int):
    from transformers import CLIPTextConfig

    # CLIP puts end-of-text at the highest id; the pooled state is taken there
    return CLIPTextConfig(vocab_size=spec.vocab, hidden_size=spec.width, intermediate_size=spec.ffn,
                          num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                          max_position_embeddings=max_len, pad_token_id=0, bos_token_id=spec.vocab - 2,
                          eos_token_id=spec.vocab - 1)


def caption_words(spec: TextSpec) -> list[str]:
    """The tokenizer's words: ids 2 … vocab−3 (0 pad, 1 unk, then begin and end of text)."""
    return [f"w{i}" for i in range(spec.vocab - 4)]


def write_random_text_encoder(path: str | Path, spec: TextSpec, max_len: int, seed: int = 0) -> Path:
    """A local Hugging Face directory (CLIP text model with random weights + word-level tokenizer)
    that ``TextEncoder`` loads like a real one; no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    path = Path(path)
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(caption_words(spec))},
             "<bos>": spec.vocab - 2, "<eos>": spec.vocab - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", spec.vocab - 2), ("<eos>", spec.vocab - 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>", model_max_length=max_len).save_pretrained(path)
    torch.manual_seed(seed)
    CLIPTextModel(text_model_config(spec, max_len)).save_pretrained(path)
    return path


def random_tokenizer(mcfg: ModelConfig, device: torch.device | str, num_res_blocks: int = 2) -> VQVAE:
    """VAR's tokenizer architecture at the config's geometry, random weights, frozen like ``load_vqvae``'s."""
    vq = VQVAE(vocab_size=mcfg.vocab_size, z_channels=mcfg.Cvae, ch=mcfg.vae_ch, ch_mult=mcfg.vae_ch_mult,
               patch_nums=mcfg.patch_nums, num_res_blocks=num_res_blocks)
    return vq.eval().requires_grad_(False).to(device)


def synthetic_raw(n: int, image_size: int, words: list[str], length: tuple[int, int], seed: int,
                  pin: bool = False) -> dict:
    """A batch as ``collate_pairs`` yields it: images in [-1, 1] and captions of random words."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    img = torch.rand(n, 3, image_size, image_size, generator=g).mul_(2).sub_(1)
    caps = [" ".join(rng.choices(words, k=rng.randint(*length))) for _ in range(n)]
    return {"index_B": torch.arange(n), "ids": [str(i) for i in range(n)], "img_B3HW": img.pin_memory() if pin else img,
            "captions": caps, "skipped": []}


def featurize_in_chunks(featurize: Featurizer, raw: dict, chunk: int) -> TokenBatch:
    parts = [featurize({"img_B3HW": raw["img_B3HW"][i:i + chunk], "captions": raw["captions"][i:i + chunk]})
             for i in range(0, len(raw["captions"]), chunk)]
    return TokenBatch.cat(parts)


def cache_batch(tb: TokenBatch) -> dict:
    """What ``collate_cache`` yields for the same rows: int64 ids and fp32 text features on the host."""
    return {"index_B": torch.arange(tb.B), "ids": [str(i) for i in range(tb.B)], "idx_BL": tb.idx_BL.cpu(),
            "text": tb.text.to("cpu"), "skipped": []}
