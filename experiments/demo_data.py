"""The embedded demo dataset: procedural captioned scenes with planted defects.

It lets the whole pipeline (rater training, scoring, pruning, downstream evaluation) run on a CPU
in minutes with nothing downloaded, and it comes with ground truth. Besides clean scenes it
plants the kinds of pairs the paper's ranking is about: ``plain`` (near-uniform image, generic
caption: easy and uninformative), ``noise`` (random pixels), ``misaligned`` (a scene captioned
with another scene's caption), ``duplicate`` (an exact copy of an earlier clean pair) and
``blurred`` (a clean scene, strongly blurred). The truth lives in ``defects.csv``, which no
training code reads; its attribute columns record what each caption asks for, so a GenEval-style
check can test generated images against them.

Everything is a function of ``DemoSpec``: the same spec gives the same bytes.
"""
from __future__ import annotations

import dataclasses
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from alchemist.utils.errors import UserError
from alchemist.utils.io import atomic_open
from experiments.types import KINDS

FORMAT_VERSION = 1  # bump when the generator's output changes, so old outputs are not reused

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
           "yellow": (240, 200, 40), "purple": (140, 60, 190), "orange": (245, 130, 30)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SIZES = {"small": 0.16, "large": 0.26}  # object diameter as a fraction of the image side
GAP = 0.04  # least space between neighbouring objects, so that counts stay countable
# region box (x0, y0, x1, y1) in unit coordinates, the axis along which objects line up, phrase
POSITIONS = {
    "left": ((0.03, 0.03, 0.50, 0.97), "y", "on the left"),
    "right": ((0.50, 0.03, 0.97, 0.97), "y", "on the right"),
    "top": ((0.03, 0.03, 0.97, 0.50), "x", "at the top"),
    "bottom": ((0.03, 0.50, 0.97, 0.97), "x", "at the bottom"),
    "center": ((0.20, 0.20, 0.80, 0.80), "x", "in the center"),
}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
TEMPLATES = ("{objects} {where} on a {background} background",
             "a {background} background with {objects} {where}",
             "{objects} {where}, {background} background")
GENERIC_CAPTIONS = ("a plain background", "an image", "a picture", "a blank image", "an empty background")
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, for anti-aliased edges


# ----------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class DemoSpec:
    n_train: int = 2000
    n_val: int = 500
    image_size: int = 32
    seed: int = 0
    rate_plain: float = 0.10
    rate_noise: float = 0.10
    rate_misaligned: float = 0.10
    rate_duplicate: float = 0.05
    rate_blurred: float = 0.10

    def __post_init__(self):
        if self.n_train < 1 or self.n_val < 1:
            raise UserError("demo n_train and n_val must be >= 1")
        if self.image_size < 16:
            raise UserError(f"demo image_size must be >= 16 to draw shapes, got {self.image_size}")
        if self.seed < 0:
            raise UserError(f"demo seed must be >= 0, got {self.seed}")
        rates = {k: getattr(self, f"rate_{k}") for k in KINDS[1:]}
        if not all(0.0 <= r <= 1.0 for r in rates.values()) or sum(rates.values()) > 1.0 + 1e-9:
            raise UserError(f"demo rates must be in [0, 1] and sum to <= 1, got {rates}")
        counts = self.planted_counts()
        if counts["clean"] < 0 or (counts["clean"] == 0 and counts["duplicate"] + counts["misaligned"] > 0):
            raise UserError(f"demo rates leave {counts['clean']} clean rows, but duplicate and misaligned "
                             "rows need clean sources; lower the rates")

    def planted_counts(self) -> dict[str, int]:
        """Train rows per kind: round(rate * n_train) of each defect, the rest clean."""
        counts = {k: round(getattr(self, f"rate_{k}") * self.n_train) for k in KINDS[1:]}
        return {"clean": self.n_train - sum(counts.values()), **counts}


@dataclass(frozen=True)
class DemoSummary:
    out_dir: Path
    spec: DemoSpec
    counts: dict[str, int]  # train rows per kind, as read back from defects.csv
    n_val: int
    reused: bool
    seconds: float


def format_summary(s: DemoSummary) -> str:
    lines = [f"demo data in {s.out_dir} ({'reused' if s.reused else f'generated in {s.seconds:.1f}s'}; "
             f"{s.spec.image_size}x{s.spec.image_size}, seed {s.spec.seed})",
             f"  train: {sum(s.counts.values())} pairs"]
    lines += [f"    {k:<10} {s.counts.get(k, 0):6d}" for k in KINDS]
    lines.append(f"  val:   {s.n_val} pairs (clean)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    count: int
    position: str
    background: str
    size: str
    template: int

    @property
    def caption(self) -> str:
        noun = self.shape + ("es" if self.shape.endswith("ss") else "s") if self.count > 1 else self.shape
        objects = f"{COUNT_WORDS[self.count]} {self.size} {self.colour} {noun}"
        return TEMPLATES[self.template].format(objects=objects, where=POSITIONS[self.position][2],
                                              background=self.background)

    def attributes(self) -> dict:
        return {k: getattr(self, k) for k in ("shape", "colour", "count", "position", "background", "size")}


def _fits(position: str, size: str, count: int) -> bool:
    (x0, y0, x1, y1), axis, _ = POSITIONS[position]
    long, short = (x1 - x0, y1 - y0) if axis == "x" else (y1 - y0, x1 - x0)
    return SIZES[size] + (GAP if count > 1 else 0.0) <= long / count + 1e-9 and SIZES[size] <= short


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene; large objects that would not fit side by side are drawn small."""
    position = str(rng.choice(list(POSITIONS)))
    count = int(rng.integers(1, 4))
    size = str(rng.choice(list(SIZES)))
    if not _fits(position, size, count):
        size = "small"
    return Scene(shape=str(rng.choice(SHAPES)), colour=str(rng.choice(list(COLOURS))), count=count,
                 position=position, background=str(rng.choice(list(BACKGROUNDS))), size=size,
                 template=int(rng.integers(len(TEMPLATES))))


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        d.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=fill)
        d.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Objects line up in equal slots along the region's long axis, each jittered inside its slot
    but never closer than ``GAP`` to a neighbour."""
    side = size * SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(img)
    (x0, y0, x1, y1), axis, _ = POSITIONS[scene.position]
    (a0, a1), (b0, b1) = ((x0, x1), (y0, y1)) if axis == "x" else ((y0, y1), (x0, x1))
    obj = SIZES[scene.size]
    slot = (a1 - a0) / scene.count
    for k in range(scene.count):
        along = a0 + slot * (k + 0.5) + rng.uniform(-1, 1) * max(slot - obj - GAP, 0.0) / 2
        across = (b0 + b1) / 2 + rng.uniform(-1, 1) * max(b1 - b0 - obj, 0.0) / 2
        cx, cy = (along, across) if axis == "x" else (across, along)
        _draw_shape(d, scene.shape, cx * side, cy * side, obj * side / 2, COLOURS[scene.colour])
    return img.resize((size, size), Image.Resampling.BOX)


def _plain_image(size: int, rng: np.random.Generator) -> Image.Image:
    """A uniform colour, half the time with faint (+-3 levels) pixel noise."""
    palette = list(BACKGROUNDS.values()) + list(COLOURS.values())
    base_HW3 = np.broadcast_to(np.array(palette[rng.integers(len(palette))], dtype=np.int16), (size, size, 3))
    if rng.random() < 0.5:
        base_HW3 = base_HW3 + rng.integers(-3, 4, size=(size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(base_HW3, 0, 255).astype(np.uint8), "RGB")


def _noise_image(size: int, rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), "RGB")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- generation
def plant_kinds(spec: DemoSpec, rng: np.random.Generator) -> list[str]:
    """Exactly ``planted_counts()`` of each kind at random rows; the first duplicate comes after a clean row."""
    kinds = np.array([k for k, n in spec.planted_counts().items() for _ in range(n)], dtype=object)
    kinds = kinds[rng.permutation(len(kinds))]
    dup, clean = np.flatnonzero(kinds == "duplicate"), np.flatnonzero(kinds == "clean")
    if len(dup) and dup[0] < clean[0]:
        kinds[dup[0]], kinds[clean[0]] = "clean", "duplicate"
    return kinds.tolist()


def _row(id: str, split: str, kind: str, caption: str, asked: Scene | None, true_caption: str,
         source_id: str = "") -> dict:
    attrs = asked.attributes() if asked else {"shape": "", "colour": "", "count": 0, "position": "",
                                              "background": "", "size": ""}
    return {"id": id, "split": split, "kind": kind, "source_id": source_id, "caption": caption,
            "true_caption": true_caption, **attrs}


def _generate_train(spec: DemoSpec, kinds: list[str], rng: np.random.Generator,
                    name: Callable[[int], str]) -> tuple[list[dict], list[bytes]]:
    """Two passes: first every self-contained row, then rows that copy from clean ones."""
    rows: list[dict] = [{}] * spec.n_train
    pngs: list[bytes] = [b""] * spec.n_train
    scenes: dict[int, Scene] = {}
    blur = ImageFilter.GaussianBlur(radius=spec.image_size / 12)
    for i, kind in enumerate(tqdm(kinds, desc="demo train", disable=None)):
        if kind in ("clean", "blurred"):
            scene = scenes[i] = sample_scene(rng)
            img = render_scene(scene, spec.image_size, rng)
            pngs[i] = png_bytes(img.filter(blur) if kind == "blurred" else img)
            rows[i] = _row(name(i), "train", kind, scene.caption, scene, scene.caption)
        elif kind == "plain":
            pngs[i] = png_bytes(_plain_image(spec.image_size, rng))
            caption = str(rng.choice(GENERIC_CAPTIONS))
            rows[i] = _row(name(i), "train", kind, caption, None, caption)
        elif kind == "noise":
            pngs[i] = png_bytes(_noise_image(spec.image_size, rng))
            asked = sample_scene(rng)
            rows[i] = _row(name(i), "train", kind, asked.caption, asked, "")
    clean = np.flatnonzero(np.array(kinds, dtype=object) == "clean")
    for i, kind in enumerate(kinds):
        if kind == "duplicate":
            src = int(rng.choice(clean[clean < i]))
            pngs[i] = pngs[src]
            rows[i] = {**rows[src], "id": name(i), "kind": kind, "source_id": name(src)}
        elif kind == "misaligned":
            src = int(rng.choice(clean))
            asked = scenes[src]
            scene = sample_scene(rng)
            while (scene.shape, scene.colour) == (asked.shape, asked.colour):  # clearly a different scene
                scene = sample_scene(rng)
            pngs[i] = png_bytes(render_scene(scene, spec.image_size, rng))
            rows[i] = _row(name(i), "train", kind, asked.caption, asked, scene.caption, source_id=name(src))
    return rows, pngs


def _generate_val(spec: DemoSpec, rng: np.random.Generator, name: Callable[[int], str],
                  taken: set[bytes]) -> tuple[list[dict], list[bytes]]:
    """Clean scenes only, none pixel-identical to a train image."""
    rows, pngs = [], []
    for j in tqdm(range(spec.n_val), desc="demo val", disable=None):
        while True:
            scene = sample_scene(rng)
            png = png_bytes(render_scene(scene, spec.image_size, rng))
            if png not in taken:
                break
        rows.append(_row(name(j), "val", "clean", scene.caption, scene, scene.caption))
        pngs.append(png)
    return rows, pngs


def _spec_record(spec: DemoSpec) -> dict:
    return {"format_version": FORMAT_VERSION, "spec": dataclasses.asdict(spec)}


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_open(path) as f:
        df.to_csv(f, index=False)


def summarize(out_dir: str | Path, reused: bool = True, seconds: float = 0.0) -> DemoSummary:
    """Counts per kind read back from a finished output folder."""
    out_dir = Path(out_dir)
    spec = DemoSpec(**json.loads((out_dir / "spec.json").read_text())["spec"])
    defects = pd.read_csv(out_dir / "defects.csv", dtype=str, keep_default_na=False)
    train = defects[defects["split"] == "train"]
    counts = {k: int((train["kind"] == k).sum()) for k in KINDS}
    return DemoSummary(out_dir=out_dir, spec=spec, counts=counts, n_val=int((defects["split"] == "val").sum()),
                       reused=reused, seconds=seconds)


def generate_demo(out_dir: str | Path, spec: DemoSpec = DemoSpec(), force: bool = False) -> DemoSummary:
    """Write ``images/*.png``, ``train.csv``, ``val.csv``, ``defects.csv`` and ``spec.json`` to ``out_dir``.

    An existing output with the same spec (and generator version) is reused unless ``force``.
    ``spec.json`` is written last and removed first, so it marks a complete output.
    """
    out_dir = Path(out_dir)
    spec_path = out_dir / "spec.json"
    complete = all((out_dir / n).is_file() for n in ("spec.json", "train.csv", "val.csv", "defects.csv"))
    if not force and complete and json.loads(spec_path.read_text()) == _spec_record(spec):
        return summarize(out_dir, reused=True)
    t0 = time.perf_counter()
    spec_path.unlink(missing_ok=True)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*img_dir.glob("train_*.png"), *img_dir.glob("val_*.png")]:
        stale.unlink()

    width = max(5, len(str(max(spec.n_train, spec.n_val) - 1)))
    train_name, val_name = f"train_{{:0{width}d}}".format, f"val_{{:0{width}d}}".format
    kinds_rng, train_rng, val_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(3))
    train_rows, train_pngs = _generate_train(spec, plant_kinds(spec, kinds_rng), train_rng, train_name)
    val_rows, val_pngs = _generate_val(spec, val_rng, val_name, set(train_pngs))

    for row, png in zip(train_rows + val_rows, train_pngs + val_pngs):
        (img_dir / f"{row['id']}.png").write_bytes(png)
    for split, rows in (("train", train_rows), ("val", val_rows)):
        table = pd.DataFrame({"id": [r["id"] for r in rows],
                              "image_path": [f"images/{r['id']}.png" for r in rows],
                              "caption": [r["caption"] for r in rows]})
        _write_csv(table, out_dir / f"{split}.csv")
    _write_csv(pd.DataFrame(train_rows + val_rows), out_dir / "defects.csv")
    with atomic_open(spec_path) as f:
        json.dump(_spec_record(spec), f, indent=2)
        f.write("\n")
    return summarize(out_dir, reused=False, seconds=time.perf_counter() - t0)
