"""Every command line reports a user error as one line, ``error: ...``, on stderr and exits 2."""
import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from alchemist.build import build_rater
from alchemist.cli import error_line
from alchemist.config import RaterConfig, config_to_dict, load_config
from alchemist.models.text import default_text_encoder_path
from alchemist.models.vqvae import VQVAE
from alchemist.ratings import read_ratings
from alchemist.target_blend import blend_with_target
from alchemist.utils.errors import UserError
from experiments.demo_data import DemoSpec, generate_demo

ROOT = Path(__file__).resolve().parents[1]


def _script(path: str):
    """A CLI file as a module (its ``main`` callable in-process)."""
    spec = importlib.util.spec_from_file_location(f"cli_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny pairs, a tiny tokenizer (vocab 32, Cvae 8), a tiny rater checkpoint, a ratings file, the
    overrides of a tiny rater run, and files of the wrong kind."""
    root = tmp_path_factory.mktemp("cli")
    generate_demo(root / "data", DemoSpec(n_train=16, n_val=8, image_size=16, seed=0))
    torch.manual_seed(0)
    kw = dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 4))
    torch.save({"state_dict": VQVAE(**kw).state_dict(), "config": kw}, root / "tok.pt")
    over = {"train_csv_path": root / "data/train.csv", "val_csv_path": root / "data/val.csv", "image_size": 16,
            "num_workers": 0, "patch_size": 4, "patch_nums": "1,2,4", "vocab_size": 32, "Cvae": 8, "vae_ch": 32,
            "vae_ch_mult": "1,2,2", "ckpt_path": root, "vae_ckpt": "tok.pt", "text_enc_path": "",
            "text_max_len": 16, "depth": 1, "raterDepth": 1, "bs": 4, "ep": 1, "fp16": 0,
            "local_out_dir_path": root / "runs", "exp_name": "run", "progress": False}
    cfg = load_config(RaterConfig, ROOT / "configs/config_rater.json", {k: str(v) for k, v in over.items()})
    rater = build_rater(cfg.model, 384, torch.device("cpu"))
    (root / "rater/checkpoints").mkdir(parents=True)
    torch.save({"rater": rater.state_dict(), "config": config_to_dict(cfg), "step": 1}, root / "rater/checkpoints/step_00000001.pt")
    rng = np.random.default_rng(0)
    pd.DataFrame({"id": [f"r{i}" for i in range(20)], "score": rng.normal(size=20)}).to_csv(root / "ratings.csv", index=False)
    (root / "junk.pt").write_text("this is not a checkpoint\n")
    (root / "empty.csv").write_bytes(b"")
    (root / "list.json").write_text('[{"bs": 4}]')
    enc = root / "encoder_without_weights"
    shutil.copytree(default_text_encoder_path(), enc, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    (root / "readonly").mkdir()
    os.chmod(root / "readonly", 0o555)
    return {"root": root, "argv": [f"--{k}={v}" for k, v in over.items()]}


def _train(env, *extra):
    return _script("train_rater.py").main(["--config", str(ROOT / "configs/config_rater.json"), *env["argv"], *extra])


# ----------------------------------------------------------------------------- train_rater: config and files
@pytest.mark.parametrize("extra,fragment", [
    (["--vocab_size=64"], "trained with model.vocab_size=32 but the config sets model.vocab_size=64"),
    (["--Cvae=16"], "trained with model.Cvae=8 but the config sets model.Cvae=16"),
    (["--vae_ckpt=junk.pt"], "junk.pt' is not a readable tokenizer checkpoint"),
    (["--seed=-1"], "seed must be >= 0"),
    (["--train_csv_path={root}/empty.csv"], "empty.csv"),
])
def test_train_rater_user_errors(env, capsys, extra, fragment):
    extra = [e.format(root=env["root"]) for e in extra]
    assert _train(env, *extra) == 2
    assert fragment.format(root=env["root"]) in _one_line(capsys)


def test_resume_from_a_file_that_is_not_a_checkpoint(env, capsys):
    assert _train(env, f"--resume={env['root'] / 'junk.pt'}", "--exp_name=resume_junk") == 2
    assert "junk.pt' is not a readable training checkpoint" in _one_line(capsys)
    assert _train(env, f"--resume={env['root'] / 'tok.pt'}", "--exp_name=resume_tok") == 2  # loads, but is a tokenizer
    assert "tok.pt' is not a training checkpoint" in _one_line(capsys)


def test_text_encoder_folder_without_weights(env, capsys):
    assert _train(env, f"--text_enc_path={env['root'] / 'encoder_without_weights'}") == 2
    line = _one_line(capsys)
    assert "encoder_without_weights" in line and "could not be loaded" in line and "model.text_enc_path" in line


def test_a_json_list_as_config_file(env, capsys):
    assert _script("train_rater.py").main(["--config", str(env["root"] / "list.json")]) == 2
    assert "holds a JSON list, not an object" in _one_line(capsys)


def test_wandb_online_without_a_key_fails_before_reading_data(env, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    assert _train(env, "--wandb=online", f"--train_csv_path={tmp_path / 'absent.csv'}") == 2
    line = _one_line(capsys)
    assert "logging.wandb=online needs a W&B API key" in line  # not the missing table: nothing was read
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password abc\n")
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert _train(env, "--wandb=online", f"--train_csv_path={tmp_path / 'absent.csv'}") == 2
    assert "absent.csv" in _one_line(capsys)  # with a key the run goes on, to the next user error


# ----------------------------------------------------------------------------- the other CLIs
def test_prune_refuses_an_unknown_extension_before_pruning(env, capsys, monkeypatch, tmp_path):
    prune = _script("scripts/prune.py")
    monkeypatch.setattr(prune, "prune_table", lambda *a, **k: pytest.fail("pruned before checking --out"))
    out = tmp_path / "subset.txt"
    assert prune.main(["--ratings", str(env["root"] / "ratings.csv"), "--out", str(out), "--retention", "0.5"]) == 2
    assert "unknown table format '.txt'" in _one_line(capsys) and not out.exists()


@pytest.mark.parametrize("script,argv,fragment", [
    ("scripts/prune.py", ["--ratings", "{root}/empty.csv", "--out", "{tmp}/s.csv", "--retention", "0.5"], "empty.csv"),
    ("scripts/prune.py", ["--ratings", "{root}/ratings.csv", "--out", "{tmp}/s.csv", "--retention", "0.5",
                          "--seed", "-1"], "argument --seed: must be >= 0"),
    ("scripts/prune.py", ["--ratings", "{root}/ratings.csv", "--out", "{tmp}/s.csv"], "--retention"),
    ("infer_rater.py", ["--ckpt", "{root}/rater", "--csv", "{root}/empty.csv", "--out", "{tmp}/r.csv",
                        "--no-progress"], "empty.csv"),
    ("infer_rater.py", ["--ckpt", "{root}/junk.pt", "--csv", "{root}/data/train.csv", "--out", "{tmp}/r.csv"],
     "not a readable rater checkpoint"),
    ("scripts/visualize_ratings.py", ["--ratings", "{root}/empty.csv", "--out-dir", "{tmp}"], "empty.csv"),
    ("scripts/score_heuristics.py", ["--csv", "{root}/empty.csv", "--out", "{tmp}/r.csv", "--heuristic", "clarity"],
     "empty.csv"),
    ("scripts/train_tokenizer.py", ["--csv", "{root}/empty.csv", "--out", "{tmp}/tok.pt", "--steps", "1"], "empty.csv"),
    ("scripts/train_tokenizer.py", ["--csv", "{root}/data/train.csv", "--out", "{tmp}/tok.pt", "--seed", "-1"],
     "must be >= 0"),
    ("scripts/train_tokenizer.py", ["--csv", "{root}/data/train.csv", "--out", "{tmp}/tok.pt", "--ch", "30"],
     "multiple of 32"),
    ("scripts/train_t2i.py", ["--config", "{root}/list.json"], "holds a JSON list"),
    ("scripts/train_t2i.py", ["--seed=-1"], "seed must be >= 0"),
    ("scripts/precompute.py", ["--config", "configs/config_rater.json"], "set data.cache_dir"),
    ("scripts/sample_grid.py", ["--run", "{tmp}/nothing", "--csv", "{root}/data/val.csv", "--out", "{tmp}/g.png"],
     "nothing"),
    ("scripts/demo.py", ["data", "--out", "{tmp}/demo", "--n-train", "0"], "n_train and n_val must be >= 1"),
    ("scripts/demo.py", ["--seed", "-1", "--out", "{tmp}/demo"], "must be >= 0"),
    ("scripts/demo.py", ["--bench", "nope"], "invalid choice: 'nope'"),
    ("scripts/experiment.py", [], "name one of selection"),
    ("scripts/experiment.py", ["rules", "--demo", "{tmp}/nodemo"], "nodemo"),
    ("scripts/experiment.py", ["classifier", "--demo", "{tmp}/nodemo", "--out", "{tmp}/c.pt"], "nodemo"),
    ("scripts/bench.py", ["--preset", "huge"], "invalid choice: 'huge'"),
])
def test_every_cli_reports_a_user_error_as_one_line(env, capsys, tmp_path, script, argv, fragment):
    argv = [a.format(root=env["root"], tmp=tmp_path) for a in argv]
    assert _script(script).main(argv) == 2
    assert fragment in _one_line(capsys)


# ----------------------------------------------------------------------------- as processes
def _without_root_write_bypass():
    """As root, permission bits do not stop writes; drop the capabilities that bypass them (Linux)."""
    if os.geteuid() != 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def drop():
        for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone after exec
                raise OSError(ctypes.get_errno(), "prctl")

    return drop


def _run(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, **kw)


def test_a_read_only_output_location_is_one_line_before_the_work(env):
    root, ro = env["root"], env["root"] / "readonly"
    runs = [
        (["train_rater.py", "--config", "configs/config_rater.json", *env["argv"], f"--local_out_dir_path={ro}"],
         str(ro / "run")),
        (["infer_rater.py", "--ckpt", str(root / "rater"), "--csv", str(root / "data/train.csv"),
          "--out", str(ro / "r.csv"), "--no-progress"], str(ro)),
        (["scripts/prune.py", "--ratings", str(root / "ratings.csv"), "--out", str(ro / "s.csv"), "--retention", "0.5"],
         str(ro)),
    ]
    for args, where in runs:
        proc = _run(args, preexec_fn=_without_root_write_bypass())
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (args[0], proc.returncode, proc.stderr[-2000:])
        assert lines[0].startswith(f"error: cannot write to {where!r}") and "permission denied" in lines[0].lower()
        assert proc.stdout == ""  # nothing was done first
    assert list(ro.iterdir()) == []


def test_infer_rater_target_ranks_the_runs_own_pairs_by_rater_and_target(env, tmp_path):
    root = env["root"]
    rate = ["infer_rater.py", "--ckpt", str(root / "rater"), "--csv", str(root / "data/train.csv"), "--no-progress"]
    missing = _run([*rate, "--out", str(tmp_path / "x.parquet"), "--target", str(tmp_path / "none.parquet")])
    assert missing.returncode == 2 and "--target" in missing.stderr and not (tmp_path / "x.parquet").exists()
    assert _run([*rate, "--out", str(tmp_path / "plain.parquet")]).returncode == 0
    plain = read_ratings(tmp_path / "plain.parquet")
    rng = np.random.default_rng(0)
    target = pd.DataFrame({"id": plain["id"], "target": rng.normal(size=len(plain))})
    target.to_parquet(tmp_path / "target.parquet")
    proc = _run([*rate, "--out", str(tmp_path / "blend.parquet"), "--target", str(tmp_path / "target.parquet")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, want = read_ratings(tmp_path / "blend.parquet"), blend_with_target(plain, target)
    assert got["id"].tolist() == want["id"].tolist() != plain["id"].tolist()
    assert np.array_equal(got["score"], plain["score"]) and np.array_equal(got["rater_score"], want["rater_score"])
    proc = _run([*rate, "--out", str(tmp_path / "t.parquet"), "--target", str(tmp_path / "target.parquet"),
                 "--target-weight", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    alone = read_ratings(tmp_path / "t.parquet")["id"].tolist()
    assert alone == blend_with_target(plain, target, weight=1.0)["id"].tolist() != got["id"].tolist()
    bad = _run([*rate, "--out", str(tmp_path / "b.parquet"), "--target", str(tmp_path / "target.parquet"),
                "--target-weight", "1.5"])
    assert bad.returncode == 2 and "--target-weight" in bad.stderr and not (tmp_path / "b.parquet").exists()


@pytest.mark.parametrize("args", [
    ["scripts/demo.py", "data", "--out", "{tmp}/d", "--n-val", "0"],
    ["scripts/experiment.py", "nonsense"],
    ["scripts/train_tokenizer.py", "--csv", "{root}/empty.csv", "--out", "{tmp}/t.pt"],
    ["scripts/prune.py", "--ratings", "{root}/ratings.csv", "--out", "{tmp}/s.txt", "--retention", "0.5"],
])
def test_the_scripts_exit_2_as_processes(env, tmp_path, args):
    """demo.py, experiment.py and train_tokenizer.py had no user-error handling at all."""
    proc = _run([a.format(root=env["root"], tmp=tmp_path) for a in args])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]


# ----------------------------------------------------------------------------- the helper
def test_error_line_maps_only_user_errors():
    assert error_line(UserError("bad\n  thing")) == "error: bad thing"
    assert error_line(FileNotFoundError("model x does not exist")) == "error: model x does not exist"
    assert error_line(PermissionError(13, "Permission denied", "/out/x")) == \
        "error: permission denied: '/out/x'; check its permissions or choose another location"
    assert error_line(OSError(28, "No space left on device")).startswith("error: no space left on device; free")
    assert error_line(OSError(5, "Input/output error")) is None  # a failing disk is not the user's typo
    assert error_line(ValueError("a bug")) is None and error_line(KeyError("k")) is None


def test_precompute_and_training_read_webdataset_shards(env, tmp_path, capsys):
    """img2dataset-style shards (gzipped, for the train split) where the tables go: scripts/precompute.py
    caches them, and train_rater.py trains from that cache and from the shards themselves."""
    import gzip
    import json

    from webdata import write_shards

    data = env["root"] / "data"
    for split in ("train", "val"):
        t = pd.read_csv(data / f"{split}.csv", dtype=str, keep_default_na=False)
        t["image_path"] = [str(data / p) for p in t["image_path"]]
        for p in write_shards(t, tmp_path / split, shard_rows=5):
            if split == "train":
                p.with_name(p.name + ".gz").write_bytes(gzip.compress(p.read_bytes()))
                p.unlink()
    argv = ["--config", str(ROOT / "configs/config_rater.json"), *env["argv"],
            f"--train_csv_path={tmp_path}/train/*.tar.gz", f"--val_csv_path={tmp_path}/val/*.tar",
            f"--local_out_dir_path={tmp_path}/runs"]
    assert _script("scripts/precompute.py").main([*argv, f"--cache_dir={tmp_path}/cache", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "val: 8 rows cached" in out and "train: 16 rows cached" in out
    for name, extra in (("cached", [f"--cache_dir={tmp_path}/cache"]), ("raw", [])):
        assert _script("train_rater.py").main([*argv, f"--exp_name={name}", *extra]) == 0
        summary = json.loads((tmp_path / f"runs/{name}/summary.json").read_text())
        assert summary["steps"] == 2 and summary["skipped_rows"] == 0 and np.isfinite(summary["L_val"])
        assert list((tmp_path / f"runs/{name}/checkpoints").glob("step_*.pt"))
