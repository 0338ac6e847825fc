"""The bundled demo tokenizer: `make demo` uses it instead of training one, only on the images it was trained on."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from alchemist.build import build_tokenizer
from alchemist.config import RaterConfig, load_config
from alchemist.models.vqvae import VQVAE
from alchemist.tokenizer_training import (bundle_tokenizer, images_fingerprint, reconstruction_mse,
                                          use_bundled_tokenizer)
from alchemist.utils.io import atomic_torch_save
from experiments.demo_data import DemoSpec, generate_demo
BUNDLED_TOKENIZER = "configs/demo_tokenizer.pt"  # Makefile: make demo


def test_the_bundle_is_a_trained_tokenizer_of_the_seed0_demo_images(tmp_path):
    """It matches a fresh seed-0 demo dataset (fingerprint and steps), loads with the demo config, and
    reconstructs the held-out demo images as a trained tokenizer does (an untrained one: MSE ~0.7)."""
    generate_demo(tmp_path / "data", DemoSpec(seed=0))
    assert use_bundled_tokenizer(BUNDLED_TOKENIZER, tmp_path / "data/train.csv", tmp_path / "tokenizer.pt", 800)
    assert (tmp_path / "tokenizer.pt").read_bytes() == open(BUNDLED_TOKENIZER, "rb").read()
    cfg = load_config(RaterConfig, "configs/demo_rater.json", {"ckpt_path": str(tmp_path)})
    vq = build_tokenizer(cfg.model, torch.device("cpu"))
    assert reconstruction_mse(vq, tmp_path / "data/val.csv") < 0.03

    other = tmp_path / "seed1"
    generate_demo(other / "data", DemoSpec(seed=1))
    assert not use_bundled_tokenizer(BUNDLED_TOKENIZER, other / "data/train.csv", other / "tokenizer.pt", 800)
    assert not (other / "tokenizer.pt").exists()


def test_a_bundle_is_used_only_for_its_images_and_steps_and_never_over_a_tokenizer(tmp_path):
    generate_demo(tmp_path / "data", DemoSpec(n_train=12, n_val=4, image_size=16, seed=5))
    table = tmp_path / "data/train.csv"
    vq = VQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), patch_nums=(1, 2, 4, 8))
    trained = atomic_torch_save({"state_dict": vq.state_dict(), "config": vq.config,
                                 "stats": {"steps": 7, "recon_mse": 0.1, "history": [1, 2]}}, tmp_path / "trained.pt")
    bundle = bundle_tokenizer(trained, table, tmp_path / "bundle.pt", "a test")
    saved = torch.load(bundle, weights_only=True)
    assert "history" not in saved["stats"] and saved["trained_on"]["made_by"] == "a test"
    assert all(torch.equal(v, saved["state_dict"][k]) for k, v in vq.state_dict().items())

    assert not use_bundled_tokenizer(bundle, table, tmp_path / "a.pt", 8)  # other steps
    assert use_bundled_tokenizer(bundle, table, tmp_path / "a.pt", 7)
    atomic_torch_save({"mine": 1}, tmp_path / "b.pt")
    assert not use_bundled_tokenizer(bundle, table, tmp_path / "b.pt", 7)  # a tokenizer is there: kept
    assert torch.load(tmp_path / "b.pt", weights_only=True) == {"mine": 1}

    before = images_fingerprint(table, 16)
    path = tmp_path / "data/images/train_00003.png"
    pixels = np.asarray(Image.open(path)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]  # one pixel of one image
    Image.fromarray(pixels).save(path)
    assert images_fingerprint(table, 16) != before
    assert not use_bundled_tokenizer(bundle, table, tmp_path / "c.pt", 7)
    assert json.loads(json.dumps(saved["trained_on"]))["fingerprint"] == before
