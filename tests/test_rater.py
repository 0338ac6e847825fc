import pytest
import torch

from alchemist.batch import TextFeatures, TokenBatch
from alchemist.config import ModelConfig
from alchemist.models.rater import Rater
from alchemist.models.vqvae import VQVAE

PATCH_NUMS = (1, 2, 3, 4)
V, CVAE, D, L = 64, 8, 16, 30


def make_batch(B=4, T=6):
    lengths = torch.tensor([T - (i % 3) for i in range(B)])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    text = TextFeatures(torch.randn(B, T, D) * mask[..., None], mask, torch.randn(B, D))
    return TokenBatch(torch.randint(0, V, (B, L)), torch.randn(B, L - 1, CVAE), text,
                      torch.randn(B, PATCH_NUMS[-1] ** 2, CVAE))


def tiny_rater(**kw):
    return Rater(2, CVAE, PATCH_NUMS, D, **kw)


def test_from_config():
    r = Rater.from_config(ModelConfig(raterDepth=2, Cvae=CVAE, patch_nums=PATCH_NUMS, group_head=False), D,
                          double_softmax=True)
    assert r.C == 128 and len(r.blocks) == 2 and r.group_head is None and r.double_softmax
    assert r.attn_mask_LL is None  # bidirectional


def test_instance_logit_is_batch_independent():
    rater = tiny_rater()  # default drop_path 0: the score is deterministic in train mode too
    batch = make_batch(4)
    full = rater(batch).logit_B
    alone = torch.cat([rater(batch.index([i])).logit_B for i in range(4)])
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = rater(batch.index(perm)).logit_B
    assert full.shape == (4,)
    assert torch.allclose(full, alone, atol=1e-5)
    assert torch.allclose(full[perm], shuffled, atol=1e-5)
    # padded to a longer caption length in another batch: same score
    longer = TextFeatures.cat([batch.text, TextFeatures(torch.randn(1, 9, D), torch.ones(1, 9, dtype=torch.bool),
                                                        torch.randn(1, D))]).index(slice(0, 4))
    padded = rater(TokenBatch(batch.idx_BL, batch.x_BLC, longer, batch.final_BlC)).logit_B
    assert torch.allclose(full, padded, atol=1e-5)


def test_only_the_full_image_rater_sees_the_last_scale():
    """Two pairs that differ only in the last scale's codes have the same teacher-forcing input: the
    official rater (full_image=False) must score them equally, the default must not."""
    torch.manual_seed(1)
    vq = VQVAE(vocab_size=V, z_channels=CVAE, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=PATCH_NUMS).eval()
    idx_Bl = [torch.randint(0, V, (1, pn * pn)).repeat(2, 1) for pn in PATCH_NUMS]
    idx_Bl[-1][1] = (idx_Bl[-1][1] + 1) % V  # second row: other finest codes, same coarse ones
    x_BLC, final_BlC = vq.idxBl_to_inputs(idx_Bl)
    text = TextFeatures(torch.randn(1, 5, D).repeat(2, 1, 1), torch.ones(2, 5, dtype=torch.bool),
                        torch.randn(1, D).repeat(2, 1))
    batch = TokenBatch(torch.cat(idx_Bl, 1), x_BLC, text, final_BlC)
    assert torch.equal(x_BLC[0], x_BLC[1]) and not torch.equal(final_BlC[0], final_BlC[1])
    official = tiny_rater(full_image=False)(batch).logit_B
    full = tiny_rater()(batch).logit_B
    # equal up to the rounding of two rows of one matmul, which some CPUs' kernels do differently
    assert (official[0] - official[1]).abs() < 1e-6
    assert (full[0] - full[1]).abs() > 1e-4
    assert "final_embed" not in dict(tiny_rater(full_image=False).named_parameters())


def test_weights_are_softmax_of_sigmoid_times_group_scalar():
    rater = tiny_rater()
    out = rater(make_batch(6))
    assert out.group_scalar.dim() == 0 and 0 < out.group_scalar < 1
    assert torch.allclose(out.weight_B.sum(), out.group_scalar)
    expected = torch.sigmoid(out.logit_B).softmax(0) * out.group_scalar
    assert torch.allclose(out.weight_B, expected)
    single = rater(make_batch(1))  # population variance of one sample is 0, not NaN
    assert torch.isfinite(single.weight_B).all() and torch.allclose(single.weight_B.sum(), single.group_scalar)


def test_group_scalar_depends_on_the_batch_and_has_gradients():
    rater = tiny_rater()
    batch = make_batch(6)
    out = rater(batch)
    assert not torch.allclose(out.group_scalar, rater(batch.index([0, 1, 2])).group_scalar)
    out.weight_B[0].backward()
    assert rater.group_head[0].weight.grad.abs().sum() > 0
    assert rater.instance_head[0].weight.grad.abs().sum() > 0
    assert rater.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_group_head_off_gives_unit_scalar():
    out = tiny_rater(group_head=False)(make_batch(5))
    assert out.group_scalar.dim() == 0 and out.group_scalar.item() == 1.0
    assert torch.allclose(out.weight_B.sum(), torch.tensor(1.0))


def test_double_softmax_flattens_the_weights():
    torch.manual_seed(0)
    single = tiny_rater()
    double = tiny_rater(double_softmax=True)
    double.load_state_dict(single.state_dict())
    batch = make_batch(8)
    w1, w2 = single(batch), double(batch)
    assert torch.equal(w1.logit_B, w2.logit_B)
    assert torch.allclose(w2.weight_B, w1.weight_B.softmax(0))
    assert torch.allclose(w2.weight_B.sum(), torch.tensor(1.0))
    # weights of a batch of B are already ~1/B, so the second softmax leaves ≈ 1/B ± O(1/B²)
    assert (w2.weight_B - 1 / 8).abs().max() < (w1.weight_B - w1.weight_B.mean()).abs().max() + 1e-12
    assert (w2.weight_B - 1 / 8).abs().max() < 1e-2


@pytest.mark.parametrize("B", [1, 3])
def test_output_shapes(B):
    out = tiny_rater()(make_batch(B))
    assert out.logit_B.shape == out.weight_B.shape == (B,)


def test_scores_stay_fp32_under_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_rater()(make_batch(3))
    assert out.logit_B.dtype == out.weight_B.dtype == out.group_scalar.dtype == torch.float32


def test_caption_head_starts_as_the_instance_head_and_the_logit_is_the_lower_of_the_two():
    torch.manual_seed(0)
    rater, batch = tiny_rater(), make_batch(6)
    before = rater(batch).logit_B
    rater.add_caption_head()
    out = rater(batch)
    assert torch.allclose(out.logit_B, before) and torch.allclose(out.tests_B2, before[:, None].expand(6, 2))
    with torch.no_grad():
        rater.caption_head[-1].weight.normal_(std=0.3)  # the heads now differ
        rater.caption_head[-1].bias.copy_(rater.instance_head[-1].bias)
    out = rater(batch)
    p_BC = rater.pooled(batch)
    inst_B, cap_B = rater.instance_head(p_BC).squeeze(-1), rater.caption_head(p_BC).squeeze(-1)
    assert torch.allclose(out.tests_B2, torch.stack([inst_B, cap_B], 1))
    assert torch.allclose(out.logit_B, torch.minimum(inst_B, cap_B))
    assert (inst_B < cap_B).any() and (cap_B < inst_B).any()  # both heads decide some rows
    assert torch.allclose(out.weight_B, torch.sigmoid(out.logit_B).softmax(0) * out.group_scalar)


def test_a_state_brings_or_takes_away_the_caption_head():
    torch.manual_seed(0)
    two, batch = tiny_rater(), make_batch(5)
    plain_state = {k: v.clone() for k, v in two.state_dict().items()}
    two.add_caption_head()
    with torch.no_grad():
        two.caption_head[-1].bias -= 0.2
    fresh = tiny_rater()
    fresh.load_state_dict(two.state_dict())  # as scoring loads a distilled checkpoint
    assert fresh.caption_head is not None and torch.equal(fresh(batch).logit_B, two(batch).logit_B)
    two.load_state_dict(plain_state)  # as undoing the distillation restores the loop's rater
    assert two.caption_head is None and two(batch).tests_B2 is None
    assert not any(k.startswith("caption_head.") for k in two.state_dict())
