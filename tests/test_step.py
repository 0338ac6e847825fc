"""One bilevel step on one process: what it applies when a loss is bad, and fp16's loss scaling in
the lookahead's own gradient. Toy models from tests/dist_worker.py (no encoders)."""
import pytest
import torch

from alchemist.bilevel.estimators import ESTIMATORS, Lookahead
from alchemist.models.proxy import Proxy
from dist_worker import batch, config, digest, trainer


@pytest.mark.parametrize("rule", ["penalty", "reference"])
def test_a_nonfinite_rater_loss_skips_the_step_before_the_proxy_moves(tmp_path, monkeypatch, device, rule):
    """The rater loss of these rules is judged before the proxy step, so a NaN there applies nothing:
    not the proxy's update (it used to be applied before the rater loss was looked at), not the
    reference proxy's."""
    tr = trainer(config(tmp_path, rule, estimator=rule), 0, 1, device=device)
    models = [tr.proxy, tr.rater] + ([tr.estimator.ref] if rule == "reference" else [])
    before = digest(*models)
    real = ESTIMATORS[rule].coefficients
    monkeypatch.setattr(ESTIMATORS[rule], "coefficients", lambda self, ctx: real(self, ctx) * float("nan"))
    assert tr.train_step(batch(0, 0, "train").to(device), batch(0, 0, "val").to(device)) is None
    assert digest(*models) == before
    monkeypatch.undo()
    assert tr.train_step(batch(1, 0, "train").to(device), batch(1, 0, "val").to(device)) is not None  # nothing half-done
    assert digest(*models) != before


def test_lookahead_takes_its_validation_gradient_through_the_loss_scaler(tmp_path, monkeypatch, device):
    """Under fp16 the lookahead's v = ∇L_val(θ') is taken from the scaled loss. With token losses 10⁶
    times smaller, unscaled fp16 gradients flush to zero and every coefficient with them; scaled, the
    coefficients are the fp32 ones up to fp16 rounding."""
    real = Proxy.per_token_loss
    monkeypatch.setattr(Proxy, "per_token_loss", lambda self, b: real(self, b) * 1e-6)
    got = {}
    real_c = Lookahead.coefficients
    monkeypatch.setattr(Lookahead, "coefficients", lambda self, ctx: got.setdefault(ctx.scaler.is_enabled(), [])
                        .append(real_c(self, ctx)) or got[ctx.scaler.is_enabled()][-1])
    for fp16 in (0, 1):
        tr = trainer(config(tmp_path, f"fp16_{fp16}", estimator="lookahead", fp16=fp16), 0, 1, device=device)
        for i in range(2):  # the second step: Adam's moments are not at their first step
            tr.train_step(batch(i, 0, "train").to(device), batch(i, 0, "val").to(device))
    fp32, fp16 = got[False][1].double(), got[True][1].double()
    assert fp32.abs().min() > 0
    assert ((fp16 - fp32).norm() / fp32.norm()).item() < 0.05, (fp16, fp32)
