"""Offline metrics (alchemist.evaluation.metrics) and the demo's attribute classifier with the metrics it
judges (experiments.attributes: GenEval-lite, FID-lite)."""
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import linalg

from alchemist.batch import TextFeatures
from alchemist.data.tokens import Featurizer
from alchemist.evaluation.metrics import (InceptionFeatures, clip_score, fid, frechet_distance,
                                          frechet_distance_gaussians, generate_for_prompts, heldout_token_loss)
from alchemist.heuristics import ClipScorer
from alchemist.models.proxy import Proxy
from alchemist.models.vqvae import VQVAE
from experiments.attributes import (ATTRIBUTES, AttributeClassifier, encode_attributes, fid_lite, geneval_lite,
                                    load_attribute_classifier, load_clean_demo, train_attribute_classifier)
from experiments.demo_data import DemoSpec, generate_demo

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- Fréchet distance
def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_matches_closed_form():
    rng = np.random.default_rng(0)
    d = 5
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), _spd(rng, d), _spd(rng, d)
    # Tr((Σ1Σ2)^½) = Σ √eig(Σ1^½ Σ2 Σ1^½), a symmetric PSD matrix: no sqrtm of a non-symmetric product
    r1 = linalg.sqrtm(s1).real
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance_gaussians(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # commuting (diagonal) covariances: Σ (√a − √b)²
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    assert frechet_distance_gaussians(mu1, np.diag(a), mu1, np.diag(b)) == pytest.approx(
        np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-9)
    # from samples, the fitted Gaussians converge to the true ones
    x = rng.multivariate_normal(mu1, s1, size=40000)
    y = rng.multivariate_normal(mu2, s2, size=40000)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.05)


def test_frechet_zero_for_same_set_and_grows_with_mean_shift():
    x = torch.randn(300, 16, dtype=torch.float64)
    assert abs(frechet_distance(x, x)) < 1e-8
    delta = torch.zeros(16, dtype=torch.float64)
    shifts = []
    for k in (0.5, 1.0, 2.0):
        delta[0] = k
        shifts.append(frechet_distance(x, x + delta))
        assert shifts[-1] == pytest.approx(k**2, rel=1e-6)  # same covariance: FD = |δ|²
    assert shifts == sorted(shifts)


def test_frechet_survives_singular_covariances_and_rejects_bad_input():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(12, 32))  # fewer rows than dimensions: rank-deficient Σ
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # handled, not warned about
        fd = frechet_distance(a, b)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r1 = linalg.sqrtm(s1 + 1e-12 * np.eye(32)).real
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert fd == pytest.approx(expected, rel=1e-3)
    assert abs(frechet_distance(a, a)) < 1e-4
    with pytest.raises(ValueError, match="at least 2 feature rows"):
        frechet_distance(a[:1], b)
    with pytest.raises(ValueError, match="matching shapes"):
        frechet_distance(a, b[:, :8])


# ----------------------------------------------------------------------------- GenEval-lite bookkeeping
class StubClassifier(torch.nn.Module):
    """Predicts a fixed row per image; the image's first pixel holds the row index."""

    def __init__(self, preds_BA):
        super().__init__()
        self.preds_BA = preds_BA

    def predict(self, img_B3HW):
        return self.preds_BA[img_B3HW[:, 0, 0, 0].long()]


def _index_images(n):
    img = torch.zeros(n, 3, 4, 4)
    img[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    return img


def test_geneval_lite_bookkeeping():
    clf = StubClassifier(torch.zeros(4, len(ATTRIBUTES), dtype=torch.long))  # circle red 1 left white small
    base = {"shape": "circle", "colour": "red", "count": 1, "position": "left", "background": "white", "size": "small"}
    requested = pd.DataFrame([base,
                              {**base, "shape": "square"},
                              {**base, "colour": ""},  # not asked: neither a hit nor a miss
                              {**base, "count": 2, "position": "right"}])
    out = geneval_lite(clf, _index_images(4), requested, batch_size=3)
    assert out["shape"] == 0.75 and out["colour"] == 1.0 and out["count"] == 0.75 and out["position"] == 0.75
    assert out["background"] == out["size"] == 1.0
    assert out["mean"] == pytest.approx(20 / 23)  # 23 asked pairs, 3 wrong
    assert out["all_correct"] == 0.5  # rows 0 and 2
    assert geneval_lite(clf, _index_images(4), requested.astype({"count": float})) == out  # 1.0 reads as 1
    # only the columns given are judged
    assert set(geneval_lite(clf, _index_images(4), requested[["colour", "count"]])) == {"colour", "count", "mean",
                                                                                       "all_correct"}
    with pytest.raises(ValueError, match="unknown value"):
        geneval_lite(clf, _index_images(4), requested.assign(shape="hexagon"))
    with pytest.raises(ValueError, match="3 images but 4 rows"):
        geneval_lite(clf, _index_images(3), requested)
    with pytest.raises(ValueError, match="at least one of the columns"):
        geneval_lite(clf, _index_images(4), requested[[]])


# ----------------------------------------------------------------------------- trained classifier
@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, DemoSpec(n_train=200, n_val=300, seed=1))
    return out


@pytest.fixture(scope="module")
def trained(demo_dir, tmp_path_factory):
    """A briefly trained classifier: colour, background, count and size are learnt in seconds, shape is not."""
    path = tmp_path_factory.mktemp("clf") / "clf.pt"
    stats = train_attribute_classifier(demo_dir, path, epochs=4, seed=0, n_extra=1500, batch_size=64)
    return path, stats


def test_classifier_training_beats_chance_and_reloads(trained, demo_dir):
    path, stats = trained
    acc = stats["heldout_accuracy"]
    assert stats["n_heldout"] == 300 and stats["n_train"] > 1500
    for a in ("colour", "background"):
        assert acc[a] > 0.9, acc
    for a in ("count", "position", "size"):
        assert acc[a] > 1.0 / len(ATTRIBUTES[a]) + 0.2, acc
    clf = load_attribute_classifier(path)
    img, rows = load_clean_demo(demo_dir, "val")
    again = load_attribute_classifier(path)
    assert torch.equal(clf.predict(img), again.predict(img))
    assert clf.features(img[:7]).shape == (7, clf.config["feat_dim"])


def test_untrained_classifier_is_at_chance(demo_dir):
    img, rows = load_clean_demo(demo_dir, "val")
    out = geneval_lite(AttributeClassifier().eval(), img, rows[["colour", "background"]])
    assert out["mean"] < 0.6


def test_geneval_lite_true_vs_shuffled_attributes(trained, demo_dir):
    clf = load_attribute_classifier(trained[0])
    img, rows = load_clean_demo(demo_dir, "val")
    asked = rows[["colour", "background"]]
    assert geneval_lite(clf, img, asked)["mean"] >= 0.9
    shuffled = asked.sample(frac=1.0, random_state=0).reset_index(drop=True)
    out = geneval_lite(clf, img, shuffled)
    assert out["mean"] < 0.4  # chance is 1/6 and 1/3
    assert out["all_correct"] < 0.15


def test_fid_lite_real_vs_real_below_real_vs_defects(trained, demo_dir):
    clf = load_attribute_classifier(trained[0])
    img, _ = load_clean_demo(demo_dir, "val")
    real_a, real_b = img[:150], img[150:]
    noise = torch.rand_like(real_b) * 2 - 1
    flat = real_b.mean(dim=(2, 3), keepdim=True).expand_as(real_b)
    same = fid_lite(clf, real_a, real_b)
    assert same < 0.5 * fid_lite(clf, real_a, flat) and same < 0.5 * fid_lite(clf, real_a, noise)


def test_classifier_errors(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_attribute_classifier(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="not a finished demo data folder"):
        train_attribute_classifier(tmp_path, tmp_path / "clf.pt")
    ckpt = torch.load(trained[0], weights_only=True)
    ckpt["vocab"]["shape"] = ["blob"]
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="other attribute vocabularies"):
        load_attribute_classifier(tmp_path / "old.pt")
    with pytest.raises(ValueError, match="no column 'colour'"):
        encode_attributes(pd.DataFrame({"shape": ["circle"]}))


def test_cli_prints_accuracy(demo_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("experiment_cli", ROOT / "scripts/experiment.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["classifier", "--demo", str(demo_dir), "--out", str(tmp_path / "c.pt"), "--epochs", "1",
                     "--extra", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy on 300" in out and "background" in out
    assert load_attribute_classifier(tmp_path / "c.pt").config["image_size"] == 32
    assert cli.main(["classifier", "--demo", str(tmp_path / "missing"), "--out", str(tmp_path / "d.pt")]) == 2


# ----------------------------------------------------------------------------- Inception / CLIP stand-ins
class TinyInceptionWithFlag(torch.nn.Module):
    """Like NVlabs' inception-2015-12-05.pt: features only when asked (else a 1-d 'logit')."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3)

    def forward(self, x, return_features: bool = False):
        f = torch.cat([self.conv(x / 255.0).mean((2, 3)), x.amax((1, 2, 3))[:, None],
                       torch.full((x.shape[0], 1), float(x.shape[-1]))], 1)
        return f if return_features else f.sum(1)


class TinyInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3)

    def forward(self, x):
        return self.conv(x / 255.0).mean((2, 3), keepdim=True)  # (B, D, 1, 1) like pytorch-fid's pool3


def test_inception_features_from_local_files(tmp_path):
    img = torch.rand(4, 3, 16, 16) * 2 - 1
    img[0] = 1.0
    torch.jit.script(TinyInceptionWithFlag()).save(str(tmp_path / "incep.pt"))
    ext = InceptionFeatures(tmp_path / "incep.pt", image_size=24)
    f = ext(img)
    assert f.shape == (4, 8) and torch.equal(f, InceptionFeatures(tmp_path / "incep.pt", image_size=24)(img))
    assert f[0, 6] == pytest.approx(255.0) and (f[:, 7] == 24).all()  # 0-255 input, resized first
    assert abs(fid(ext, img, img)) < 1e-3  # 4 rows in 8-d: singular, the eps route

    torch.jit.script(TinyInception()).save(str(tmp_path / "plain.pt"))
    assert InceptionFeatures(tmp_path / "plain.pt", image_size=None)(img).shape == (4, 5)
    sd_model = TinyInception()
    torch.save(sd_model.state_dict(), tmp_path / "sd.pt")
    from_sd = InceptionFeatures(tmp_path / "sd.pt", model=TinyInception(), image_size=None)
    torch.testing.assert_close(from_sd(img), sd_model(((img + 1) * 127.5)).flatten(1))


def test_inception_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        InceptionFeatures(tmp_path / "missing.pt")
    torch.save(TinyInception().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="needs the module"):
        InceptionFeatures(tmp_path / "sd.pt")
    (tmp_path / "junk.pt").write_text("hello")
    with pytest.raises(ValueError, match="could not read"):
        InceptionFeatures(tmp_path / "junk.pt", model=TinyInception())


def test_clip_score_from_local_dir(tiny_clip, tmp_path):
    img = torch.rand(5, 3, 32, 32) * 2 - 1
    caps = ["a red circle", "two blue squares", "a cross", "three small diamonds", "a plain background"]
    s = clip_score(tiny_clip, img, caps, batch_size=2)
    expected = ClipScorer(tiny_clip)(img, caps).mean().item()
    assert s == pytest.approx(expected, abs=1e-4) and -100 <= s <= 100
    assert clip_score(ClipScorer(tiny_clip), img, caps) == pytest.approx(s, abs=1e-4)
    with pytest.raises(FileNotFoundError, match="CLIP model directory"):
        clip_score(tmp_path / "no_clip", img, caps)
    with pytest.raises(ValueError, match="5 images but 4 captions"):
        clip_score(tiny_clip, img, caps[:4])


# ----------------------------------------------------------------------------- proxy: held-out loss, generation
PATCH_NUMS, V, CVAE, D = (1, 2, 3, 4), 64, 8, 16


class StubText:
    """Deterministic per-caption features; the empty caption keeps one (zero) token."""

    def __init__(self):
        self.emb = torch.randn(128, D, generator=torch.Generator().manual_seed(0))

    def __call__(self, captions):
        T = 8
        ids = torch.tensor([[ord(c) % 128 for c in (cap + " " * T)[:T]] for cap in captions])
        mask = torch.tensor([[i < max(len(cap), 1) for i in range(T)] for cap in captions])
        hidden = self.emb[ids] * (mask[..., None] & (ids[..., None] != 32))
        return TextFeatures(hidden, mask, hidden.sum(1) / mask.sum(1, keepdim=True))


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(1)
    vqvae = VQVAE(vocab_size=V, z_channels=CVAE, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=PATCH_NUMS).eval()
    return Proxy(2, V, CVAE, PATCH_NUMS, D), vqvae, StubText()


def test_heldout_token_loss_is_mean_over_all_tokens(tiny_models):
    proxy, vqvae, text = tiny_models
    featurize = Featurizer(vqvae, text, torch.device("cpu"))
    size = vqvae.image_size
    g = torch.Generator().manual_seed(0)
    raws = [{"img_B3HW": torch.rand(b, 3, size, size, generator=g) * 2 - 1, "captions": [f"cap {i}" for i in range(b)]}
            for b in (3, 0, 1)]  # uneven batches, one empty (all images unreadable)
    proxy.train()
    loss = heldout_token_loss(proxy, featurize, raws)
    assert proxy.training and all(p.grad is None for p in proxy.parameters())
    proxy.eval()
    with torch.no_grad():
        all_BL = torch.cat([proxy.per_token_loss(featurize(r)) for r in raws if len(r["captions"])])
    assert loss == pytest.approx(all_BL.mean().item(), rel=1e-6)  # per token, not a mean of batch means
    assert loss == pytest.approx(heldout_token_loss(proxy, featurize, raws))  # dropout off: deterministic
    with pytest.raises(ValueError, match="no usable batch"):
        heldout_token_loss(proxy, featurize, raws[1:2])


def test_generate_for_prompts_batched_seeded_deterministic(tiny_models):
    proxy, vqvae, text = tiny_models
    caps = ["a red circle", "two blue squares", "a cross", "three diamonds", "a square"]
    img = generate_for_prompts(proxy, vqvae, text, caps, cfg=2.0, top_k=10, top_p=0.9, seed=3, batch_size=2)
    size = vqvae.image_size
    assert img.shape == (5, 3, size, size) and img.min() >= -1 and img.max() <= 1
    assert torch.equal(img, generate_for_prompts(proxy, vqvae, text, caps, cfg=2.0, top_k=10, top_p=0.9, seed=3,
                                                 batch_size=2))
    assert not torch.equal(img, generate_for_prompts(proxy, vqvae, text, caps, cfg=2.0, top_k=10, top_p=0.9, seed=4,
                                                     batch_size=2))
    # batch i uses seed + i, guided against the empty caption
    second = proxy.generate(vqvae, text(caps[2:4]), text([""]), cfg=2.0, top_k=10, top_p=0.9, seed=4)
    torch.testing.assert_close(img[2:4], second)
