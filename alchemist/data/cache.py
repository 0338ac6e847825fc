"""Feature cache: token ids and text features encoded once, read back by memory-mapped shards.

Layout of a cache folder (one per table, tokenizer and text encoder):
  meta.json                     table ids in order, shard size, encoders, dtype
  empty.pt                      text features of "" (caption dropout reads these)
  shard_00000.{idx,hidden,len,pooled,ok}.npy, shard_00000.done   one shard = ``shard_size`` rows
A shard's ``.done`` marker is written last, so a killed run redoes at most the shards in flight,
and ranks share the work by shard (shard k belongs to rank k mod world).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from alchemist.batch import TextFeatures
from alchemist.data.pairs import DataError, PairsDataset, collate_pairs, drops_caption
from alchemist.utils.io import atomic_open, atomic_torch_save

_PARTS = ("idx", "hidden", "len", "pooled", "ok")


def _shard_path(root: Path, k: int, part: str) -> Path:
    return root / (f"shard_{k:05d}.{part}" + ("" if part == "done" else ".npy"))


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, arr)


@torch.no_grad()
def build_cache(table: pd.DataFrame, cache_dir: str | Path, vqvae, text_encoder, image_size: int,
                shard_size: int = 4096, batch_size: int = 64, num_workers: int = 0, dtype: str = "float16",
                rank: int = 0, world: int = 1, device: torch.device | None = None, progress: bool = True) -> Path:
    """Encode this rank's unfinished shards of ``table`` (resumable, shardable across ranks)."""
    root = Path(cache_dir)
    device = device or torch.device("cpu")
    meta = {"ids": table["id"].astype(str).tolist(), "shard_size": shard_size, "dtype": dtype,
            "patch_nums": list(vqvae.patch_nums), "text": text_encoder.cache_key(), "image_size": image_size}
    meta_path = root / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old != meta:
            raise DataError(f"feature cache {str(root)!r} was built for another table or encoders; "
                            f"use a new data.cache_dir or delete the folder")
    elif rank == 0:
        with atomic_open(meta_path) as f:
            json.dump(meta, f)
        atomic_torch_save(text_encoder([""]).to("cpu"), root / "empty.pt")
    n_shards = -(-len(table) // shard_size)
    mine = [k for k in range(n_shards) if k % world == rank and not _shard_path(root, k, "done").exists()]
    np_dtype = np.dtype(dtype)
    dataset = PairsDataset(table, image_size)
    for k in tqdm(mine, desc=f"cache rank {rank}", disable=not progress):
        rows = list(range(k * shard_size, min(len(table), (k + 1) * shard_size)))
        loader = DataLoader(torch.utils.data.Subset(dataset, rows), batch_size=batch_size,
                            num_workers=num_workers, collate_fn=collate_pairs)
        L = sum(p * p for p in vqvae.patch_nums)
        idx = np.zeros((len(rows), L), np.int32)
        ok = np.zeros(len(rows), bool)
        lens = np.zeros(len(rows), np.int32)
        hidden, pooled = {}, {}
        for raw in loader:
            if raw["img_B3HW"].shape[0] == 0:
                continue
            local = (raw["index_B"] - k * shard_size).numpy()
            idx_BL = torch.cat(vqvae.img_to_idxBl(raw["img_B3HW"].to(device)), 1)
            text = text_encoder(raw["captions"])
            idx[local] = idx_BL.cpu().numpy()
            ok[local] = True
            for j, r in enumerate(local):
                n = int(text.mask_BT[j].sum())
                lens[r] = n
                hidden[r] = text.hidden_BTD[j, :n].float().cpu().numpy()
                pooled[r] = text.pooled_BD[j].float().cpu().numpy()
        T = max([h.shape[0] for h in hidden.values()], default=1)
        D = text_encoder.width
        hid = np.zeros((len(rows), T, D), np_dtype)
        pool = np.zeros((len(rows), D), np_dtype)
        for r, h in hidden.items():
            hid[r, :h.shape[0]] = h
            pool[r] = pooled[r]
        for part, arr in zip(_PARTS, (idx, hid, lens, pool, ok)):
            _save_npy(_shard_path(root, k, part), arr)
        _shard_path(root, k, "done").touch()
    return root


class CacheDataset(Dataset):
    """Items of a finished cache, aligned with ``table``'s rows; same skips and caption dropout as
    ``PairsDataset``, so a run reads identical batches from either."""

    def __init__(self, cache_dir: str | Path, table: pd.DataFrame, caption_dropout: float = 0.0, seed: int = 0):
        self.root = Path(cache_dir)
        meta_path = self.root / "meta.json"
        if not meta_path.exists():
            raise DataError(f"no feature cache in {str(self.root)!r}; build it with scripts/precompute.py")
        meta = json.loads(meta_path.read_text())
        if meta["ids"] != table["id"].astype(str).tolist():
            raise DataError(f"feature cache {str(self.root)!r} does not match the table's ids; rebuild it")
        self.shard_size, self.ids = meta["shard_size"], meta["ids"]
        n_shards = -(-len(self.ids) // self.shard_size)
        missing = [k for k in range(n_shards) if not _shard_path(self.root, k, "done").exists()]
        if missing:
            raise DataError(f"feature cache {str(self.root)!r} is incomplete ({len(missing)} of {n_shards} shards "
                            f"missing); rerun scripts/precompute.py to finish it")
        self._shards: dict[int, dict[str, np.ndarray]] = {}
        self.empty: TextFeatures = torch.load(self.root / "empty.pt", weights_only=False)
        self.caption_dropout, self.seed = caption_dropout, seed
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    def _shard(self, k: int) -> dict[str, np.ndarray]:
        if k not in self._shards:  # opened lazily, per worker process
            self._shards[k] = {p: np.load(_shard_path(self.root, k, p), mmap_mode="r") for p in _PARTS}
        return self._shards[k]

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        s, r = self._shard(i // self.shard_size), i % self.shard_size
        item = {"index": i, "id": self.ids[i], "error": None if s["ok"][r] else "unreadable image"}
        if drops_caption(self.seed, int(self._epoch[0]), i, self.caption_dropout):
            e = self.empty
            item.update(hidden_TD=e.hidden_BTD[0][e.mask_BT[0]].float(), pooled_D=e.pooled_BD[0].float())
        else:
            n = int(s["len"][r])
            item.update(hidden_TD=torch.from_numpy(np.array(s["hidden"][r, :n], np.float32)),
                        pooled_D=torch.from_numpy(np.array(s["pooled"][r], np.float32)))
        item["idx_L"] = torch.from_numpy(np.array(s["idx"][r], np.int64))
        return item


def collate_cache(items: list[dict]) -> dict:
    """Like ``collate_pairs``: good items stacked (text padded to the longest), failures in ``skipped``."""
    ok = [it for it in items if it["error"] is None]
    T = max([it["hidden_TD"].shape[0] for it in ok], default=1)
    D = ok[0]["pooled_D"].shape[0] if ok else 1
    hidden = torch.zeros(len(ok), T, D)
    mask = torch.zeros(len(ok), T, dtype=torch.bool)
    for j, it in enumerate(ok):
        n = it["hidden_TD"].shape[0]
        hidden[j, :n], mask[j, :n] = it["hidden_TD"], True
    pooled = torch.stack([it["pooled_D"] for it in ok]) if ok else torch.zeros(0, D)
    idx = torch.stack([it["idx_L"] for it in ok]) if ok else torch.zeros(0, 1, dtype=torch.long)
    return {"index_B": torch.tensor([it["index"] for it in ok], dtype=torch.long), "ids": [it["id"] for it in ok],
            "idx_BL": idx, "text": TextFeatures(hidden, mask, pooled),
            "skipped": [(it["id"], it["error"]) for it in items if it["error"] is not None]}
