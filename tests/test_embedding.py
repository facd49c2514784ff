"""Placeholder rows, init, and every embedding file format (incl. diffusers' own loader reading ours)."""

from __future__ import annotations

import copy
import gzip
import json

import pytest
import torch
from torch import nn

import ldm
from inversion.embedding import (
    InversionError,
    LearnedWords,
    atomic_write,
    check_width,
    load_embedding_file,
    save_embedding_files,
    table_mean_norm,
    word_id,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def model():
    return ldm.tiny_model(seed=0)


def test_only_new_rows_are_trainable_and_the_table_is_untouched(model):
    table = model.text_encoder.token_embedding.weight
    ptr, before = table.data_ptr(), table.detach().clone()
    words = LearnedWords(model, "<cat>", num_vectors=3, init_words=["cat"])
    assert words.vectors.shape == (3, 32) and words.vectors.dtype == torch.float32
    assert [p for p in words.parameters()] == [words.vectors]
    assert not table.requires_grad and table.data_ptr() == ptr and table.shape == (49408, 32)
    assert words.tokens == {"<cat>": [49408, 49409, 49410]}
    cat = model.tokenizer.encode("cat")[0]
    assert torch.equal(words.vectors.detach(), table[cat].expand(3, -1))
    # splice: the word's 3 ids sit in the prompt in a row and pick the 3 learned rows, in order
    ids = model.tokenizer(["a photo of <cat>"])
    pos = (ids[0] >= 49408).nonzero().flatten().tolist()
    assert pos == [4, 5, 6]
    emb = model.token_embeddings(ids, extra=words.vectors)
    assert torch.equal(emb[0, 4:7], words.vectors.detach())
    assert torch.equal(emb[0, :4], table[ids[0, :4]])
    assert torch.equal(table, before)


def test_init_words_spread_and_random_init_scale(model):
    table = model.text_encoder.token_embedding.weight
    words = LearnedWords(model, "<x>", num_vectors=4, init_words=["cat", "dog"])
    cat, dog = (table[model.tokenizer.encode(w)[0]] for w in ("cat", "dog"))
    assert torch.equal(words.vectors.detach(), torch.stack([cat, cat, dog, dog]))
    rand = LearnedWords(
        ldm.tiny_model(0), "<y>", num_vectors=5, init_words=None, generator=torch.Generator().manual_seed(1)
    )
    norms = rand.vectors.detach().norm(dim=1)
    assert torch.allclose(norms, torch.full((5,), table_mean_norm(model)), rtol=1e-5)


def test_bad_words_are_one_line_errors(model):
    with pytest.raises(InversionError, match=r"'golden retriever' is 2 tokens .*try one of 'golden', 'retriever'"):
        word_id(model.tokenizer, "golden retriever")
    with pytest.raises(InversionError, match=r"TOKEN='cat' is already a vocabulary word.*'<cat>'"):
        LearnedWords(model, "cat")
    with pytest.raises(InversionError, match="is 2 tokens"):
        LearnedWords(model, "<new>", init_words=["golden retriever"])


def test_reg_loss_is_the_official_coarse_loss(model):
    words = LearnedWords(model, "<cat>", init_words=["cat"])
    assert float(words.reg_loss().detach()) == 0.0
    with torch.no_grad():
        words.vectors.add_(0.5)
    assert float(words.reg_loss().detach()) == pytest.approx(0.25 * 32, rel=1e-6)


def test_three_files_round_trip(model, tmp_path):
    words = LearnedWords(model, "<cat|toy>", num_vectors=2, init_words=["cat"])
    with torch.no_grad():
        words.vectors.add_(torch.randn(2, 32, generator=torch.Generator().manual_seed(0)))
    paths = save_embedding_files(tmp_path, words, step=7, checkpoint_hash="abc123", checkpoint_name="tiny")
    assert [p.name for p in paths] == ["embeddings.pt", "learned_embeds.safetensors", "cat-toy.pt"]
    want = words.vectors.detach()
    for p in paths:
        got = load_embedding_file(p)
        assert list(got) == ["<cat|toy>"] and torch.equal(got["<cat|toy>"], want), p.name
    official = torch.load(paths[0], weights_only=True)
    assert int(official["string_to_token"]["<cat|toy>"]) == 49408
    a1111 = torch.load(paths[2], weights_only=True)
    assert a1111["string_to_token"] == {"*": 265} and a1111["step"] == 7
    assert (a1111["name"], a1111["sd_checkpoint"], a1111["sd_checkpoint_name"]) == ("<cat|toy>", "abc123", "tiny")
    assert list(load_embedding_file(paths[1], token="<other>")) == ["<other>"]


def test_foreign_formats(tmp_path):
    from safetensors.torch import save_file

    v = torch.randn(3, 768)
    torch.save({"emb_params": v}, tmp_path / "kohya.pt")
    save_file({"emb_params": v}, str(tmp_path / "kohya2.safetensors"))
    save_file({"<t>": v[0], "<t>_1": v[1], "<t>_2": v[2]}, str(tmp_path / "multi.safetensors"))
    official = {
        "string_to_token": {"*": torch.tensor(265)},
        "string_to_param": nn.ParameterDict({"*": nn.Parameter(v)}),
    }  # as the official code saves
    torch.save(official, tmp_path / "official.pt")
    torch.save({"clip_l": v, "clip_g": torch.randn(3, 1280)}, tmp_path / "sdxl.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    assert torch.equal(load_embedding_file(tmp_path / "kohya.pt")["kohya"], v)
    assert torch.equal(load_embedding_file(tmp_path / "kohya2.safetensors", token="<k>")["<k>"], v)
    assert torch.equal(load_embedding_file(tmp_path / "multi.safetensors")["<t>"], v)
    assert torch.equal(load_embedding_file(tmp_path / "official.pt")["*"], v)
    with pytest.raises(InversionError, match="SDXL"):
        load_embedding_file(tmp_path / "sdxl.pt")
    with pytest.raises(InversionError, match="not a readable embedding file"):
        load_embedding_file(tmp_path / "junk.pt")
    with pytest.raises(InversionError, match="does not exist"):
        load_embedding_file(tmp_path / "missing.pt")


def test_check_width_names_both_widths_and_families(model):
    check_width(torch.zeros(1, 32), model)
    with pytest.raises(InversionError) as e:
        check_width(torch.zeros(2, 1024), 768)
    msg = str(e.value)
    assert "1024 wide (SD2.x" in msg and "768 wide (SD1.x" in msg and "\n" not in msg
    with pytest.raises(InversionError, match=r"1280 wide \(LDM-1.4B"):
        check_width(torch.zeros(1, 1280), model)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# --- a real client reads our file ------------------------------------------------------------------------


def _hf_tokenizer(folder):
    """transformers' CLIPTokenizer built offline from open_clip's BPE merges."""
    from transformers import CLIPTokenizer

    from ldm.tokenizer import bytes_to_unicode, default_bpe_path

    with gzip.open(default_bpe_path(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 48894 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")


def test_diffusers_load_textual_inversion_reads_our_file(model, tmp_path):
    from diffusers.loaders import TextualInversionLoaderMixin
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = model.config.text
    hf = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["width"],
            intermediate_size=4 * cfg["width"],
            num_hidden_layers=cfg["layers"],
            num_attention_heads=cfg["heads"],
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        )
    ).eval()
    ours = {k.removeprefix("text_model."): v for k, v in model.text_encoder.state_dict().items()}
    hf.load_state_dict(ours, strict=True)
    hf_fresh = copy.deepcopy(hf)

    class TinyPipeline(TextualInversionLoaderMixin):
        """The least of a pipeline that diffusers' loader touches: tokenizer, text encoder, components."""

        hf_device_map = None

        def __init__(self, tokenizer, text_encoder):
            self.tokenizer, self.text_encoder = tokenizer, text_encoder
            self.components = {"tokenizer": tokenizer, "text_encoder": text_encoder}

    (tmp_path / "tok").mkdir()
    pipe = TinyPipeline(_hf_tokenizer(tmp_path / "tok"), hf)
    words = LearnedWords(model, "<cat>", num_vectors=2, init_words=["cat", "dog"])
    with torch.no_grad():
        words.vectors.add_(torch.randn(2, 32, generator=torch.Generator().manual_seed(3)))
    save_embedding_files(tmp_path, words, step=1)
    pipe.load_textual_inversion(str(tmp_path), weight_name="learned_embeds.safetensors")

    prompt = "a photo of <cat>"
    hf_ids = pipe.tokenizer(
        pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    assert torch.equal(hf_ids, model.tokenizer([prompt]))  # same ids: 49408, 49409 for <cat>, <cat>_1
    with torch.no_grad():
        theirs = hf(hf_ids).last_hidden_state
        mine = model.encode_prompts([prompt], extra=words.vectors.detach())
    err = ((theirs - mine).abs().max() / mine.abs().max()).item()
    print(f"diffusers load_textual_inversion vs oneword text-encoder output: rel max err {err:.2e}")
    assert err <= 1e-5, err
    # and the A1111 file through the same loader, under the token stored in its name field
    pipe2 = TinyPipeline(_hf_tokenizer(tmp_path / "tok"), hf_fresh)
    pipe2.load_textual_inversion(str(tmp_path / "cat.pt"))
    assert "<cat>" in pipe2.tokenizer.get_vocab() and "<cat>_1" in pipe2.tokenizer.get_vocab()
