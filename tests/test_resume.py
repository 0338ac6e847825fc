"""Run records survive a kill -9 at any point and a rerun: weights, summary.json, skipped.csv,
metrics.jsonl, no temp files, normal file modes; a damaged newest checkpoint is skipped."""
import json
import logging
import os
import signal
import stat
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from alchemist.bilevel.launch import train_rater
from alchemist.config import RaterConfig, load_config
from alchemist.data.pairs import SkipLog
from alchemist.models.vqvae import VQVAE
from alchemist.utils import io as io_mod
from alchemist.utils.checkpoint import (CheckpointError, latest_checkpoint, latest_intact_checkpoint,
                                        list_checkpoints, load_checkpoint)
from alchemist.utils.io import atomic_open, atomic_torch_save, remove_stale_temps, write_json
from alchemist.utils.metrics import MetricsLogger, trim_metrics
from experiments.demo_data import DemoSpec, generate_demo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# ----------------------------------------------------------------------------- the pieces
def test_atomic_writes_get_the_mode_open_would_give(tmp_path, umask_022):
    with atomic_open(tmp_path / "a.txt") as f:
        f.write("x")
    atomic_torch_save({"x": 1}, tmp_path / "b.pt")
    write_json({"x": 1}, tmp_path / "c.json")
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"a.txt": 0o644, "b.pt": 0o644, "c.json": 0o644, "plain.txt": 0o644}
    os.umask(0o077)
    write_json({"x": 2}, tmp_path / "c.json")
    assert stat.S_IMODE((tmp_path / "c.json").stat().st_mode) == 0o600  # the umask is respected, not overridden


def test_stale_temp_files_are_removed_and_nothing_else(tmp_path):
    keep = ["a.json", ".hidden", "x.tmp", ".a.json.tmp", ".a.json.abc.tmp"]
    stale = [".a.json.k3j_9x0q.tmp", ".step_00000006.pt.0123abcd.tmp", ".ratings.csv.zzzzzzzz.tmp"]
    for n in keep + stale:
        (tmp_path / n).write_text("half")
    assert sorted(p.name for p in remove_stale_temps(tmp_path, ["a.json", "step_00000006.pt"])) == sorted(stale[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + stale[2:])
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)

    def killed(*a, **k):  # a write killed after the temp file was made
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with atomic_open(tmp_path / "b.json") as f:
            f.write("{")
            killed()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)  # an interrupted write cleans up itself


def test_trim_metrics_keeps_each_record_up_to_the_checkpoint_once(tmp_path):
    recs = [{"step": 1, "epoch": 0, "loss": 1.0}, {"step": 2, "epoch": 0, "loss": 0.9},
            {"step": 2, "epoch": 1, "heldout_loss": 2.0},  # the epoch-end record of epoch 0
            {"step": 3, "epoch": 1, "loss": 0.8}, {"step": 4, "epoch": 1, "loss": 0.7}]
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(r) for r in recs]
    path.write_text("\n".join(lines[:3] + lines[1:3] + lines[3:]) + "\n" + '{"step": 5, "ep')  # duplicates, torn
    assert trim_metrics(path, (3, 1)) == 4  # 2 repeated, 1 after the checkpoint, 1 torn
    assert [json.loads(x) for x in path.read_text().splitlines()] == recs[:4]
    assert trim_metrics(path, (3, 1)) == 0  # idempotent
    assert trim_metrics(path, (2, 0)) == 2  # a mid-epoch checkpoint at the epoch's last step
    assert [json.loads(x) for x in path.read_text().splitlines()] == recs[:2]
    assert trim_metrics(path, None) == 2 and path.read_text() == ""  # a fresh start


def _ckpt(step):
    return {"step": step, "epoch": 0, "config": {}, "w": torch.full((50,), float(step))}


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    for step in (2, 4, 6):
        atomic_torch_save(_ckpt(step), tmp_path / f"checkpoints/step_{step:08d}.pt")
    newest = latest_checkpoint(tmp_path)
    newest.write_bytes(newest.read_bytes()[:300])  # truncated
    with caplog.at_level(logging.WARNING):
        path, ckpt = latest_intact_checkpoint(tmp_path)
    assert path.name == "step_00000004.pt" and ckpt["step"] == 4
    assert "step_00000006.pt" in caplog.text and "damaged" in caplog.text
    (tmp_path / "checkpoints/step_00000004.pt").write_text("not a checkpoint")
    assert latest_intact_checkpoint(tmp_path)[1]["step"] == 2
    torch.save({"state_dict": {}}, tmp_path / "checkpoints/step_00000002.pt")  # loads, but is no training checkpoint
    with pytest.raises(CheckpointError, match="none of the 3 checkpoints"):
        latest_intact_checkpoint(tmp_path)
    assert latest_intact_checkpoint(tmp_path / "elsewhere") is None
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(tmp_path / "checkpoints/step_00000002.pt")


# ----------------------------------------------------------------------------- kill -9 and rerun
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Demo pairs plus bad rows of every kind, some found only when decoded (the pre-pass is off)."""
    root = tmp_path_factory.mktemp("resume")
    generate_demo(root / "data", DemoSpec(n_train=48, n_val=16, image_size=16, seed=0))
    img = root / "data/images"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(img / "noise.png")
    png = (img / "noise.png").read_bytes()
    for i in range(3):
        (img / f"cut{i}.png").write_bytes(png[: len(png) // 2])
    (img / "a_folder.png").mkdir()
    train = pd.read_csv(root / "data/train.csv", dtype=str, keep_default_na=False)
    bad = pd.DataFrame({"id": ["cut0", "cut1", "cut2", "gone", "folder", "nocap"],
                        "image_path": ["images/cut0.png", "images/cut1.png", "images/cut2.png", "images/gone.png",
                                       "images/a_folder.png", train["image_path"][0]],
                        "caption": ["a", "b", "c", "d", "e", ""]})
    pd.concat([train, bad]).to_csv(root / "data/train_bad.csv", index=False)
    torch.manual_seed(0)
    kw = dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 4))
    torch.save({"state_dict": VQVAE(**kw).state_dict(), "config": kw}, root / "tok.pt")
    return root


def _cfg(root, run, **extra):
    over = {"train_csv_path": str(root / "data/train_bad.csv"), "val_csv_path": str(root / "data/val.csv"),
            "image_size": 16, "num_workers": 0, "patch_size": 4, "patch_nums": "1,2,4", "vocab_size": 32,
            "Cvae": 8, "vae_ch": 32, "vae_ch_mult": "1,2,2", "ckpt_path": str(root), "vae_ckpt": "tok.pt",
            "text_enc_path": "", "text_max_len": 16, "depth": 1, "raterDepth": 1, "bs": 8, "ep": 3, "tlr": 1e-3,
            "rater_lr": 1e-3, "fp16": 0, "local_out_dir_path": str(root / "runs"), "exp_name": run, "save_every": 3,
            "log_every": 1, "progress": False, "gamma_decay": 0.5, "check_images": False}
    over.update(extra)
    return load_config(RaterConfig, ROOT / "configs/config_rater.json", {k: str(v) for k, v in over.items()})


@pytest.fixture(scope="module")
def straight(data):
    cfg = _cfg(data, "straight")
    old = os.umask(0o022)
    try:
        train_rater(cfg)
    finally:
        os.umask(old)
    return _records(cfg.output.run_dir)


def _records(run: Path) -> dict:
    ck = load_checkpoint(latest_checkpoint(run))
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {"summary": json.loads((run / "summary.json").read_text()), "skipped": (run / "skipped.csv").read_text(),
            "metrics": metrics, "proxy": ck["proxy"], "rater": ck["rater"], "step": ck["step"]}


def _no_timing(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "img_per_s"}


def _kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def _run_killed(cfg, monkeypatch, where: str) -> None:
    """Train in a forked child that SIGKILLs itself at ``where``; return once it is dead."""
    from alchemist.bilevel import trainer as trainer_mod
    from alchemist import loop as loop_mod

    if where == "mid_step":
        real, calls = trainer_mod.BilevelTrainer.train_step, {"n": 0}

        def step(self, *a):
            calls["n"] += 1
            if calls["n"] == 5:
                _kill_self()
            return real(self, *a)

        monkeypatch.setattr(trainer_mod.BilevelTrainer, "train_step", step)
    elif where == "checkpoint_write":  # half a checkpoint in its temp file, then the kill
        def half_save(obj, path):
            if Path(path).name == "step_00000006.pt":
                with atomic_open(path, "wb") as f:
                    f.write(b"PK\x03\x04 half a zip")
                    f.flush()
                    _kill_self()
            return real_save(obj, path)

        real_save = io_mod.atomic_torch_save
        monkeypatch.setattr("alchemist.utils.checkpoint.atomic_torch_save", half_save)
    elif where == "before_summary":  # every checkpoint written, summary.json not yet
        real_write = loop_mod.write_json

        def write(obj, path):
            if Path(path).name == "summary.json":
                _kill_self()
            return real_write(obj, path)

        monkeypatch.setattr(loop_mod, "write_json", write)
    elif where == "torn_metrics_line":  # the kill lands in the middle of a metrics line
        real_log = MetricsLogger.log

        def log(self, record):
            if record["step"] == 5:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record)[:17])
                _kill_self()
            return real_log(self, record)

        monkeypatch.setattr(MetricsLogger, "log", log)
    pid = os.fork()
    if pid == 0:  # the child: train until the kill
        try:
            train_rater(cfg)
        finally:
            os._exit(3)  # not killed: the parent sees exit status 3
    deadline = time.monotonic() + 300
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the training child did not finish")
        time.sleep(0.2)
    monkeypatch.undo()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("where", ["mid_step", "checkpoint_write", "before_summary", "torn_metrics_line"])
def test_kill_9_then_rerun_gives_the_records_of_a_straight_run(data, straight, monkeypatch, umask_022, where):
    cfg = _cfg(data, f"killed_{where}")
    run = cfg.output.run_dir
    _run_killed(cfg, monkeypatch, where)
    assert not (run / "summary.json").exists()
    if where == "checkpoint_write":
        assert list((run / "checkpoints").glob(".step_00000006.pt.*.tmp"))  # what the kill left
    if where == "mid_step":  # the kill came before the end: the rows listed so far are on disk
        listed = (run / "skipped.csv").read_text()
        assert set(listed.splitlines()) <= set(straight["skipped"].splitlines()) and "gone,missing file" in listed

    summary = train_rater(cfg)
    got = _records(run)
    assert got["step"] == straight["step"] == 6
    for name in ("proxy", "rater"):  # bit-identical weights, as a run never stopped
        assert all(torch.equal(got[name][k], straight[name][k]) for k in straight[name])
    assert _no_timing(got["summary"]) == _no_timing(straight["summary"]) == _no_timing(summary)
    assert len(got["summary"]) == len(straight["summary"]) >= 21
    assert got["skipped"] == straight["skipped"]
    assert [_no_timing(r) for r in got["metrics"]] == [_no_timing(r) for r in straight["metrics"]]
    assert [r["step"] for r in got["metrics"]] == list(range(1, 7))  # one line per step
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files), \
        {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}


def test_straight_run_lists_every_bad_row_once_with_its_reason(straight):
    rows = pd.read_csv(pd.io.common.StringIO(straight["skipped"]), dtype=str, keep_default_na=False)
    reasons = dict(zip(rows["id"], rows["reason"]))
    assert rows["id"].is_unique
    assert reasons["gone"] == "missing file" and reasons["folder"] == "not a file" and reasons["nocap"] == "empty caption"
    assert {k for k, r in reasons.items() if r.startswith("unreadable image: ")} <= {"cut0", "cut1", "cut2"}


def test_a_truncated_newest_checkpoint_is_skipped_on_resume(data, straight, caplog):
    cfg = _cfg(data, "truncated")
    train_rater(cfg)
    names = [p.name for p in list_checkpoints(cfg.output.run_dir)]
    assert names == ["step_00000003.pt", "step_00000004.pt", "step_00000006.pt"]
    newest = latest_checkpoint(cfg.output.run_dir)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    (cfg.output.run_dir / "summary.json").unlink()
    with caplog.at_level(logging.WARNING):
        train_rater(cfg)  # resumes from step 4, trains steps 5 and 6 again
    assert "skipping a damaged checkpoint" in caplog.text and "step_00000006.pt" in caplog.text
    got = _records(cfg.output.run_dir)
    for name in ("proxy", "rater"):
        assert all(torch.equal(got[name][k], straight[name][k]) for k in straight[name])
    assert [r["step"] for r in got["metrics"]] == list(range(1, 7))
    assert _no_timing(got["summary"]) == _no_timing(straight["summary"])


def test_a_fresh_start_replaces_the_old_records(data, straight):
    """output.resume=none in a used run folder: the records are this run's, not appended to the old."""
    cfg = _cfg(data, "fresh", ep=1)
    train_rater(cfg)
    again = _cfg(data, "fresh", ep=1, resume="none")
    train_rater(again)
    got = _records(again.output.run_dir)
    assert [r["step"] for r in got["metrics"]] == [1, 2]
    skipped = SkipLog().read(again.output.run_dir / "skipped.csv")
    assert len({i for i, _ in skipped.items}) == skipped.count
