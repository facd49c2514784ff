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

import logging
import os
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import regex
import torch

from ldm.tokenizer import fit_ids

log = logging.getLogger(__name__)

__all__ = ["WordPieceTokenizer", "VOCAB_FILE", "default_vocab_path", "basic_tokenize"]

VOCAB_FILE = "bert-base-uncased-vocab.txt"
VOCAB_URL = "https://huggingface.co/google-bert/bert-base-uncased/resolve/main/vocab.txt"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
CONTINUATION = "##"
MAX_CHARS_PER_WORD = 100
UNK, CLS, SEP, PAD, MASK = "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
# CJK Unified Ideographs and their extensions/compatibility blocks (BERT's _is_chinese_char ranges)
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
              (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def default_vocab_path() -> Path:
    """$ONEWORD_BERT_VOCAB, else weights/bert-base-uncased-vocab.txt; a missing file says how to get it."""
    path = Path(os.environ.get("ONEWORD_BERT_VOCAB") or WEIGHTS_DIR / VOCAB_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"no BERT vocabulary at {path}; `make weights MODEL=ldm-1.4b` downloads it "
                                f"(or fetch {VOCAB_URL} there, or set ONEWORD_BERT_VOCAB=path)")
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


class WordPieceTokenizer:
    """BERT WordPiece to 77 ids ([CLS] … [SEP] [PAD]…), plus placeholder tokens with new ids ≥ vocab_size."""

    kind = "bert"

    def __init__(self, vocab_path: str | os.PathLike | None = None, context_length: int = 77,
                 lowercase: bool = True, max_chars_per_word: int = MAX_CHARS_PER_WORD) -> None:
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
        self.context_length, self.lowercase, self.max_chars_per_word = context_length, lowercase, max_chars_per_word
        self.unk_id, self.bos_id, self.eos_id, self.pad_id = (self._encoder[t] for t in (UNK, CLS, SEP, PAD))
        self._specials = {t: self._encoder[t] for t in SPECIAL_TOKENS if t in self._encoder}
        self._special_of = {i: t for t, i in self._specials.items()}
        self._cache: dict[str, list[int]] = {}
        self._placeholders: dict[str, list[int]] = {}
        self._placeholder_of: dict[int, str] = {}
        self._split = self._splitter()

    # --- vocabulary --------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Rows of the frozen embedding table (30,522 for bert-base-uncased); placeholder ids start here."""
        return len(self._decoder)

    def __len__(self) -> int:
        return self.vocab_size + len(self._placeholder_of)

    @property
    def placeholders(self) -> dict[str, list[int]]:
        return {tok: list(ids) for tok, ids in self._placeholders.items()}

    def _splitter(self) -> regex.Pattern:
        """Verbatim matches of placeholders and special tokens, longest first."""
        verbatim = sorted([*self._placeholders, *self._specials], key=len, reverse=True)
        return regex.compile("(" + "|".join(regex.escape(t) for t in verbatim) + ")")

    def add_placeholder(self, token: str, num_vectors: int = 1) -> list[int]:
        """Register `token` as `num_vectors` new ids ≥ vocab_size, matched verbatim and never split."""
        if not isinstance(token, str) or not token:
            raise ValueError("a placeholder must be a non-empty string such as '<my-concept>'")
        if any(c.isspace() for c in token):
            raise ValueError(f"placeholder {token!r} contains whitespace; use one word such as '<my-concept>'")
        if token in self._placeholders:
            raise ValueError(f"placeholder {token!r} is already registered with ids {self._placeholders[token]}")
        if token in self._specials:
            raise ValueError(f"placeholder {token!r} is a BERT special token; pick another such as '<my-concept>'")
        if not isinstance(num_vectors, int) or num_vectors < 1:
            raise ValueError(f"num_vectors must be a positive integer, got {num_vectors!r}")
        existing = self._encode_plain(token)
        if len(existing) == 1 and existing[0] != self.unk_id:
            raise ValueError(f"placeholder {token!r} is already the vocabulary word {self._decoder[existing[0]]!r} "
                             f"(id {existing[0]}); pick a string that is not, e.g. '<{token}>'")
        ids = list(range(len(self), len(self) + num_vectors))
        self._placeholders[token] = ids
        self._placeholder_of.update(dict.fromkeys(ids, token))
        self._split = self._splitter()
        return list(ids)

    def is_single_token(self, word: str) -> bool:
        return len(self.encode(word)) == 1

    def token_id(self, word: str) -> int:
        """The one id `word` encodes to (e.g. an initializer word); ValueError naming the pieces otherwise."""
        ids = self.encode(word)
        if len(ids) != 1:
            pieces = ", ".join(repr(self._piece(i)) for i in ids) or "nothing"
            raise ValueError(f"{word!r} is {len(ids)} tokens ({pieces}), not one; choose a single-token word")
        return ids[0]

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

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without [CLS]/[SEP]; placeholders and special tokens (verbatim) keep their ids."""
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2 == 0:
                ids += self._encode_plain(part)
            elif part in self._placeholders:
                ids += self._placeholders[part]
            else:
                ids.append(self._specials[part])
        return ids

    def __call__(self, prompts: str | Sequence[str]) -> torch.LongTensor:
        """Prompts → (B, context_length) ids: [CLS], pieces, [SEP], [PAD]…; over-long prompts keep [SEP] last."""
        if isinstance(prompts, str):
            prompts = [prompts]
        room = self.context_length - 2
        out = torch.full((len(prompts), self.context_length), self.pad_id, dtype=torch.long)
        dropped = []
        for row, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            if len(ids) > room:
                kept = fit_ids(ids, room, self._placeholder_of)
                dropped.append(f"{self.decode(ids[len(kept):])!r} from prompt {row}")
                ids = kept
            out[row, :len(ids) + 2] = torch.tensor([self.bos_id, *ids, self.eos_id])
        if dropped:
            log.warning("prompt longer than %d tokens was truncated; dropped %s",
                        self.context_length, "; ".join(dropped))
        return out

    # --- decoding ----------------------------------------------------------------------------------------

    def _piece(self, i: int) -> str:
        """Readable text of one id (a continuation piece without its "##")."""
        if i in self._placeholder_of:
            return self._placeholder_of[i]
        piece = self._decoder[i]
        return piece[len(CONTINUATION):] if piece.startswith(CONTINUATION) else piece

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Ids → text: [CLS] skipped, stops at [SEP] or [PAD], "##" pieces glued, placeholders by name."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        words: list[str] = []
        prev = None
        for i in ids:
            i = int(i)
            if i == self.bos_id:
                continue
            if i in (self.eos_id, self.pad_id):
                break
            if not 0 <= i < len(self):
                raise ValueError(f"token id {i} is outside this tokenizer's {len(self)} ids")
            if i in self._placeholder_of:
                token = self._placeholder_of[i]
                if prev not in self._placeholders[token] or prev + 1 != i:  # one name per run of its ids
                    words.append(token)
            elif self._decoder[i].startswith(CONTINUATION) and words:
                words[-1] += self._piece(i)
            else:
                words.append(self._piece(i))
            prev = i
        return " ".join(words)
