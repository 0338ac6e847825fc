"""Heuristic baselines (alchemist.heuristics) and scripts/score_heuristics.py."""
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from alchemist.heuristics import (AestheticScorer, ClipScorer, as_batch, clarity, edge_density, grey,
                                  low_frequency_energy, otsu_threshold)
from alchemist.ratings import read_ratings

ROOT = Path(__file__).resolve().parents[1]


def _scene(seed=0, size=96) -> Image.Image:
    """Shapes on a textured background: edges at several scales."""
    rng = np.random.default_rng(seed)
    base = (rng.random((size // 8, size // 8, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(base).resize((size, size), Image.Resampling.NEAREST)
    d = ImageDraw.Draw(img)
    for _ in range(8):
        x, y = rng.integers(0, size - 20, 2)
        d.ellipse((x, y, x + rng.integers(6, 20), y + rng.integers(6, 20)), fill=tuple(rng.integers(0, 256, 3).tolist()))
    return img


@pytest.fixture(scope="module")
def images():
    sharp = _scene()
    return {"sharp": sharp, "blurred": sharp.filter(ImageFilter.GaussianBlur(2.5)),
            "flat": Image.new("RGB", sharp.size, (90, 140, 200))}


# ----------------------------------------------------------------------------- statistics
def test_inputs_pil_and_tensor_agree(images):
    t = as_batch(images["sharp"])
    assert t.shape == (1, 3, 96, 96) and -1 <= t.min() and t.max() <= 1
    np.testing.assert_allclose(grey(t)[0].numpy(), np.asarray(images["sharp"].convert("L"), dtype=np.float32), atol=0.51)
    batch = as_batch([images["sharp"], images["blurred"]])
    torch.testing.assert_close(clarity(batch), torch.cat([clarity(images["sharp"]), clarity(images["blurred"])]))
    with pytest.raises(ValueError, match="3HW or B3HW"):
        as_batch(torch.zeros(2, 1, 8, 8))


def test_clarity_is_laplacian_variance_and_drops_with_blur(images):
    g = grey(images["sharp"])[0].double().numpy()
    expected = ndimage.laplace(g, mode="mirror").var()  # mirror = OpenCV's reflect-101 border
    assert clarity(images["sharp"]).item() == pytest.approx(expected, rel=1e-9)
    c = {k: clarity(v).item() for k, v in images.items()}
    assert c["blurred"] < 0.2 * c["sharp"] and c["flat"] == 0.0


def test_low_frequency_energy_rises_with_blur(images):
    lf = {k: low_frequency_energy(v).item() for k, v in images.items()}
    assert 0 < lf["sharp"] < lf["blurred"] < 1 and lf["flat"] == 1.0
    # a wider disc holds more of the energy
    assert low_frequency_energy(images["sharp"], radius=0.3).item() > lf["sharp"]


def test_edge_density_flat_is_zero_and_lowest(images):
    ed = {k: edge_density(v).item() for k, v in images.items()}
    assert ed["flat"] == 0.0
    assert 0.0 < ed["blurred"] and 0.0 < ed["sharp"] < 0.5
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    assert edge_density(noise).item() > ed["sharp"]


def test_otsu_lands_between_the_modes():
    rng = np.random.default_rng(0)
    low, high = rng.normal(50, 5, 3000), rng.normal(200, 10, 1000)
    t = otsu_threshold(np.concatenate([low, high]))
    assert low.max() <= t < high.min()
    # Overlapping modes: agrees with a brute-force maximum of the between-class variance.
    x = np.concatenate([rng.normal(100, 20, 3000), rng.normal(170, 15, 2000)])
    cands = np.linspace(x.min(), x.max(), 2001)[1:-1]
    between = [(x <= c).mean() * (x > c).mean() * (x[x <= c].mean() - x[x > c].mean()) ** 2 for c in cands]
    assert otsu_threshold(x) == pytest.approx(cands[int(np.argmax(between))], abs=2 * np.ptp(x) / 256)
    assert otsu_threshold(np.array([0.0, 0.0, 10.0, 10.0])) < 10.0
    assert otsu_threshold(np.full(10, 3.0)) == 3.0


# ----------------------------------------------------------------------------- CLIP / aesthetic
@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory) -> Path:
    dims = [(16, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    g = torch.Generator().manual_seed(0)
    state = {}
    for i, (a, b) in zip((0, 2, 4, 6, 7), dims):
        state[f"layers.{i}.weight"] = torch.randn(b, a, generator=g) / a**0.5
        state[f"layers.{i}.bias"] = torch.randn(b, generator=g)
    path = tmp_path_factory.mktemp("aesthetic") / "mlp.pth"
    torch.save(state, path)
    return path


def test_clip_scorer_scores_and_matches_clip_logits(tiny_clip, images):
    scorer = ClipScorer(tiny_clip)
    imgs = as_batch([images["sharp"], images["blurred"], images["flat"]])
    caps = ["a red circle", "blurry shapes", "a blue wall with a much longer caption " * 5]
    s = scorer(imgs, caps)
    assert s.shape == (3,) and torch.isfinite(s).all() and (s.abs() <= 100).all()
    torch.testing.assert_close(ClipScorer(tiny_clip)(imgs, caps), s)  # deterministic across loads
    assert len(set(s.tolist())) == 3
    # Same numbers as CLIP's own forward pass: logits_per_image = exp(logit_scale) * cos.
    pixels = torch.nn.functional.interpolate((imgs + 1) / 2, size=(32, 32), mode="bicubic", antialias=True)
    pixels = (pixels.clamp(0, 1) - scorer.mean) / scorer.std
    tok = scorer._tokenizer(caps, padding=True, truncation=True, max_length=40, return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels)
    torch.testing.assert_close(100 * out.logits_per_image.diag() / scorer.model.logit_scale.exp(), s,
                               atol=1e-4, rtol=1e-4)


def test_aesthetic_scorer(tiny_clip, mlp_file, images, tmp_path):
    scorer = AestheticScorer(tiny_clip, mlp_file)
    imgs = as_batch([images["sharp"], images["blurred"]])
    s = scorer(imgs)
    assert s.shape == (2,) and s[0] != s[1]
    torch.testing.assert_close(AestheticScorer(tiny_clip, mlp_file)(imgs), s)
    state = torch.load(mlp_file, weights_only=True)
    emb = scorer.clip.image_embeds(imgs)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2))
    x = emb
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(x[:, 0], s)
    torch.save({k: v for k, v in state.items() if not k.startswith("layers.7")}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="LAION layout"):
        AestheticScorer(tiny_clip, tmp_path / "bad.pth")
    wide = dict(state, **{"layers.0.weight": torch.zeros(1024, 768)})
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="768-d embeddings"):
        AestheticScorer(tiny_clip, tmp_path / "wide.pth")


def test_missing_model_paths_are_clear(tmp_path, tiny_clip):
    with pytest.raises(FileNotFoundError, match="CLIP model directory .*nothing is downloaded"):
        ClipScorer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="aesthetic MLP weights"):
        AestheticScorer(tiny_clip, tmp_path / "nope.pth")


# ----------------------------------------------------------------------------- CLI
def test_score_heuristics_cli(tmp_path, images, capsys):
    spec = importlib.util.spec_from_file_location("score_cli", ROOT / "scripts/score_heuristics.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    (tmp_path / "img").mkdir()
    for name, img in images.items():
        img.save(tmp_path / "img" / f"{name}.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    pd.DataFrame({"id": ["s", "b", "f", "x"],
                  "image_save_path": [f"img/{n}.png" for n in ("sharp", "blurred", "flat", "broken")],
                  "caption": ["sharp", "blurred", "flat", "broken"], "extra": [1, 2, 3, 4]}
                 ).to_csv(tmp_path / "pairs.csv", index=False)
    out = tmp_path / "out" / "ratings.csv"
    assert cli.main(["--csv", str(tmp_path / "pairs.csv"), "--out", str(out), "--heuristic", "lowfreq",
                     "--image-size", "64", "--workers", "0"]) == 0
    ratings = read_ratings(out)
    assert list(ratings["id"]) == ["s", "b", "f"]  # least low-frequency energy ranks first
    assert {"image_save_path", "extra", "lowfreq", "score", "rank"} <= set(ratings.columns)
    np.testing.assert_allclose(ratings["score"], -ratings["lowfreq"].astype(float))
    skipped = pd.read_csv(out.parent / "skipped.csv")
    assert list(skipped["id"]) == ["x"] and "unreadable image" in skipped["reason"][0]
    assert "rated 3 pairs" in capsys.readouterr().out
    assert cli.main(["--csv", str(tmp_path / "pairs.csv"), "--out", str(out), "--heuristic", "clip",
                     "--clip-path", str(tmp_path / "no_clip")]) == 2
    assert "CLIP model directory" in capsys.readouterr().err
