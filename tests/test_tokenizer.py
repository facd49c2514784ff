"""CLIP BPE tokenizer: ids equal open_clip (SD2) and transformers (SD1), placeholders, truncation."""

from __future__ import annotations

import logging

import pytest
import torch

from ldm.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, Tokenizer, _load_bpe, default_bpe_path

COLOURS = "red orange yellow green blue indigo violet black white grey brown pink gold silver".split()
LONG = "a highly detailed photograph of " + " ".join(COLOURS * 6) + " in the very end"
TRICKY = [
    "a photo of a cat",
    "",
    "   ",
    "A   photo\tof  a\n\nDOG   ",
    "Café naïve résumé, Ångström, Crème brûlée",
    "emoji 🐱🚀✨ and 👩‍👩‍👧 family",
    "猫の写真 一只猫 고양이 사진",
    "Привет, мир! Ελληνικά; עברית",
    "don't, it's, we're, they'll, I'd, you've, I'm",
    "punctuation!!! ??? ... --- (brackets) [x] {y} <z> @user #tag $100 50% a&b",
    "tom &amp; jerry &lt;b&gt;bold&lt;/b&gt; &amp;amp; &quot;q&quot;",
    "numbers 1234567890 3.14159 1,000,000",
    "mojibake Ã©tÃ© â€œquotedâ€\x9d",
    "ﬁne ligatures and fullwidth ＡＢＣ",
    LONG,
    "x " * 200,
]
# Prompts whose cleaning is the same under transformers' normalizer (NFC, whitespace, lower) and CLIP's (ftfy, html).
SAME_CLEANING = [p for i, p in enumerate(TRICKY) if i not in (10, 12, 13)]


@pytest.fixture(scope="module")
def sd1() -> Tokenizer:
    return Tokenizer("sd1")


@pytest.fixture(scope="module")
def sd2() -> Tokenizer:
    return Tokenizer("sd2")


@pytest.fixture(scope="module")
def open_clip_ids() -> torch.Tensor:
    open_clip = pytest.importorskip("open_clip")
    return open_clip.tokenize(TRICKY)


def hf_tokenizer():
    """transformers' CLIPTokenizer built offline from the same merges file."""
    transformers = pytest.importorskip("transformers")
    encoder, _, ranks = _load_bpe(str(default_bpe_path()))
    return transformers.CLIPTokenizer(vocab=dict(encoder), merges=sorted(ranks, key=ranks.get))


def test_constants(sd1, sd2):
    assert (BOS_ID, EOS_ID, VOCAB_SIZE) == (49406, 49407, 49408)
    assert sd1.vocab_size == len(sd1) == 49408
    assert (sd1.pad_id, sd2.pad_id) == (49407, 0)
    assert sd1.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]


def test_sd2_matches_open_clip(sd2, open_clip_ids):
    got = sd2(TRICKY)
    assert got.dtype == torch.long and got.shape == (len(TRICKY), 77)
    bad = [TRICKY[i] for i in range(len(TRICKY)) if not torch.equal(got[i], open_clip_ids[i])]
    assert not bad


def test_sd1_is_open_clip_padded_with_eos(sd1, open_clip_ids):
    want = open_clip_ids.clone()
    after_eos = (want == EOS_ID).long().cumsum(1).cumsum(1) > 1  # every position after the first EOS
    want[after_eos] = EOS_ID
    assert torch.equal(sd1(TRICKY), want)


def test_sd1_matches_transformers(sd1):
    ref = hf_tokenizer()
    want = ref(SAME_CLEANING, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(sd1(SAME_CLEANING), want.input_ids)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_truncation_keeps_eos_last_and_warns_once(kind, caplog):
    tok = Tokenizer(kind)
    content = tok.encode(LONG)
    assert len(content) > 75
    with caplog.at_level(logging.WARNING, logger="ldm.tokenizer"):
        ids = tok([LONG, "short prompt"])
    records = [r for r in caplog.records if r.name == "ldm.tokenizer"]
    assert len(records) == 1
    assert ids[0].tolist() == [BOS_ID, *content[:75], EOS_ID]
    dropped = tok.decode(content[75:])
    assert dropped.endswith("silver in the very end") and dropped in records[0].getMessage()
    assert "highly detailed" not in records[0].getMessage()


def test_no_warning_when_it_fits(sd1, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm.tokenizer"):
        sd1(["a photo of a cat", "x " * 75])
    assert not caplog.records


def test_decode_round_trip(sd1, sd2):
    for tok in (sd1, sd2):
        assert tok.decode(tok("A photo of a CAT, please!")[0]) == "a photo of a cat , please !"
        assert tok.decode(tok("猫の写真 🐱")[0]) == "猫の写真 🐱"


def test_placeholders_new_ids_never_split():
    tok = Tokenizer("sd1")
    assert tok.add_placeholder("<cat-toy>") == [49408]
    assert tok.add_placeholder("<Style_Ü>", num_vectors=3) == [49409, 49410, 49411]
    assert len(tok) == 49412 and tok.vocab_size == 49408
    assert tok.placeholders == {"<cat-toy>": [49408], "<Style_Ü>": [49409, 49410, 49411]}
    assert tok.encode("a photo of <cat-toy>") == [320, 1125, 539, 49408]
    # glued to other text, repeated, next to punctuation: still whole
    assert tok.encode("<cat-toy>s,<cat-toy>!") == [49408, *tok.encode("s,"), 49408, *tok.encode("!")]
    assert tok.encode("in the style of <Style_Ü>") == [*tok.encode("in the style of"), 49409, 49410, 49411]
    # case-sensitive, matched before lower-casing
    assert not set(tok.encode("<CAT-TOY> <style_ü>")) & set(range(49408, 49412))
    row = tok("a <cat-toy> in the style of <Style_Ü>")[0]
    assert row[:9].tolist() == [BOS_ID, 320, 49408, *tok.encode("in the style of"), 49409, 49410, 49411][:9]
    assert tok.decode(row) == "a <cat-toy> in the style of <Style_Ü>"
    assert tok.is_single_token("<cat-toy>") and not tok.is_single_token("<Style_Ü>")
    assert tok.token_id("<cat-toy>") == 49408


def test_placeholder_sharing_a_prefix_matches_longest():
    tok = Tokenizer("sd2")
    a, b = tok.add_placeholder("<x>"), tok.add_placeholder("<x>2")
    assert tok.encode("<x>2 <x>") == [*b, *a]


@pytest.mark.parametrize(
    "bad, match",
    [
        ("", "non-empty"),
        ("my concept", "whitespace"),
        ("a\tb", "whitespace"),
        ("cat", "<cat>"),
        ("Sculpture", "vocabulary word"),
        ("*", "vocabulary word"),
    ],
)
def test_placeholder_refusals(bad, match):
    tok = Tokenizer("sd1")
    with pytest.raises(ValueError, match=match):
        tok.add_placeholder(bad)
    assert len(tok) == 49408


def test_placeholder_duplicate_and_bad_count():
    tok = Tokenizer("sd1")
    tok.add_placeholder("<p>")
    with pytest.raises(ValueError, match="already registered"):
        tok.add_placeholder("<p>")
    with pytest.raises(ValueError, match="positive"):
        tok.add_placeholder("<q>", num_vectors=0)


def test_init_word_helpers(sd1):
    assert sd1.is_single_token("sculpture") and sd1.token_id("sculpture") == 8757
    assert sd1.token_id("Cat") == 2368
    assert not sd1.is_single_token("photorealistic")
    pieces = [sd1.decode([i]) for i in sd1.encode("photorealistic")]
    with pytest.raises(ValueError, match="2 tokens") as err:
        sd1.token_id("photorealistic")
    assert all(repr(p) in str(err.value) for p in pieces)
    with pytest.raises(ValueError, match="0 tokens"):
        sd1.token_id("  ")


def test_bad_kind_and_ids(sd1):
    with pytest.raises(ValueError, match="sd1, sd2"):
        Tokenizer("bert")
    with pytest.raises(ValueError, match="outside"):
        sd1.decode([49408])
