"""Placeholder tokens (Gal et al. 2022) shared by the CLIP BPE and BERT WordPiece tokenizers."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

import regex
import torch

__all__ = ["PlaceholderTokenizer", "fit_ids"]


def fit_ids(ids: list[int], room: int, placeholder_of: dict[int, str]) -> list[int]:
    """The first ≤ room ids, cut before (never inside) a multi-vector placeholder's run of ids."""
    if len(ids) <= room:
        return ids
    cut = room
    while (
        cut > 0
        and ids[cut] in placeholder_of
        and ids[cut - 1] == ids[cut] - 1
        and placeholder_of.get(ids[cut - 1]) == placeholder_of[ids[cut]]
    ):
        cut -= 1
    return ids[:cut]


class PlaceholderTokenizer:
    """Placeholders as new ids ≥ vocab_size, padding/truncation to context_length and the decode skeleton.

    Subclasses fill `self._decoder` (id → vocabulary piece) and implement `_encode_plain` (text without
    placeholders → ids), `_plain_piece` (readable text of one vocabulary id) and `decode`.
    """

    unk_id: int | None = None  # an id `_encode_plain` gives unknown words; a placeholder may encode to it
    stops_at_pad: bool = False  # whether decoding stops at pad_id as well as at eos_id
    _decoder: list[str]

    def __init__(
        self, context_length: int, bos_id: int, eos_id: int, pad_id: int, specials: dict[str, int] | None = None
    ) -> None:
        self.context_length = context_length
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self._specials = dict(specials or {})  # written verbatim in a prompt, they keep their ids
        self._cache: dict[str, list[int]] = {}
        self._placeholders: dict[str, list[int]] = {}
        self._placeholder_of: dict[int, str] = {}
        self._split = self._splitter()

    # --- hooks -------------------------------------------------------------------------------------------

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def _plain_piece(self, i: int) -> str:
        raise NotImplementedError

    # --- vocabulary --------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Rows of the frozen embedding table (49,408 for CLIP, 30,522 for BERT); placeholder ids start here."""
        return len(self._decoder)

    def __len__(self) -> int:
        return self.vocab_size + len(self._placeholder_of)

    @property
    def placeholders(self) -> dict[str, list[int]]:
        return {tok: list(ids) for tok, ids in self._placeholders.items()}

    def _splitter(self) -> regex.Pattern | None:
        """Verbatim matches of placeholders and special tokens, longest first (None when there are none)."""
        verbatim = sorted([*self._placeholders, *self._specials], key=len, reverse=True)
        if not verbatim:
            return None
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
            raise ValueError(
                f"placeholder {token!r} is a special token of this vocabulary; pick another such as '<my-concept>'"
            )
        if not isinstance(num_vectors, int) or num_vectors < 1:
            raise ValueError(f"num_vectors must be a positive integer, got {num_vectors!r}")
        existing = self._encode_plain(token)
        if len(existing) == 1 and existing[0] != self.unk_id:
            raise ValueError(
                f"placeholder {token!r} is already the vocabulary word {self._piece(existing[0])!r} "
                f"(id {existing[0]}); pick a string that is not, e.g. '<{token}>'"
            )
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

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without BOS/EOS; placeholders and special tokens (matched verbatim) keep their ids."""
        if self._split is None:
            return self._encode_plain(text)
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
        """Prompts → (B, context_length) ids: BOS, tokens, EOS, padding; over-long prompts keep EOS last."""
        if isinstance(prompts, str):
            prompts = [prompts]
        room = self.context_length - 2
        out = torch.full((len(prompts), self.context_length), self.pad_id, dtype=torch.long)
        dropped = []
        for row, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            if len(ids) > room:
                kept = fit_ids(ids, room, self._placeholder_of)
                dropped.append(f"{self.decode(ids[len(kept) :])!r} from prompt {row}")
                ids = kept
            out[row, : len(ids) + 2] = torch.tensor([self.bos_id, *ids, self.eos_id])
        if dropped:  # logged under the subclass's module (ldm.tokenizer, ldm.wordpiece)
            logging.getLogger(type(self).__module__).warning(
                "prompt longer than %d tokens was truncated; dropped %s", self.context_length, "; ".join(dropped)
            )
        return out

    # --- decoding ----------------------------------------------------------------------------------------

    def _piece(self, i: int) -> str:
        """Readable text of one id: a placeholder's name, else the subclass's `_plain_piece`."""
        if i in self._placeholder_of:
            return self._placeholder_of[i]
        return self._plain_piece(i)

    def _decode_items(self, ids: Iterable[int] | torch.Tensor) -> Iterator[int | str]:
        """Vocabulary ids (int) and placeholder names (str, once per run of its ids) between BOS and the stop."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        prev = None
        for i in ids:
            i = int(i)
            if i == self.bos_id:
                continue
            if i == self.eos_id or (self.stops_at_pad and i == self.pad_id):
                break
            if not 0 <= i < len(self):
                raise ValueError(f"token id {i} is outside this tokenizer's {len(self)} ids")
            if i in self._placeholder_of:
                token = self._placeholder_of[i]
                if prev not in self._placeholders[token] or prev + 1 != i:  # one name per run of its ids
                    yield token
            else:
                yield i
            prev = i

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        raise NotImplementedError
