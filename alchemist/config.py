"""Typed, validated configuration.

A config is a tree of frozen dataclasses. JSON files may be grouped by section
(``{"optim": {"bs": 64}}``) or flat like the official Alchemist config
(``{"bs": 64}``): a bare key is resolved to the one section that owns it.
Command-line overrides use the same rule (``--bs=32``, ``--model.depth=8``).
An unknown key is an error that names the key and the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

from alchemist.utils.errors import UserError
from alchemist.utils.io import atomic_open

T = TypeVar("T")


class ConfigError(UserError):
    """A user-fixable problem with a configuration (bad key, type or value)."""


# ----------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DataConfig:
    train_csv_path: str = ""
    val_csv_path: str = ""
    id_col: str = "id"
    image_col: str = ""  # "" = first of image_save_path, image_path present in the table
    caption_col: str = "caption"
    recaption_col: str = ""  # e.g. "cogvlm_caption": used for a row when non-empty
    image_size: int = 256
    caption_dropout: float = 0.1  # CFG training; always 0 at scoring time
    num_workers: int = 4
    cache_dir: str = ""  # feature cache written by scripts/precompute.py; "" = raw images
    # pre-pass: every image is opened once when the table is read, so bad rows are skipped and listed
    # (skipped.csv) before the first step; false skips it (very large tables): bad images then show up
    # when first decoded
    check_images: bool = True
    # parquet inputs: the column of encoded image bytes ("" = the first binary column named jpg, image,
    # bytes, png, webp or img; a table without one is a table of image paths)
    image_bytes_col: str = ""
    # webdataset shards: columns to join from img2dataset's metadata parquet beside each shard (00000.parquet
    # beside 00000.tar), by key, e.g. "uid,url" ("*" = all it has that the shard lacks; "" = none). A joined
    # uid becomes the id when the table has no id_col
    shard_meta_cols: str = ""

    def __post_init__(self):
        _check(self.image_size > 0, "data.image_size must be positive")
        _check(0.0 <= self.caption_dropout < 1.0, "data.caption_dropout must be in [0, 1)")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")


@dataclass(frozen=True)
class ModelConfig:
    depth: int = 16  # proxy depth: width 64*depth, heads = depth
    raterDepth: int = 8
    patch_size: int = 16  # tokenizer downsampling factor = 2 ** (len(vae_ch_mult) - 1)
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    vocab_size: int = 4096
    Cvae: int = 32
    vae_ch: int = 160
    vae_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    ckpt_path: str = ""  # directory with pretrained weights (tokenizer, optional proxy)
    vae_ckpt: str = "vae_ch160v4096z32.pth"  # file name inside ckpt_path, or a path
    proxy_init: str = ""  # optional proxy warm start (a checkpoint file)
    text_enc_path: str = ""  # "" = the offline all-MiniLM-L6-v2 package
    text_max_len: int = 77
    drop_path_rate: float = -1.0  # < 0: 0.1 * depth / 24 as in STAR
    rope_norm: float = 64.0
    rope_theta: float = 10000.0
    group_head: bool = True
    rater_full_image: bool = True  # the rater also reads the finished f̂ (false = the official rater's input)
    # how the models run (not what they are; may differ between training and scoring):
    attn_impl: str = "mask"  # proxy self-attention: mask (one SDPA call, block-causal mask) | scales (one
    # unmasked call per scale against the keys of scales <= it: the same numbers, flash-eligible)
    compile: str = ""  # "" eager; else a torch.compile backend (inductor, aot_eager, ...) for each block
    encoder_amp: bool = False  # frozen tokenizer encoder + text encoder under the run's autocast (tokens
    # are still chosen in fp32); default fp32/TF32 as VAR and the feature cache
    cfg: float = 4.0  # classifier-free guidance scale at sampling time
    top_k: int = 600
    top_p: float = 0.8

    def __post_init__(self):
        _check(self.depth >= 1 and self.raterDepth >= 1, "model.depth and model.raterDepth must be >= 1")
        _check(self.text_max_len >= 1, "model.text_max_len must be >= 1 (captions are truncated to it)")
        _check(len(self.patch_nums) >= 1, "model.patch_nums must not be empty")
        _check(all(p >= 1 for p in self.patch_nums), "model.patch_nums must be positive")
        _check(list(self.patch_nums) == sorted(set(self.patch_nums)),
               f"model.patch_nums must be strictly increasing, got {list(self.patch_nums)}")
        _check(self.patch_size >= 1 and self.patch_size & (self.patch_size - 1) == 0,
               f"model.patch_size must be a power of two, got {self.patch_size}")
        _check(2 ** (len(self.vae_ch_mult) - 1) == self.patch_size,
               f"model.patch_size {self.patch_size} must equal the tokenizer's downsampling "
               f"2**(len(vae_ch_mult)-1) = {2 ** (len(self.vae_ch_mult) - 1)}")
        _check(self.vocab_size >= 2 and self.Cvae >= 1 and self.vae_ch >= 1, "model.vocab_size/Cvae/vae_ch too small")
        _check(self.attn_impl in ("mask", "scales"), f"model.attn_impl must be mask or scales, got {self.attn_impl!r}")
        _check(self.cfg >= 0, "model.cfg must be >= 0")
        _check(0 < self.top_p <= 1, "model.top_p must be in (0, 1]")

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)


@dataclass(frozen=True)
class OptimConfig:
    bs: int = 64  # global batch size of each of the train and val batches
    ep: int = 10
    tlr: float = 1e-4  # proxy learning rate
    twd: float = 0.05  # proxy weight decay
    rater_lr: float = 1e-4
    rater_wd: float = 0.05
    opt: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 2.0  # <= 0 disables
    sche: str = "lin0"  # lin0 | lin | cos | const
    rater_sche: str = ""  # the rater's lr schedule; "" = the proxy's (official). The demo uses const
    wp: float = 0.0  # warm-up epochs; <= 0 means ep / 50
    wp0: float = 0.005  # warm-up starts at wp0 * lr
    wpe: float = 0.01  # final lr = wpe * lr
    fp16: int = -1  # -1 auto (bf16 on GPU, fp32 on CPU), 0 fp32, 1 fp16 + grad scaler, 2 bf16
    max_nonfinite: int = 20  # consecutive non-finite steps before the run stops (with a checkpoint)

    def __post_init__(self):
        _check(self.bs >= 1, "optim.bs must be >= 1")
        _check(self.ep >= 1, "optim.ep must be >= 1")
        _check(0 < self.tlr < math.inf and 0 < self.rater_lr < math.inf,
               "optim.tlr and optim.rater_lr must be finite and > 0")
        _check(self.twd >= 0 and self.rater_wd >= 0, "weight decay must be >= 0")
        _check(self.opt in ("adamw", "adam", "sgd"), f"optim.opt must be adamw, adam or sgd, got {self.opt!r}")
        _check(self.sche in ("lin0", "lin", "cos", "const"), f"optim.sche must be lin0, lin, cos or const, got {self.sche!r}")
        _check(self.rater_sche in ("", "lin0", "lin", "cos", "const"),
               f"optim.rater_sche must be empty (= optim.sche), lin0, lin, cos or const, got {self.rater_sche!r}")
        _check(self.fp16 in (-1, 0, 1, 2), "optim.fp16 must be -1 (auto), 0, 1 or 2")
        _check(0 <= self.wp0 <= 1 and 0 <= self.wpe <= 1, "optim.wp0 and optim.wpe must be in [0, 1]")

    def precision(self, device_type: str) -> str:
        """fp32, bf16 or fp16 (autocast; fp16 with a loss scaler) on a device of this type."""
        mode = self.fp16 if self.fp16 >= 0 else (2 if device_type == "cuda" else 0)
        return ("fp32", "fp16", "bf16")[mode]


@dataclass(frozen=True)
class BilevelConfig:
    estimator: str = "penalty"  # a rule registered in alchemist/bilevel/estimators.py (checked there)
    gamma_start: float = 1.0
    gamma_decay: float = 0.03  # per epoch
    gamma_decay_from: int = 1  # first epoch at which gamma decays
    gamma_min: float = 0.0
    entropy_reg: float = 0.0  # weight of -entropy(w) in the rater loss (official: 0.01, off)
    double_softmax: bool = False  # the official code's second softmax over the weights
    fix_proxy: bool = False  # keep a pretrained proxy frozen (official `fixVar`)
    lookahead_eps: float = 1e-2  # central-difference step: theta +- (eps / |u|) * u, u = P * grad L_val
    center: bool = True  # centre the rule's coefficients on their batch mean (keeps the group head alive)
    standardize: bool = False  # also divide them by their batch std: every step teaches the rater equally
    rater_replay: int = 0  # extra rater steps per step, each on a stored batch of the last replay_size steps
    replay_size: int = 32  # with the coefficients computed then (0 replay = the paper's one rater step)
    distill_steps: int = 0  # after the loop: rater steps fitting it to the final proxy's signal (bilevel/distill.py)
    distill_lr: float = 0.0  # their learning rate (0: optim.rater_lr)
    distill_pairs: int = 10000  # training pairs, drawn at random, that get the signal and are fitted (in memory)
    distill_proxy_steps: int = 0  # plain steps of a copy of the final proxy on those pairs before its signal
    distill_captions: int = 0  # other captions per pair for the caption-agreement term of the target (0: none)
    distill_snapshots: int = 1  # points of those steps (evenly spaced, both ends) whose signals are averaged
    distill_swaps: float = 0.0  # share of the fit's rows shown with another row's caption (needs distill_captions;
    # with distill_judge_steps its target is graded by the judge's evidence for that caption)
    distill_caption_head: str = ""  # a head for the caption test in the fit: "min" (score = min of the two
    # heads) or "aux" (an auxiliary task, dropped after the fit); "" none (bilevel/distill.py)
    distill_judge_steps: int = 0  # > 0: the caption test asks a copy of the loop's proxy trained this many plain
    # steps on the validation pairs (the judge), all distill_captions at once, its posterior of the own caption
    distill_start: str = "loop"  # the fit starts from "loop" (the rater the loop ended with) or "fresh" (a newly
    # initialised one, seeded by seed + 6)
    distill_fits: int = 1  # independent fits of distill_steps each, from the same start in other batch orders;
    # the rater's score is their mean logit (an ensemble: the fit's batch order alone moves a kind's AUROC)
    distill_sche: str = "const"  # the fit's learning rate: "const", or "cos" (cosine decay to 0 over each fit)
    official_scale: bool = False  # proxy train term (1/B)·Σ softmax·l as in the official code;
    # default: weights rescaled to mean 1 so the train term is a weighted average of the losses

    def __post_init__(self):
        _check(0 <= self.gamma_min <= self.gamma_start <= 1, "need 0 <= bilevel.gamma_min <= bilevel.gamma_start <= 1")
        _check(self.gamma_decay >= 0 and self.entropy_reg >= 0, "bilevel.gamma_decay and entropy_reg must be >= 0")
        _check(self.lookahead_eps > 0, "bilevel.lookahead_eps must be > 0")
        _check(self.center or not self.standardize, "bilevel.standardize needs bilevel.center=true")
        _check(min(self.distill_steps, self.distill_lr, self.distill_proxy_steps, self.distill_captions) >= 0
               and self.distill_pairs >= 1 and self.distill_snapshots >= 1, "bilevel.distill_steps, distill_lr, "
               "distill_proxy_steps and distill_captions must be >= 0, distill_pairs and distill_snapshots >= 1")
        _check(self.distill_snapshots == 1 or self.distill_proxy_steps >= self.distill_snapshots - 1,
               "bilevel.distill_snapshots > 1 spaces its points over distill_proxy_steps: need "
               "distill_proxy_steps >= distill_snapshots - 1")
        _check(0 <= self.distill_swaps < 1 and (self.distill_captions or not self.distill_swaps),
               "bilevel.distill_swaps must be in [0, 1), and > 0 needs bilevel.distill_captions > 0 (its target "
               "is set by the caption agreement)")
        _check(self.distill_caption_head in ("", "min", "aux"), "bilevel.distill_caption_head must be '', 'min' "
               f"or 'aux', got {self.distill_caption_head!r}")
        _check(self.distill_captions or not self.distill_caption_head, "bilevel.distill_caption_head needs "
               "bilevel.distill_captions > 0 (its target is the caption agreement)")
        _check(self.distill_judge_steps >= 0 and (not self.distill_judge_steps or (
            self.distill_captions and not self.distill_caption_head)),
            "bilevel.distill_judge_steps must be >= 0, and > 0 needs bilevel.distill_captions > 0 and no "
            "distill_caption_head (its targets are shares of captions, the judge's a posterior)")
        _check(self.distill_start in ("loop", "fresh"), "bilevel.distill_start must be 'loop' or 'fresh', got "
               f"{self.distill_start!r}")
        _check(self.distill_fits >= 1, f"bilevel.distill_fits must be >= 1, got {self.distill_fits}")
        _check(self.distill_sche in ("const", "cos"), "bilevel.distill_sche must be 'const' or 'cos', got "
               f"{self.distill_sche!r}")
        _check(not (self.distill_steps and self.fix_proxy), "bilevel.distill_steps reads the proxy optimiser's "
               "state, and bilevel.fix_proxy=true has none")
        _check(self.rater_replay >= 0 and self.replay_size >= 1, "bilevel.rater_replay must be >= 0 and replay_size >= 1")


@dataclass(frozen=True)
class LoggingConfig:
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "alchemist"
    log_every: int = 10
    progress: bool = True

    def __post_init__(self):
        _check(self.wandb in ("disabled", "offline", "online"), "logging.wandb must be disabled, offline or online")
        _check(self.log_every >= 1, "logging.log_every must be >= 1")


@dataclass(frozen=True)
class OutputConfig:
    local_out_dir_path: str = "runs"
    exp_name: str = "rater"
    save_every: int = 500  # steps between checkpoints (also at every epoch end)
    keep_last: int = 3
    resume: str = "auto"  # auto | none | path to a checkpoint

    def __post_init__(self):
        _check(self.save_every >= 1 and self.keep_last >= 1, "output.save_every and keep_last must be >= 1")

    @property
    def run_dir(self) -> Path:
        return Path(self.local_out_dir_path) / self.exp_name


@dataclass(frozen=True)
class RaterConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    bilevel: BilevelConfig = field(default_factory=BilevelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0

    def __post_init__(self):
        _check_geometry(self.data, self.model)
        _check_seed(self.seed)


@dataclass(frozen=True)
class T2IConfig:
    """Downstream text-to-image training on a (selected) subset: the proxy architecture, no rater.
    ``data.train_csv_path`` is the subset, ``data.val_csv_path`` the clean held-out set."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(exp_name="t2i"))
    seed: int = 0

    def __post_init__(self):
        _check_geometry(self.data, self.model)
        _check_seed(self.seed)


def _check_geometry(data: DataConfig, model: ModelConfig) -> None:
    side = model.patch_nums[-1] * model.patch_size
    _check(data.image_size == side,
           f"data.image_size {data.image_size} must equal patch_nums[-1] * patch_size = "
           f"{model.patch_nums[-1]} * {model.patch_size} = {side}")


def _check_seed(seed: int) -> None:
    _check(seed >= 0, f"seed must be >= 0 (numpy and torch take non-negative seeds), got {seed}")


# ----------------------------------------------------------------------------- machinery
def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


@functools.lru_cache(maxsize=None)
def _leaves(cls: type, prefix: str = "") -> dict[str, type]:
    """Dotted path -> annotated type for every leaf field of a config tree (cached: resolving
    type hints is slow and every key lookup needs them)."""
    out: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaves(tp, prefix + f.name + "."))
        else:
            out[prefix + f.name] = tp
    return out


def resolve_key(cls: type, key: str) -> str:
    """Map a dotted or bare key to its dotted path; unknown keys name the closest valid one."""
    leaves = _leaves(cls)
    if key in leaves:
        return key
    owners = [p for p in leaves if p.rsplit(".", 1)[-1] == key]
    if len(owners) == 1:
        return owners[0]
    if len(owners) > 1:
        raise ConfigError(f"config key {key!r} is ambiguous: write one of {', '.join(owners)}")
    names = list(leaves) + sorted({p.rsplit(".", 1)[-1] for p in leaves})
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert JSON or command-line values to the field's type, or raise a ConfigError."""
    origin = typing.get_origin(tp)
    try:
        if origin is tuple:
            if isinstance(value, str):
                value = [v for v in value.replace("[", "").replace("]", "").replace(" ", "").split(",") if v]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            elem = typing.get_args(tp)[0]
            return tuple(_coerce(v, elem, key) for v in value)
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise TypeError
        if tp is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"config key {key!r} expects {name}, got {value!r}")


def _flatten_json(cls: type, raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Grouped or flat JSON -> {dotted key: value}."""
    out: dict[str, Any] = {}
    sections = {f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])}
    for k, v in raw.items():
        if k.startswith("_"):  # "_comment" and the like
            continue
        if not prefix and k in sections and isinstance(v, Mapping):
            for kk, vv in v.items():
                if not kk.startswith("_"):
                    out[resolve_key(cls, f"{k}.{kk}")] = vv
        else:
            out[resolve_key(cls, prefix + k)] = v
    return out


def _build(cls: type[T], values: Mapping[str, Any], prefix: str = "") -> T:
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, values, path + ".")
        elif path in values:
            kwargs[f.name] = _coerce(values[path], tp, path)
    return cls(**kwargs)


def parse_overrides(cls: type, args: Sequence[str]) -> dict[str, Any]:
    """``["--bs=32", "--model.depth", "8"]`` -> {"optim.bs": "32", "model.depth": "8"}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ConfigError(f"expected --key=value, got {a!r}")
        key, eq, val = a[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override --{key} has no value")
            val, i = args[i + 1], i + 1
        out[resolve_key(cls, key.replace("-", "_"))] = val
        i += 1
    return out


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> T:
    """JSON file (optional) + overrides -> validated config of type ``cls``."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(p)!r} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} holds a JSON {type(raw).__name__}, not an object; write "
                              '{"section": {"key": value}} or a flat {"key": value}')
        values.update(_flatten_json(cls, raw))
    if isinstance(overrides, Mapping):
        values.update({resolve_key(cls, k): v for k, v in overrides.items()})
    else:
        values.update(parse_overrides(cls, overrides))
    return _build(cls, values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(cls: type[T], raw: Mapping[str, Any]) -> T:
    """Inverse of ``config_to_dict`` (used when reading a checkpoint)."""
    return _build(cls, _flatten_json(cls, raw))


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as JSON, atomically."""
    with atomic_open(path) as f:
        json.dump(config_to_dict(cfg), f, indent=2)
        f.write("\n")
    return Path(path)
