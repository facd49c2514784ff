"""--init-search: the first-order ranking, the exact check on the fixed batch, and a run that starts from its choice."""

from __future__ import annotations

import json

import pytest
import torch

from inversion import initsearch
from inversion import train as T
from inversion.config import TrainConfig
from inversion.embedding import load_embedding_file
from tests.helpers import train_argv

K = 4


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    out = T.train(TrainConfig.from_argv(train_argv(tmp, "--init-search", str(K), "--lr", "5e-2")))
    return tmp, out, json.loads((out / initsearch.FILE).read_text())


def test_the_gradient_is_the_objectives_derivative(tmp_path):
    """objective.gradient · u equals the central difference of the objective along u."""
    s = T.setup(TrainConfig.from_argv(train_argv(tmp_path, "--steps", "auto")))
    words = s.words
    g = s.objective.gradient(1)
    u = torch.randn(words.vectors.shape, generator=torch.Generator().manual_seed(0))
    u *= 0.05 * float(words.vectors.detach().norm()) / float(u.norm())
    start = words.vectors.detach().clone()
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            words.vectors.copy_(start + sign * u)
        values.append(s.objective(1))
    assert (values[0] - values[1]) / 2 == pytest.approx(float((g * u).sum()), rel=0.05)
    assert words.vectors.grad is None  # the run's own gradient slot is untouched


def test_the_search_measures_init_and_k_whole_words_and_keeps_the_best(searched):
    _, _, record = searched
    found = record["candidates"]
    assert len(found) == K + 1 and found[0]["word"] == "cat" and record["init"] == "cat"
    assert all(c["word"].isalpha() and len(c["word"]) >= initsearch.MIN_LETTERS for c in found)
    assert len({c["id"] for c in found}) == K + 1
    ranks = [c["rank"] for c in found[1:]]
    assert ranks == sorted(ranks)  # taken in the first-order ranking's order
    best = min(found, key=lambda c: c["objective"])
    assert record["chosen"] == best["word"] and record["id"] == best["id"]
    size = 5 * 4  # the cat concept's images × stratified timesteps
    assert record["image_passes"] == size * (K + 2)


def test_a_searched_run_equals_a_run_from_the_chosen_word(searched):
    """The search touches no random state: the same batches and updates as INIT=<chosen word>."""
    tmp, out, record = searched
    argv = train_argv(tmp, "--lr", "5e-2", out="plain")
    argv[argv.index("--init") + 1] = record["chosen"]
    plain = T.train(TrainConfig.from_argv(argv))
    a = load_embedding_file(out / "learned_embeds.safetensors")["<cat>"]
    b = load_embedding_file(plain / "learned_embeds.safetensors")["<cat>"]
    assert torch.equal(a, b)


def test_resume_reads_the_choice_instead_of_searching(searched, monkeypatch):
    tmp, out, _ = searched
    first = T.train(
        TrainConfig.from_argv(
            train_argv(tmp, "--init-search", str(K), "--lr", "5e-2", out="cut", steps=1, save_every=1)
        )
    )
    monkeypatch.setattr(initsearch, "search", lambda *a: pytest.fail("searched again on RESUME"))
    resumed = T.train(TrainConfig.from_argv(["--resume", str(first), "--steps", "3", "--no-progress"]))
    a = load_embedding_file(out / "learned_embeds.safetensors")["<cat>"]
    b = load_embedding_file(resumed / "learned_embeds.safetensors")["<cat>"]
    assert torch.equal(a, b)
