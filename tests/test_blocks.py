import math

import pytest
import torch
from torch.func import functional_call, jvp

from alchemist.batch import TextFeatures
from alchemist.models.blocks import (
    Block, apply_rope, block_causal_mask, math_attention, rope_angles, rope_positions, text_attn_mask,
)

PATCH_NUMS = (1, 2, 3, 4)


def test_block_causal_mask_matches_definition():
    mask = block_causal_mask(PATCH_NUMS)
    scale = [si for si, pn in enumerate(PATCH_NUMS) for _ in range(pn * pn)]
    L = len(scale)
    assert mask.shape == (L, L) and mask.dtype == torch.bool
    for i in range(L):
        for j in range(L):
            assert bool(mask[i, j]) == (scale[j] <= scale[i]), (i, j)


def test_rope_positions_normalise_every_scale_onto_the_same_range():
    norm = 64.0
    pos = rope_positions((1, 2, 4, 16), norm)
    begin = 0
    per_scale = []
    for pn in (1, 2, 4, 16):
        p = pos[begin:begin + pn * pn]
        begin += pn * pn
        assert p.min() > 0 and p.max() < norm
        assert torch.allclose(p.min() + p.max(), torch.tensor(norm, dtype=p.dtype))  # symmetric in [0, norm]
        assert torch.allclose(p.mean(0), torch.full((2,), norm / 2, dtype=p.dtype))
        per_scale.append(p.view(pn, pn, 2))
    assert torch.allclose(per_scale[0].view(2), torch.full((2,), norm / 2, dtype=pos.dtype))
    # a coarse cell sits at the mean position of the finer cells it covers (2×2 → 4×4)
    coarse, fine = per_scale[1], per_scale[2]
    fine_means = fine.view(2, 2, 2, 2, 2).mean(dim=(1, 3))
    assert torch.allclose(coarse, fine_means)


def test_rope_preserves_norms_and_depends_on_relative_position_only():
    d, theta = 64, 1e4
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)

    def rot(x, yx):
        a = rope_angles(torch.tensor([yx], dtype=torch.float64), d, theta)
        return apply_rope(x[None], a.cos(), a.sin())[0]

    p1, p2, shift = (3.0, 10.0), (17.5, 2.25), (40.0, -7.0)
    assert torch.allclose(rot(q, p1).norm(), q.norm())
    dot = rot(q, p1) @ rot(k, p2)
    dot_shifted = rot(q, (p1[0] + shift[0], p1[1] + shift[1])) @ rot(k, (p2[0] + shift[0], p2[1] + shift[1]))
    assert torch.allclose(dot, dot_shifted)
    assert not torch.allclose(dot, rot(q, p1) @ rot(k, (p2[0] + 1.0, p2[1])))  # position does matter
    # y and x each rotate half of the channel pairs
    a = rope_angles(torch.tensor([[1.0, 0.0]], dtype=torch.float64), d, theta)
    assert (a[0, : d // 4] != 0).all() and (a[0, d // 4:] == 0).all()


def _block_and_inputs(B=2, L=14, C=128, H=2, D=16, T=5):
    block = Block(C, H, D, 4.0, drop_path=0.0).eval()
    x = torch.randn(B, L, C)
    angles = rope_angles(rope_positions((1, 2, 3), 64.0), 64, 1e4).float()
    text = torch.randn(B, T, D)
    mask_BT = torch.ones(B, T, dtype=torch.bool)
    mask_BT[0, 3:] = False
    return block, x, angles.cos(), angles.sin(), block_causal_mask((1, 2, 3)), text, text_attn_mask(mask_BT)


def test_math_attention_matches_default_backend():
    block, x, cos, sin, mask, text, tmask = _block_and_inputs()
    run = lambda: block(x, cos, sin, mask, block.cross.text_kv(text), tmask)
    ref = run()
    with math_attention():
        out = run()
    assert torch.allclose(ref, out, atol=1e-5)


class _WithTextKV(torch.nn.Module):
    """Block plus its text K/V projection in one forward, so functional_call swaps every parameter."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, cos, sin, mask, text, tmask):
        return self.block(x, cos, sin, mask, self.block.cross.text_kv(text), tmask)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")  # torch-internal, jvp decompositions
def test_math_attention_supports_double_backward_and_jvp():
    block, x, cos, sin, mask, text, tmask = _block_and_inputs()
    model = _WithTextKV(block)
    params = dict(model.named_parameters())
    loss_fn = lambda p: functional_call(model, p, (x, cos, sin, mask, text, tmask)).pow(2).mean()

    with math_attention():
        # double backward: the gradient of a gradient norm reaches the parameters
        grads = torch.autograd.grad(loss_fn(params), list(params.values()), create_graph=True)
        gnorm = sum(g.pow(2).sum() for g in grads)
        second = torch.autograd.grad(gnorm, list(params.values()), allow_unused=True)
        assert sum(s.abs().sum() for s in second if s is not None) > 0

        # forward-mode AD along a random direction agrees with a central difference
        primal = {k: v.detach() for k, v in params.items()}
        tangent = {k: torch.randn_like(v) for k, v in primal.items()}
        _, jvp_out = jvp(loss_fn, (primal,), (tangent,))
        eps = 1e-3
        plus = loss_fn({k: primal[k] + eps * tangent[k] for k in primal})
        minus = loss_fn({k: primal[k] - eps * tangent[k] for k in primal})
        assert torch.allclose(jvp_out, (plus - minus) / (2 * eps), rtol=1e-2, atol=1e-6)


def test_self_attention_temperature_starts_at_4_and_is_capped_at_100():
    block, x, cos, sin, mask, text, tmask = _block_and_inputs()
    assert torch.allclose(block.attn.log_scale_H.exp(), torch.full((2,), 4.0))
    with torch.no_grad():
        block.attn.log_scale_H.fill_(math.log(1e4))
        capped = block(x, cos, sin, mask, block.cross.text_kv(text), tmask)
        block.attn.log_scale_H.fill_(math.log(100.0))
        at_cap = block(x, cos, sin, mask, block.cross.text_kv(text), tmask)
    assert torch.allclose(capped, at_cap)


def test_text_mask_ignores_padding_and_survives_an_empty_caption():
    block, x, cos, sin, mask, text, _ = _block_and_inputs(T=5)
    mask_BT = torch.tensor([[True, True, False, False, False], [False] * 5])
    tmask = text_attn_mask(mask_BT)
    out = block(x, cos, sin, mask, block.cross.text_kv(text), tmask)
    text2 = text.clone()
    text2[0, 2:] = torch.randn(3, text.shape[-1])  # padding of sample 0 changes
    out2 = block(x, cos, sin, mask, block.cross.text_kv(text2), tmask)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], out2[0], atol=1e-6)


def test_text_features_cat_pads_and_masks():
    a = TextFeatures(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 4))
    b = TextFeatures(torch.randn(1, 5, 4), torch.ones(1, 5, dtype=torch.bool), torch.randn(1, 4))
    c = TextFeatures.cat([a, b])
    assert c.hidden_BTD.shape == (3, 5, 4) and c.B == 3
    assert not c.mask_BT[:2, 3:].any() and c.mask_BT[2].all()
    assert torch.equal(c.hidden_BTD[:2, :3], a.hidden_BTD) and (c.hidden_BTD[:2, 3:] == 0).all()
    assert torch.equal(c.index([2]).pooled_BD, b.pooled_BD)


@pytest.mark.parametrize("causal", [True, False])
def test_trunk_drop_path_rises_linearly(causal):
    from alchemist.models.blocks import ScaleTransformer

    t = ScaleTransformer(4, 8, PATCH_NUMS, 16, causal, 0.3, 64.0, 1e4, 4.0)
    assert [b.drop_path.p for b in t.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert (t.attn_mask_LL is not None) == causal
