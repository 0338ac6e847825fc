"""The selection experiment end to end on a tiny demo: every arm trains and is measured, subsets have
exactly the requested sizes, seeds vary the sampled arms only, the results table and figure are
written, and a rerun retrains nothing."""
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from alchemist.build import build_rater, build_text_encoder
from alchemist.config import ConfigError, RaterConfig, config_to_dict, load_config
from alchemist.data.pairs import DataError
from alchemist.models.vqvae import VQVAE
from alchemist.ratings import read_ratings, write_ratings
from alchemist.scoring import rate_file
from alchemist.selection import n_select
from experiments import experiment as ex
from experiments import report
from experiments.demo_data import DemoSpec, generate_demo
from experiments.types import DEFECT_KINDS, HEURISTIC_CANDIDATES, ExperimentConfig, quick_config

ROOT = Path(__file__).resolve().parents[1]
GEOMETRY = {"image_size": 16, "patch_size": 4, "patch_nums": "1,2,4", "vocab_size": 32, "Cvae": 8, "vae_ch": 32,
            "vae_ch_mult": "1,2,2", "text_max_len": 16, "text_enc_path": "", "fp16": 0, "num_workers": 0}
T2I = tuple(f"--{k}={v}" for k, v in {**GEOMETRY, "bs": 4, "progress": False, "log_every": 1}.items())
N_TRAIN = 80


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """runs/demo in miniature: data, a random tokenizer, a random rater's ratings, one 'rule'."""
    root = tmp_path_factory.mktemp("experiment")
    generate_demo(root / "data", DemoSpec(n_train=N_TRAIN, n_val=16, image_size=16, seed=0))
    torch.manual_seed(0)
    kw = dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 4))
    torch.save({"state_dict": VQVAE(**kw).state_dict(), "config": kw}, root / "tokenizer.pt")
    cfg = load_config(RaterConfig, ROOT / "configs/config_rater.json",
                      {**GEOMETRY, "ckpt_path": str(root), "vae_ckpt": "tokenizer.pt", "depth": 1, "raterDepth": 1})
    rater = build_rater(cfg.model, build_text_encoder(cfg.model, torch.device("cpu")).width, torch.device("cpu"))
    ckpt = root / "rater/checkpoints/step_00000001.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"rater": rater.state_dict(), "config": config_to_dict(cfg), "step": 1}, ckpt)
    rate_file(root / "rater", root / "data/train.csv", root / "ratings.parquet", progress=False)
    (root / "rules/penalty").mkdir(parents=True)
    shutil.copy(root / "ratings.parquet", root / "rules/penalty/ratings.parquet")
    return root


@pytest.fixture(scope="module")
def quick(demo):
    cfg = quick_config(demo=str(demo), t2i_overrides=T2I, seeds=(0, 1), rule_arms=("penalty",))
    return cfg, ex.run_experiment(cfg, command="pytest", progress=False)


def test_every_arm_trains_and_is_measured(quick):
    cfg, res = quick
    names = [a["arm"] for a in res["arms"]]
    heur = res["heuristics"]["trained"]
    assert len(heur) == 1 and heur[0] in HEURISTIC_CANDIDATES
    assert names == ["full", "random_50", "shift_gsample_50", "topk_50", f"{heur[0]}_50", "penalty_shift_gsample_50",
                     "random_20", "shift_gsample_20"]
    assert len(res["runs"]) == len(names) * 2
    for r in res["runs"]:
        for key in ("heldout_loss", "geneval", "geneval_all_correct", "fid_lite"):
            assert math.isfinite(r[key]), (r["arm"], key, r[key])
        assert r["epochs"] == 1 and [p["epoch"] for p in r["curve"]] == [1] and r["n_generated"] == 8
        assert r["steps"] == r["train_rows"] // 4 and r["train_seed"] == r["seed"]
    for a in res["arms"]:
        assert a["n_seeds"] == 2 and math.isfinite(a["heldout_loss"]["mean"]) and a["heldout_loss"]["std"] >= 0
    saved = json.loads((cfg.out_dir / "results.json").read_text())
    assert [a["arm"] for a in saved["arms"]] == names


def test_subsets_have_the_requested_sizes_and_seeds_vary_only_the_sampled_arms(quick, demo):
    cfg, res = quick
    rated = read_ratings(demo / "ratings.parquet")
    ids = {(r["arm"], r["seed"]): pd.read_csv(r["subset"], dtype=str)["id"] for r in res["runs"]}
    for (arm, seed), sub in ids.items():
        retention = next(a["retention"] for a in res["arms"] if a["arm"] == arm)
        assert len(sub) == sub.nunique() == (N_TRAIN if arm == "full" else n_select(N_TRAIN, retention))
        assert set(sub) <= set(rated["id"])
        assert pd.read_csv(res["runs"][0]["subset"]).columns.tolist()[:3] == ["id", "image_path", "caption"]
    for arm in ("random_50", "shift_gsample_50", "random_20", "shift_gsample_20"):
        assert set(ids[(arm, 0)]) != set(ids[(arm, 1)]), arm  # selection seed varies with the run seed
    for arm in ("full", "topk_50", f"{res['heuristics']['trained'][0]}_50"):
        assert set(ids[(arm, 0)]) == set(ids[(arm, 1)]), arm  # deterministic selections
    assert set(ids[("random_50", 0)]) != set(ids[("shift_gsample_50", 0)])
    for seed in (0, 1):  # the fixture's penalty ratings are the rater's: the rule arm must draw the same rows
        assert set(ids[("penalty_shift_gsample_50", seed)]) == set(ids[("shift_gsample_50", seed)])
    assert set(ids[("topk_50", 0)]) == set(rated["id"][:N_TRAIN // 2])
    head = set(rated["id"][:N_TRAIN // 4])  # Shift-Gsample 50 % drops the top quarter first
    assert not head & set(ids[("shift_gsample_50", 0)]) and not head & set(ids[("shift_gsample_50", 1)])
    runs = {(r["arm"], r["seed"]): r for r in res["runs"]}
    assert runs[("random_50", 1)]["selection_seed"] == 1 and runs[("topk_50", 1)]["selection_seed"] is None


def test_the_shift_gsample_reference_is_the_raters_own_validation_scores_or_none(tmp_path, capsys):
    rng = np.random.default_rng(0)
    table = lambda n, tag: pd.DataFrame({"id": [f"{tag}{i}" for i in range(n)], "score": rng.normal(size=n)})
    ratings, val = write_ratings(table(80, "t"), tmp_path / "ratings.parquet"), table(60, "v")
    cfg = ExperimentConfig(demo=str(tmp_path))
    assert ex.trusted_reference(cfg, ratings) is None and "tail 0.15" in capsys.readouterr().out  # none written
    write_ratings(val, tmp_path / "val_ratings.parquet")
    os.utime(ratings, (1, 1))  # the rater's ratings, then its validation scores (run_demo's order)
    got = ex.trusted_reference(cfg, ratings)
    assert np.array_equal(np.sort(got), np.sort(val["score"].to_numpy()))
    os.utime(ratings, None)  # ratings rescored after the validation scores: maybe another rater's
    with pytest.raises(DataError, match="older than"):
        ex.trusted_reference(cfg, ratings)
    other = ExperimentConfig(demo=str(tmp_path), ratings=str(ratings))  # a user's ratings: the demo's file is not theirs
    assert ex.trusted_reference(other, ratings) is None
    given = ExperimentConfig(demo=str(tmp_path), ratings=str(ratings), reference=str(tmp_path / "val_ratings.parquet"))
    assert np.array_equal(np.sort(ex.trusted_reference(given, ratings)), np.sort(got))
    with pytest.raises(FileNotFoundError, match="--reference"):
        ex.trusted_reference(ExperimentConfig(demo=str(tmp_path), reference=str(tmp_path / "nope.parquet")), ratings)


def test_results_section_figure_and_planted_tables(quick):
    cfg, res = quick
    doc = cfg.doc_path.read_text()
    assert doc.count(report.SECTION_START) == 1 and doc.count(report.SECTION_END) == 1
    for a in res["arms"]:
        assert f"| {a['label']} |" in doc
    assert "`pytest`" in doc and "mean ± std over 2 seeds" in doc and "rule `penalty`" in doc
    assert "| Shift-Gsample 50% (penalty rater) |" in doc
    ref = res["reference"]  # 16 val images: 8 prompts' own and 8 more for the FID-lite floor
    assert ref["n"] == 8 and math.isfinite(ref["geneval"]) and math.isfinite(ref["fid_lite"])
    assert "real val images (reference, 8)" in doc
    assert cfg.figure_path.is_file() and cfg.figure_path.stat().st_size > 10_000
    assert set(res["planted"]) == {"rater", "rule:penalty", *HEURISTIC_CANDIDATES}
    for q in res["planted"].values():
        assert all(0.0 <= v <= 1.0 for v in q["auroc"].values()) and set(q["auroc"]) <= set(DEFECT_KINDS)
        assert all(abs(sum(row) - 1.0) < 1e-9 for row in q["deciles"].values())
    for a in res["arms"]:
        assert abs(sum(a["composition"].values()) - 1.0) < 1e-9


def test_rerun_trains_nothing_and_replaces_the_section(quick, demo):
    cfg, res = quick
    again = ex.run_experiment(cfg, command="pytest again", progress=False)
    assert not any(r["trained_now"] for r in again["runs"])
    assert [r["heldout_loss"] for r in again["runs"]] == [r["heldout_loss"] for r in res["runs"]]
    assert [r["fid_lite"] for r in again["runs"]] == [r["fid_lite"] for r in res["runs"]]
    doc = cfg.doc_path.read_text()
    assert doc.count(report.SECTION_START) == 1 and "`pytest again`" in doc and "`pytest`" not in doc

    # a run killed after its last checkpoint but before its summary: resumed, not retrained from scratch
    run = Path(res["runs"][0]["run_dir"])
    (run / "summary.json").unlink()
    third = ex.run_experiment(cfg, command="pytest", progress=False)
    assert [r["trained_now"] for r in third["runs"]] == [True] + [False] * (len(res["runs"]) - 1)
    assert third["runs"][0]["heldout_loss"] == res["runs"][0]["heldout_loss"]
    assert third["runs"][0]["steps"] == res["runs"][0]["steps"]


def test_a_run_folder_of_another_config_is_refused(quick):
    cfg, _ = quick
    other = quick_config(demo=cfg.demo, t2i_overrides=T2I + ("--tlr=0.01",), seeds=(0,))
    with pytest.raises(ConfigError, match="another config"):
        ex.run_experiment(other, progress=False)
    with pytest.raises(ConfigError, match="no <rules_dir>/<rule>/ratings.parquet"):
        ex.run_experiment(quick_config(demo=cfg.demo, t2i_overrides=T2I, rule_arms=("reference",)), progress=False)
    with pytest.raises(ConfigError, match="set by the experiment"):
        ex.base_t2i_config(quick_config(demo=cfg.demo, t2i_overrides=T2I + ("--ep=3",)))


def test_mean_std_and_doc_section_replacement(tmp_path):
    assert report.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert report.mean_std([2.0]) == (2.0, 0.0)
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nkeep me\n")
    report.write_doc_section(doc, f"{report.SECTION_START}\none\n{report.SECTION_END}\n")
    report.write_doc_section(doc, f"{report.SECTION_START}\ntwo\n{report.SECTION_END}\n")
    text = doc.read_text()
    assert "keep me" in text and "two" in text and "one" not in text and text.count(report.SECTION_START) == 1


def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("experiment_cli", ROOT / "scripts/experiment.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["selection", "--demo", str(tmp_path / "nope"), "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not exist" in err and "\n" not in err
    assert cli.main(["selection", "--demo", str(tmp_path), "--quick", "--seeds", "1,1"]) == 2
    assert "distinct" in capsys.readouterr().err


def test_sample_grid_pairs_each_caption_with_its_own_image_and_is_seeded(quick, demo, monkeypatch, tmp_path):
    from alchemist.data.pairs import PairsDataset, load_pairs
    from alchemist.evaluation import samples

    drawn = []
    monkeypatch.setattr(samples, "plot_samples", lambda real, gen, captions, out, title: drawn.append(
        (real, gen, captions)) or Path(out))
    run = quick[1]["runs"][0]["run_dir"]
    for seed in (0, 0, 1):
        samples.sample_grid(run, demo / "data/val.csv", tmp_path / "g.png", n=3, k=2, seed=seed)
    real, gen, captions = drawn[0]
    assert gen.shape == (3, 2, 3, 16, 16) and len(set(captions)) == 3
    table = load_pairs(demo / "data/val.csv", load_config(RaterConfig, None, {**GEOMETRY}).data)
    ds = PairsDataset(table, 16)
    for b, caption in enumerate(captions):
        i = table.index[table["caption"] == caption][0]
        assert torch.equal(real[b], ds[i]["img_3HW"])
    assert torch.equal(gen, drawn[1][1]) and drawn[1][2] == captions
    assert drawn[2][2] != captions or not torch.equal(gen, drawn[2][1])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        samples.sample_grid(tmp_path, demo / "data/val.csv", tmp_path / "g.png")
