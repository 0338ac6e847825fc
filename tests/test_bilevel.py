"""The bilevel loop: update rules against brute force, schedules, resume, two ranks, a real run."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from alchemist.bilevel.estimators import (ESTIMATORS, Lookahead, Penalty, StepContext, alignment, build_estimator,
                                          register)
from alchemist.batch import TextFeatures, TokenBatch
from alchemist.bilevel.launch import train_rater
from alchemist.config import BilevelConfig, ConfigError, RaterConfig, load_config
from alchemist.data.sampler import ResumableSampler
from alchemist.loop import NonFiniteLossError
from alchemist.models.blocks import math_attention
from alchemist.models.proxy import Proxy
from alchemist.models.rater import RaterOutput
from alchemist.models.vqvae import VQVAE
from alchemist.utils.checkpoint import latest_checkpoint, load_checkpoint
from alchemist.utils.optim import build_optimizer, param_groups
from alchemist.utils.schedule import gamma_at, lr_factor
from experiments.demo_data import DemoSpec, generate_demo

ROOT = Path(__file__).resolve().parents[1]
PATCH_NUMS = (1, 2, 4)


# ----------------------------------------------------------------------------- schedules, sampler, groups
def test_gamma_schedule_matches_paper():
    got = [round(gamma_at(e, 1.0, 0.03, 1, 0.0), 6) for e in range(10)]
    assert got == [1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.73]
    assert gamma_at(100, 1.0, 0.03, 1, 0.2) == 0.2


def test_lin0_schedule_shape():
    f = [lr_factor("lin0", i, 10, 210) for i in range(210)]
    assert f[0] == pytest.approx(0.005) and f[10] == 1.0
    assert all(a < b for a, b in zip(f[:10], f[1:11]))  # warm-up rises
    assert f[15] == 1.0 and f[30] < 1.0  # 5 % of the 200 post-warm-up steps held
    assert f[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor("cos", 209, 10, 210) == pytest.approx(0.01)


def test_resumable_sampler_resume_and_shards():
    s = ResumableSampler(10, seed=3, world=1)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=4)
    assert list(s) == full[4:]
    ranks = []
    for r in range(2):
        t = ResumableSampler(10, seed=3, rank=r, world=2)
        t.set_epoch(2)
        ranks.append(list(t))
    assert sorted(ranks[0] + ranks[1]) == list(range(10))
    s.set_epoch(3)
    assert list(s) != full


def test_no_weight_decay_groups():
    proxy = Proxy(1, 16, 4, PATCH_NUMS, 8)
    decay, no_decay = param_groups(proxy, 0.05)
    names = {id(p): n for n, p in proxy.named_parameters()}
    no = {names[id(p)] for p in no_decay["params"]}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any("lvl_embed" in n for n in no) and any("log_scale" in n for n in no) and any("bias" in n for n in no)


# ----------------------------------------------------------------------------- update rules vs brute force
def _tiny_batch(B, V=16, Cvae=4, T=3, D=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    L = sum(p * p for p in PATCH_NUMS)
    text = TextFeatures(torch.randn(B, T, D, generator=g, dtype=dtype), torch.ones(B, T, dtype=torch.bool),
                        torch.randn(B, D, generator=g, dtype=dtype))
    return TokenBatch(torch.randint(0, V, (B, L), generator=g), torch.randn(B, L - 1, Cvae, generator=g, dtype=dtype),
                      text, torch.randn(B, PATCH_NUMS[-1] ** 2, Cvae, generator=g, dtype=dtype))


def test_penalty_gradient_is_softmax_analytic_form():
    s_B = torch.rand(5, dtype=torch.float64, requires_grad=True)  # sigmoid outputs
    g = torch.tensor(0.7, dtype=torch.float64)
    w = torch.softmax(s_B, 0)
    l_B = torch.rand(5, dtype=torch.float64)
    out = RaterOutput(logit_B=s_B, weight_B=w * g, group_scalar=g)
    ctx = StepContext(None, None, None, out, l_B, None, None, None)
    Penalty().rater_loss(ctx).backward()
    wd = w.detach()
    assert torch.allclose(s_B.grad, g * wd * (l_B - (wd * l_B).sum()), rtol=1e-12, atol=1e-14)


def test_centering_keeps_instance_gradient_and_frees_the_group_scalar():
    """Centred and official penalty give the same instance gradient; only the group scalar's differs:
    always positive uncentred (g is pushed to 0), of either sign centred."""
    l_B = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    grads = {}
    for center in (False, True):
        s_B = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
        g = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
        out = RaterOutput(s_B, torch.softmax(s_B, 0) * g, g)
        est = Penalty()
        est.center = center
        est.rater_loss(StepContext(None, None, None, out, l_B, None, None, None)).backward()
        grads[center] = (s_B.grad.clone(), g.grad.item())
    assert torch.allclose(grads[False][0], grads[True][0], rtol=1e-12)
    w = torch.softmax(torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64), 0)
    assert grads[False][1] == pytest.approx((w * l_B).sum().item()) and grads[False][1] > 0
    assert grads[True][1] == pytest.approx((w * (l_B - l_B.mean())).sum().item())


def test_standardized_coefficients_are_batch_z_scores_and_scale_free():
    """With bilevel.standardize the rater loss is Σ W_i·z_i, z the batch z-score of a_i: a step whose
    coefficients are 1000× larger teaches the rater exactly as much; all-zero a (γ = 1) stays 0."""
    def loss_and_grad(l_B, standardize=True):
        s_B = torch.tensor([0.2, 0.5, 0.9, -0.3], dtype=torch.float64, requires_grad=True)
        out = RaterOutput(s_B, torch.softmax(s_B, 0), torch.ones((), dtype=torch.float64))
        est = Penalty()
        est.standardize = standardize
        loss = est.rater_loss(StepContext(None, None, None, out, l_B, None, None, None))
        loss.backward()
        return loss.item(), s_B.grad.clone()

    l_B = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=torch.float64)
    w = torch.softmax(torch.tensor([0.2, 0.5, 0.9, -0.3], dtype=torch.float64), 0)
    z = (l_B - l_B.mean()) / l_B.std()
    loss, grad = loss_and_grad(l_B)
    assert loss == pytest.approx((w * z).sum().item(), rel=1e-12)
    loss_big, grad_big = loss_and_grad(1000 * l_B + 3)
    assert loss_big == pytest.approx(loss, rel=1e-9) and torch.allclose(grad_big, grad, rtol=1e-9)
    assert not torch.allclose(loss_and_grad(1000 * l_B, standardize=False)[1], grad)
    assert loss_and_grad(torch.zeros(4, dtype=torch.float64))[0] == 0.0
    with pytest.raises(ConfigError, match="standardize needs"):
        BilevelConfig(center=False, standardize=True)


@pytest.mark.parametrize("opt_kind,wd,gamma", [("sgd", 0.0, 0.0), ("adamw", 0.05, 0.3), ("adam", 0.05, 0.6)])
def test_lookahead_equals_brute_force_derivative_of_the_trainers_step(opt_kind, wd, gamma):
    """a_i == dL_val(θ')/dw_i where θ' is one real step of the trainer's optimiser (built by the same
    factory, with moments from earlier steps) on the trainer's objective γ·L_val + (1−γ)·Σ_i w_i·l_i;
    brute force: central differences in w through that step, float64."""
    torch.manual_seed(0)
    proxy = Proxy(1, 16, 4, PATCH_NUMS, 8, drop_path_rate=0.0).double().eval()
    params = list(proxy.parameters())
    opt = build_optimizer(proxy, opt_kind, 3e-3 if opt_kind != "sgd" else 0.5, wd)
    for s in range(3):  # a history, so that Adam's moments are not at their first step
        proxy.per_sample_loss(_tiny_batch(4, seed=10 + s)).mean().backward()
        opt.step()
        opt.zero_grad()
    train, val = _tiny_batch(4, seed=1), _tiny_batch(3, seed=2)
    theta = [p.detach().clone() for p in params]
    opt_state = copy.deepcopy(opt.state_dict())

    def step(w_B):
        """The trainer's proxy step from θ with weights w; returns the gradient it used."""
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)
        opt.load_state_dict(copy.deepcopy(opt_state))
        loss = gamma * proxy.per_sample_loss(val).mean() + (1 - gamma) * (w_B * proxy.per_sample_loss(train)).sum()
        loss.backward()
        grads = [p.grad.detach().clone() for p in params]
        opt.step()
        opt.zero_grad()
        return grads

    def val_after_step(w_B):
        step(w_B)
        with torch.no_grad():
            return proxy.per_sample_loss(val).mean().item()

    w = torch.full((4,), 0.25, dtype=torch.float64)
    h = 1e-6
    brute = torch.tensor([(val_after_step(w + h * e) - val_after_step(w - h * e)) / (2 * h)
                          for e in torch.eye(4, dtype=torch.float64)], dtype=torch.float64)
    grads = step(w)  # leave the proxy and its optimiser at θ', as the trainer does
    theta_prime = [p.detach().clone() for p in params]
    out = RaterOutput(logit_B=torch.zeros(4), weight_B=torch.zeros(4, dtype=torch.float64, requires_grad=True),
                      group_scalar=torch.tensor(1.0))
    ctx = StepContext(proxy, train, val, out, torch.zeros(4, dtype=torch.float64), w, theta,
                      lambda: torch.autocast("cpu", enabled=False), gamma, 1.0, opt, grads)
    got = Lookahead(eps=1e-4).coefficients(ctx)
    assert brute.abs().max() > 1e-4  # a signal, not two zeros
    assert torch.allclose(got, brute, rtol=1e-5, atol=1e-10), (got, brute)
    assert all(torch.equal(p, q) for p, q in zip(params, theta_prime))  # θ' restored after the ± passes


def test_lookahead_refuses_a_frozen_proxy():
    with pytest.raises(ConfigError, match="fix_proxy"):
        build_estimator(BilevelConfig(estimator="lookahead", fix_proxy=True), None, None, 0.0)


def test_lookahead_gives_no_signal_when_the_proxy_ignores_the_weights():
    """At γ = 1 the proxy step does not depend on w, so the true derivative is 0."""
    out = RaterOutput(torch.zeros(3), torch.zeros(3), torch.tensor(1.0))
    ctx = StepContext(None, None, None, out, torch.ones(3), None, None, None, gamma=1.0)
    assert torch.equal(Lookahead(eps=1e-2).coefficients(ctx), torch.zeros(3))


def test_central_difference_matches_double_backward():
    """The second way: c_i = ∇l_i(θ)·v by double backward under the math attention kernel."""
    torch.manual_seed(0)
    proxy = Proxy(1, 16, 4, PATCH_NUMS, 8, drop_path_rate=0.0).double().eval()
    batch = _tiny_batch(3, seed=4)
    params = list(proxy.parameters())
    v = [torch.randn_like(p) for p in params]
    with math_attention():
        l_B = proxy.per_sample_loss(batch)
        u = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        g = torch.autograd.grad((u * l_B).sum(), params, create_graph=True, allow_unused=True)
        dot = sum((gi * vi).sum() for gi, vi in zip(g, v) if gi is not None)
        exact = torch.autograd.grad(dot, u)[0]
    theta = [p.detach().clone() for p in params]
    fd = alignment(proxy, params, theta, v, batch, 1e-4, lambda: torch.autocast("cpu", enabled=False))
    assert torch.allclose(fd, exact, rtol=1e-6, atol=1e-10)


# ----------------------------------------------------------------------------- real runs on tiny demo data
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bilevel")
    generate_demo(root / "data", DemoSpec(n_train=64, n_val=16, image_size=16, seed=0))
    torch.manual_seed(0)
    kw = dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=PATCH_NUMS)
    torch.save({"state_dict": VQVAE(**kw).state_dict(), "config": kw}, root / "tok.pt")
    return root


def _cfg(root, run, **extra):
    over = {"train_csv_path": str(root / "data/train.csv"), "val_csv_path": str(root / "data/val.csv"),
            "image_size": 16, "num_workers": 0, "patch_size": 4, "patch_nums": "1,2,4", "vocab_size": 32,
            "Cvae": 8, "vae_ch": 32, "vae_ch_mult": "1,2,2", "ckpt_path": str(root), "vae_ckpt": "tok.pt",
            "text_enc_path": "", "text_max_len": 16, "depth": 1, "raterDepth": 1, "bs": 8, "ep": 2, "tlr": 1e-3, "rater_lr": 1e-3,
            "fp16": 0, "local_out_dir_path": str(root), "exp_name": run, "save_every": 3, "log_every": 1,
            "progress": False, "gamma_decay": 0.5}
    over.update(extra)
    return load_config(RaterConfig, ROOT / "configs/config_rater.json", {k: str(v) for k, v in over.items()})


def _weights(run_dir):
    ck = load_checkpoint(latest_checkpoint(run_dir))
    return ck["proxy"], ck["rater"], ck["step"]


@pytest.mark.parametrize("estimator,precision", [("penalty", 0), ("reference", 0), ("lookahead", 0),
                                                  ("reference", 2), ("lookahead", 1)])
def test_run_writes_metrics_config_and_checkpoints(tiny_setup, estimator, precision):
    """Every rule, and the bf16 and fp16 paths (autocast, fp16's loss scalers, encoders under autocast)
    that a GPU run takes, at toy size on the CPU."""
    cfg = _cfg(tiny_setup, f"run_{estimator}_{precision}", estimator=estimator, fp16=precision,
               encoder_amp=precision > 0)
    summary = train_rater(cfg)
    run = cfg.output.run_dir
    assert summary["steps"] == 4 and summary["epochs"] == 2 and summary["nonfinite_steps"] == 0
    assert json.loads((run / "config.json").read_text())["bilevel"]["estimator"] == estimator
    ck = load_checkpoint(latest_checkpoint(run))
    assert ck["config"]["bilevel"]["estimator"] == estimator and ck["step"] == 4
    assert len(list((run / "checkpoints").iterdir())) <= cfg.output.keep_last
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["gamma"] for r in recs] == [1.0, 1.0, 0.5, 0.5]
    groups = [r["group_scalar"] for r in recs]
    assert all(0 < g < 1 for g in groups) and len(set(groups)) == 4  # the group head moves every step
    assert recs[-1]["rater_grad_norm"] > 0 and recs[-1]["L_val"] < recs[0]["L_val"] - 0.05  # both models learn


def test_unknown_estimator_is_one_sentence_naming_the_choices(tiny_setup):
    with pytest.raises(ConfigError, match="bilevel.estimator") as err:
        train_rater(_cfg(tiny_setup, "magic", estimator="magic"))
    assert "penalty, reference, lookahead" in str(err.value) and "'magic'" in str(err.value)


def test_a_new_rule_is_one_registered_class():
    """The trainer looks rules up by name: registering a class is all a new rule needs."""
    @register
    class Twice(Penalty):
        name = "twice"

        def coefficients(self, ctx):
            return 2 * ctx.train_loss_B

    try:
        cfg = BilevelConfig(estimator="twice", center=False, entropy_reg=0.5)
        est = build_estimator(cfg, None, None, 0.0)
        assert isinstance(est, Twice) and est.center is False and est.entropy_reg == 0.5
        assert "twice" in ESTIMATORS
        w_B, l_B = torch.tensor([0.2, 0.3, 0.5]), torch.tensor([1.0, 2.0, 3.0])
        loss = est.rater_loss(StepContext(None, None, None, RaterOutput(w_B, w_B, torch.tensor(1.0)), l_B,
                                          None, None, None))
        entropy = -(w_B * w_B.log()).sum()  # the entropy term lives in the base class, for every rule
        assert loss.item() == pytest.approx((2 * w_B * l_B).sum().item() - 0.5 * entropy.item())
    finally:
        del ESTIMATORS["twice"]


REPLAY = {"estimator": "lookahead", "standardize": True, "rater_replay": 2, "replay_size": 2}


@pytest.mark.parametrize("extra", [{}, REPLAY], ids=["plain", "replay"])
def test_resume_after_crash_gives_same_weights(tiny_setup, monkeypatch, extra):
    """Exact resume, also with the rater's replay buffer (it is in the checkpoint: without it the
    resumed run would draw other batches)."""
    tag = "_replay" if extra else ""
    straight = _cfg(tiny_setup, "straight" + tag, ep=3, **extra)
    train_rater(straight)
    from alchemist.bilevel import trainer as trainer_mod

    real_step, calls = trainer_mod.BilevelTrainer.train_step, {"n": 0}

    def crashing(self, *a):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill")
        return real_step(self, *a)

    crashed = _cfg(tiny_setup, "crashed" + tag, ep=3, **extra)
    monkeypatch.setattr(trainer_mod.BilevelTrainer, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_rater(crashed)
    assert _weights(crashed.output.run_dir)[2] == 3  # the step-3 checkpoint survived the kill
    monkeypatch.setattr(trainer_mod.BilevelTrainer, "train_step", real_step)
    train_rater(crashed)
    a, b = _weights(straight.output.run_dir), _weights(crashed.output.run_dir)
    assert a[2] == b[2] == 6
    for x, y in ((a[0], b[0]), (a[1], b[1])):
        assert all(torch.equal(x[k], y[k]) for k in x)
    rater_steps = load_checkpoint(latest_checkpoint(crashed.output.run_dir))["opt_rater"]["state"][0]["step"]
    assert rater_steps == 6 * (1 + extra.get("rater_replay", 0))  # each replay is one more rater step


def test_nonfinite_losses_are_skipped_then_stop_with_checkpoint(tiny_setup, monkeypatch):
    real = Proxy.per_sample_loss
    monkeypatch.setattr(Proxy, "per_sample_loss", lambda self, b: real(self, b) * float("nan"))
    cfg = _cfg(tiny_setup, "nan", max_nonfinite=2, save_every=100)
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps"):
        train_rater(cfg)
    assert latest_checkpoint(cfg.output.run_dir) is not None


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_gloo_processes_keep_identical_replicas(tiny_setup, tmp_path, free_port):
    cfg = _cfg(tiny_setup, "ddp")
    over = [f"--{k}={v}" for k, v in {
        "train_csv_path": cfg.data.train_csv_path, "val_csv_path": cfg.data.val_csv_path, "image_size": 16,
        "num_workers": 0, "patch_size": 4, "patch_nums": "1,2,4", "vocab_size": 32, "Cvae": 8, "vae_ch": 32,
        "vae_ch_mult": "1,2,2", "ckpt_path": str(tiny_setup), "vae_ckpt": "tok.pt", "text_max_len": 16, "text_enc_path": "",
        "depth": 1, "raterDepth": 1, "bs": 8, "ep": 1, "fp16": 0, "local_out_dir_path": str(tmp_path),
        "exp_name": "ddp", "progress": False}.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port}",
                           str(ROOT / "train_rater.py"), *over], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp/summary.json").read_text())
    assert summary["processes"] == 2 and summary["replica_spread"] == 0.0
    assert summary["steps"] == 2  # 16 val rows, 4 per rank per step
    assert (tmp_path / "ddp/skipped_rank1.csv").exists()


@pytest.mark.parametrize("estimator", ["lookahead"])
def test_rater_scores_noise_below_clean_after_a_short_run(tmp_path, estimator):
    """Behaviour: on demo data with planted defects, the rater learns to score noise images lower.
    ``penalty`` is left out: its signal is the per-sample loss, which rewards whatever an early proxy
    finds easy, and here it ranks noise above clean (0.48 vs 0.03; on the demo, docs/demo.md, it puts
    the blank images first and noise above clean). ``reference``'s reference proxy has barely
    trained in 12 steps and it too ranks noise above clean (docs/bilevel.md reports all three rules).
    80 steps: with a random tokenizer the toy's signal is weak, and the exact rule learns nothing at γ = 1."""
    import pandas as pd

    from alchemist.ratings import read_ratings
    from alchemist.scoring import rate_file

    root = tmp_path
    generate_demo(root / "data", DemoSpec(n_train=96, n_val=32, image_size=16, seed=1, rate_noise=0.25,
                                          rate_plain=0.0, rate_misaligned=0.0, rate_duplicate=0.0, rate_blurred=0.0))
    torch.manual_seed(0)
    kw = dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=PATCH_NUMS)
    torch.save({"state_dict": VQVAE(**kw).state_dict(), "config": kw}, root / "tok.pt")
    cfg = _cfg(root, "behaviour", estimator=estimator, ep=20, bs=8, tlr=3e-3, rater_lr=3e-3, save_every=1000,
               caption_dropout=0.0, gamma_decay=0.05, rater_sche="const")
    train_rater(cfg)
    rate_file(cfg.output.run_dir, root / "data/train.csv", root / "ratings.parquet", progress=False)
    kinds = pd.read_csv(root / "data/defects.csv", dtype={"id": str}).set_index("id")["kind"]
    ratings = read_ratings(root / "ratings.parquet")
    by_kind = ratings.assign(kind=ratings["id"].map(kinds)).groupby("kind")["score"].mean()
    assert by_kind["noise"] < by_kind["clean"], by_kind


def test_training_from_feature_cache_matches_raw_images(tiny_setup, monkeypatch):
    """scripts/precompute.py's cache gives the trainer the same batches (ids, dropout, skips)."""
    from alchemist.build import build_text_encoder, build_tokenizer
    from alchemist.data.cache import CacheDataset, build_cache
    from alchemist.data.pairs import PairsDataset, load_pairs

    raw = _cfg(tiny_setup, "from_raw")
    cached = _cfg(tiny_setup, "from_cache", cache_dir=str(tiny_setup / "cache"))
    vq, text = build_tokenizer(raw.model, torch.device("cpu")), build_text_encoder(raw.model, torch.device("cpu"))
    for split, path in (("train", raw.data.train_csv_path), ("val", raw.data.val_csv_path)):
        build_cache(load_pairs(path, raw.data), tiny_setup / "cache" / split, vq, text, 16, shard_size=16,
                    dtype="float32", progress=False)
    train_rater(raw)
    reads = {"cache": 0}
    real_get = CacheDataset.__getitem__

    def counting_get(self, i):
        reads["cache"] += 1
        return real_get(self, i)

    monkeypatch.setattr(CacheDataset, "__getitem__", counting_get)
    monkeypatch.setattr(PairsDataset, "__getitem__", lambda self, i: pytest.fail("read an image despite the cache"))
    train_rater(cached)
    assert reads["cache"] >= 4 * 2 * 8  # 4 steps of 8 train + 8 val items
    (pa, ra, _), (pb, rb, _) = _weights(raw.output.run_dir), _weights(cached.output.run_dir)
    for x, y in ((pa, pb), (ra, rb)):
        assert all(torch.allclose(x[k], y[k], atol=1e-5, rtol=1e-4) for k in x)


def test_coefficient_hook_reports_what_each_rater_step_used(tiny_setup):
    """The diagnostic hook gets, per step, the batch's training ids and the centred coefficients;
    under penalty those are the pairs' own losses minus the batch mean, so they sum to 0 and differ."""
    records = []
    cfg = _cfg(tiny_setup, "hook", estimator="penalty")
    train_rater(cfg, on_coefficients=records.append)
    train_ids = set(pd.read_csv(tiny_setup / "data/train.csv", dtype={"id": str})["id"])
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert [r["gamma"] for r in records] == [1.0, 1.0, 0.5, 0.5]
    for r in records:
        assert len(r["ids"]) == len(r["a"]) == len(r["logit"]) == 8 and set(r["ids"]) <= train_ids
        assert abs(float(r["a"].sum())) < 1e-5 and r["a"].std() > 0
    assert len({i for r in records[:2] for i in r["ids"]}) == 16  # one pass over distinct pairs


def test_refit_learns_a_signal_that_marks_one_kind(tiny_setup):
    """Given a trace whose coefficients call every noise pair harmful (+1) and the rest helpful (−1),
    a fresh rater refit on it ranks noise below clean: the refit learns what a trace says."""
    from experiments.trace import refit

    out = tiny_setup / "refit"
    train_rater(_cfg(tiny_setup, "rater", ep=1, local_out_dir_path=out))
    kinds = pd.read_csv(tiny_setup / "data/defects.csv", dtype={"id": str}, keep_default_na=False)
    kinds = kinds[kinds["split"] == "train"].reset_index(drop=True)
    a = np.where(kinds["kind"] == "noise", 1.0, -1.0)
    order = np.random.default_rng(0).permutation(len(kinds))
    pd.DataFrame({"step": np.arange(len(kinds))[order] // 8, "id": kinds["id"], "a": a}).to_parquet(out / "trace.parquet")
    result = refit(out, passes=6, standardize=True)
    assert list(result.index) == [1, 2, 3, 4, 5, 6]
    assert result["noise"].iloc[-1] > 0.9
