"""VAR tokenizer: checkpoint compatibility, golden equivalence, generation-time consistency, training."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alchemist.models.vqvae import VQVAE, load_vqvae
from alchemist.models.vqvae_train import train_vqvae
from golden_vqvae import KEYS, load_golden  # tests/golden_vqvae.py: the golden data in tests/data


def _golden_kwargs(cfg: dict) -> dict:
    return dict(vocab_size=cfg["vocab_size"], z_channels=cfg["z_channels"], ch=cfg["ch"], ch_mult=cfg["ch_mult"],
                num_res_blocks=cfg["num_res_blocks"], beta=cfg["beta"], quant_resi=cfg["quant_resi"],
                share_quant_resi=cfg["share_quant_resi"], patch_nums=cfg["v_patch_nums"])


@pytest.fixture(scope="module")
def golden():
    return load_golden()


@pytest.fixture(scope="module")
def gmodel(golden):
    model = VQVAE(**_golden_kwargs(golden["config"])).eval()
    model.load_state_dict(golden["state_dict"], strict=True)
    return model


def _shapes(n: int, size: int, seed: int) -> torch.Tensor:
    """Axis-aligned coloured boxes on flat backgrounds, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    img = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img[i] = rng.uniform(-1, 1, (3, 1, 1))
        for _ in range(rng.integers(1, 3)):
            y0, x0 = rng.integers(0, size - 4, 2)
            h, w = rng.integers(4, size // 2 + 1, 2)
            img[i, :, y0:y0 + h, x0:x0 + w] = rng.uniform(-1, 1, (3, 1, 1))
    return torch.from_numpy(img)


# ----------------------------------------------------------------------------- compatibility
def test_full_config_state_dict_matches_released_checkpoint():
    ref = {}
    for line in KEYS.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        ref[key] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
    with torch.device("meta"):
        model = VQVAE()
    ours = {k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()}
    assert ours == ref
    assert sum(v.numel() for v in model.state_dict().values()) == 108_989_315
    assert (model.downsample, model.image_size) == (16, 256)


def test_golden_tokens_and_tensors(golden, gmodel):
    x = golden["input_B3HW"]
    with torch.no_grad():
        f_BChw = gmodel.img_to_f(x)
        q = gmodel.quantize.residual_quantize(f_BChw)
        idx_Bl = gmodel.img_to_idxBl(x)
    torch.testing.assert_close(f_BChw, golden["f_BChw"], atol=1e-5, rtol=1e-5)
    assert [i.shape for i in idx_Bl] == [(4, 1), (4, 4), (4, 9), (4, 16)]
    for ours, ref in zip(idx_Bl, golden["idx_Bl"], strict=True):
        assert torch.equal(ours, ref)
    for ours, ref in zip(q.fhat_per_scale, golden["fhat_per_scale"], strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gmodel.idxBl_to_var_input(golden["idx_Bl"]), golden["var_input_BLC"],
                               atol=1e-5, rtol=1e-5)
    # The decoder output reaches |3| before clamping with these random weights; float32 summation order
    # (thread count, conv backend) alone moves it by ~2.5e-5, hence the looser absolute bound.
    torch.testing.assert_close(gmodel.idxBl_to_img(golden["idx_Bl"]), golden["recon_last_B3HW"],
                               atol=1e-4, rtol=1e-5)


def test_var_input_is_fhat_accumulation_downsampled(golden, gmodel):
    with torch.no_grad():
        q = gmodel.quantize.residual_quantize(gmodel.img_to_f(golden["input_B3HW"]))
        var_input_BLC = gmodel.idxBl_to_var_input(q.idx_Bl)
    pns = gmodel.patch_nums
    expected = [F.interpolate(q.fhat_per_scale[si], size=(pns[si + 1],) * 2, mode="area").flatten(2).transpose(1, 2)
                for si in range(len(pns) - 1)]
    assert var_input_BLC.shape == (4, sum(p * p for p in pns) - pns[0] ** 2, gmodel.Cvae)
    torch.testing.assert_close(var_input_BLC, torch.cat(expected, 1), atol=1e-6, rtol=1e-6)


def test_final_tokens_are_the_finished_fhat(golden, gmodel):
    """The rater's extra input is the last f̂ of residual quantisation (what the decoder reads),
    from the same pass that gives the golden teacher-forcing input."""
    with torch.no_grad():
        q = gmodel.quantize.residual_quantize(gmodel.img_to_f(golden["input_B3HW"]))
        x_BLC, final_BlC = gmodel.idxBl_to_inputs(q.idx_Bl)
    torch.testing.assert_close(x_BLC, golden["var_input_BLC"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final_BlC, q.fhat_per_scale[-1].flatten(2).transpose(1, 2), atol=1e-6, rtol=1e-6)
    assert final_BlC.shape == (4, gmodel.patch_nums[-1] ** 2, gmodel.Cvae)


def test_generation_step_loop_matches_teacher_forcing_and_decode(golden, gmodel):
    idx_Bl = golden["idx_Bl"]
    B, C, pns = idx_Bl[0].shape[0], gmodel.Cvae, gmodel.patch_nums
    var_input_BLC = gmodel.idxBl_to_var_input(idx_Bl)
    f_hat, start = None, 0
    with torch.no_grad():
        for si, pn in enumerate(pns):
            h_BChw = gmodel.embed_idx(idx_Bl[si]).transpose(1, 2).reshape(B, C, pn, pn)
            f_hat, next_BChw = gmodel.get_next_autoregressive_input(si, f_hat, h_BChw)
            if si < len(pns) - 1:
                n = pns[si + 1] ** 2
                torch.testing.assert_close(next_BChw.flatten(2).transpose(1, 2), var_input_BLC[:, start:start + n])
                start += n
        torch.testing.assert_close(gmodel.fhat_to_img(f_hat), gmodel.idxBl_to_img(idx_Bl))
    torch.testing.assert_close(f_hat, golden["fhat_per_scale"][-1], atol=1e-5, rtol=1e-5)


def test_encode_is_batch_independent(golden, gmodel):
    x = torch.cat([golden["input_B3HW"], _shapes(4, 64, seed=3)])
    batched = gmodel.img_to_idxBl(x)
    for b in range(len(x)):
        alone = gmodel.img_to_idxBl(x[b:b + 1])
        for si in range(len(alone)):
            assert torch.equal(alone[si][0], batched[si][b])


# ----------------------------------------------------------------------------- loading
def test_ema_buffer_of_other_scale_count_keeps_own(golden, tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(golden["state_dict"], path)
    kwargs = {**_golden_kwargs(golden["config"]), "patch_nums": (1, 2, 4)}
    model = load_vqvae(path, **kwargs)
    assert model.quantize.ema_vocab_hit_SV.shape == (3, 64)
    assert torch.equal(model.quantize.embedding.weight, golden["state_dict"]["quantize.embedding.weight"])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert [i.shape[1] for i in model.img_to_idxBl(golden["input_B3HW"][:1])] == [1, 4, 16]


def test_missing_checkpoint_names_path(tmp_path):
    path = tmp_path / "nowhere" / "vae.pth"
    with pytest.raises(FileNotFoundError, match="never downloaded") as err:
        load_vqvae(path)
    assert str(path) in str(err.value)


def test_tokenizer_is_found_in_ckpt_path_never_in_the_working_directory(tmp_path, monkeypatch):
    """model.vae_ckpt: absolute as given, relative inside model.ckpt_path; a file of the same name in
    the working directory must not win, and a missing one is one sentence naming both keys."""
    from alchemist.build import build_tokenizer, tokenizer_path
    from alchemist.config import ModelConfig

    kw = dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1, 1), patch_nums=(1, 2))
    mcfg = ModelConfig(vocab_size=32, Cvae=8, vae_ch=32, vae_ch_mult=(1, 1, 1), patch_size=4, patch_nums=(1, 2),
                       ckpt_path=str(tmp_path / "ckpts"), vae_ckpt="tokenizer.pt")
    wanted, stray = VQVAE(**kw), VQVAE(**kw)
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "cwd").mkdir()
    torch.save({"state_dict": wanted.state_dict(), "config": kw}, tmp_path / "ckpts/tokenizer.pt")
    torch.save({"state_dict": stray.state_dict(), "config": kw}, tmp_path / "cwd/tokenizer.pt")
    monkeypatch.chdir(tmp_path / "cwd")
    assert tokenizer_path(mcfg) == tmp_path / "ckpts/tokenizer.pt"
    got = build_tokenizer(mcfg, torch.device("cpu")).quantize.embedding.weight
    assert torch.equal(got, wanted.quantize.embedding.weight)
    assert not torch.equal(got, stray.quantize.embedding.weight)

    absolute = ModelConfig(**{**mcfg.__dict__, "vae_ckpt": str(tmp_path / "cwd/tokenizer.pt")})
    assert tokenizer_path(absolute) == tmp_path / "cwd/tokenizer.pt"
    no_dir = ModelConfig(**{**mcfg.__dict__, "ckpt_path": ""})
    assert tokenizer_path(no_dir) == Path("tokenizer.pt")

    missing = ModelConfig(**{**mcfg.__dict__, "vae_ckpt": "nope.pt"})
    with pytest.raises(FileNotFoundError) as err:
        build_tokenizer(missing, torch.device("cpu"))
    msg = str(err.value)
    assert "model.vae_ckpt='nope.pt'" in msg and "model.ckpt_path=" in msg and "\n" not in msg


def test_wrong_config_is_a_clear_error(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1), patch_nums=(1, 2)).state_dict(), path)
    with pytest.raises(ValueError, match="vocab_size"):
        load_vqvae(path, vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1), patch_nums=(1, 2))


def test_wrong_image_size_is_a_clear_error():
    model = VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1), patch_nums=(1, 2))
    with pytest.raises(ValueError, match="image size"):
        model.img_to_idxBl(torch.zeros(1, 3, 8, 8))


# ----------------------------------------------------------------------------- training
TINY = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, patch_nums=(1, 2, 4))


def _token_mse(model: VQVAE, x: torch.Tensor) -> float:
    return (model.idxBl_to_img(model.img_to_idxBl(x)) - x).square().mean().item()


def _train(restart_dead: bool, out_path=None):
    torch.manual_seed(0)
    images = _shapes(32, 16, seed=0)
    model = VQVAE(**TINY)
    before = _token_mse(model, images)
    stats = train_vqvae(model, [images[:16], images[16:]], steps=60, lr=2e-3, log_every=20, out_path=out_path,
                        restart_dead=restart_dead, dead_after=10, restart_every=5, progress=False)
    return model, stats, before, _token_mse(model, images)


def test_training_learns_and_restart_revives_dead_codes(tmp_path):
    out = tmp_path / "tok.pt"
    model, with_restart, before, after = _train(True, out)
    _, without, _, _ = _train(False)
    assert after < 0.75 * before  # through the token path: encode -> ids -> decode
    assert with_restart["history"][-1]["recon_mse"] < 0.8 * with_restart["history"][0]["recon_mse"]
    assert with_restart["restarted_codes"] > 0 and without["restarted_codes"] == 0
    assert with_restart["usage"] > without["usage"] + 0.3  # a random N(0,1) codebook leaves most codes unused
    assert out.with_suffix(".jsonl").read_text().count("\n") == 3

    loaded = load_vqvae(out)  # our checkpoint carries its own config
    assert loaded.config == model.config and not loaded.training
    x = _shapes(4, 16, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(loaded.img_to_idxBl(x), model.img_to_idxBl(x), strict=True))


def test_interrupted_training_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "tok.pt"
    images = _shapes(16, 16, seed=1)

    def crashing(after: int):
        for i in range(after):
            yield images[i % 2 * 8:(i % 2 + 1) * 8]
        raise RuntimeError("killed")

    kwargs = dict(steps=30, lr=2e-3, log_every=10, out_path=out, save_every=10, progress=False)
    with pytest.raises(RuntimeError, match="killed"):
        train_vqvae(VQVAE(**TINY), crashing(25), **kwargs)
    assert torch.load(out, weights_only=True)["train_state"]["step"] == 20
    stats = train_vqvae(VQVAE(**TINY), [images[:8], images[8:]], **kwargs)
    assert stats["steps"] == 30 and [h["step"] for h in stats["history"]] == [10, 20, 30]
    assert "train_state" not in torch.load(out, weights_only=True)
    again = train_vqvae(VQVAE(**TINY), [images[:8]], **kwargs)  # finished: reloaded, not retrained
    assert again["history"] == stats["history"]


def test_training_on_a_pairs_table_and_its_heldout_mse(tmp_path):
    from experiments.demo_data import DemoSpec, generate_demo
    from alchemist.data.pairs import PairsDataset, load_pairs
    from alchemist.config import DataConfig
    from alchemist.tokenizer_training import reconstruction_mse, train_vqvae_on_pairs

    generate_demo(tmp_path / "d", DemoSpec(n_train=24, n_val=10, image_size=16, seed=0))
    val = tmp_path / "d/val.csv"
    ds = PairsDataset(load_pairs(val, DataConfig(train_csv_path=str(val), image_size=16)), 16)
    x = torch.stack([ds[i]["img_3HW"] for i in range(len(ds))])
    torch.manual_seed(0)
    model = VQVAE(**TINY)
    before = reconstruction_mse(model, val, bs=3)  # 10 images in uneven batches
    assert before == pytest.approx(_token_mse(model, x), rel=1e-5)  # brute force through the token path
    stats = train_vqvae_on_pairs(model, tmp_path / "d/train.csv", 40, bs=8, out_path=tmp_path / "tok.pt",
                                 log_every=20, progress=False)
    assert stats["images"] == 24 and stats["steps"] == 40
    after = reconstruction_mse(model, val)
    assert after == pytest.approx(_token_mse(model, x), rel=1e-5) and after < 0.8 * before
