"""LDM-1.4B (the paper's model) through load_model: detection from shapes, strict load, WordPiece tokenizer."""

from __future__ import annotations

import pytest
import torch
from helpers import meta_state_dict, original_state_dict
from safetensors.torch import save_file

from ldm import config as configs
from ldm.checkpoint import CONFIG_KEY, CheckpointError, config_to_tensor, detect_variant, load_model
from ldm.pipeline import build_modules

WORDS = ["a", "photo", "of", "cat", "the", "on", "moon", "painting"]


@pytest.fixture
def vocab(tmp_path, monkeypatch):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    monkeypatch.setenv("ONEWORD_BERT_VOCAB", str(path))
    return path


def small_ldm() -> configs.ModelConfig:
    tiny = configs.tiny()
    return configs.ldm_1p4b().with_(
        name="ldm-small",
        unet=tiny.unet | {"context_dim": 64},
        vae=tiny.vae,
        text=dict(kind="ldmbert", vocab_size=len(WORDS) + 5, width=64, layers=2, heads=1, dim_head=64, max_seq_len=77),
    )


def test_full_size_ldm_1p4b_is_detected_from_shapes():
    sd = meta_state_dict(configs.ldm_1p4b())
    sd["cond_stage_model.transformer.to_logits.weight"] = torch.empty(30522, 1280, device="meta")
    cfg = detect_variant(sd)
    assert cfg.name == "ldm-1.4b" and cfg.text["kind"] == "ldmbert" and cfg.text["layers"] == 32
    assert (cfg.image_size, cfg.guidance, cfg.tokenizer) == (256, 5.0, "bert")


@pytest.mark.parametrize("marker", [True, False])
def test_small_ldm_round_trip_with_to_logits_extra(tmp_path, vocab, marker):
    cfg = small_ldm()
    torch.manual_seed(0)
    unet, vae, text = build_modules(cfg)
    sd = original_state_dict(unet, vae, text, cfg)
    sd["cond_stage_model.transformer.to_logits.weight"] = torch.zeros(cfg.text["vocab_size"], 64)
    if marker:
        sd[CONFIG_KEY] = config_to_tensor(cfg)
    save_file(sd, tmp_path / "ldm.safetensors")
    model = load_model(tmp_path / "ldm.safetensors")
    assert model.config.text["kind"] == "ldmbert"
    ids = model.tokenizer(["a photo of a cat on the moon"])
    assert ids[0, 0].item() == 2 and ids[0, 9].item() == 3 and ids[0, 10].item() == 0  # [CLS] … [SEP] [PAD]
    torch.testing.assert_close(model.text_encoder(ids), text(ids), rtol=0, atol=0)


def test_missing_bert_vocabulary_is_one_line(tmp_path, monkeypatch):
    cfg = small_ldm()
    sd = original_state_dict(*build_modules(cfg), cfg) | {CONFIG_KEY: config_to_tensor(cfg)}
    save_file(sd, tmp_path / "ldm.safetensors")
    monkeypatch.setenv("ONEWORD_BERT_VOCAB", str(tmp_path / "absent.txt"))
    with pytest.raises(CheckpointError, match="no BERT vocabulary"):
        load_model(tmp_path / "ldm.safetensors")


def test_inversion_learns_a_wide_word_on_the_ldm_family(tmp_path, vocab):
    """The trainer runs unchanged on a BERT-towered LDM: one new row of the tower's width, nothing else moves."""
    from helpers import train_argv
    from safetensors.torch import load_file

    from inversion.train import TrainConfig, train

    cfg = small_ldm()
    torch.manual_seed(0)
    sd = original_state_dict(*build_modules(cfg), cfg) | {CONFIG_KEY: config_to_tensor(cfg)}
    save_file(sd, tmp_path / "ldm.safetensors")
    model = load_model(tmp_path / "ldm.safetensors")
    table = model.text_encoder.token_embedding.weight.clone()
    argv = train_argv(tmp_path, "--token", "<cat>", "--init", "cat", steps=2, save_every=2)
    argv[argv.index("--model") + 1] = "tiny"  # ignored: the model is passed in
    run = train(TrainConfig.from_argv(argv), model=model)
    learned = load_file(run / "learned_embeds.safetensors")["<cat>"]
    assert learned.shape == (1, 64)
    assert not torch.equal(learned[0], table[WORDS.index("cat") + 5])  # moved away from its init word
    assert torch.equal(model.text_encoder.token_embedding.weight, table)
