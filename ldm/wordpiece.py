"""BERT's uncased WordPiece tokenizer (Devlin et al. 2019; Wu et al. 2016) for LDM-1.4B, with placeholder tokens.

The original LDM `BERTTokenizer` runs HF `BertTokenizerFast("bert-base-uncased")` with truncation,
max_length=77 and padding="max_length": [CLS] pieces [SEP], then [PAD] (id 0) to 77. Normalisation as the
`tokenizers` BertNormalizer: drop NUL/U+FFFD/control characters, whitespace → space, spaces around CJK
ideographs, accents stripped (NFD, drop Mn), lower-cased per character; pre-tokenisation splits on whitespace
and isolates every punctuation character; WordPiece is greedy longest-match-first with "##" continuations, and
a word longer than 100 characters or with an unmatched remainder becomes [UNK]. The special tokens
([PAD] [UNK] [CLS] [SEP] [MASK]) written verbatim in a prompt are kept as their ids, as the HF tokenizer does.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import torch

from ldm.placeholders import PlaceholderTokenizer

__all__ = ["WordPieceTokenizer", "VOCAB_FILE", "default_vocab_path", "basic_tokenize"]

VOCAB_FILE = "bert-base-uncased-vocab.txt"
VOCAB_URL = "https://huggingface.co/google-bert/bert-base-uncased/resolve/main/vocab.txt"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
CONTINUATION = "##"
MAX_CHARS_PER_WORD = 100
UNK, CLS, SEP, PAD, MASK = "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
# CJK Unified Ideographs and their extensions/compatibility blocks (BERT's _is_chinese_char ranges)
CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def default_vocab_path() -> Path:
    """$ONEWORD_BERT_VOCAB, else weights/bert-base-uncased-vocab.txt; a missing file says how to get it."""
    path = Path(os.environ.get("ONEWORD_BERT_VOCAB") or WEIGHTS_DIR / VOCAB_FILE)
    if not path.is_file():
        raise FileNotFoundError(
            f"no BERT vocabulary at {path}; `make weights MODEL=ldm-1.4b` downloads it "
            f"(or fetch {VOCAB_URL} there, or set ONEWORD_BERT_VOCAB=path)"
        )
    return path


def _is_control(c: str) -> bool:
    return c not in "\t\n\r" and unicodedata.category(c).startswith("C")


def _is_punctuation(c: str) -> bool:
    """ASCII symbols count too ($, +, <, =, >, ^, `, |, ~), as in BERT."""
    cp = ord(c)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(c).startswith("P")


def _is_cjk(c: str) -> bool:
    cp = ord(c)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def normalize(text: str, lowercase: bool = True) -> str:
    """BertNormalizer: clean, space out CJK, strip accents and lower-case (when `lowercase`)."""
    out = []
    for c in text:
        if c in ("\0", "\ufffd") or _is_control(c):
            continue
        if c.isspace():
            out.append(" ")
        elif _is_cjk(c):
            out.append(f" {c} ")
        else:
            out.append(c)
    text = "".join(out)
    if lowercase:
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        text = "".join(c.lower() for c in text)  # per character: no final-sigma rule, as the Rust normaliser
    return text


def basic_tokenize(text: str, lowercase: bool = True) -> list[str]:
    """Normalised words with every punctuation character on its own (BertPreTokenizer)."""
    words: list[str] = []
    for chunk in normalize(text, lowercase).split():
        current = ""
        for c in chunk:
            if _is_punctuation(c):
                if current:
                    words.append(current)
                words.append(c)
                current = ""
            else:
                current += c
        if current:
            words.append(current)
    return words


class WordPieceTokenizer(PlaceholderTokenizer):
    """BERT WordPiece to 77 ids ([CLS] … [SEP] [PAD]…), plus placeholder tokens with new ids ≥ vocab_size."""

    kind = "bert"
    stops_at_pad = True

    def __init__(
        self,
        vocab_path: str | os.PathLike | None = None,
        context_length: int = 77,
        lowercase: bool = True,
        max_chars_per_word: int = MAX_CHARS_PER_WORD,
    ) -> None:
        if context_length < 2:
            raise ValueError(f"context_length {context_length} leaves no room for [CLS] and [SEP]")
        path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        if not path.is_file():
            raise FileNotFoundError(f"BERT vocabulary {path} does not exist")
        with open(path, encoding="utf-8") as f:
            self._decoder = [line.rstrip() for line in f.read().split("\n")]
        if self._decoder and not self._decoder[-1]:
            self._decoder.pop()  # the newline that ends the file
        self._encoder = {t: i for i, t in enumerate(self._decoder)}
        missing = [t for t in (UNK, CLS, SEP, PAD) if t not in self._encoder]
        if missing:
            raise ValueError(f"{path} is not a BERT vocabulary: it has no {', '.join(missing)}")
        super().__init__(
            context_length,
            *(self._encoder[t] for t in (CLS, SEP, PAD)),
            specials={t: self._encoder[t] for t in SPECIAL_TOKENS if t in self._encoder},
        )
        self.lowercase, self.max_chars_per_word = lowercase, max_chars_per_word
        self.unk_id = self._encoder[UNK]

    # --- encoding ----------------------------------------------------------------------------------------

    def _wordpiece(self, word: str) -> list[int]:
        """Greedy longest-match-first over the vocabulary; "##" marks pieces inside a word."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        if len(word) > self.max_chars_per_word:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            end, found = len(word), None
            while start < end:
                piece = word[start:end] if start == 0 else CONTINUATION + word[start:end]
                found = self._encoder.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                ids = [self.unk_id]
                break
            ids.append(found)
            start = end
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in basic_tokenize(text, self.lowercase):
            ids += self._wordpiece(word)
        return ids

    # --- decoding ----------------------------------------------------------------------------------------

    def _plain_piece(self, i: int) -> str:
        """Readable text of one vocabulary id (a continuation piece without its "##")."""
        piece = self._decoder[i]
        return piece[len(CONTINUATION) :] if piece.startswith(CONTINUATION) else piece

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Ids → text: [CLS] skipped, stops at [SEP] or [PAD], "##" pieces glued, placeholders by name."""
        words: list[str] = []
        for item in self._decode_items(ids):
            if isinstance(item, str):  # a placeholder's name
                words.append(item)
            elif self._decoder[item].startswith(CONTINUATION) and words:
                words[-1] += self._piece(item)
            else:
                words.append(self._piece(item))
        return " ".join(words)
