"""CLIP's byte-level BPE tokenizer (Radford et al. 2021; Sennrich et al. 2016) with placeholder tokens."""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

import regex
import torch

from ldm.placeholders import PlaceholderTokenizer, fit_ids

try:
    import ftfy
except ImportError:  # ftfy only repairs mojibake; CLIP still works without it
    ftfy = None


__all__ = ["Tokenizer", "BOS_ID", "EOS_ID", "VOCAB_SIZE", "default_bpe_path", "fit_ids"]

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # 48,894 merge lines after the header
VOCAB_SIZE = 256 + 256 + NUM_MERGES + 2  # 49,408
BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>
PAD_ID = {"sd1": EOS_ID, "sd2": 0}  # SD1 (transformers) pads with EOS; SD2 (open_clip) with 0
END_OF_WORD = "</w>"
# CLIP's pre-tokenizer: English contractions, letter runs, single digits, runs of other symbols.
PRETOKENIZE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


def default_bpe_path() -> Path:
    """The vocabulary file open_clip_torch ships, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"cannot find {BPE_FILE}: install open_clip_torch or pass bpe_path=")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / BPE_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"open_clip is installed but has no {BPE_FILE}; pass bpe_path=")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character table: printable bytes map to themselves."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@functools.lru_cache(maxsize=4)
def _load_bpe(path: str) -> tuple[dict[str, int], list[str], dict[tuple[str, str], int]]:
    """(token → id, id → token, merge pair → rank) from CLIP's gzipped merges file."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not CLIP's BPE merges file (expected {NUM_MERGES} pairs after a header)")
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, vocab, {m: r for r, m in enumerate(merges)}


def valid_unicode(text: str) -> str:
    """Lone surrogates (e.g. undecodable command-line bytes) → U+FFFD, so UTF-8 encoding never fails."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def clean(text: str) -> str:
    """CLIP's text cleaning: ftfy repair, HTML unescape twice, whitespace collapse, lower case."""
    text = valid_unicode(text)
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class Tokenizer(PlaceholderTokenizer):
    """CLIP BPE to 77 ids with SD1 ("sd1": pad EOS) or SD2 ("sd2": open_clip, pad 0) rules, plus placeholders."""

    KINDS = tuple(PAD_ID)

    def __init__(self, kind: str = "sd1", context_length: int = 77, bpe_path: str | os.PathLike | None = None) -> None:
        if kind not in PAD_ID:
            raise ValueError(f"tokenizer kind {kind!r}; choose one of {', '.join(self.KINDS)}")
        if context_length < 2:
            raise ValueError(f"context_length {context_length} leaves no room for BOS and EOS")
        super().__init__(context_length, BOS_ID, EOS_ID, PAD_ID[kind])
        self.kind = kind
        self._encoder, self._decoder, self._ranks = _load_bpe(str(bpe_path or default_bpe_path()))
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}

    # --- encoding ----------------------------------------------------------------------------------------

    def _bpe(self, word: str) -> list[int]:
        """Byte-pair merges (Sennrich et al. 2016) on one pre-token, lowest-rank pair first."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            ranked = [(self._ranks.get(pair, NUM_MERGES), pair) for pair in zip(symbols, symbols[1:])]
            rank, (first, second) = min(ranked)
            if rank == NUM_MERGES:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self._encoder[s] for s in symbols]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in PRETOKENIZE.findall(clean(text)):
            ids += self._bpe("".join(self._byte_encoder[b] for b in piece.encode("utf-8")))
        return ids

    # --- decoding ----------------------------------------------------------------------------------------

    def _plain_piece(self, i: int) -> str:
        """Readable text of one vocabulary id (without the end-of-word marker)."""
        return self._join_bytes(self._decoder[i]).strip()

    def _join_bytes(self, symbols: str) -> str:
        """Byte-level symbols → UTF-8 text, one space per end-of-word marker."""
        parts = symbols.split(END_OF_WORD)
        return " ".join(bytes(self._byte_decoder[c] for c in p).decode("utf-8", errors="replace") for p in parts)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Ids → text: BOS skipped, stops at the first EOS (padding after it), placeholders by name."""
        words: list[str] = []
        pending: list[str] = []
        for item in self._decode_items(ids):
            if isinstance(item, str):  # a placeholder: flush the byte-level symbols before it
                if pending:
                    words.append(self._join_bytes("".join(pending)))
                    pending.clear()
                words.append(f" {item} ")
            else:
                pending.append(self._decoder[item])
        if pending:
            words.append(self._join_bytes("".join(pending)))
        return " ".join("".join(words).split())
