"""The VAR tokenizer golden data in tests/data, and how it was made from the reference files.

The reference implementation produced ``var_vqvae_golden.pt``: a small tokenizer configuration with
random weights, four input images and every intermediate tensor (features, token ids, f̂ after each
scale, teacher-forcing input, reconstruction). Its 4.4 M weights are PyTorch's default initialisation
drawn from ``torch.manual_seed(0)`` in the order VAR builds its modules, so they are not stored: they
are replayed here and checked bit for bit against the SHA-256 of the reference state dict. Only the
codebook (re-initialised after construction) and the usage buffer are stored, with the tensors the
tests compare against: about 0.4 MB instead of 18 MB, with nothing lost.

Made once with ``python tests/golden_vqvae.py SOURCE.pt tests/data/var_vqvae_golden.pt``.
"""
from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import torch
from torch import nn

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = DATA / "var_vqvae_golden.pt"
KEYS = DATA / "var_vqvae_ch160v4096z32.keys.tsv"  # every key, shape and dtype of VAR's released checkpoint
STORED = ("quantize.embedding.weight", "quantize.ema_vocab_hit_SV")  # not a plain default initialisation
SEED = 0


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k, v in state_dict.items():
        v = v.detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def construction_order(keys: list[str]) -> list[str]:
    """Module names in the order VAR creates them. That is state-dict order except in two places:
    a level with attention creates block j then attn j (it registers all blocks first), and the
    decoder creates its levels deepest first (it registers them shallowest first)."""
    mods = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in keys))
    out, i = [], 0
    while i < len(mods):
        lv = re.match(r"^((?:en|de)coder\.(?:down|up)\.\d+)\.block\.", mods[i])
        if lv:
            level = lv.group(1)
            group = [m for m in mods if m.startswith((level + ".block.", level + ".attn."))]
            n_blocks = len({m.split(".")[4] for m in group if m.startswith(level + ".block.")})
            for j in range(n_blocks):
                out += [m for m in group if m.split(".")[3] == "block" and m.split(".")[4] == str(j)]
                out += [m for m in group if m.split(".")[3] == "attn" and m.split(".")[4] == str(j)]
            i += len(group)
            continue
        out.append(mods[i])
        i += 1
    ups = [m for m in out if m.startswith("decoder.up.")]
    if ups:
        at = out.index(ups[0])
        rest = [m for m in out if not m.startswith("decoder.up.")]
        deepest_first = sorted({int(m.split(".")[2]) for m in ups}, reverse=True)
        out = rest[:at] + [m for lv in deepest_first for m in ups if int(m.split(".")[2]) == lv] + rest[at:]
    return out


def replay_state_dict(shapes: dict[str, tuple[int, ...]], stored: dict[str, torch.Tensor],
                      seed: int = SEED) -> dict[str, torch.Tensor]:
    """Default-initialised Conv2d / Embedding / GroupNorm tensors drawn in VAR's construction order."""
    torch.manual_seed(seed)
    made: dict[str, torch.Tensor] = {}
    for m in construction_order(list(shapes)):
        w = shapes.get(m + ".weight")
        if w is None:
            continue
        if len(w) == 4:
            conv = nn.Conv2d(w[1], w[0], w[2], bias=(m + ".bias") in shapes)
            made[m + ".weight"] = conv.weight.detach()
            if conv.bias is not None:
                made[m + ".bias"] = conv.bias.detach()
        elif len(w) == 2:
            made[m + ".weight"] = nn.Embedding(*w).weight.detach()
        elif len(w) == 1:
            norm = nn.GroupNorm(1, w[0])
            made[m + ".weight"], made[m + ".bias"] = norm.weight.detach(), norm.bias.detach()
    made.update(stored)
    return {k: made[k] for k in shapes}


def load_golden() -> dict:
    """The golden dict as the reference wrote it (``state_dict`` rebuilt and verified)."""
    g = torch.load(GOLDEN, map_location="cpu", weights_only=True)
    sd = replay_state_dict({k: tuple(s) for k, s in g["shapes"]}, g["stored"], g["seed"])
    got = state_dict_digest(sd)
    if got != g["state_dict_sha256"]:
        raise AssertionError(f"the replayed golden weights differ from the reference (sha256 {got[:12]} != "
                             f"{g['state_dict_sha256'][:12]}): has torch's default Conv2d initialisation changed?")
    return {**{k: v for k, v in g.items() if k not in ("shapes", "stored", "seed")}, "state_dict": sd}


def trim(source: str | Path, out: str | Path) -> None:
    """Reference golden file -> the trimmed one (fails unless the replay reproduces every weight)."""
    g = torch.load(source, map_location="cpu", weights_only=False)
    sd = g["state_dict"]
    stored = {k: sd[k].clone() for k in STORED}
    shapes = [(k, tuple(v.shape)) for k, v in sd.items()]
    digest = state_dict_digest(sd)
    if state_dict_digest(replay_state_dict(dict(shapes), stored)) != digest:
        raise SystemExit("the replay does not reproduce the reference weights")
    keep = ("config", "input_B3HW", "f_BChw", "idx_Bl", "fhat_per_scale", "var_input_BLC", "recon_last_B3HW")
    def clone(v):  # views may hold a larger storage than they show
        return [t.clone() for t in v] if isinstance(v, list) else v.clone() if torch.is_tensor(v) else v

    torch.save({**{k: clone(g[k]) for k in keep}, "shapes": shapes, "stored": stored, "seed": SEED,
                "state_dict_sha256": digest}, out)


if __name__ == "__main__":
    trim(sys.argv[1], sys.argv[2])
