"""Two gloo processes (tests/dist_worker.py): every rank takes or skips each update together, in every
precision and rule, and a resume restores each rank's own random state."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# MP_SCENARIOS=a,b runs only those (to see one test fail against the code before its fix)
SCENARIOS = tuple(os.environ.get("MP_SCENARIOS", "overflow,nonfinite_loss,empty_batch,resume,rules").split(","))

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All scenarios in one launch (a launch costs seconds of imports); each rank's record per scenario."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("multiprocess")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIST_TIMEOUT": "30", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", str(ROOT / "tests/dist_worker.py"), str(out), *SCENARIOS],
                          capture_output=True, text=True, env=env, timeout=600)
    recs = {}
    for name in SCENARIOS:
        files = [out / f"{name}_rank{r}.json" for r in range(2)]
        recs[name] = [json.loads(f.read_text()) if f.exists() else {"ok": False, "error": proc.stderr[-3000:]}
                      for f in files]
    return recs


def _ok(recs):
    for r in recs:
        assert r["ok"], r.get("traceback", r["error"])
    return recs


def test_fp16_overflow_on_one_rank_skips_the_update_on_every_rank(runs):
    """Rank 1's proxy gradient overflows: both ranks skip the proxy update, halve the same scale and stay
    finite and equal (the scaler used to look before the average: one rank skipped, the other stepped
    into inf/NaN). The reference proxy has a scaler of its own and behaves the same."""
    r0, r1 = _ok(runs["overflow"])
    assert r0["reference"]["ref_finite"] and r1["reference"]["ref_finite"]
    for rule in ("penalty", "reference"):
        a, b = r0[rule], r1[rule]
        for key in ("after", "next"):
            assert a[key]["finite"] and b[key]["finite"], (rule, key)
            assert a[key]["proxy"] == b[key]["proxy"] and a[key]["rater"] == b[key]["rater"], (rule, key)
            assert a[key]["scales"] == b[key]["scales"]
        assert a["after"]["proxy"] == a["before"]["proxy"]  # the update was skipped
        assert a["after"]["scales"][0] == a["before"]["scales"][0] / 2
        assert a["next"]["proxy"] != a["after"]["proxy"]  # and the run goes on
    assert r0["reference"]["ref_digest"] == r1["reference"]["ref_digest"]
    assert r0["reference"]["ref_scale"] == r1["reference"]["ref_scale"]
    assert r0["reference"]["ref_scale"] is not None and r0["reference"]["ref_scale"] < 2.0 ** 16


@pytest.mark.parametrize("case", ["penalty_proxy", "lookahead_proxy", "penalty_rater"])
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(runs, case):
    """Rank 1 alone has a NaN loss at step 1: every rank skips that step (no rank leaves early and
    pairs its all-reduces with the others' next step), nothing is applied, and the next step runs.
    ``penalty_rater``: the rater loss is judged before the proxy step, so the proxy is untouched too."""
    r0, r1 = (r[case] for r in _ok(runs["nonfinite_loss"]))
    assert r0["ran"] == r1["ran"] == [True, False, True]
    for key in ("after", "next"):
        assert r0[key]["proxy"] == r1[key]["proxy"] and r0[key]["rater"] == r1[key]["rater"]
        assert r0[key]["finite"] and r1[key]["finite"]
    assert r0["after"]["proxy"] == r0["before"]["proxy"] and r0["after"]["rater"] == r0["before"]["rater"]


def test_a_batch_with_no_usable_row_on_one_rank_is_skipped_by_every_rank(runs):
    r0, r1 = _ok(runs["empty_batch"])
    assert r0["steps"] == r1["steps"] == r0["summary_steps"] == 2  # 3 batches, one skipped everywhere
    assert r0["proxy"] == r1["proxy"] and r0["rater"] == r1["rater"]


def test_resume_restores_each_ranks_own_random_state(runs):
    """With drop-path on, 2 + checkpoint + 2 steps equal 4 straight steps on every rank (each rank's
    RNG is saved; restoring rank 0's everywhere changed rank 1's draws after the resume)."""
    for r in _ok(runs["resume"]):
        assert r["resumed"] == r["straight"]
    r0, r1 = runs["resume"]
    assert r0["straight"]["proxy"] == r1["straight"]["proxy"]


@pytest.mark.parametrize("rule", ["penalty", "reference", "lookahead"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_rule_and_precision_keeps_two_replicas_equal(runs, rule, precision):
    r0, r1 = (r[f"{rule}_{precision}"] for r in _ok(runs["rules"]))
    assert r0["ran"] == r1["ran"] and r0["ran"][0]
    assert r0["last"]["finite"] and r0["last"]["proxy"] == r1["last"]["proxy"]
    assert r0["last"]["rater"] == r1["last"]["rater"]
    assert r0["last"]["proxy"] != r0["first"]["proxy"] and r0["last"]["rater"] != r0["first"]["rater"]
