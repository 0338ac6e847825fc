import pytest
import torch
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from alchemist.models.text import TextEncoder, default_text_encoder_path

CAPTIONS = ["a cat", "a red bicycle leaning against a brick wall in the rain", "", "two dogs"]


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder()


def test_minilm_features(minilm):
    feats = minilm(CAPTIONS)
    B, T = len(CAPTIONS), feats.mask_BT.shape[1]
    assert minilm.kind == "bert" and minilm.width == 384
    assert feats.hidden_BTD.shape == (B, T, 384) and feats.pooled_BD.shape == (B, 384)
    assert feats.mask_BT.dtype == torch.bool
    n_tokens = [len(minilm.tokenizer(c)["input_ids"]) for c in CAPTIONS]
    assert feats.mask_BT.sum(1).tolist() == n_tokens and T == max(n_tokens)
    assert (feats.hidden_BTD[~feats.mask_BT] == 0).all()
    m = feats.mask_BT[..., None].float()
    assert torch.allclose(feats.pooled_BD, (feats.hidden_BTD * m).sum(1) / m.sum(1), atol=1e-6)


def test_caption_features_do_not_depend_on_batch_companions(minilm):
    batch = minilm(CAPTIONS)
    for i, c in enumerate(CAPTIONS):
        alone = minilm([c])
        t = alone.mask_BT.shape[1]
        assert torch.allclose(alone.hidden_BTD[0], batch.hidden_BTD[i, :t], atol=1e-5)
        assert (batch.hidden_BTD[i, t:] == 0).all() and not batch.mask_BT[i, t:].any()
        assert torch.allclose(alone.pooled_BD[0], batch.pooled_BD[i], atol=1e-5)


def test_encoder_is_frozen_and_stays_in_eval(minilm):
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.model.training
    assert minilm.cache_key().endswith("|max_len=77")


def test_truncates_to_max_len():
    enc = TextEncoder(max_len=5)
    assert enc(["one two three four five six seven eight"]).mask_BT.shape == (1, 5)


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_enc_path"):
        TextEncoder(str(tmp_path / "nope"))


def _save_with_minilm_tokenizer(model, path):
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(default_text_encoder_path()).save_pretrained(path)
    return str(path)


def test_tiny_clip_pools_the_end_of_text_token(tmp_path):
    tok = AutoTokenizer.from_pretrained(default_text_encoder_path())
    cfg = CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=tok.sep_token_id,
                         bos_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id)
    enc = TextEncoder(_save_with_minilm_tokenizer(CLIPTextModel(cfg), tmp_path / "clip"))
    feats = enc(CAPTIONS)
    assert enc.kind == "clip" and enc.width == 32
    ids = enc.tokenizer(CAPTIONS, padding="longest", return_tensors="pt")["input_ids"]
    eos = (ids == tok.sep_token_id).int().argmax(1)
    assert torch.allclose(feats.pooled_BD, feats.hidden_BTD[torch.arange(len(CAPTIONS)), eos])
    m = feats.mask_BT[..., None].float()
    assert not torch.allclose(feats.pooled_BD, (feats.hidden_BTD * m).sum(1) / m.sum(1), atol=1e-3)


def test_tiny_t5_pools_the_masked_mean(tmp_path):
    tok = AutoTokenizer.from_pretrained(default_text_encoder_path())
    cfg = T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)
    enc = TextEncoder(_save_with_minilm_tokenizer(T5EncoderModel(cfg), tmp_path / "t5"))
    feats = enc(CAPTIONS)
    assert enc.kind == "t5" and enc.width == 32
    m = feats.mask_BT[..., None].float()
    assert torch.allclose(feats.pooled_BD, (feats.hidden_BTD * m).sum(1) / m.sum(1), atol=1e-6)
    alone = enc([CAPTIONS[0]])
    assert torch.allclose(alone.pooled_BD[0], feats.pooled_BD[0], atol=1e-5)
