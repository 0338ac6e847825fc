"""The distillation stage: its signal, caption agreement and further-trained proxy against brute force,
its target, a real tiny run and its resume."""
import copy
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import ndtri
from scipy.stats import spearmanr

from alchemist.bilevel.distill import (adam_step_size, caption_agreement, caption_evidence, caption_shifts,
                                       combined_target, judge_evidence, judged_swap_targets,
                                      distill_loss, distill_settings, mean_rank, needs_distillation, pair_signal,
                                      quantile_in, rank_target, snapshot_points, snapshot_signals, swapped_target,
                                      trained_further, two_test_targets, with_swapped_captions)
from alchemist.bilevel import distill
from alchemist.bilevel.launch import train_rater
from alchemist.build import build_proxy, build_rater, build_text_encoder, build_tokenizer
from alchemist.config import BilevelConfig, ConfigError, RaterConfig
from alchemist.data.pairs import PairsDataset, collate_pairs, load_pairs
from alchemist.data.tokens import Featurizer
from alchemist.models.proxy import Proxy
from alchemist.models.rater import Rater, RaterEnsemble
from alchemist.scoring import load_rater
from alchemist.utils.checkpoint import latest_checkpoint, load_checkpoint, state_sha1
from alchemist.utils.optim import build_optimizer
from tests.test_bilevel import PATCH_NUMS, _cfg, _tiny_batch, tiny_setup  # noqa: F401 (a fixture)

NO_AMP = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731


def _tiny_proxy():
    """A seeded tiny float64 proxy without drop-path, for comparisons with brute force."""
    torch.manual_seed(0)
    return Proxy(1, 16, 4, PATCH_NUMS, 8, drop_path_rate=0.0).double()


def _image_with_caption(batch, i, j):
    """Row ``i``'s image alone, shown with row ``j``'s caption."""
    return dataclasses.replace(batch.index([i]), text=batch.text.index([j]))


def test_pair_signal_is_each_pairs_gradient_along_adams_step_of_the_val_gradient():
    """c_i = ∇l_i(θ)·(v / (ŝ+eps)), v = ∇ of the mean val loss over all val batches; brute force:
    per-pair autograd gradients, float64."""
    proxy = _tiny_proxy()
    params = list(proxy.parameters())
    opt = build_optimizer(proxy, "adamw", 3e-3, 0.05)
    for s in range(3):
        proxy.per_sample_loss(_tiny_batch(4, seed=10 + s)).mean().backward()
        opt.step()
        opt.zero_grad()
    val = [_tiny_batch(3, seed=2), _tiny_batch(2, seed=3)]
    train = [(["a", "b", "c"], _tiny_batch(3, seed=4)), (["d", "e"], _tiny_batch(2, seed=5))]
    got = pair_signal(proxy, opt, val, train, 1e-4, NO_AMP)

    v = torch.autograd.grad(torch.cat([proxy.per_sample_loss(b) for b in val]).mean(), params)
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    u = [g / ((opt.state[p]["exp_avg_sq"] / (1 - group[id(p)]["betas"][1] ** 3)).sqrt() + group[id(p)]["eps"])
         for g, p in zip(v, params)]
    assert all(torch.allclose(s * g, x) for s, g, x in zip(adam_step_size(opt, params), v, u))
    for ids, batch in train:
        for k, i in enumerate(ids):
            g = torch.autograd.grad(proxy.per_sample_loss(batch)[k], params)
            want = sum((gi * ui).sum() for gi, ui in zip(g, u)).item()
            assert got[i] == pytest.approx(want, rel=1e-5, abs=1e-10)
    assert len({round(c, 12) for c in got.values()}) == 5  # five different pairs, five values


def _caption_batches():
    """Held batches of 5, 2 and 1 pairs: a full one, one shorter than most shifts, one with no other caption."""
    return [(list("abcde"), _tiny_batch(5, seed=4)), (["f", "g"], _tiny_batch(2, seed=5)), (["h"], _tiny_batch(1, seed=6))]


@pytest.mark.parametrize("shifts", [[1, 2, 3], [2, 4]])
def test_caption_agreement_is_the_share_of_other_captions_that_predict_the_image_worse(shifts):
    """Brute force: each pair's image scored alone with each caption it is compared with (the ones
    ``shifts`` rows before it in its batch, cyclically, shifts of at least the batch size left out),
    float64; a pair with none left gives 0.5."""
    proxy = _tiny_proxy()
    batches = _caption_batches()
    got = caption_agreement(proxy, batches, shifts, NO_AMP)
    with torch.no_grad():
        for ids, batch in batches:
            B = batch.B
            for i, pid in enumerate(ids):
                alone = lambda j: proxy.per_sample_loss(_image_with_caption(batch, i, j)).item()  # noqa: E731
                others = [(i - r) % B for r in shifts if r < B]
                want = np.mean([alone(j) > alone(i) for j in others]) if others else 0.5
                assert got[pid] == pytest.approx(want, abs=1e-6)
    assert len(set(got.values())) > 1  # the random proxy does read the captions


@pytest.mark.parametrize("others", [3, 16])
def test_caption_evidence_is_the_log_posterior_over_prior_of_each_caption_asked(others):
    """Brute force: each pair's image scored alone under every caption it is compared with (its own and
    the ones 1..``others`` rows before it in its batch, cyclically, shifts of at least the batch size
    left out and NaN), the total token loss as -log likelihood, float64; a pair with no other caption
    gives 0 for its own."""
    proxy = _tiny_proxy()
    batches = _caption_batches()
    got = caption_evidence(proxy, batches, others, NO_AMP)
    with torch.no_grad():
        for ids, batch in batches:
            B = batch.B
            for i, pid in enumerate(ids):
                nll = lambda j: proxy.per_token_loss(_image_with_caption(batch, i, j)).sum().item()  # noqa: E731
                asked = [(i - r) % B for r in range(others + 1) if r < B]
                like = np.exp([-nll(j) for j in asked])
                want = np.full(others + 1, np.nan)
                want[:len(asked)] = np.log(like / like.sum() * len(asked))
                assert got[pid].shape == (others + 1,)
                assert np.allclose(got[pid], want, atol=1e-9, equal_nan=True)
    own = np.array([e[0] for e in got.values()])
    assert got["h"][0] == 0.0 and np.isnan(got["h"][1:]).all() and len(set(own)) > 2
    assert own.max() <= np.log(6) and own.min() < 0  # at most log(n) of the n asked


def _adamw(model):
    return build_optimizer(model, "adamw", 1e-4, 0.05)


def _adam_step(model, opt, loss):
    """One plain update: the ``step`` the stage is given."""
    loss.backward()
    opt.step()
    opt.zero_grad()


def _stepped_proxy(steps):
    """A tiny float64 proxy and its AdamW after ``steps`` updates, so that the optimiser has moments."""
    proxy = _tiny_proxy()
    opt = _adamw(proxy)
    for s in range(steps):
        _adam_step(proxy, opt, proxy.per_sample_loss(_tiny_batch(4, seed=10 + s)).mean())
    return proxy, opt


def test_the_judge_asks_a_copy_trained_on_the_validation_batches_only():
    """``judge_evidence`` equals ``caption_evidence`` of a copy trained that many steps on the validation
    batches in the order ``_shuffled_cycle`` deals them; the held pairs never train it, and the original
    proxy and its optimiser are untouched."""
    proxy, opt = _stepped_proxy(1)
    before, state_before = copy.deepcopy(proxy.state_dict()), str(opt.state_dict()["state"])
    val = [_tiny_batch(3, seed=40 + s) for s in range(2)]
    held = [(list("abcd"), _tiny_batch(4, seed=30))]

    got = judge_evidence(proxy, opt, val, held, 3, 2, 3e-3, _adamw, _adam_step, NO_AMP, seed=7, progress=False)
    assert all(torch.equal(before[k], v) for k, v in proxy.state_dict().items())
    assert str(opt.state_dict()["state"]) == state_before
    judge, _ = trained_further(proxy, opt, distill._shuffled_cycle(val, 7), 3, 3e-3, _adamw, _adam_step, NO_AMP,
                               progress=False)
    table = lambda evidence: np.stack([evidence[i] for i in "abcd"])  # noqa: E731
    assert np.allclose(table(got), table(caption_evidence(judge, held, 2, NO_AMP)), atol=1e-12)
    on_held, _ = trained_further(proxy, opt, iter([b for _, b in held] * 3), 3, 3e-3, _adamw, _adam_step, NO_AMP,
                                 progress=False)
    assert not np.allclose(table(got), table(caption_evidence(on_held, held, 2, NO_AMP)), atol=1e-6)
    assert not np.allclose(table(got), table(caption_evidence(proxy, held, 2, NO_AMP)), atol=1e-6)


def test_snapshots_share_out_the_captions_and_vote_equally():
    assert snapshot_points(300, 1) == [300] and snapshot_points(0, 1) == [0]
    assert snapshot_points(300, 4) == [0, 100, 200, 300] and snapshot_points(7, 3) == [0, 4, 7]
    dealt = [caption_shifts(16, 4, j) for j in range(4)]
    assert dealt[0] == [1, 5, 9, 13] and sorted(sum(dealt, [])) == list(range(1, 17))  # each caption once
    assert caption_shifts(16, 1, 0) == list(range(1, 17)) and caption_shifts(2, 4, 3) == []
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([4e6, 3e6, 2e6, 1e6])  # opposite orders, scales 10^6 apart
    assert np.allclose(mean_rank([a, b]), 0.0)  # equal votes: a tie everywhere
    assert np.allclose(mean_rank([a, 10 * a]), rank_target(a))
    assert np.allclose(mean_rank([a]), rank_target(a))


def test_a_checkpoint_distilled_before_a_setting_existed_counts_as_its_default():
    cfg = RaterConfig(bilevel=BilevelConfig(estimator="lookahead", distill_steps=5))
    done = {k: v for k, v in distill_settings(cfg).items() if k != "distill_snapshots"}
    assert not needs_distillation(cfg, done)
    more = RaterConfig(bilevel=BilevelConfig(estimator="lookahead", distill_steps=5, distill_proxy_steps=2,
                                             distill_snapshots=3))
    assert needs_distillation(more, done) and not needs_distillation(more, distill_settings(more))
    with pytest.raises(ConfigError, match="distill_proxy_steps >= distill_snapshots - 1"):
        BilevelConfig(distill_proxy_steps=1, distill_snapshots=3)
    with pytest.raises(ConfigError, match="distill_swaps"):  # its target needs the caption agreement
        BilevelConfig(distill_swaps=0.5)
    with pytest.raises(ConfigError, match="distill_swaps"):
        BilevelConfig(distill_swaps=1.0, distill_captions=4)
    with pytest.raises(ConfigError, match="distill_caption_head needs"):
        BilevelConfig(distill_caption_head="min")
    with pytest.raises(ConfigError, match="distill_start must be 'loop' or 'fresh'"):
        BilevelConfig(distill_start="proxy")
    with pytest.raises(ConfigError, match="must be '', 'min' or 'aux'"):
        BilevelConfig(distill_caption_head="both", distill_captions=4)
    for bad in ({}, {"distill_captions": 4, "distill_caption_head": "aux"}):
        with pytest.raises(ConfigError, match="distill_judge_steps"):  # the caption head's targets are shares
            BilevelConfig(distill_judge_steps=10, **bad)
    assert BilevelConfig(distill_judge_steps=10, distill_captions=4, distill_swaps=0.25).distill_swaps == 0.25
    judged = RaterConfig(bilevel=BilevelConfig(estimator="lookahead", distill_steps=5, distill_captions=4,
                                               distill_judge_steps=10))
    assert needs_distillation(judged, {k: v for k, v in distill_settings(judged).items() if k != "distill_judge_steps"})


def test_trained_further_continues_adam_on_a_copy_at_the_given_lr():
    """Steps on a copy: the original and its optimiser are untouched; the copy equals AdamW carried on
    from the original's moments (step count included) at the new lr."""
    proxy, opt = _stepped_proxy(2)
    before = copy.deepcopy(proxy.state_dict())
    state_before = copy.deepcopy(opt.state_dict())
    batches = [_tiny_batch(3, seed=20 + s) for s in range(3)]

    twin, twin_opt = trained_further(proxy, opt, iter(batches), 3, 3e-3, _adamw, _adam_step, NO_AMP, progress=False)
    assert all(torch.equal(before[k], v) for k, v in proxy.state_dict().items())
    assert {g["lr"] for g in opt.param_groups} == {1e-4} and {g["lr"] for g in twin_opt.param_groups} == {3e-3}
    assert str(opt.state_dict()["state"]) == str(state_before["state"])

    want = copy.deepcopy(proxy)
    want_opt = _adamw(want)
    want_opt.load_state_dict(state_before)
    for group in want_opt.param_groups:  # weights with and without decay
        group["lr"] = 3e-3
    for b in batches:
        _adam_step(want, want_opt, want.per_sample_loss(b).float().mean())  # the loss in fp32, as the stage takes it
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(twin.parameters(), want.parameters()))
    assert all(float(twin_opt.state[p]["step"]) == 5 for p in twin.parameters())
    assert not all(torch.allclose(a, b) for a, b in zip(twin.parameters(), proxy.parameters()))


def test_snapshot_signals_are_the_signals_of_the_proxy_trained_that_far():
    """Each point's signal equals ``pair_signal`` at a fresh copy trained that many steps on the same
    batch sequence (the one copy trained on from point to point changes nothing); the original proxy
    and its optimiser are untouched; captions are asked only where they were dealt."""
    proxy, opt = _stepped_proxy(1)
    before, state_before = copy.deepcopy(proxy.state_dict()), str(opt.state_dict()["state"])
    batches = [_tiny_batch(3, seed=20 + s) for s in range(3)]
    held, val = [(list("abcd"), _tiny_batch(4, seed=30))], [_tiny_batch(4, seed=31)]

    ids, signals, agreements = snapshot_signals(proxy, opt, held, val, iter(batches), [0, 2, 3], 2, 1e-4, 3e-3,
                                                _adamw, _adam_step, NO_AMP, progress=False)
    assert ids == list("abcd") and len(signals) == 3 and len(agreements) == 2  # 2 captions over 3 points
    assert all(torch.equal(before[k], v) for k, v in proxy.state_dict().items())
    assert str(opt.state_dict()["state"]) == state_before
    for point, got in zip([0, 2, 3], signals):
        m, o = trained_further(proxy, opt, iter(batches), point, 3e-3, _adamw, _adam_step, NO_AMP, progress=False)
        want = pair_signal(m, o, val, held, 1e-4, NO_AMP)
        assert np.allclose(got, [want[i] for i in ids], rtol=1e-9, atol=0)


def test_combined_target_rates_a_pair_by_the_worse_of_its_two_tests():
    c = np.array([5.0, 4.0, 3.0, 2.0, 1.0])  # the signal's order: pair 0 best
    a = np.array([0.1, 1.0, 0.9, 0.8, 0.7])  # pair 0's caption fails
    t = combined_target(c, a)
    z = lambda x: rank_target(x)  # noqa: E731
    assert np.allclose(t, rank_target(np.minimum(z(c), z(a))))
    assert np.allclose(np.sort(t), np.sort(rank_target(np.array([1, 4, 3, 2, 1.0]))))  # normal quantiles of ranks
    assert t[0] == t[4] < t[3] < t[2] < t[1]  # min ranks 1, 4, 3, 2, 1: the caption sinks pair 0, the signal pair 4
    assert np.allclose(combined_target(c, None), rank_target(c))


def test_rank_target_is_the_normal_quantile_of_the_rank_with_ties_shared():
    c = np.array([3.0, -1.0, 10.0, 3.0, 0.5])
    t = rank_target(c)
    ranks = np.array([3.5, 1, 5, 3.5, 2])
    assert np.allclose(t, ndtri(ranks / 6))
    assert t[0] == t[3] and np.all(np.diff(t[np.argsort(c, kind="stable")]) >= 0)
    assert np.allclose(rank_target(-c), -t)  # symmetric: only the order matters
    assert np.allclose(rank_target(c * 1e6 + 7), t)


def test_quantile_in_places_values_among_a_reference_on_rank_targets_scale():
    ref = np.array([3.0, -1.0, 10.0, 3.0, 0.5])
    assert np.allclose(quantile_in(ref, ref), rank_target(ref))
    # below everything, between -1 and 0.5, on the tied 3s, above everything: mean ranks 0.5, 1.5, 3.5, 5.5 of 6
    assert np.allclose(quantile_in(ref, np.array([-5.0, 0.0, 3.0, 11.0])), ndtri(np.array([0.5, 1.5, 3.5, 5.5]) / 6))


def test_swapped_target_is_the_pair_under_a_chance_level_caption_never_above_its_own():
    rng = np.random.default_rng(0)
    c, a = rng.normal(size=200), rng.uniform(0.3, 1.0, size=200)
    own, swapped = combined_target(c, a), swapped_target(c, a)
    assert np.all(swapped <= own + 1e-12)
    # brute force: each pair's min(z(c), z(a)) with its a lowered to 0.5 (where it was higher), ranked among the own
    z_c, z_half = rank_target(c), quantile_in(a, np.array([0.5]))[0]
    for i in rng.choice(200, 20, replace=False):
        m = np.minimum(z_c, rank_target(a))
        m_i = min(m[i], z_half)
        rank = (m < m_i).sum() + ((m == m_i).sum() + 1) / 2
        assert np.isclose(swapped[i], ndtri(rank / 201))
    at_chance = a <= 0.5  # a caption already at chance or worse: the pair's own target
    assert at_chance.any() and np.allclose(swapped[at_chance], own[at_chance])
    assert (swapped[~at_chance] < own[~at_chance]).mean() > 0.5  # good captions lose their credit


def test_judged_swap_targets_grade_each_swapped_caption_by_the_judges_evidence():
    rng = np.random.default_rng(2)
    N, K = 300, 4
    c, evidence = rng.normal(size=N), rng.normal(size=(N, K + 1))
    evidence[:5, 3:] = np.nan  # pairs of a short batch: the judge asked two others only
    got = judged_swap_targets(c, evidence)
    assert got.shape == (N, K) and np.isnan(got[:5, 2:]).all() and not np.isnan(got[5:]).any()
    own = combined_target(c, evidence[:, 0])
    # brute force: min(z(c), the caption's evidence ranked among the own evidence), ranked among the own mins
    z_c, e_own = rank_target(c), evidence[:, 0]
    m = np.minimum(z_c, rank_target(e_own))
    rank_among = lambda ref, x: ((ref < x).sum() + ((ref == x).sum() + 1) / 2) / (len(ref) + 1)  # noqa: E731
    for i, r in zip(rng.choice(N, 30, replace=False), rng.integers(1, K + 1, size=30)):
        if np.isnan(evidence[i, r]):
            continue
        m_ir = min(z_c[i], ndtri(rank_among(e_own, evidence[i, r])))
        assert np.isclose(got[i, r - 1], ndtri(rank_among(m, m_ir)))
    # a caption as good as the own one gives the own target; never above what the image allows (z(c))
    same = judged_swap_targets(c, np.repeat(evidence[:, :1], K + 1, axis=1))
    assert np.allclose(same, own[:, None])
    assert np.all(got[5:] <= quantile_in(m, z_c)[5:, None] + 1e-12)
    # a misaligned pair's image under a caption that fits it is better than the pair as it is
    fits = evidence.copy()
    fits[0, 0], fits[0, 1] = evidence[:, 0].min() - 1, evidence[:, 0].max() + 1
    assert judged_swap_targets(c, fits)[0, 0] > combined_target(c, fits[:, 0])[0]


def test_two_test_targets_give_each_head_its_own_test():
    rng = np.random.default_rng(1)
    c, a = rng.normal(size=300), rng.integers(0, 17, size=300) / 16  # 16 captions: shares in steps of 1/16
    own, swapped = two_test_targets(c, a)
    assert own.shape == swapped.shape == (300, 2)
    assert np.array_equal(own[:, 0], rank_target(c)) and np.array_equal(swapped[:, 0], own[:, 0])
    assert np.array_equal(own[:, 1], rank_target(a))
    # brute force: a share of 0.5 ranked among the shares (ties half-way), capping the pair's own
    rank_half = (a < 0.5).sum() + ((a == 0.5).sum() + 1) / 2
    assert np.allclose(swapped[:, 1], np.minimum(rank_target(a), ndtri(rank_half / 301)))
    assert np.array_equal(swapped[a <= 0.5, 1], own[a <= 0.5, 1]) and (swapped[a > 0.5, 1] < own[a > 0.5, 1]).all()
    # the min of the two heads' targets orders the pairs as the single head's target does
    assert spearmanr(own.min(axis=1), combined_target(c, a)).statistic == pytest.approx(1.0)
    aux_own, aux_swapped = two_test_targets(c, a, aux=True)  # the score keeps the combined target, swaps teach it nothing
    assert np.array_equal(aux_own[:, 0], combined_target(c, a)) and np.isnan(aux_swapped[:, 0]).all()
    assert np.array_equal(aux_own[:, 1], own[:, 1]) and np.array_equal(aux_swapped[:, 1], swapped[:, 1])


def test_distill_loss_skips_unknown_targets():
    pred = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, 2, dtype=torch.float64)
    target[[1, 3], 0] = float("nan")
    loss = distill_loss(pred, target)
    known = ~target.isnan()
    assert torch.isclose(loss, (pred[known] - target[known]).pow(2).mean())
    loss.backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad[~known] == 0).all() and (pred.grad[known] != 0).all()
    assert torch.isclose(distill_loss(pred[:, 1], target[:, 1]), (pred[:, 1] - target[:, 1]).pow(2).mean())


def test_with_swapped_captions_moves_another_rows_caption_and_its_target():
    g = torch.Generator().manual_seed(0)
    own = [torch.randn(8, generator=g) for _ in range(200)]  # own targets; swapped ones below them
    batches = [(_tiny_batch(8, seed=s), t, t - torch.rand(8, generator=g)) for s, t in enumerate(own)]
    batches.append((_tiny_batch(1, seed=9), torch.ones(1), -torch.ones(1)))  # one row: nothing to swap with
    assert all(b is o and torch.equal(t, t0) for (b, t), (o, t0, _) in
               zip(with_swapped_captions(batches, 0.0, seed=0), batches))
    swapped = 0
    for (batch, target_B), (orig, own_B, swap_B) in zip(with_swapped_captions(batches, 0.3, seed=0), batches):
        shifts = set()
        for i in range(batch.B):  # image and tokens untouched; a swapped row reads another row's caption
            same = [j for j in range(orig.B) if torch.equal(batch.text.hidden_BTD[i], orig.text.hidden_BTD[j])]
            assert len(same) == 1 and torch.equal(batch.text.pooled_BD[i], orig.text.pooled_BD[same[0]])
            j = same[0]
            if j != i:  # its image's swapped target
                assert target_B[i] == swap_B[i]
                shifts.add((j - i) % batch.B)
                swapped += 1
            else:
                assert target_B[i] == own_B[i]
        assert len(shifts) <= 1  # one shift per batch
        assert torch.equal(batch.idx_BL, orig.idx_BL) and torch.equal(batch.x_BLC, orig.x_BLC)
        assert torch.equal(batch.final_BlC, orig.final_BlC)
    assert abs(swapped / (200 * 8) - 0.3) < 0.05
    two = [(b, torch.stack([t, -t], 1), torch.stack([t, t - 5], 1)) for b, t, _ in batches[:20]]  # two heads
    for (batch, target_B2), (orig, own_B2, swap_B2) in zip(with_swapped_captions(two, 0.5, seed=1), two):
        moved = torch.tensor([not torch.equal(batch.text.pooled_BD[i], orig.text.pooled_BD[i]) for i in range(batch.B)])
        assert torch.equal(target_B2[moved], swap_B2[moved]) and torch.equal(target_B2[~moved], own_B2[~moved])
        assert moved.any()


def test_with_swapped_captions_takes_the_judges_column_for_the_caption_it_moves():
    """A (B, K) swapped table: a swapped row reads the caption r rows back, 1 <= r <= min(K, B - 1), one r
    per batch, and its target is column r - 1; the other rows keep theirs."""
    g = torch.Generator().manual_seed(3)
    K = 3
    batches = [(_tiny_batch(B, seed=s), torch.randn(B, generator=g), torch.randn(B, K, generator=g))
               for s, B in enumerate([8] * 60 + [2] * 20)]
    seen = set()
    for (batch, target_B), (orig, own_B, table_BK) in zip(with_swapped_captions(batches, 0.5, seed=2), batches):
        B, shifts = batch.B, set()
        for i in range(B):
            j = [j for j in range(B) if torch.equal(batch.text.pooled_BD[i], orig.text.pooled_BD[j])][0]
            if j == i:
                assert target_B[i] == own_B[i]
                continue
            r = (i - j) % B
            assert 1 <= r <= min(K, B - 1) and target_B[i] == table_BK[i, r - 1]
            shifts.add(r)
        assert len(shifts) <= 1 and torch.equal(batch.idx_BL, orig.idx_BL)
        seen |= {(B, r) for r in shifts}
    assert seen == {(8, 1), (8, 2), (8, 3), (2, 1)}  # every shift the judge asked, none it did not


def test_distillation_fits_the_rater_to_the_final_signal_and_a_rerun_skips_it(tiny_setup, monkeypatch):  # noqa: F811
    """After the loop the rater's logits follow the final proxy's signal (recomputed here from the
    checkpoint's proxy and AdamW state); the checkpoint says so, and a rerun changes nothing."""
    cfg = _cfg(tiny_setup, "distill", estimator="lookahead", distill_steps=80, distill_lr=3e-3)
    summary = train_rater(cfg)
    ck = load_checkpoint(latest_checkpoint(cfg.output.run_dir))
    assert ck["distilled"]["steps_taken"] == summary["distill_steps_taken"] == 80 and ck["distilled"]["pairs"] == 64
    assert summary["distill_loss_last"] < 0.5 * summary["distill_loss_first"]

    cpu = torch.device("cpu")
    text = build_text_encoder(cfg.model, cpu)
    featurize = Featurizer(build_tokenizer(cfg.model, cpu), text, cpu)
    proxy = build_proxy(cfg.model, text.width, cpu)
    proxy.load_state_dict(ck["proxy"])
    opt = build_optimizer(proxy, cfg.optim.opt, cfg.optim.tlr, cfg.optim.twd, (cfg.optim.beta1, cfg.optim.beta2))
    opt.load_state_dict(ck["opt_proxy"])

    def rows(path):
        table = load_pairs(path, cfg.data)
        ds = PairsDataset(table, cfg.data.image_size)
        return list(table["id"].astype(str)), featurize(collate_pairs([ds[i] for i in range(len(ds))]))

    (_, val), (ids, train) = rows(cfg.data.val_csv_path), rows(cfg.data.train_csv_path)
    signal = pair_signal(proxy, opt, [val], [(ids, train)], cfg.bilevel.lookahead_eps, NO_AMP)
    rater = build_rater(cfg.model, text.width, cpu).eval()
    rater.load_state_dict(ck["rater"])
    with torch.no_grad():
        logit = rater(train).logit_B.numpy()
    assert spearmanr(logit, [signal[i] for i in ids]).statistic > 0.7
    saved = pd.read_parquet(cfg.output.run_dir / distill.TARGET_FILE).set_index("id").loc[ids]
    # one snapshot, no captions: the rank transform of that signal (batching moves near-ties)
    assert spearmanr(saved["signal"], [signal[i] for i in ids]).statistic > 0.99
    assert np.allclose(saved["signal"], rank_target(saved["signal"].to_numpy()))
    assert saved["agreement"].isna().all() and np.allclose(saved["target"], saved["signal"])

    before = {k: v.clone() for k, v in ck["rater"].items()}
    train_rater(cfg)  # resumes at the end: the loop and the stage are done
    after = load_checkpoint(latest_checkpoint(cfg.output.run_dir))
    assert after["distilled"] == ck["distilled"]
    assert all(torch.equal(before[k], after["rater"][k]) for k in before)

    # other settings redo the stage from the loop's rater; none restores that rater
    online = ck["rater_online"]
    assert not all(torch.equal(online[k], before[k]) for k in before)
    redo = train_rater(_cfg(tiny_setup, "distill", estimator="lookahead", distill_steps=10, distill_lr=3e-3,
                            distill_proxy_steps=4, distill_captions=3, distill_snapshots=2))
    assert redo["distill_steps_taken"] == 10 and redo["distill_proxy_steps"] == 4 and redo["distill_captions"] == 3
    assert redo["distill_snapshots"] == 2
    redone = load_checkpoint(latest_checkpoint(cfg.output.run_dir))
    assert all(torch.equal(ck["proxy"][k], redone["proxy"][k]) for k in ck["proxy"])  # trained further on a copy
    assert not all(torch.equal(redone["rater"][k], before[k]) for k in before)
    target = pd.read_parquet(cfg.output.run_dir / distill.TARGET_FILE)
    assert np.allclose(target["target"], combined_target(target["signal"].to_numpy(), target["agreement"].to_numpy()))

    def no_signal(*args, **kwargs):
        raise AssertionError("the signal was computed again")
    monkeypatch.setattr(distill, "snapshot_signals", no_signal)  # other fit settings: the saved target is reused
    refit = train_rater(_cfg(tiny_setup, "distill", estimator="lookahead", distill_steps=12, distill_lr=1e-3,
                             distill_proxy_steps=4, distill_captions=3, distill_snapshots=2, distill_swaps=0.5))
    assert refit["distill_steps_taken"] == 12 and refit["distill_swaps"] == 0.5
    two = train_rater(_cfg(tiny_setup, "distill", estimator="lookahead", distill_steps=12, distill_lr=1e-3,
                           distill_proxy_steps=4, distill_captions=3, distill_snapshots=2, distill_caption_head="min"))
    assert two["distill_caption_head"] == "min"
    heads = load_checkpoint(latest_checkpoint(cfg.output.run_dir))["rater"]
    assert any(k.startswith("caption_head.") for k in heads) and not any(k.startswith("caption_head.") for k in online)
    scorer = build_rater(cfg.model, text.width, cpu).eval()
    scorer.load_state_dict(heads)  # as infer_rater loads it: the logit is the lower head's
    with torch.no_grad():
        out = scorer(train)
    assert torch.equal(out.logit_B, out.tests_B2.min(dim=1).values) and (out.tests_B2[:, 0] != out.tests_B2[:, 1]).all()
    train_rater(_cfg(tiny_setup, "distill", estimator="lookahead", distill_steps=12, distill_lr=1e-3, distill_swaps=0.5,
                     distill_proxy_steps=4, distill_captions=3, distill_snapshots=2, distill_caption_head="aux"))
    aux = load_checkpoint(latest_checkpoint(cfg.output.run_dir))["rater"]  # the auxiliary head is gone
    assert aux.keys() == online.keys() and not all(torch.equal(aux[k], heads[k]) for k in online)
    with pytest.raises(AssertionError, match="computed again"):  # other signal settings: it is not
        train_rater(_cfg(tiny_setup, "distill", estimator="lookahead", distill_steps=12, distill_lr=1e-3,
                         distill_proxy_steps=4, distill_captions=2, distill_snapshots=2))
    monkeypatch.undo()
    judge_cfg = dict(estimator="lookahead", distill_steps=12, distill_lr=1e-3, distill_proxy_steps=4,
                     distill_captions=3, distill_snapshots=2, distill_judge_steps=3)
    train_rater(_cfg(tiny_setup, "distill", **judge_cfg, distill_swaps=0.5))
    judged = pd.read_parquet(cfg.output.run_dir / distill.JUDGE_FILE).set_index("id")
    target = pd.read_parquet(cfg.output.run_dir / distill.TARGET_FILE).set_index("id")
    assert list(judged.columns) == [f"evidence_{r}" for r in range(4)] and len(judged) == 64
    assert np.allclose(target["agreement"], judged.loc[target.index, "evidence_0"])  # the own caption's
    monkeypatch.setattr(distill, "judge_evidence", no_signal)  # another fit: the judge's table is reused
    assert train_rater(_cfg(tiny_setup, "distill", **judge_cfg, distill_swaps=0.25))["distill_swaps"] == 0.25
    monkeypatch.undo()
    # a fit from a fresh rater: one step at a negligible rate leaves it where it started
    fresh_cfg = _cfg(tiny_setup, "distill", estimator="lookahead", distill_steps=1, distill_lr=1e-12,
                     distill_start="fresh")
    train_rater(fresh_cfg)
    started = load_checkpoint(latest_checkpoint(cfg.output.run_dir))["rater"]
    rng = torch.get_rng_state()
    fresh = distill.fresh_rater_state(fresh_cfg, text.width)
    assert torch.equal(rng, torch.get_rng_state())  # seeded on the side
    assert all(torch.equal(v, distill.fresh_rater_state(fresh_cfg, text.width)[k]) for k, v in fresh.items())
    for k, v in started.items():  # the group head, which the fit does not train, is the loop's
        assert torch.allclose(v, online[k] if k.startswith("group_head.") else fresh[k], atol=1e-8)
    assert not torch.allclose(online["instance_head.0.weight"], fresh["instance_head.0.weight"])
    train_rater(_cfg(tiny_setup, "distill", estimator="lookahead", distill_steps=0))
    undone = load_checkpoint(latest_checkpoint(cfg.output.run_dir))
    assert undone["distilled"] is None and all(torch.equal(online[k], undone["rater"][k]) for k in online)


def test_state_sha1_names_the_weights_bit_for_bit():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    twin = copy.deepcopy(m)
    assert state_sha1(m) == state_sha1(twin)
    with torch.no_grad():
        twin[0].weight[1, 2] = torch.nextafter(twin[0].weight[1, 2], torch.tensor(1.0))  # one ulp of one weight
    assert state_sha1(m) != state_sha1(twin)
    assert state_sha1(copy.deepcopy(m).to(torch.bfloat16)) != state_sha1(m)  # bf16 states too


def test_fit_lr_factor_is_one_or_a_cosine_to_zero():
    const, cos = distill.fit_lr_factor("const", 4), distill.fit_lr_factor("cos", 4)
    assert [const(t) for t in range(6)] == [1.0] * 6
    expected = [0.5 * (1 + np.cos(np.pi * t / 4)) for t in range(5)]
    assert np.allclose([cos(t) for t in range(5)], expected) and cos(0) == 1.0 and abs(cos(4)) < 1e-12
    assert cos(9) == cos(4)  # held at 0 past the end
    assert [distill.fit_seed(7, k) for k in range(3)] == [7, 17, 27]
    with pytest.raises(ConfigError, match="distill_fits must be >= 1"):
        BilevelConfig(distill_fits=0)
    with pytest.raises(ConfigError, match="distill_sche must be 'const' or 'cos'"):
        BilevelConfig(distill_sche="linear")


def test_an_ensemble_of_fits_scores_the_mean_of_its_members_first_member_the_single_fit(tiny_setup, monkeypatch):  # noqa: F811
    """``distill_fits`` = 3: the checkpoint's rater is bit for bit the single fit, the two others are fits
    in other orders, and the scorer infer_rater loads is their mean logit; ``distill_sche`` = "cos" steps
    at the decayed rate; a rerun keeps the ensemble and ``distill_steps`` = 0 removes it."""
    base = dict(estimator="lookahead", distill_steps=6, distill_lr=3e-3)
    cfg = _cfg(tiny_setup, "ensemble", **base)
    train_rater(cfg)
    single = load_checkpoint(latest_checkpoint(cfg.output.run_dir))
    assert single["rater_members"] is None and isinstance(load_rater(cfg.output.run_dir)[0], Rater)

    summary = train_rater(_cfg(tiny_setup, "ensemble", **base, distill_fits=3))
    ck = load_checkpoint(latest_checkpoint(cfg.output.run_dir))
    assert summary["distill_steps_taken"] == 18 and summary["distill_fits"] == 3
    assert all(torch.equal(single["rater"][k], v) for k, v in ck["rater"].items())  # member 0: the single fit
    members = [ck["rater"], *ck["rater_members"]]
    assert len(members) == 3
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert not torch.equal(members[a]["instance_head.2.weight"], members[b]["instance_head.2.weight"])
    for k in members[0]:  # every fit starts from the loop's rater; the group head is not fitted
        if k.startswith("group_head."):
            assert all(torch.equal(m[k], ck["rater_online"][k]) for m in members)

    cpu = torch.device("cpu")
    text = build_text_encoder(cfg.model, cpu)
    featurize = Featurizer(build_tokenizer(cfg.model, cpu), text, cpu)
    table = load_pairs(cfg.data.train_csv_path, cfg.data)
    ds = PairsDataset(table, cfg.data.image_size)
    batch = featurize(collate_pairs([ds[i] for i in range(24)]))
    ensemble, _ = load_rater(cfg.output.run_dir)
    assert isinstance(ensemble, RaterEnsemble)
    outs = []
    for m in members:  # brute force: each member alone, as a single rater
        rater = build_rater(cfg.model, text.width, cpu).eval()
        rater.load_state_dict(m)
        with torch.no_grad():
            outs.append(rater(batch))
    with torch.no_grad():
        out = ensemble(batch)
        split = ensemble.heads(ensemble.pooled(batch))
    assert torch.allclose(out.logit_B, torch.stack([o.logit_B for o in outs]).mean(0), atol=1e-6)
    assert torch.allclose(out.weight_B, torch.stack([o.weight_B for o in outs]).mean(0), atol=1e-7)
    assert torch.equal(split.logit_B, out.logit_B) and len(ensemble.blocks) == 3 * len(rater.blocks)
    assert not torch.allclose(out.logit_B, outs[0].logit_B)

    train_rater(_cfg(tiny_setup, "ensemble", **base, distill_fits=3))  # done with these settings: kept as it is
    again = load_checkpoint(latest_checkpoint(cfg.output.run_dir))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(again["rater_members"], ck["rater_members"]) for k in a)

    rates = []
    real_build = distill.build_optimizer

    def recording(*args, **kwargs):  # every update's learning rate, as the optimiser applies it
        opt = real_build(*args, **kwargs)
        opt.register_step_pre_hook(lambda o, a, k: rates.append(o.param_groups[0]["lr"]))
        return opt
    monkeypatch.setattr(distill, "build_optimizer", recording)
    train_rater(_cfg(tiny_setup, "ensemble", **base, distill_fits=2, distill_sche="cos"))
    cos = [3e-3 * 0.5 * (1 + np.cos(np.pi * t / 6)) for t in range(6)]
    assert np.allclose(rates, cos + cos) and rates[0] == 3e-3  # each fit decays from the full rate
    monkeypatch.undo()

    train_rater(_cfg(tiny_setup, "ensemble", estimator="lookahead", distill_steps=0))
    undone = load_checkpoint(latest_checkpoint(cfg.output.run_dir))
    assert undone["rater_members"] is None and isinstance(load_rater(cfg.output.run_dir)[0], Rater)
    with pytest.raises(ValueError, match="at least 2"):
        RaterEnsemble([rater])
