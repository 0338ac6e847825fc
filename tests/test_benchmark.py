"""The benchmark harness: every row is a real, finite measurement and the FLOP counts are right."""
import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from alchemist.bench.flops import (H100_BF16_DENSE_TFLOPS, RULES, component_flops, count_flops, meta_batch,
                                   proxy_flops_analytic, step_flops)
from alchemist.bench.harness import Bench, run_benchmark
from alchemist.bench.report import format_table
from alchemist.bench.synthetic import MODES, PRESETS, bench_config
from alchemist.config import RaterConfig, load_config
from alchemist.models.blocks import math_attention
from alchemist.models.proxy import Proxy

ROOT = Path(__file__).resolve().parents[1]
# every caption longer than text_max_len: all batches pad to the same T, so FLOPs are exact per image
CPU = dataclasses.replace(PRESETS["cpu"], caption_words=(40, 50), score_bs=8)


def test_cpu_preset_times_every_row():
    res = run_benchmark(CPU, steps=1, warmup=0)
    rows = {(r.kind, r.mode, r.rule): r for r in res.rows}
    expected = ([("plain", m, "") for m in MODES] + [("bilevel", m, r) for r in RULES for m in MODES]
                + [("score", m, "") for m in MODES])
    assert sorted(rows) == sorted(expected)
    bs, sbs = res.meta["bs"], res.meta["score_bs"]
    for r in res.rows:
        assert r.error == "", r.error
        for v in (r.seconds, r.seconds_min, r.img_per_s, r.peak_mem_gib, r.gflop, r.tflops):
            assert math.isfinite(v) and v > 0, (r.label, r.mode, v)
        assert r.images == {"plain": bs, "bilevel": 2 * bs, "score": sbs}[r.kind]
        assert r.seconds_min <= r.seconds and r.img_per_s == pytest.approx(r.images / r.seconds)
        assert r.tflops == pytest.approx(r.gflop / 1e3 / r.seconds)
        assert math.isnan(r.mfu)  # no peak rate given on a CPU
        if r.kind == "bilevel":
            assert r.vs_plain == pytest.approx(r.seconds / rows[("plain", r.mode, "")].seconds)
    # the FLOPs each row is credited with follow the step's structure
    c = res.flops_per_image
    assert rows[("plain", "tokens", "")].gflop * 1e9 == pytest.approx(bs * c["proxy_fwd_bwd"])
    assert rows[("bilevel", "tokens", "penalty")].gflop * 1e9 == pytest.approx(
        bs * (2 * c["proxy_fwd_bwd"] + c["rater_fwd_bwd"]))
    assert rows[("bilevel", "raw", "reference")].gflop - rows[("bilevel", "tokens", "reference")].gflop == \
        pytest.approx(2 * bs * (c["tokenizer_encode"] + c["teacher_forcing_input"] + c["text_encoder"]) / 1e9)
    assert rows[("score", "tokens", "")].gflop * 1e9 == pytest.approx(sbs * c["rater_fwd"])
    table = format_table(res)
    assert table.count("\n| bilevel ") == 9 and "GFLOP/s" in table
    json.dumps(res.to_dict())  # NaNs became nulls: valid JSON


@pytest.mark.parametrize("depth,patch_nums,T,D,V", [(2, (1, 2, 3, 4), 7, 48, 64), (3, (1, 2, 4), 16, 64, 100)])
def test_proxy_flops_counted_match_closed_form(depth, patch_nums, T, D, V):
    mcfg = load_config(RaterConfig, None, {"depth": depth, "patch_nums": list(patch_nums), "vocab_size": V, "Cvae": 8,
                                           "image_size": 16 * patch_nums[-1]}).model
    b = meta_batch(2, mcfg, T, D)
    with torch.device("meta"):
        proxy = Proxy.from_config(mcfg, D)
    fwd_bwd = count_flops(lambda: proxy.per_sample_loss(b).mean().backward())
    fwd = count_flops(lambda: proxy.per_sample_loss(b))
    args = (depth, patch_nums, T, D, V, 8)
    assert fwd_bwd == 2 * proxy_flops_analytic(*args)
    assert fwd == 2 * proxy_flops_analytic(*args, backward=False)
    # a hand count of one term: depth 2, 30 tokens, C 128, V 64 → the head alone is 2·30·128·64 per image
    if depth == 2:
        no_head = proxy_flops_analytic(depth, patch_nums, T, D, 1, 8, backward=False)
        assert proxy_flops_analytic(*args, backward=False) - no_head == 2 * 30 * 128 * 63


def test_paper_scale_proxy_flops():
    """d16 proxy, 680 tokens, 77 caption tokens of width 1024, 4096 codes: ≈ 1.09 TFLOP per image fwd+bwd,
    within a few % of 6·N·tokens + attention."""
    f = proxy_flops_analytic(16, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 77, 1024, 4096, 32)
    assert f == pytest.approx(1.0871e12, rel=1e-3)
    C, L, T = 1024, 680, 77
    n_token_params = 16 * 14 * C * C + C * 4096  # qkv, proj, q, proj, ffn (and the head) act on every token
    six_n = 6 * n_token_params * L + 3 * 16 * (4 * L * L * C + 4 * L * T * C) + 6 * 16 * 2 * T * 1024 * C
    assert f == pytest.approx(six_n, rel=0.01)


def test_step_flop_model_matches_a_counted_real_step(tmp_path):
    """step_flops (per-image components × the step's structure) equals FlopCounterMode around the real
    train_step / plain step / scoring pass on CPU (math attention so SDPA is counted)."""
    cfg = bench_config(CPU, tmp_path)
    bench = Bench(cfg, CPU, tmp_path, lambda s: None)
    assert bench.text_len == cfg.model.text_max_len
    comp = component_flops(cfg.model, CPU.text, bench.text_len)
    bs = cfg.optim.bs
    for rule in RULES:
        trainer = bench.trainer(rule)
        for mode in ("tokens", "raw") if rule == "penalty" else ("cache",):
            with math_attention():
                got = count_flops(bench.bilevel_fn(trainer, mode))
            assert got == pytest.approx(step_flops(comp, "bilevel", mode, bs, rule), rel=2e-3), (rule, mode)
    with math_attention():
        plain = count_flops(bench.plain_fn(trainer, "cache"))
        score = count_flops(bench.score_fn(trainer, "raw"))
    assert plain == pytest.approx(step_flops(comp, "plain", "cache", bs), rel=2e-3)
    assert score == pytest.approx(step_flops(comp, "score", "raw", CPU.score_bs), rel=2e-3)


def test_flops_only_cli_writes_json(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    out = tmp_path / "flops.json"
    bench.main(["--preset", "cpu", "--flops-only", "--json", str(out), "--bs=4"])
    summary = json.loads(out.read_text())
    assert summary["bs"] == 4 and summary["peak_tflops"] == H100_BF16_DENSE_TFLOPS
    steps = {(s["step"], s["mode"]): s for s in summary["steps"]}
    per = summary["per_image"]
    pen = steps[("bilevel penalty", "tokens")]
    assert pen["tflop"] * 1e12 == pytest.approx(4 * (2 * per["proxy_fwd_bwd"] + per["rater_fwd_bwd"]))
    assert pen["floor_s"] == pytest.approx(pen["tflop"] / H100_BF16_DENSE_TFLOPS)
    assert "| bilevel lookahead | raw |" in capsys.readouterr().out


def test_scoring_engine_benchmark_runs_the_real_command(monkeypatch):
    """``bench.py score``'s measurement at toy size: every pair rated, the process tree's memory seen
    (the torch engine only: the Ray engine's run is the same command, tested in test_scoring_ray.py)."""
    from alchemist.bench.scoring import run_scoring_benchmark

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (res,) = run_scoring_benchmark([60], ["torch"], bs=16, workers=0, log=lambda s: None)
    assert res["engine"] == "torch" and res["rated"] == 60 and res["rows_per_s"] > 0
    assert 100 < res["peak_rss_mb"] < 4096
