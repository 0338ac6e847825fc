"""scripts/device_check.sh: its dry run (every stage at toy size on the CPU) and how its report judges
the targets."""
import json
import os
import subprocess
import sys
from pathlib import Path

from alchemist.bench.device_report import AUTHORS, collect, markdown

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_trains_kills_resumes_rates_and_benchmarks(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "scripts/device_check.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads((out / "device_check.json").read_text())
    assert rec["ok"] and [s["stage"] for s in rec["stages"]] == ["tests", "fixture", "train_killed", "train_resume",
                                                                 "infer", "bench"]
    t = rec["train"]
    assert t["killed_after_checkpoint"] >= 4 and t["resumed_at_step"] == t["killed_after_checkpoint"]
    assert t["final_steps"] == t["expected_steps"] == 12 and t["nonfinite_steps"] == 0
    assert rec["infer"]["rows"] == 48
    assert {(r["kind"], r["mode"]) for r in rec["bench"]["bench"]} == {("plain", "tokens"), ("bilevel", "tokens"),
                                                                       ("score", "tokens")}
    assert all(x["ok"] is None for x in rec["targets"])  # a dry run judges no GPU target
    assert "| train_resume | 0 |" in (out / "device_check.md").read_text()


def _bench(tmp_path, raw_img_s, ratio, mem):
    rows = [{"label": "x", "kind": "bilevel", "mode": "raw", "rule": "penalty", "img_per_s": raw_img_s,
             "vs_plain": ratio, "peak_mem_gib": mem, "error": ""}]
    meta = {"preset": "paper", "precision": "bf16 autocast", "bs": 64, "steps": 5}
    (tmp_path / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    (tmp_path / "meta.json").write_text(json.dumps({"dry_run": False, "device": "cuda", "train_steps": 30}))
    (tmp_path / "stages.jsonl").write_text(json.dumps({"stage": "bench", "rc": 0, "seconds": 1.0}) + "\n")
    return collect(tmp_path)


def test_report_judges_twice_the_authors_throughput(tmp_path):
    rec = _bench(tmp_path, 2 * AUTHORS["bilevel_raw"] + 1, 2.2, 70.0)
    by = {x["target"]: x["ok"] for x in rec["targets"]}
    assert by["bilevel penalty step, tokenizer + text encoder in the step (img/s)"] is True
    assert by["bilevel ÷ plain proxy step, raw images"] is True
    assert by["peak memory of a 64 + 64 bilevel step, raw images (GiB)"] is True
    assert by["scoring from the cache, batch 256 (img/s)"] is None  # not measured: not judged
    rec = _bench(tmp_path, 2 * AUTHORS["bilevel_raw"] - 1, 2.4, 90.0)
    assert [x["ok"] for x in rec["targets"] if x["ok"] is not None] == [False, False, False]
    assert not rec["ok"]  # no resumed training run in this folder
    assert "| NO |" in markdown(rec)
