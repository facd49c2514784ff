"""--init-search K: start the word from the vocabulary word that fits the concept best, not a hand-picked INIT.

The fixed-batch objective of STEPS=auto (inversion/stopping.py: every concept image at its posterior mean, fixed
templates, stratified timesteps, fixed noise) scores a starting row without touching the run's random state.
One backward pass at INIT's row gives its gradient g; to first order, starting from row c instead changes the
objective by g·(c − e₀), so one matrix product ranks every row of the token table. Walking down that ranking,
the first K rows that are whole words (letters only, at least three, encoding back to that one id) are measured
exactly, with INIT itself, and the run starts from the lowest. Cost: (K + 2) × the fixed batch's size in UNet
image-passes (the backward pass counted as one), recorded with the ranking in `init_search.json`; RESUME reads
the choice from there instead of searching again.
"""

from __future__ import annotations

import logging

import torch

from inversion.embedding import LearnedWords, word_id
from inversion.stopping import DeterministicObjective

log = logging.getLogger(__name__)

MIN_LETTERS = 3
FILE = "init_search.json"


def whole_words(tokenizer, order: list[int], k: int, skip: int) -> list[tuple[int, str]]:
    """The first `k` ids of `order` (other than `skip`) that are one-token alphabetic words of ≥ MIN_LETTERS."""
    found: list[tuple[int, str]] = []
    for i in order:
        if i == skip:
            continue
        word = tokenizer.decode([i]).strip()
        if len(word) >= MIN_LETTERS and word.isascii() and word.isalpha() and tokenizer.encode(word) == [i]:
            found.append((i, word))
            if len(found) == k:
                break
    return found


def start_from(words: LearnedWords, row: torch.Tensor) -> None:
    """Every vector of the main word (and the regulariser's anchor) starts from `row`."""
    n = words.num_vectors
    with torch.no_grad():
        words.vectors[:n] = row.to(words.vectors)
        words.initial[:n] = row.to(words.initial)


def search(model, words: LearnedWords, objective: DeterministicObjective, init: str, k: int) -> dict:
    """Rank the token table by the first-order estimate at INIT's row, measure INIT and the best `k` whole
    words on the fixed batch, and start `words` from the lowest; returns what `init_search.json` records."""
    table = model.text_encoder.token_embedding.weight.detach().float()
    n = words.num_vectors
    grad = objective.gradient(n)[:n].sum(0)  # every main vector moves to the same row: the rows' gradients add
    order = (table @ grad.to(table.device)).argsort().tolist()
    init_id = word_id(model.tokenizer, init)
    measured = []
    for i, word in [(init_id, init), *whole_words(model.tokenizer, order, k, init_id)]:
        start_from(words, table[i])
        measured.append({"word": word, "id": i, "rank": order.index(i), "objective": objective(n)})
    best = min(measured, key=lambda m: m["objective"])
    start_from(words, table[best["id"]])
    log.info(
        "--init-search %d: starting from %r (fixed-batch objective %.5f; INIT %r %.5f)",
        k,
        best["word"],
        best["objective"],
        init,
        measured[0]["objective"],
    )
    return {
        "chosen": best["word"],
        "id": best["id"],
        "init": init,
        "candidates": measured,
        "image_passes": objective.size * (len(measured) + 1),
    }


def resume(model, words: LearnedWords, record: dict) -> None:
    """RESUME: the anchor of the regulariser is the row the search chose (the vectors come from state.pt)."""
    start_from(words, model.text_encoder.token_embedding.weight.detach().float()[record["id"]])
