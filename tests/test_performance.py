"""The performance options leave the numbers as they were: per-scale attention, torch.compile, encoders
under autocast, and a step that reads the device back only where it must. Each runs on the CPU, and
on a GPU when there is one (the ``device`` fixture; scripts/device_check.sh runs those)."""
import copy
import sys

import pytest
import torch

from alchemist.bilevel.estimators import weight_entropy
from alchemist.data.tokens import Featurizer
from alchemist.models.blocks import compile_blocks
from alchemist.models.proxy import Proxy
from alchemist.models.text import TextEncoder
from alchemist.models.vqvae import VQVAE
from alchemist.utils.optim import build_optimizer, set_lr
from dist_worker import PATCH_NUMS, batch, config, trainer


def _run(tmp_path, device, steps=2, **over):
    """A toy trainer's weights after ``steps`` bilevel steps (fixed data, fixed init)."""
    tr = trainer(config(tmp_path, "_".join(f"{k}{v}" for k, v in over.items()) or "base", **over), 0, 1,
                 device=device)
    for i in range(steps):
        assert tr.train_step(batch(i, 0, "train").to(device), batch(i, 0, "val").to(device)) is not None
    return [p.detach().cpu().clone() for p in list(tr.proxy.parameters()) + list(tr.rater.parameters())]


def _maxdiff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ----------------------------------------------------------------------------- attention by scale
def test_attention_by_scale_equals_the_masked_call(device):
    """model.attn_impl=scales (one unmasked SDPA call per scale, flash-eligible) gives the masked call's
    logits and gradients."""
    torch.manual_seed(0)
    proxy = Proxy(2, 16, 4, PATCH_NUMS, 8, drop_path_rate=0.0).to(device)
    b = batch(0, 0, "train").to(device)
    out = {}
    for impl in ("mask", "scales"):
        proxy.set_attn_impl(impl)
        proxy.zero_grad()
        loss_BL = proxy.per_token_loss(b)
        loss_BL.mean().backward()
        out[impl] = (loss_BL.detach(), [p.grad.clone() for p in proxy.parameters()])
    assert torch.allclose(out["scales"][0], out["mask"][0], rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(out["scales"][1], out["mask"][1]))


@pytest.mark.parametrize("rule,tol", [("penalty", 1e-6), ("lookahead", 2e-5)])
def test_training_with_attention_by_scale_matches(tmp_path, device, rule, tol):
    """Two steps (lr 1.5e-5 in warm-up) land on the same weights up to rounding. The lookahead's central
    difference magnifies the last bits of the loss, and Adam turns that into up to a third of a step in
    coordinates whose gradient is near zero, hence its looser bound."""
    base = _run(tmp_path, device, estimator=rule)
    assert _maxdiff(_run(tmp_path, device, estimator=rule, attn_impl="scales"), base) <= tol


# ----------------------------------------------------------------------------- torch.compile
def test_compiled_blocks_train_like_eager_ones(tmp_path, device):
    """model.compile compiles each block in place: the same weights after two steps (the reference rule:
    its deep copy of the compiled proxy works too), the same checkpoint keys. aot_eager on a CPU (no C++
    toolchain needed); inductor, the one a GPU run would use, on a GPU."""
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    torch._dynamo.reset()
    base = _run(tmp_path, device, estimator="reference")
    compiled = _run(tmp_path, device, estimator="reference", compile=backend)
    assert _maxdiff(compiled, base) <= (1e-5 if device.type == "cuda" else 1e-6)
    proxy = compile_blocks(Proxy(1, 16, 4, PATCH_NUMS, 8), backend)
    assert list(proxy.state_dict()) == list(Proxy(1, 16, 4, PATCH_NUMS, 8).state_dict())


# ----------------------------------------------------------------------------- encoders under autocast
@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    vq = VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 4))
    return vq.eval().requires_grad_(False), TextEncoder("", max_len=16)


def test_encoders_under_autocast(encoders, device):
    """model.encoder_amp runs the tokenizer's encoder and the text encoder under the run's autocast. With
    fp32 (every CPU default) nothing changes; in bf16 the tokens (still chosen in fp32) mostly agree and
    the text features stay close."""
    vq, text = (copy.deepcopy(m).to(device) for m in encoders)
    g = torch.Generator().manual_seed(0)
    raw = {"img_B3HW": torch.rand(8, 3, 16, 16, generator=g) * 2 - 1,
           "captions": [f"a {c} square on a {d} field" for c, d in zip("red blue green gray".split() * 2,
                                                                       "white black dark pale".split() * 2)]}
    fp32 = Featurizer(vq, text, device)(raw)
    same = Featurizer(vq, text, device, amp_dtype=None)(raw)
    assert torch.equal(same.idx_BL, fp32.idx_BL) and torch.equal(same.text.hidden_BTD, fp32.text.hidden_BTD)
    bf16 = Featurizer(vq, text, device, amp_dtype=torch.bfloat16)(raw)
    assert not torch.equal(bf16.text.hidden_BTD, fp32.text.hidden_BTD)  # it did run in bf16
    assert bf16.text.hidden_BTD.dtype == torch.float32 and bf16.x_BLC.dtype == fp32.x_BLC.dtype
    assert (bf16.idx_BL == fp32.idx_BL).float().mean() >= 0.8
    cos = torch.nn.functional.cosine_similarity(bf16.text.pooled_BD, fp32.text.pooled_BD, dim=-1)
    assert cos.min() > 0.99


# ----------------------------------------------------------------------------- host reads in the step
class HostReads:
    """Where alchemist code reads a tensor back to the host (``.item()``, ``.tolist()``, ``bool(t)``,
    ``float(t)``...): on a GPU each one waits for the queue to drain."""

    def __init__(self, monkeypatch):
        self.sites = []
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
            real = getattr(torch.Tensor, name)

            def spy(t, *a, _real=real, **k):
                f = sys._getframe(1)
                if "/alchemist/" in f.f_code.co_filename:
                    self.sites.append(f"{f.f_code.co_filename.rsplit('/alchemist/', 1)[1]}:{f.f_code.co_name}")
                return _real(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, spy)


@pytest.mark.parametrize("rule,decisions", [("penalty", 1), ("reference", 1), ("lookahead", 2)])
def test_a_step_reads_the_device_only_for_its_decisions_and_its_log(tmp_path, device, monkeypatch, rule,
                                                                    decisions):
    """One read per skip decision (a flag every rank agrees on) and one for all logged numbers; no
    ``.item()`` per metric, no ``float(grad_norm)``, no ``v_norm.item()``. There were 13 reads in a penalty
    step and 14 in a lookahead step, plus one per parameter tensor for Adam's step count, which the
    fused GPU optimiser keeps on the device."""
    tr = trainer(config(tmp_path, rule, estimator=rule), 0, 1, device=device)
    for i in range(2):  # the second step is the steady state (Adam has moments)
        reads = HostReads(monkeypatch)
        assert tr.train_step(batch(i, 0, "train").to(device), batch(i, 0, "val").to(device)) is not None
        monkeypatch.undo()
    # a CPU optimiser keeps its step count on the host (the fused GPU one does not): reading it is free
    sites = [s for s in reads.sites if s != "bilevel/estimators.py:update_jacobian"]
    assert sorted(sites) == sorted(["utils/dist.py:all_ranks"] * decisions + ["utils/metrics.py:host_floats"])


# ----------------------------------------------------------------------------- the step's arithmetic
def test_the_penalty_step_is_the_plain_algorithm(tmp_path):
    """The step after its reordering (rater loss before the proxy update, joint decisions, norms left on
    the device) gives bit for bit the weights of a plain transcription of the official rule."""
    tr = trainer(config(tmp_path, "plain", estimator="penalty"), 0, 1)
    proxy, rater = copy.deepcopy(tr.proxy), copy.deepcopy(tr.rater)
    o = tr.cfg.optim
    opt_p = build_optimizer(proxy, o.opt, o.tlr, o.twd, (o.beta1, o.beta2))
    opt_r = build_optimizer(rater, o.opt, o.rater_lr, o.rater_wd, (o.beta1, o.beta2))
    for i in range(2):
        train, val = batch(i, 0, "train"), batch(i, 0, "val")
        m = tr.train_step(train, val)
        set_lr(opt_p, tr.opt_proxy.param_groups[0]["lr"]), set_lr(opt_r, tr.opt_rater.param_groups[0]["lr"])
        proxy.train(), rater.train()
        out = rater(train)
        val_loss = proxy.per_token_loss(val).mean()
        l_B = proxy.per_sample_loss(train)
        w_B = out.weight_B.detach() * train.B
        (m["gamma"] * val_loss + (1 - m["gamma"]) * (w_B * l_B).mean()).backward()
        torch.nn.utils.clip_grad_norm_(proxy.parameters(), o.grad_clip)
        opt_p.step(), opt_p.zero_grad()
        a_B = l_B.detach() - l_B.detach().mean()
        ((out.weight_B * a_B).sum() - tr.cfg.bilevel.entropy_reg * weight_entropy(out.weight_B)).backward()
        torch.nn.utils.clip_grad_norm_(rater.parameters(), o.grad_clip)
        opt_r.step(), opt_r.zero_grad()
        assert m["L_val"] == val_loss.item()
    for a, b in ((tr.proxy, proxy), (tr.rater, rater)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
