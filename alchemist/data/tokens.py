"""Raw (image, caption) batches -> TokenBatch with the frozen tokenizer and text encoder."""
from __future__ import annotations

import contextlib

import torch

from alchemist.batch import TokenBatch


class Featurizer:
    """Encodes a collated batch on ``device``: multi-scale ids, teacher-forcing input, text features.

    A batch read from the feature cache already carries ``idx_BL`` and ``text``; only the cheap
    teacher-forcing input is rebuilt from the ids (no image encoder, no text encoder).
    ``amp_dtype`` (``model.encoder_amp``): run the tokenizer's encoder and the text encoder under
    autocast; the tokens are still chosen in fp32 (the quantiser turns autocast off), but features near a
    tie between two codes may pick the other one, so such tokens differ a little from fp32 ones."""

    def __init__(self, vqvae, text_encoder, device: torch.device, amp_dtype: torch.dtype | None = None):
        self.vqvae, self.text_encoder, self.device = vqvae, text_encoder, device
        self.amp_dtype = amp_dtype
        self.scale_sizes = [pn * pn for pn in vqvae.patch_nums]

    def _encoders(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def __call__(self, raw: dict) -> TokenBatch | None:
        if "idx_BL" in raw:
            idx_BL = raw["idx_BL"].to(self.device, non_blocking=True).long()
            text = raw["text"].to(self.device)
        else:
            img_B3HW = raw["img_B3HW"]
            if img_B3HW.shape[0] == 0:
                return None
            img_B3HW = img_B3HW.to(self.device, non_blocking=True)
            with self._encoders():
                idx_BL = torch.cat(self.vqvae.img_to_idxBl(img_B3HW), dim=1)
                text = self.text_encoder(raw["captions"]).to(self.device)
        if idx_BL.shape[0] == 0:
            return None
        x_BLC, final_BlC = self.vqvae.idxBl_to_inputs(list(idx_BL.split(self.scale_sizes, dim=1)))
        return TokenBatch(idx_BL, x_BLC, text, final_BlC)
