"""Atomic writes: a crash leaves either the old file or the new one, never half of one.

The half-written temp file a killed write leaves behind (``.<name>.<8 chars>.tmp``, beside the
target) is removed by ``remove_stale_temps`` when the next run starts.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from alchemist.utils.errors import UserError

_TEMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-z_]{8}\.tmp$")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside ``path``; rename it over ``path`` only if the block succeeds.

    The temp file is created with mode 0666 less the umask, as ``open`` would create ``path``
    (``tempfile.mkstemp`` would make it 0600, and the rename would keep that).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and check that a file can be made in it, so that a read-only or
    full output location fails when a command starts, not after its work; a UserError if not."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check.{secrets.token_hex(4)}.tmp"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {str(folder)!r} ({e.strerror or type(e).__name__}); make it writable "
                        "or choose another output location") from None
    return folder


def remove_stale_temps(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Delete the temp files killed ``atomic_open`` writes left in ``folder`` (only those of
    ``names`` when given); returns what was removed. Call it before this run writes there."""
    folder, wanted = Path(folder), None if names is None else set(names)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m and (wanted is None or m["name"] in wanted) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """``obj`` as indented JSON, atomically; numpy scalars and paths are written as plain values."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")
    return Path(path)


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
