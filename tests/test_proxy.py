import math

import pytest
import torch

import alchemist.models.proxy as proxy_module
from alchemist.batch import TextFeatures, TokenBatch
from alchemist.config import ModelConfig
from alchemist.models.proxy import Proxy, sample_top_k_top_p
from alchemist.models.vqvae import VQVAE

PATCH_NUMS = (1, 2, 3, 4)
V, CVAE, D = 64, 8, 16
SCALE_L = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(PATCH_NUMS)])


@pytest.fixture(scope="module")
def vqvae():
    torch.manual_seed(1)
    return VQVAE(vocab_size=V, z_channels=CVAE, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=PATCH_NUMS).eval()


def make_text(B, T=6, lengths=None):
    lengths = lengths or [T - (i % 3) for i in range(B)]
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    hidden = torch.randn(B, T, D) * mask[..., None]
    return TextFeatures(hidden, mask, torch.randn(B, D))


def make_batch(vqvae, B=4):
    idx_Bl = [torch.randint(0, V, (B, pn * pn)) for pn in PATCH_NUMS]
    return TokenBatch(torch.cat(idx_Bl, dim=1), vqvae.idxBl_to_var_input(idx_Bl), make_text(B))


def tiny_proxy(**kw):
    return Proxy(2, V, CVAE, PATCH_NUMS, D, **kw)


def test_from_config_follows_depth():
    p = Proxy.from_config(ModelConfig(depth=2, vocab_size=V, Cvae=CVAE, patch_nums=PATCH_NUMS), text_dim=D)
    assert p.C == 128 and p.num_heads == 2 and len(p.blocks) == 2
    assert p.blocks[-1].drop_path.p == pytest.approx(0.1 * 2 / 24)
    assert p.head.out_features == V and p.L == 30


def test_cross_attention_uses_each_samples_own_caption(vqvae):
    proxy = tiny_proxy().eval()
    batch = make_batch(vqvae)
    ref = proxy(batch.x_BLC, batch.text)
    j = 2
    hidden = batch.text.hidden_BTD.clone()
    hidden[j] += torch.randn_like(hidden[j]) * batch.text.mask_BT[j, :, None]  # pooled left unchanged
    out = proxy(batch.x_BLC, TextFeatures(hidden, batch.text.mask_BT, batch.text.pooled_BD))
    others = [i for i in range(batch.B) if i != j]
    assert (out[j] - ref[j]).abs().max() > 1e-3
    assert torch.allclose(out[others], ref[others], atol=1e-6)
    # values at padded positions are ignored
    pad = ~batch.text.mask_BT
    assert pad.any()
    noisy = batch.text.hidden_BTD + torch.randn_like(hidden) * pad[..., None]
    out_pad = proxy(batch.x_BLC, TextFeatures(noisy, batch.text.mask_BT, batch.text.pooled_BD))
    assert torch.allclose(out_pad, ref, atol=1e-6)


@pytest.mark.parametrize("s", range(len(PATCH_NUMS) - 1))
def test_block_causal_no_logit_sees_finer_inputs(vqvae, s):
    """x_BLC entry p is the input at position p + first_l; changing inputs of scales > s keeps every
    logit of scales <= s and changes logits of scales > s."""
    proxy = tiny_proxy().eval()
    batch = make_batch(vqvae)
    ref = proxy(batch.x_BLC, batch.text)
    finer_L = SCALE_L[proxy.first_l:] > s
    x = batch.x_BLC.clone()
    x[:, finer_L] += torch.randn_like(x[:, finer_L])
    out = proxy(x, batch.text)
    coarse = SCALE_L <= s
    assert torch.allclose(out[:, coarse], ref[:, coarse], atol=1e-6)
    assert (out[:, ~coarse] - ref[:, ~coarse]).abs().max() > 1e-4


def test_losses_match_brute_force_cross_entropy(vqvae):
    proxy = tiny_proxy().eval()
    batch = make_batch(vqvae)
    logits = proxy(batch.x_BLC, batch.text).double()
    B, L = batch.idx_BL.shape
    brute = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        for l in range(L):
            row = logits[b, l]
            brute[b, l] = torch.logsumexp(row, 0) - row[batch.idx_BL[b, l]]
    loss_BL = proxy.per_token_loss(batch)
    loss_B = proxy.per_sample_loss(batch)
    assert loss_BL.shape == (B, L) and loss_B.shape == (B,)
    assert torch.allclose(loss_BL.double(), brute, atol=1e-5)
    assert torch.allclose(loss_B.double(), brute.mean(1), atol=1e-5)
    assert torch.allclose(loss_BL.mean(1), loss_B)
    per_scale = proxy.per_scale_loss(loss_BL)
    assert per_scale.shape == (len(PATCH_NUMS),)
    for si in range(len(PATCH_NUMS)):
        assert torch.allclose(per_scale[si].double(), brute[:, SCALE_L == si].mean(), atol=1e-5)
    # untrained proxy with VAR's small head init predicts ~uniformly
    assert abs(loss_B.mean().item() - math.log(V)) < 0.1


def test_tiny_proxy_overfits_one_batch(vqvae):
    torch.manual_seed(0)
    proxy = Proxy(1, V, CVAE, PATCH_NUMS, D)  # depth 1 (64 wide): ~0.1 s a step on 2 CPU cores
    batch = make_batch(vqvae)
    opt = torch.optim.AdamW(proxy.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = proxy.per_sample_loss(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0 and losses[-1] < 1.0


def _record_sampling(monkeypatch):
    calls = []

    def recorder(logits_BlV, top_k, top_p, generator):
        idx = sample_top_k_top_p(logits_BlV, top_k, top_p, generator)
        calls.append(logits_BlV.clone())
        return idx

    monkeypatch.setattr(proxy_module, "sample_top_k_top_p", recorder)
    return calls


def test_kv_cached_generation_equals_teacher_forced_decode(vqvae, monkeypatch):
    proxy = tiny_proxy().eval()
    B, cfg = 3, 2.5
    text, uncond = make_text(B), make_text(1, T=3, lengths=[2])
    calls = _record_sampling(monkeypatch)
    idx_Bl, f_hat = proxy.sample_tokens(vqvae, text, uncond, cfg=cfg, top_k=20, top_p=0.9, seed=7)
    assert [i.shape for i in idx_Bl] == [(B, pn * pn) for pn in PATCH_NUMS]
    # no-cache reference: teacher-force the sampled sequence for cond and uncond, mix per scale
    both = TextFeatures.cat([text, uncond.index([0] * B)])
    x_BLC = vqvae.idxBl_to_var_input(idx_Bl)
    logits = proxy(x_BLC.repeat(2, 1, 1), both)
    K = len(PATCH_NUMS)
    for si, (bg, ed) in enumerate(proxy.begin_ends):
        t = cfg * si / (K - 1)
        ref = (1 + t) * logits[:B, bg:ed] - t * logits[B:, bg:ed]
        assert torch.allclose(calls[si], ref, atol=1e-4), si
    assert torch.allclose(f_hat, vqvae.quantize.idxBl_to_fhat(idx_Bl), atol=1e-5)


def test_generation_is_deterministic_per_seed_and_cfg0_is_conditional(vqvae):
    proxy = tiny_proxy()  # left in train mode: generation must switch drop-path off itself
    text, uncond = make_text(4), make_text(1, T=2, lengths=[1])
    run = lambda **kw: torch.cat(proxy.sample_tokens(vqvae, text, **{"top_k": 0, "top_p": 1.0, **kw})[0], 1)
    a, b = run(uncond=uncond, seed=3), run(uncond=uncond, seed=3)
    assert torch.equal(a, b) and proxy.training
    assert not torch.equal(a, run(uncond=uncond, seed=4))
    assert torch.equal(run(uncond=uncond, cfg=0.0, seed=5), run(uncond=None, seed=5))
    img = proxy.generate(vqvae, text, uncond, seed=0)
    assert img.shape == (4, 3, 8, 8) and img.abs().max() <= 1.0


def test_top_k_top_p_filtering():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]])).expand(1, 2000, 4).contiguous()
    counts = lambda idx: torch.bincount(idx.flatten(), minlength=4)
    assert (counts(sample_top_k_top_p(logits, 2, 1.0, g))[2:] == 0).all()
    # top-p 0.7: ids 0 and 1 (mass before id 1 is 0.5 < 0.7, before id 2 is 0.8 > 0.7)
    c = counts(sample_top_k_top_p(logits, 0, 0.7, g))
    assert c[0] > 0 and c[1] > 0 and (c[2:] == 0).all()
    assert (counts(sample_top_k_top_p(logits, 0, 0.1, g))[1:] == 0).all()  # the best id always survives
    assert (counts(sample_top_k_top_p(logits, 0, 1.0, g)) > 0).all()
