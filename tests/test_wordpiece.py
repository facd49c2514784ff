"""WordPiece tokenizer: same ids as the `tokenizers` BertWordPieceTokenizer and transformers' BertTokenizer
(what LDM's BERTTokenizer ran) built from the same small vocabulary, on tricky strings."""

from __future__ import annotations

import string

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ldm.wordpiece import WordPieceTokenizer, basic_tokenize, default_vocab_path

SPECIALS = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "the",
    "a",
    "photo",
    "of",
    "cat",
    "##s",
    "un",
    "##believ",
    "##able",
    "cafe",
    "naive",
    "resume",
    "is",
    "it",
    "in",
    "and",
    "new",
    "tab",
    "zero",
    "width",
    "##width",
    "istanbul",
    "tokyo",
    "sculpture",
    "中",
    "国",
    "東",
    "京",
    "σοφια",
    "σοφος",
    "σ",
    "##ς",
    "##σ",
    "ο",
    "φ",
    "ι",
    "α",
    "##ο",
    "##φ",
    "##ι",
    "##α",
    "δ",
    "##δ",
]
PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["¿", "—", "…", "「", "」"]


def _vocab() -> list[str]:
    letters = list(string.ascii_lowercase + string.digits)
    return SPECIALS + letters + ["##" + c for c in letters] + PUNCT + WORDS


TRICKY = [
    "A Photo of a CAT!",
    "Café naïve RÉSUMÉ Ångström",
    "un-believable, isn't it?... (yes) [no] {maybe}",
    "中国猫 in 東京 and Tokyo",
    "søren and œuvre and ß",
    "a" * 150 + " cat",
    "\t tab\nnew\u00a0line\u3000ideographic\u2028sep",
    "zero\u200bwidth\u0000nul\ufffdrepl\x07bell",
    "[MASK] and [mask] and [CLS]x[SEP]",
    "ΣΟΦΙΑ σοφός ΟΔΟΣ",  # per-character lower case: final Σ → σ, not ς
    "İstanbul",
    "🐱 cat 🐱🐱",
    "$100 + 20% = <cat> ~ ^_^ `x` |y|",
    "",
    "   ",
    "Ｆｕｌｌｗｉｄｔｈ and ﬁne and ①",
    "한국어 sculpture",
    "cat's cats' o'clock ¿qué? — «quoted» …",
    " ".join(["sculpture"] * 90),
    "unbelievable " * 40,
]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(_vocab()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ours(vocab_file):
    return WordPieceTokenizer(vocab_file)


@pytest.fixture(scope="module")
def reference(vocab_file):
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(str(vocab_file), lowercase=True)
    tok.enable_truncation(77)
    tok.enable_padding(length=77, pad_id=0, pad_token="[PAD]")
    return tok


def _hf_bert(vocab_file):
    """transformers' BertTokenizer (5.x: the tokenizers-backed class BertTokenizerFast became) on the same vocab."""
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert import load_vocab

    return BertTokenizer(vocab=dict(load_vocab(str(vocab_file))))


def test_ids_match_tokenizers_bert_wordpiece(ours, reference):
    ids = ours(TRICKY)
    ref = torch.tensor([e.ids for e in reference.encode_batch(TRICKY)])
    for row, text in enumerate(TRICKY):
        assert ids[row].tolist() == ref[row].tolist(), f"{text!r}: {ids[row].tolist()} vs {ref[row].tolist()}"


def test_ids_match_transformers_bert_tokenizer_as_ldm_calls_it(ours, vocab_file):
    """CompVis BERTTokenizer: truncation=True, max_length=77, padding="max_length"."""
    hf = _hf_bert(vocab_file)
    ref = hf(TRICKY, truncation=True, max_length=77, padding="max_length", return_tensors="pt")["input_ids"]
    assert torch.equal(ours(TRICKY), ref)


def test_layout_of_a_padded_row(ours):
    ids = ours("a photo of a cat")[0]
    enc = ours._encoder
    want = [enc["[CLS]"], enc["a"], enc["photo"], enc["of"], enc["a"], enc["cat"], enc["[SEP]"]]
    assert ids[:7].tolist() == want
    assert (ids[7:] == 0).all() and ours.pad_id == 0 and ids.shape == (77,)
    assert ours.encode("unbelievable") == [enc["un"], enc["##believ"], enc["##able"]]
    assert ours.encode("a" * 101) == [ours.unk_id] and ours.encode("a" * 100) != [ours.unk_id]


def test_truncation_keeps_sep_last_and_warns(ours, caplog):
    with caplog.at_level("WARNING"):
        ids = ours(" ".join(["sculpture"] * 90))[0]
    assert ids[0] == ours.bos_id and ids[-1] == ours.eos_id and (ids[1:-1] == ours._encoder["sculpture"]).all()
    assert "truncated" in caplog.text


ALPHABET = "aAbcéÉßσΣς中東!?,.'-[]#$ \t\n\u00a0\u200b\u0301😀ﬁＦ" + "[MASK][UNK]"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=40))
def test_random_strings_match_tokenizers(vocab_file, text):
    # fixtures are module-scoped; build the pair here once per process
    global _PAIR
    try:
        ours, ref = _PAIR
    except NameError:
        from tokenizers import BertWordPieceTokenizer

        ref = BertWordPieceTokenizer(str(vocab_file), lowercase=True)
        ours = WordPieceTokenizer(vocab_file)
        _PAIR = ours, ref
    want = ref.encode(text, add_special_tokens=False).ids
    assert ours.encode(text) == want, f"{text!r}"


def test_placeholders_are_new_ids_never_split(vocab_file):
    tok = WordPieceTokenizer(vocab_file)
    n = tok.vocab_size
    assert n == len(_vocab())
    assert tok.add_placeholder("<cat>") == [n]
    assert tok.add_placeholder("<cat-toy>", 3) == [n + 1, n + 2, n + 3]
    enc = tok._encoder
    assert tok.encode("a photo of <cat>") == [enc["a"], enc["photo"], enc["of"], n]
    assert tok.encode("<cat-toy>s and <cat>!") == [n + 1, n + 2, n + 3, enc["s"], enc["and"], n, enc["!"]]
    assert tok.encode("<CAT>") != [n]  # verbatim, case-sensitive
    assert len(tok) == n + 4 and tok.placeholders == {"<cat>": [n], "<cat-toy>": [n + 1, n + 2, n + 3]}
    assert tok.decode(tok("a photo of <cat-toy> and <cat>")[0]) == "a photo of <cat-toy> and <cat>"
    assert tok.token_id("<cat>") == n and tok.is_single_token("sculpture") and not tok.is_single_token("cats")
    row = tok("<cat>")[0]
    assert row[:3].tolist() == [tok.bos_id, n, tok.eos_id]


def test_placeholder_errors(vocab_file):
    tok = WordPieceTokenizer(vocab_file)
    with pytest.raises(ValueError, match="already the vocabulary word 'cat'"):
        tok.add_placeholder("Cat")
    with pytest.raises(ValueError, match="special token"):
        tok.add_placeholder("[MASK]")
    with pytest.raises(ValueError, match="whitespace"):
        tok.add_placeholder("my cat")
    tok.add_placeholder("<x>")
    with pytest.raises(ValueError, match="already registered"):
        tok.add_placeholder("<x>")
    with pytest.raises(ValueError, match="positive integer"):
        tok.add_placeholder("<y>", 0)
    with pytest.raises(ValueError, match=r"2 tokens \('cat', 's'\)"):
        tok.token_id("cats")


def test_decode(ours):
    assert ours.decode(ours("Unbelievable cats, Café!")[0]) == "unbelievable cats , cafe !"
    assert ours.decode([ours._encoder["##able"]]) == "able"
    with pytest.raises(ValueError, match="outside"):
        ours.decode([10**6])


def test_basic_tokenize():
    assert basic_tokenize("Héllo,WORLD!! 中国x") == ["hello", ",", "world", "!", "!", "中", "国", "x"]


def test_bad_vocabulary_and_missing_file(tmp_path, monkeypatch):
    bad = tmp_path / "vocab.txt"
    bad.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match=r"not a BERT vocabulary: it has no \[UNK\]"):
        WordPieceTokenizer(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WordPieceTokenizer(tmp_path / "nope.txt")
    monkeypatch.setenv("ONEWORD_BERT_VOCAB", str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="make weights MODEL=ldm-1.4b"):
        default_vocab_path()
