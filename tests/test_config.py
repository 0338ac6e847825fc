import json

import pytest
import torch

from alchemist.config import (ConfigError, RaterConfig, T2IConfig, config_from_dict, config_to_dict, load_config,
                              save_config)

PAPER = "configs/config_rater.json"


def test_paper_defaults_load():
    cfg = load_config(RaterConfig, PAPER)
    assert (cfg.model.depth, cfg.model.raterDepth, cfg.model.patch_size) == (16, 8, 16)
    assert cfg.model.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert cfg.model.num_tokens == 680
    assert (cfg.optim.bs, cfg.optim.ep, cfg.optim.tlr, cfg.optim.twd) == (64, 10, 1e-4, 0.05)
    assert (cfg.optim.opt, cfg.optim.sche, cfg.model.cfg) == ("adamw", "lin0", 4.0)
    assert cfg.logging.wandb == "disabled"


def test_official_keys_all_present_in_paper_config():
    raw = json.load(open(PAPER))
    keys = {k for sec in raw.values() if isinstance(sec, dict) for k in sec}
    official = {"train_csv_path", "val_csv_path", "text_enc_path", "ckpt_path", "depth", "raterDepth",
                "patch_size", "patch_nums", "bs", "ep", "tlr", "twd", "cfg", "opt", "sche", "wp", "fp16",
                "local_out_dir_path", "exp_name"}
    assert official <= keys


def test_overrides_bare_and_dotted_and_separate_value():
    cfg = load_config(RaterConfig, PAPER, ["--bs=32", "--model.depth=8", "--tlr", "3e-4", "--double_softmax=true"])
    assert cfg.optim.bs == 32 and cfg.model.depth == 8 and cfg.optim.tlr == 3e-4
    assert cfg.bilevel.double_softmax is True


def test_flat_official_style_json(tmp_path):
    p = tmp_path / "flat.json"
    p.write_text(json.dumps({"depth": 4, "bs": 8, "patch_nums": [1, 2], "image_size": 32, "exp_name": "x"}))
    cfg = load_config(RaterConfig, p)
    assert (cfg.model.depth, cfg.optim.bs, cfg.model.patch_nums, cfg.output.exp_name) == (4, 8, (1, 2), "x")


def test_round_trip(tmp_path):
    cfg = load_config(RaterConfig, PAPER, ["--raterDepth=2", "--patch_nums=1,2,4", "--image_size=64"])
    path = save_config(cfg, tmp_path / "config.json")
    assert load_config(RaterConfig, path) == cfg
    assert config_from_dict(RaterConfig, config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("override, suggestion", [("--raterdepth=2", "raterDepth"), ("--tlrr=1", "tlr"),
                                                  ("--model.dpeth=2", "model.depth")])
def test_unknown_key_names_key_and_closest(override, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(RaterConfig, PAPER, [override])
    key = override[2:].split("=")[0]
    assert repr(key) in str(e.value) and repr(suggestion) in str(e.value)


def test_unknown_key_in_json(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"optim": {"bss": 3}}))
    with pytest.raises(ConfigError, match="optim.bss"):
        load_config(RaterConfig, p)


@pytest.mark.parametrize("override, fragment", [
    ("--bs=0", "optim.bs"),
    ("--bs=abc", "expects int"),
    ("--bs=1.5", "expects int"),
    ("--tlr=-1", "optim.tlr"),
    ("--tlr=inf", "finite"),
    ("--rater_lr=nan", "finite"),
    ("--text_max_len=0", "model.text_max_len"),
    ("--sche=step", "optim.sche"),
    ("--patch_nums=1,3,2", "strictly increasing"),
    ("--image_size=128", "patch_nums[-1] * patch_size"),
    ("--patch_size=8", "downsampling"),
    ("--caption_dropout=1.5", "caption_dropout"),
    ("--wandb=maybe", "logging.wandb"),
    ("--group_head=perhaps", "expects bool"),
])
def test_invalid_values_rejected(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        load_config(RaterConfig, PAPER, [override])


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RaterConfig, tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(RaterConfig, bad)


@pytest.mark.parametrize("name,cls", [("demo_rater.json", RaterConfig), ("demo_t2i.json", T2IConfig)])
def test_demo_configs_fit_the_tokenizer_they_train(name, cls):
    """`train_tokenizer_for` builds the demo tokenizer from the config: its grid must be the config's."""
    from alchemist.models.vqvae import VQVAE

    cfg = load_config(cls, f"configs/{name}")
    m = cfg.model
    with torch.device("meta"):
        vq = VQVAE(vocab_size=m.vocab_size, z_channels=m.Cvae, ch=m.vae_ch, ch_mult=m.vae_ch_mult,
                   patch_nums=m.patch_nums, num_res_blocks=1)
    assert vq.downsample == m.patch_size and vq.image_size == cfg.data.image_size
