"""Throughput, memory and model FLOPs of rater training and scoring (``scripts/bench.py``).

Everything runs through the production code: ``BilevelTrainer.train_step`` for the bilevel step,
``TrainLoop.optimizer_step`` for the plain proxy step, ``Featurizer`` for the frozen tokenizer and
text encoder, ``Rater.forward`` for scoring. Only the weights and the data are synthetic: a VQVAE
and a CLIP-style text encoder with random weights (the text encoder is written to a temp dir and
loaded through ``TextEncoder``), random images and captions of random words.

Three input modes, so the table splits the cost:
- ``raw``: collated images + captions; tokenizer and text encoder run inside the step
  (what ``train_rater.py`` does without ``data.cache_dir``);
- ``cache``: what the feature-cache loader yields (ids + text features on the host); the step moves
  them to the device and rebuilds the teacher-forcing input from the ids (``data.cache_dir`` set);
- ``tokens``: ``TokenBatch`` already on the device: the step alone.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on copies of the models built
on the ``meta`` device (no memory, no time, any scale, any host), where SDPA runs as its math
decomposition, so attention counts as the full L×L products (masked entries included), the way
MFU is usually quoted. Matmuls and convolutions only; norms, softmax, RoPE and the optimiser are
not counted. ``proxy_flops_analytic`` is the closed form the counter is tested against.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import math
import os
import platform
import random
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from alchemist.bilevel.estimators import ESTIMATORS
from alchemist.bilevel.trainer import BilevelTrainer
from alchemist.build import build_proxy, build_rater, build_text_encoder
from alchemist.config import ModelConfig, RaterConfig, load_config, parse_overrides
from alchemist.data.sampler import ResumableSampler, Stream
from alchemist.data.tokens import Featurizer
from alchemist.batch import TextFeatures, TokenBatch
from alchemist.models.proxy import Proxy
from alchemist.models.rater import Rater
from alchemist.models.vqvae import VQVAE
from alchemist.runtime import setup_runtime

RULES = tuple(ESTIMATORS)  # every registered rater-update rule
MODES = ("raw", "cache", "tokens")
H100_BF16_DENSE_TFLOPS = 989.0


# ----------------------------------------------------------------------------- presets
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
            "wandb": "disabled", "caption_dropout": 0.0}
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


def random_tokenizer(mcfg: ModelConfig, device: torch.device | str) -> VQVAE:
    """VAR's tokenizer architecture at the config's geometry, random weights, frozen like ``load_vqvae``'s."""
    vq = VQVAE(vocab_size=mcfg.vocab_size, z_channels=mcfg.Cvae, ch=mcfg.vae_ch, ch_mult=mcfg.vae_ch_mult,
               patch_nums=mcfg.patch_nums)
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


def _featurize_in_chunks(featurize: Featurizer, raw: dict, chunk: int) -> TokenBatch:
    parts = [featurize({"img_B3HW": raw["img_B3HW"][i:i + chunk], "captions": raw["captions"][i:i + chunk]})
             for i in range(0, len(raw["captions"]), chunk)]
    return TokenBatch(torch.cat([p.idx_BL for p in parts]), torch.cat([p.x_BLC for p in parts]),
                      TextFeatures.cat([p.text for p in parts]))


def cache_batch(tb: TokenBatch) -> dict:
    """What ``collate_cache`` yields for the same rows: int64 ids and fp32 text features on the host."""
    return {"index_B": torch.arange(tb.B), "ids": [str(i) for i in range(tb.B)], "idx_BL": tb.idx_BL.cpu(),
            "text": tb.text.to("cpu"), "skipped": []}


# ----------------------------------------------------------------------------- FLOPs
def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as fc, _autocast_off_on_meta():
        fn()
    return int(fc.get_total_flops())


@contextlib.contextmanager
def _autocast_off_on_meta():
    """``torch.autocast("meta")`` raises (no meta backend); the models' fp32 regions are no-ops there."""
    real = torch.autocast

    def autocast(device_type, *args, **kwargs):
        return contextlib.nullcontext() if device_type == "meta" else real(device_type, *args, **kwargs)
    torch.autocast = autocast
    try:
        yield
    finally:
        torch.autocast = real


def proxy_flops_analytic(depth: int, patch_nums: Sequence[int], text_len: int, text_dim: int, vocab_size: int,
                         Cvae: int, mlp_ratio: float = 4.0, backward: bool = True) -> int:
    """Matmul FLOPs of one image through the proxy (forward, plus backward if asked), in closed form.

    Forward: the linear layers (2·in·out per row) and attention (4·L·L'·C for QKᵀ and AV). Backward
    doubles every product except the gradients w.r.t. inputs that need none: the pooled caption
    (start token), the teacher-forcing features (word embedding) and the caption states (cross k/v).
    """
    C, L, first = 64 * depth, sum(p * p for p in patch_nums), patch_nums[0] ** 2
    hidden, T, D = round(C * mlp_ratio), text_len, text_dim
    lin_with_input_grad = depth * (2 * L * C * 3 * C + 2 * L * C * C + 2 * L * C * C + 2 * L * C * C
                                   + 2 * 2 * L * C * hidden) + 2 * L * C * vocab_size
    lin_weight_grad_only = 2 * D * C + 2 * (L - first) * Cvae * C + depth * 2 * T * D * 2 * C
    attention = depth * (4 * L * L * C + 4 * L * T * C)
    fwd = lin_with_input_grad + lin_weight_grad_only + attention
    if not backward:
        return fwd
    return fwd + 2 * lin_with_input_grad + lin_weight_grad_only + 2 * attention


def _meta_batch(B: int, mcfg: ModelConfig, T: int, D: int) -> TokenBatch:
    L = mcfg.num_tokens
    with torch.device("meta"):
        return TokenBatch(torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L - mcfg.patch_nums[0] ** 2, mcfg.Cvae),
                          TextFeatures(torch.zeros(B, T, D), torch.ones(B, T, dtype=torch.bool), torch.zeros(B, D)))


def component_flops(mcfg: ModelConfig, spec: TextSpec, text_len: int) -> dict[str, int]:
    """FLOPs per image of every piece a step is made of, counted on meta-device models.

    ``text_len`` is the padded caption length T the batch carries (it sets the cross-attention cost)."""
    geometry = dataclasses.replace(mcfg, ckpt_path="", vae_ckpt="", proxy_init="", text_enc_path="")
    return dict(_component_flops(geometry, spec, text_len))


@functools.lru_cache(maxsize=8)  # a few seconds each (bicubic resizes decompose into many meta ops)
def _component_flops(mcfg: ModelConfig, spec: TextSpec, text_len: int) -> dict[str, int]:
    D = spec.width
    with torch.device("meta"):
        proxy = Proxy.from_config(mcfg, D)
        rater = Rater.from_config(mcfg, D)
        vq = VQVAE(vocab_size=mcfg.vocab_size, z_channels=mcfg.Cvae, ch=mcfg.vae_ch, ch_mult=mcfg.vae_ch_mult,
                   patch_nums=mcfg.patch_nums).requires_grad_(False)
        from transformers import CLIPTextModel

        text = CLIPTextModel(text_model_config(spec, mcfg.text_max_len)).requires_grad_(False)
        img = torch.zeros(1, 3, mcfg.patch_nums[-1] * mcfg.patch_size, mcfg.patch_nums[-1] * mcfg.patch_size)
        ids = torch.zeros(1, text_len, dtype=torch.long)
        idx_Bl = [torch.zeros(1, p * p, dtype=torch.long) for p in mcfg.patch_nums]
    b = _meta_batch(1, mcfg, text_len, D)

    def fwd_bwd(model_loss):
        return lambda: model_loss().backward()

    out = {
        "proxy_fwd_bwd": count_flops(fwd_bwd(lambda: proxy.per_sample_loss(b).mean())),
        "proxy_fwd": count_flops(lambda: proxy.per_sample_loss(b)),
        "rater_fwd_bwd": count_flops(fwd_bwd(lambda: rater(b).weight_B.sum())),
        "rater_fwd": count_flops(lambda: rater(b)),
        "tokenizer_encode": count_flops(lambda: vq.img_to_idxBl(img)),
        "teacher_forcing_input": count_flops(lambda: vq.idxBl_to_var_input(idx_Bl)),
        "text_encoder": count_flops(lambda: text(input_ids=ids)),  # no padding: a mask would need .item()
    }
    out["proxy_fwd_bwd_analytic"] = proxy_flops_analytic(mcfg.depth, mcfg.patch_nums, text_len, D, mcfg.vocab_size,
                                                         mcfg.Cvae)
    return out


def step_flops(c: dict[str, int], kind: str, mode: str, B: int, rule: str = "penalty") -> int:
    """FLOPs of one step of ``kind`` (bilevel | plain | score) on ``B`` images per batch (bilevel: B
    train + B val), from the per-image components. Mirrors ``BilevelTrainer.train_step`` and the rules."""
    if kind == "score":
        model = c["rater_fwd"]
        batches = 1
    elif kind == "plain":
        model = c["proxy_fwd_bwd"]
        batches = 1
    else:
        # rater once on the train batch, proxy fwd+bwd on val and train batches, then the rule's extras
        model = c["rater_fwd_bwd"] + 2 * c["proxy_fwd_bwd"]
        model += sum(n * c[k] for k, n in ESTIMATORS[rule].extra_passes.items())
        batches = 2
    encode = {"tokens": 0, "cache": c["teacher_forcing_input"],
              "raw": c["tokenizer_encode"] + c["teacher_forcing_input"] + c["text_encoder"]}[mode]
    return B * (model + batches * encode)


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(fn: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Wall times of ``steps`` calls of ``fn`` after ``warmup`` untimed ones (synchronised on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":  # (a CPU's peak RSS cannot be reset; gc.collect alone costs ~0.5 s there)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """GPU: peak allocated since the last reset. CPU: the process's peak RSS so far (monotone)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


@dataclass
class Row:
    kind: str  # bilevel | plain | score
    mode: str  # raw | cache | tokens
    rule: str  # penalty | reference | lookahead | "" (plain, score)
    images: int  # images per step
    seconds: float = math.nan  # median
    seconds_min: float = math.nan  # the least disturbed step (a shared host's noise only adds time)
    img_per_s: float = math.nan
    peak_mem_gib: float = math.nan
    gflop: float = math.nan  # model FLOPs of one step
    tflops: float = math.nan  # achieved
    mfu: float = math.nan  # achieved / peak (nan without a peak rate)
    vs_plain: float = math.nan  # bilevel s/step ÷ plain s/step in the same mode
    error: str = ""

    @property
    def label(self) -> str:
        return {"bilevel": f"bilevel {self.rule}", "plain": "plain proxy", "score": "rater scoring"}[self.kind]


@dataclass
class Result:
    meta: dict[str, Any]
    flops_per_image: dict[str, int]
    rows: list[Row] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
        return {"meta": self.meta, "flops_per_image": self.flops_per_image,
                "rows": [{"label": r.label, **{k: clean(v) for k, v in dataclasses.asdict(r).items()}}
                         for r in self.rows]}


class _Bench:
    """Models, encoders and batches of one preset on one device; a method per kind of step."""

    def __init__(self, cfg: RaterConfig, preset: Preset, workdir: Path, log: Callable[[str], None]):
        self.cfg, self.preset = cfg, preset
        rt = setup_runtime(cfg.optim.bs, cfg.seed)
        self.device = rt.device
        log(f"random text encoder ({preset.text.width} wide, {preset.text.layers} layers) -> {workdir}")
        write_random_text_encoder(cfg.model.text_enc_path, preset.text, cfg.model.text_max_len, cfg.seed)
        self.text = build_text_encoder(cfg.model, self.device)
        self.featurize = Featurizer(random_tokenizer(cfg.model, self.device), self.text, self.device)
        bs, pin = cfg.optim.bs, self.device.type == "cuda"
        words = caption_words(preset.text)
        mk = lambda n, seed: synthetic_raw(n, cfg.data.image_size, words, preset.caption_words, seed, pin)  # noqa: E731
        self.raw = {"train": mk(bs, 1), "val": mk(bs, 2), "score": mk(preset.score_bs, 3)}
        log(f"featurising the synthetic batches on {self.device}")
        # in training-size chunks: the scoring batch in one piece is the raw-scoring row's job (it may not fit)
        self.tokens = {k: _featurize_in_chunks(self.featurize, v, bs) for k, v in self.raw.items()}
        self.cache = {k: cache_batch(v) for k, v in self.tokens.items()}
        if pin:
            self.cache = {k: {**v, "idx_BL": v["idx_BL"].pin_memory()} for k, v in self.cache.items()}
        self.text_len = max(tb.text.hidden_BTD.shape[1] for tb in self.tokens.values())

    def batches(self, mode: str, split: str):
        """A thunk giving the step's input for ``split`` in ``mode`` (featurised inside the step unless tokens)."""
        if mode == "tokens":
            return lambda: self.tokens[split]
        src = (self.raw if mode == "raw" else self.cache)[split]
        return lambda: self.featurize(src)

    def trainer(self, rule: str) -> BilevelTrainer:
        cfg = dataclasses.replace(self.cfg, bilevel=dataclasses.replace(self.cfg.bilevel, estimator=rule))
        torch.manual_seed(cfg.seed)
        proxy = build_proxy(cfg.model, self.text.width, self.device)
        rater = build_rater(cfg.model, self.text.width, self.device, cfg.bilevel.double_softmax)
        bs = cfg.optim.bs
        stream = lambda: Stream(lambda s: iter(()), ResumableSampler(100 * bs, shuffle=False), bs)  # noqa: E731
        return BilevelTrainer(cfg, proxy, rater, self.featurize, stream(), stream(), self.device, is_main=False)

    def bilevel_fn(self, trainer: BilevelTrainer, mode: str) -> Callable[[], None]:
        train, val = self.batches(mode, "train"), self.batches(mode, "val")

        def step():
            if trainer.train_step(train(), val()) is None:
                raise FloatingPointError("non-finite loss: the step returned early and its timing would be wrong")
        return step

    def plain_fn(self, trainer: BilevelTrainer, mode: str) -> Callable[[], None]:
        """One proxy step on the training batch alone (unweighted loss), same precision as the bilevel step."""
        train = self.batches(mode, "train")

        def step():
            trainer.plain_proxy_step(train())
        return step

    def score_fn(self, trainer: BilevelTrainer, mode: str) -> Callable[[], None]:
        """The scoring pass of ``score_table``: featurise, rater forward in eval mode under inference_mode,
        in the run's precision (bf16 autocast on a GPU, fp32 on a CPU, as ``scoring._amp``)."""
        batch, rater = self.batches(mode, "score"), trainer.rater

        def step():
            rater.eval()
            with torch.inference_mode(), trainer.autocast():
                rater(batch()).logit_B
        return step


def _measure(row: Row, fn: Callable[[], None], bench: _Bench, warmup: int, steps: int, flops: int,
             peak_tflops: float | None) -> Row:
    _reset_peak(bench.device)
    try:
        times = step_times(fn, warmup, steps, bench.device)
        row.seconds, row.seconds_min = statistics.median(times), min(times)
    except Exception as e:  # noqa: BLE001 — one failing row (e.g. out of memory) must not lose the others
        first = (str(e).splitlines() or [""])[0][:160]
        row.error = f"{type(e).__name__}: {first}"
    if row.error:  # outside the handler: the traceback (and the tensors its frames hold) is gone
        _reset_peak(bench.device)
        return row
    row.peak_mem_gib = peak_memory_gib(bench.device)
    row.img_per_s = row.images / row.seconds
    row.gflop = flops / 1e9
    row.tflops = flops / row.seconds / 1e12
    if peak_tflops:
        row.mfu = row.tflops / peak_tflops
    return row


def run_benchmark(preset: Preset | str, rules: Sequence[str] = RULES, modes: Sequence[str] = MODES,
                  steps: int | None = None, warmup: int | None = None, peak_tflops: float | None = None,
                  overrides: Sequence[str] = (), log: Callable[[str], None] = lambda s: None) -> Result:
    """Time every (rule × mode) bilevel step, the plain proxy step per mode and scoring per mode.

    ``peak_tflops`` None: the H100 bf16 dense rate on a GPU, no MFU on a CPU."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    steps = preset.steps if steps is None else steps
    warmup = preset.warmup if warmup is None else warmup
    bad = [r for r in rules if r not in RULES] + [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown rule or mode {bad}: rules are {', '.join(RULES)}, modes {', '.join(MODES)}")
    with tempfile.TemporaryDirectory(prefix="alchemist_bench_") as tmp:
        cfg = bench_config(preset, tmp, overrides)
        log(f"building {preset.name} models ...")
        bench = _Bench(cfg, preset, Path(tmp), log)
        dev = bench.device
        if peak_tflops is None and dev.type == "cuda":
            peak_tflops = H100_BF16_DENSE_TFLOPS
        comp = component_flops(cfg.model, preset.text, bench.text_len)
        bs = cfg.optim.bs
        result = Result(_metadata(cfg, preset, dev, warmup, steps, peak_tflops, bench.text_len), comp)

        plain_s: dict[str, float] = {}
        for i, rule in enumerate(rules):
            trainer = bench.trainer(rule)

            def measure(row: Row, fn: Callable[[], None], kind_bs: int) -> Row:
                _measure(row, fn, bench, warmup, steps, step_flops(comp, row.kind, row.mode, kind_bs, row.rule or
                                                                   "penalty"), peak_tflops)
                if row.error:  # free what the failed step left behind before the next row
                    for opt in trainer.optimizers():
                        opt.zero_grad(set_to_none=True)
                if row.kind == "bilevel":
                    row.vs_plain = row.seconds / plain_s.get(row.mode, math.nan)
                result.rows.append(row)
                log(format_row(row))
                return row

            if i == 0:  # the reference: a plain proxy step with the same proxy, optimiser and precision
                for mode in modes:
                    plain_s[mode] = measure(Row("plain", mode, "", bs), bench.plain_fn(trainer, mode), bs).seconds
            for mode in modes:
                measure(Row("bilevel", mode, rule, 2 * bs), bench.bilevel_fn(trainer, mode), bs)
            if i == len(rules) - 1:
                for mode in modes:
                    measure(Row("score", mode, "", preset.score_bs), bench.score_fn(trainer, mode), preset.score_bs)
            del trainer
            _reset_peak(dev)
        return result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _metadata(cfg: RaterConfig, preset: Preset, device: torch.device, warmup: int, steps: int,
              peak_tflops: float | None, text_len: int) -> dict[str, Any]:
    m = cfg.model
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    amp = cfg.optim.fp16 if cfg.optim.fp16 >= 0 else (2 if device.type == "cuda" else 0)
    return {"preset": preset.name, "device": device.type, "device_name": name, "torch": torch.__version__,
            "precision": {0: "fp32", 1: "fp16", 2: "bf16"}[amp] + ("" if amp == 0 else " autocast"),
            "warmup": warmup, "steps": steps, "peak_tflops": peak_tflops,
            "bs": cfg.optim.bs, "score_bs": preset.score_bs, "depth": m.depth, "raterDepth": m.raterDepth,
            "image_size": cfg.data.image_size, "patch_nums": list(m.patch_nums), "tokens": m.num_tokens,
            "vocab_size": m.vocab_size, "text": dataclasses.asdict(preset.text), "text_len": text_len}


# ----------------------------------------------------------------------------- formatting
def _f(v: float, spec: str) -> str:
    return "—" if v is None or not math.isfinite(v) else format(v, spec)


def format_row(r: Row) -> str:
    if r.error:
        return f"{r.label} [{r.mode}]: {r.error}"
    return (f"{r.label} [{r.mode}]: {r.seconds:.4f} s/step, {r.img_per_s:.1f} img/s, "
            f"{r.peak_mem_gib:.2f} GiB" + (f", ×{r.vs_plain:.2f} plain" if math.isfinite(r.vs_plain) else ""))


def format_table(result: Result) -> str:
    """Markdown: the timing table, then the FLOPs per image."""
    meta, gpu = result.meta, result.meta["device"] == "cuda"
    rate = "TFLOP/s" if gpu else "GFLOP/s"
    scale = 1.0 if gpu else 1e3
    mem = "peak alloc GiB" if gpu else "peak RSS GiB"
    head = ["step", "input", "imgs/step", "s/step", "min s/step", "img/s", "× plain", "GFLOP/step", rate, "MFU", mem]
    lines = [f"preset `{meta['preset']}` on {meta['device_name']} ({meta['precision']}), torch {meta['torch']}; "
             f"median of {meta['steps']} steps after {meta['warmup']} warm-up; bs {meta['bs']} (+{meta['bs']} val "
             f"for bilevel), scoring batch {meta['score_bs']}, {meta['tokens']} tokens, captions padded to "
             f"{meta['text_len']}",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        cells = [r.label, r.mode, str(r.images)]
        if r.error:
            cells += [r.error] + [""] * (len(head) - 4)
        else:
            cells += [_f(r.seconds, ".4f"), _f(r.seconds_min, ".4f"), _f(r.img_per_s, ",.1f"), _f(r.vs_plain, ".2f"),
                      _f(r.gflop, ",.1f"), _f(r.tflops * scale, ",.1f"), _f(r.mfu * 100, ".1f") + ("%" if math.isfinite(r.mfu) else ""),
                      _f(r.peak_mem_gib, ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| per image | GFLOP |", "|---|---|"]
    lines += [f"| {k} | {v / 1e9:,.3f} |" for k, v in result.flops_per_image.items()]
    return "\n".join(lines)


def flops_summary(cfg: RaterConfig, preset: Preset, text_len: int, peak_tflops: float = H100_BF16_DENSE_TFLOPS,
                  score_bs: int | None = None) -> dict[str, Any]:
    """Model FLOPs of every step at ``cfg``'s scale and the time floor at ``peak_tflops``; needs no
    device and no memory (the models are built on ``meta``), so the paper scale can be counted anywhere."""
    comp = component_flops(cfg.model, preset.text, text_len)
    bs, sbs = cfg.optim.bs, score_bs or preset.score_bs
    steps = []
    cases = [("plain proxy", "plain", "", bs)] + [(f"bilevel {r}", "bilevel", r, 2 * bs) for r in RULES] + \
            [("rater scoring", "score", "", sbs)]
    for label, kind, rule, imgs in cases:
        for mode in MODES:
            f = step_flops(comp, kind, mode, sbs if kind == "score" else bs, rule or "penalty")
            floor = f / (peak_tflops * 1e12)
            steps.append({"step": label, "mode": mode, "images": imgs, "tflop": f / 1e12, "floor_s": floor,
                          "ceiling_img_per_s": imgs / floor, "img_per_s_at_35pct_mfu": 0.35 * imgs / floor})
    return {"preset": preset.name, "bs": bs, "score_bs": sbs, "text_len": text_len, "peak_tflops": peak_tflops,
            "per_image": comp, "steps": steps}


def format_flops(summary: dict[str, Any]) -> str:
    lines = ["| per image | GFLOP |", "|---|---|"]
    lines += [f"| {k} | {v / 1e9:,.1f} |" for k, v in summary["per_image"].items()]
    lines += ["", f"| step | input | imgs | TFLOP/step | floor s/step at {summary['peak_tflops']:g} TFLOP/s "
                  "| ceiling img/s | img/s at 35 % MFU |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['mode']} | {r['images']} | {r['tflop']:,.2f} | {r['floor_s']:.4f} "
              f"| {r['ceiling_img_per_s']:,.0f} | {r['img_per_s_at_35pct_mfu']:,.0f} |" for r in summary["steps"]]
    return "\n".join(lines)
