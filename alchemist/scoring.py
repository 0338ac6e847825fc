"""Rate every pair of a table with a trained rater: sharded across ranks, resumable, ranked.

The ranking ``score`` is the instance logit, a function of the pair alone, so it does not move
with batch size, order or the number of GPUs (docs/method.md, "Where this project departs"). The
official score, softmax over a batch of 256 × the group scalar, is kept as ``official_score`` for
comparison; it is computed over consecutive fixed 256-row batches of each shard, as the official
script batched.

Rows are cut into fixed shards by position; shard k belongs to rank k mod world. A finished shard
is written atomically to ``<out>.shards/shard_XXXXX.parquet``, so a rerun skips it and a crash
loses at most the shard in flight. When every rank is done, rank 0 joins the shards with the
input columns, ranks them and writes the ratings file; skipped rows go to ``<out stem>.skipped.csv``.
The Ray engine (``scoring_ray.py``, one part per input shard) loads and batches through the same
``build_scorer``, ``pool_rows`` and ``shard_frame``.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from alchemist.build import build_rater, build_text_encoder, build_tokenizer
from alchemist.config import ConfigError, RaterConfig, config_from_dict, config_to_dict, parse_overrides
from alchemist.data.cache import CacheDataset, collate_cache
from alchemist.data.pairs import DataError, PairsDataset, SkipLog, collate_pairs, load_pairs, reason_kind
from alchemist.data.tokens import Featurizer
from alchemist.models.blocks import compile_blocks
from alchemist.models.rater import Rater, RaterEnsemble
from alchemist.ratings import table_format, write_ratings
from alchemist.runtime import amp_dtype, autocast, encoder_amp_dtype
from alchemist.utils.checkpoint import CheckpointError, latest_checkpoint, state_sha1, torch_load
from alchemist.utils.dist import state as dist_state
from alchemist.utils.errors import UserError
from alchemist.utils.io import atomic_open, check_writable, remove_stale_temps

OFFICIAL_BATCH = 256  # the official scoring script's batch size: official_score depends on it
DEFAULT_SHARD_ROWS = 16384  # a multiple of OFFICIAL_BATCH; about a minute of one GPU's work
SCORE_COLUMNS = ("score", "official_score", "rank")
# the model is fixed by the checkpoint; only where its files live, and how it runs, may change
MODEL_PATH_KEYS = ("model.ckpt_path", "model.vae_ckpt", "model.text_enc_path")
RUN_KEYS = ("optim.fp16", "model.attn_impl", "model.compile", "model.encoder_amp")
TRAINING_ONLY = {"train_csv_path": "", "val_csv_path": "", "cache_dir": "", "caption_dropout": 0.0}


# ----------------------------------------------------------------------------- loading
def load_rater(ckpt: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[Rater | RaterEnsemble, RaterConfig]:
    """A checkpoint file or a run dir (its latest checkpoint) -> the eval-mode rater (an ensemble when the
    distillation stage kept several fits) and its config.

    The text width is read from the weights, so no text encoder is loaded here. The rater is built
    without the trainer's optional second softmax: ``official_score`` is what the official scoring
    script wrote, softmax_inst × group.
    """
    path = Path(ckpt)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"run dir {str(path)!r} has no checkpoints/step_*.pt; train a rater first "
                                    "or pass a checkpoint file")
        path = found
    elif not path.is_file():
        raise FileNotFoundError(f"rater checkpoint {str(path)!r} does not exist; pass a run dir or a .pt file "
                                "written by train_rater.py")
    state = torch_load(path, "rater checkpoint")
    if not (isinstance(state, dict) and "rater" in state and "config" in state):
        raise CheckpointError(f"{str(path)!r} is not a rater checkpoint (needs 'rater' and 'config' entries); "
                              "pass a file written by train_rater.py")
    cfg = config_from_dict(RaterConfig, state["config"])
    text_dim = state["rater"]["text_proj.weight"].shape[1]
    # eager here: build_scorer compiles it when the scoring config asks for it
    raters = []
    for weights in [state["rater"], *(state.get("rater_members") or [])]:  # an ensemble: bilevel.distill_fits
        raters.append(build_rater(dataclasses.replace(cfg.model, compile=""), text_dim, torch.device(device),
                                  double_softmax=False))
        raters[-1].load_state_dict(weights)
    rater = RaterEnsemble(raters) if len(raters) > 1 else raters[0]
    return rater.eval().requires_grad_(False), cfg


def scoring_config(cfg: RaterConfig, overrides: Sequence[str] = ()) -> RaterConfig:
    """The checkpoint's config with training-only data fields cleared, then ``--key=value`` overrides.

    Only ``data.*``, the model's file locations and how it runs (``RUN_KEYS``: precision, attention
    kernel, compile, encoder precision) may be overridden: everything else describes the trained
    weights. ``data.cache_dir`` here names the cache of the table being scored.
    """
    raw = config_to_dict(cfg)
    raw["data"].update(TRAINING_ONLY)
    for key, value in parse_overrides(RaterConfig, overrides).items():
        if not (key.startswith("data.") or key in MODEL_PATH_KEYS or key in RUN_KEYS):
            raise ConfigError(f"--{key} is fixed by the checkpoint; when scoring only data.*, "
                              f"{', '.join(MODEL_PATH_KEYS + RUN_KEYS)} can be set")
        section, name = key.split(".")
        raw[section][name] = value
    return config_from_dict(RaterConfig, raw)


def build_scorer(ckpt: str | os.PathLike, overrides: Sequence[str] = (),
                 device: torch.device | str = "cpu") -> tuple[Rater, RaterConfig, Featurizer]:
    """The rater, its scoring config and the featurizer (tokenizer + text encoder) on ``device``: what every
    scoring engine loads (``rate_file`` on each rank, ``scoring_ray``'s actors)."""
    device = torch.device(device)
    rater, cfg = load_rater(ckpt, device)
    cfg = scoring_config(cfg, overrides)
    compile_blocks(rater, cfg.model.compile)
    text_encoder = build_text_encoder(cfg.model, device)
    if text_encoder.width != rater.text_dim:
        raise ConfigError(f"the rater was trained with {rater.text_dim}-wide text features but text encoder "
                          f"{text_encoder.path!r} gives {text_encoder.width}; set model.text_enc_path to the "
                          "encoder used in training")
    featurizer = Featurizer(build_tokenizer(cfg.model, device), text_encoder, device,
                            encoder_amp_dtype(cfg.model, cfg.optim, device))
    return rater, cfg, featurizer


def rate_file(ckpt: str | os.PathLike, table_path: str | os.PathLike, out_path: str | os.PathLike,
              overrides: Sequence[str] = (), batch_size: int = 256, shard_rows: int = DEFAULT_SHARD_ROWS,
              progress: bool = True) -> Path:
    """Everything ``infer_rater.py`` does: load, build encoders, score this rank's shards, merge."""
    table_format(out_path)  # a bad extension or a read-only folder fails now, not after the scoring
    check_writable(Path(out_path).parent)
    ps = dist_state()
    rank, world = ps.process_index, ps.num_processes
    rater, cfg, featurizer = build_scorer(ckpt, overrides, ps.device)
    skip_log = SkipLog()
    table = load_pairs(table_path, cfg.data, skip_log)
    return score_table(table, out_path, rater, featurizer, cfg, batch_size=batch_size, shard_rows=shard_rows,
                       rank=rank, world=world, cache_dir=cfg.data.cache_dir or None,
                       skipped=skip_log.items, progress=progress)


# ----------------------------------------------------------------------------- scoring
def shards_dir(out_path: str | os.PathLike) -> Path:
    out = Path(out_path)
    return out.with_name(out.name + ".shards")


def skipped_path(out_path: str | os.PathLike) -> Path:
    out = Path(out_path)
    return out.with_name(out.stem + ".skipped.csv")


def _shard_file(root: Path, k: int) -> Path:
    return root / f"shard_{k:05d}.parquet"


def _fingerprint(table: pd.DataFrame, rater: Rater, shard_rows: int) -> dict:
    """What the shards depend on: reusing shards of another table, rater or sharding would be wrong."""
    return {"rows": len(table), "table_sha1": table_sha1(table), "rater_sha1": state_sha1(rater),
            "shard_rows": shard_rows, "official_batch": OFFICIAL_BATCH}


def table_sha1(table: pd.DataFrame) -> str:
    rows = pd.util.hash_pandas_object(table[["id", "image_path", "caption"]], index=False).to_numpy()
    return hashlib.sha1(rows.tobytes()).hexdigest()


def claim(root: Path, meta: dict, rank: int = 0) -> None:
    """Check that existing shards belong to this job (written by rank 0 when new)."""
    path = root / "meta.json"
    if path.exists():
        if json.loads(path.read_text()) != meta:
            raise DataError(f"{str(root)!r} holds shards of another table, rater or --shard-rows; delete it "
                            "or write the ratings to another --out")
    elif rank == 0:
        with atomic_open(path) as f:
            json.dump(meta, f)


def write_shard(path: Path, shard: pd.DataFrame) -> None:
    with atomic_open(path, "wb") as f:
        shard.to_parquet(f, index=False)


def _amp(cfg: RaterConfig, device: torch.device):
    """The trunk in the config's precision (``optim.fp16``: auto = bf16 on a GPU, fp32 on a CPU; ``--fp16=0``
    scores in fp32). The heads always run in fp32; in bf16/fp16 a score still moves with the batch it was
    computed in, by the trunk's rounding (docs/selection.md gives the tolerance)."""
    return autocast(amp_dtype(cfg.optim, device), device)


@torch.inference_mode()
def pool_rows(rater: Rater, featurizer: Featurizer, cfg: RaterConfig, ids: np.ndarray,
              batches: Iterable[tuple[Sequence[int], dict]], done=lambda n: None
              ) -> tuple[np.ndarray, torch.Tensor | None, dict[int, str]]:
    """The pooled rater features of one shard's collated batches of (row positions, ``collate_pairs`` /
    ``collate_cache`` output): (rows scored, their features ``p_NC``, {row: reason} of those skipped)."""
    rows_ok, p_parts, bad = [], [], {}
    for batch_rows, raw in batches:
        by_id = {ids[r]: r for r in batch_rows} if raw["skipped"] else {}
        bad.update((by_id[id], reason) for id, reason in raw["skipped"])
        batch = featurizer(raw)
        if batch is not None:
            with _amp(cfg, featurizer.device):
                p_parts.append(rater.pooled(batch))
            rows_ok.append(raw["index_B"].numpy())
        done(len(batch_rows))
    rows = np.concatenate(rows_ok) if rows_ok else np.zeros(0, np.int64)
    return rows, (torch.cat(p_parts) if p_parts else None), bad


def shard_frame(rater: Rater, lo: int, ids: np.ndarray, rows: np.ndarray, p_NC: torch.Tensor | None,
                 bad: dict[int, str]) -> pd.DataFrame:
    """One shard's rows: instance logit and official score for the good ones (the latter per fixed
    256-row batch of the shard, skipped rows left out of their batch), the reason for the bad ones."""
    logit, official = np.empty(len(rows)), np.empty(len(rows))
    batch_of_row = (rows - lo) // OFFICIAL_BATCH
    with torch.autocast("cpu" if p_NC is None else p_NC.device.type, enabled=False):
        for b in np.unique(batch_of_row):
            sel = np.flatnonzero(batch_of_row == b)
            out = rater.heads(p_NC[torch.from_numpy(sel).to(p_NC.device)])
            logit[sel] = out.logit_B.double().cpu().numpy()
            official[sel] = out.weight_B.double().cpu().numpy()
    bad_rows = np.array(sorted(bad), dtype=np.int64)
    nan = np.full(len(bad_rows), np.nan)
    return pd.DataFrame({
        "row": np.concatenate([rows, bad_rows]),
        "id": ids[np.concatenate([rows, bad_rows])].astype(str),
        "score": np.concatenate([logit, nan]),
        "official_score": np.concatenate([official, nan]),
        "skipped": [""] * len(rows) + [bad[r] for r in bad_rows],
    }).sort_values("row", ignore_index=True)


@torch.inference_mode()
def score_table(table: pd.DataFrame, out_path: str | os.PathLike, rater: Rater, featurizer: Featurizer,
                cfg: RaterConfig, *, batch_size: int = 256, shard_rows: int = DEFAULT_SHARD_ROWS, rank: int = 0,
                world: int = 1, cache_dir: str | os.PathLike | None = None,
                skipped: Iterable[tuple[str, str]] = (), progress: bool = True) -> Path:
    """Score this rank's unfinished shards of ``table`` (from ``load_pairs``); rank 0 then merges.

    ``skipped`` lists rows dropped before scoring (``load_pairs``' skip log) so that the
    ``.skipped.csv`` report is complete. Returns the ratings path (on every rank, once written).
    """
    if batch_size < 1 or shard_rows < 1:
        raise UserError(f"batch size and shard rows must be >= 1, got {batch_size} and {shard_rows}")
    out_path = Path(out_path)
    table_format(out_path)
    root = shards_dir(out_path)
    if rank == 0:  # what killed writes of an earlier run left
        remove_stale_temps(root)
        remove_stale_temps(out_path.parent, [out_path.name, skipped_path(out_path).name])
    claim(root, _fingerprint(table, rater, shard_rows), rank)
    _barrier()  # the shard folder is claimed and clean before any rank writes to it
    device = featurizer.device
    rater.eval()

    n_shards = -(-len(table) // shard_rows)
    mine = [k for k in range(n_shards) if k % world == rank and not _shard_file(root, k).exists()]
    bounds = {k: (k * shard_rows, min(len(table), (k + 1) * shard_rows)) for k in mine}
    batches = [list(range(b, min(b + batch_size, hi))) for lo, hi in bounds.values()
               for b in range(lo, hi, batch_size)]
    if cache_dir:
        dataset, collate = CacheDataset(cache_dir, table, caption_dropout=0.0), collate_cache
    else:
        dataset, collate = PairsDataset(table, cfg.data.image_size, caption_dropout=0.0), collate_pairs
    workers = cfg.data.num_workers
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)

    bar = tqdm(total=sum(hi - lo for lo, hi in bounds.values()), unit="row", dynamic_ncols=True,
               desc=f"rating ({len(mine)} shards on rank {rank} of {world})", disable=not (progress and rank == 0))
    ids = table["id"].to_numpy()
    raws = zip(batches, loader)
    for k, (lo, hi) in bounds.items():
        n_batches = -(-(hi - lo) // batch_size)
        rows, p_NC, bad = pool_rows(rater, featurizer, cfg, ids, itertools.islice(raws, n_batches), bar.update)
        write_shard(_shard_file(root, k), shard_frame(rater, lo, ids, rows, p_NC, bad))
    bar.close()

    _barrier()
    if rank == 0:
        _merge(table, out_path, root, n_shards, skipped)
    _barrier()
    return out_path


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- merge
def _merge(table: pd.DataFrame, out_path: Path, root: Path, n_shards: int,
           skipped: Iterable[tuple[str, str]]) -> None:
    missing = [k for k in range(n_shards) if not _shard_file(root, k).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} of {n_shards} shards are missing in {str(root)!r} after all ranks "
                           f"finished (first: {missing[0]}); rerun to complete them")
    parts = pd.concat([pd.read_parquet(_shard_file(root, k)) for k in range(n_shards)], ignore_index=True)
    if not np.array_equal(np.sort(parts["row"].to_numpy()), np.arange(len(table))):
        raise RuntimeError(f"the shards in {str(root)!r} do not cover each row exactly once; delete the folder "
                           "and rerun")
    ok = parts[parts["skipped"] == ""]
    clash = [c for c in SCORE_COLUMNS if c in table.columns]
    if clash:
        print(f"note: the input's column(s) {clash} are replaced by this rating")
    ratings = table.drop(columns=clash).iloc[ok["row"].to_numpy()].reset_index(drop=True)
    ratings["score"] = ok["score"].to_numpy()
    ratings["official_score"] = ok["official_score"].to_numpy()
    write_ratings(ratings, out_path)

    log = SkipLog()
    log.extend(skipped)
    bad = parts[parts["skipped"] != ""]
    log.extend(zip(bad["id"], bad["skipped"]))
    skip_file = log.write(skipped_path(out_path))
    counts = collections.Counter(reason_kind(reason) for _, reason in log.items)
    detail = f" ({', '.join(f'{n} {r}' for r, n in counts.most_common())})" if counts else ""
    print(f"rated {len(ratings)} pairs -> {out_path}; skipped {log.count}{detail}, listed in {skip_file}")
