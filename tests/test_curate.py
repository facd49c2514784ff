"""inversion.curate: BEST_OF/KEEP/RANK=clip ranking with a fake scorer whose features we control."""

import argparse
import json

import pytest
import torch
from PIL import Image

from inversion import curate
from inversion.embedding import InversionError


class FakeScorer:
    """Image i's feature is `table[int(pixel[0,0,0] code)]`; text features come from a dict."""

    def __init__(self, table: dict[int, list[float]], texts: dict[str, list[float]]):
        self.table, self.texts = table, texts
        self.text_calls = []

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        codes = ((images[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()
        return torch.tensor([self.table[c] for c in codes], dtype=torch.float32)

    def text_features(self, texts):
        self.text_calls.extend(texts)
        return torch.tensor([self.texts[t] for t in texts], dtype=torch.float32)


def coded(*codes: int, size: int = 8) -> torch.Tensor:
    x = torch.zeros(len(codes), 3, size, size)
    for i, c in enumerate(codes):
        x[i] = c / 127.5 - 1
    return x


TABLE = {0: [1.0, 0.0], 1: [0.0, 1.0], 2: [1.0, 1.0], 3: [-1.0, 0.0], 10: [1.0, 0.0], 11: [0.8, 0.6]}


def test_rank_by_concept_images_only():
    scorer = FakeScorer(TABLE, {})
    # concept images point along x: cosines 1, 0, 0.707, -1
    assert curate.rank(coded(0, 1, 2, 3), coded(10, 10), None, scorer) == [0, 2, 1, 3]


def test_rank_by_prompt_only_and_text_is_used():
    scorer = FakeScorer(TABLE, {"a dog": [0.0, 1.0]})
    assert curate.rank(coded(0, 1, 2, 3), None, "a dog", scorer) == [1, 2, 0, 3]
    assert scorer.text_calls == ["a dog"]


def test_combined_score_is_the_weighted_sum():
    scorer = FakeScorer(TABLE, {"p": [0.0, 1.0]})
    pairs = curate.ranked(coded(0, 1, 2), coded(10, 11), "p", scorer, image_weight=0.25)
    # image term: mean cos to (1,0) and (.8,.6); text term: cos to (0,1)
    expect = {
        0: 0.25 * (1 + 0.8) / 2 + 0.75 * 0.0,
        1: 0.25 * (0 + 0.6) / 2 + 0.75 * 1.0,
        2: 0.25 * (2**-0.5 + 1.4 / 2**0.5) / 2 + 0.75 * 2**-0.5,
    }
    assert [i for i, _ in pairs] == sorted(expect, key=lambda i: -expect[i])
    for i, s in pairs:
        assert s == pytest.approx(expect[i], abs=1e-6)


def test_weight_one_ignores_text_and_zero_ignores_images():
    scorer = FakeScorer(TABLE, {"p": [0.0, 1.0]})
    assert curate.rank(coded(0, 1), coded(10), "p", scorer, image_weight=1.0) == [0, 1]
    assert curate.rank(coded(0, 1), coded(10), "p", scorer, image_weight=0.0) == [1, 0]


def test_ties_keep_sampling_order_and_scale_does_not_matter():
    table = {0: [1.0, 0.0], 1: [5.0, 0.0], 2: [0.0, 1.0], 10: [1.0, 0.0]}
    assert curate.rank(coded(2, 0, 1), coded(10), None, FakeScorer(table, {})) == [1, 2, 0]


def test_pil_candidates_are_accepted():
    pils = [Image.new("RGB", (8, 8), (c, c, c)) for c in (1, 0)]
    assert curate.rank(pils, coded(10), None, FakeScorer(TABLE, {})) == [1, 0]


def test_nothing_to_rank_against_is_an_error():
    with pytest.raises(InversionError, match="concept images or a prompt"):
        curate.rank(coded(0), None, "  ", FakeScorer(TABLE, {}))
    with pytest.raises(InversionError, match="no candidates"):
        curate.rank(torch.zeros(0, 3, 8, 8), coded(10), None, FakeScorer(TABLE, {}))


def test_clip_text_strips_learned_words():
    assert (
        curate.clip_text("a photo of <cat> on the <cat-toy> beach", ["<cat>", "<cat-toy>"]) == "a photo of on the beach"
    )
    assert curate.clip_text("S* in the snow") == "in the snow"


def args(**kw):
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--prompt", default="a photo of <cat> in the snow")
    p.add_argument("--embedding", default=None)
    curate.add_arguments(p)
    argv = []
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return p.parse_args(argv)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(keep=2), "needs BEST_OF"),
        (dict(best_of=0), "at least 1"),
        (dict(best_of=4, keep=5), "between 1 and BEST_OF"),
        (dict(best_of=4, rank="lpips"), "unknown RANK"),
        (dict(best_of=4, image_weight=1.5), r"\[0, 1\]"),
    ],
)
def test_check_args_errors(kw, message):
    with pytest.raises(InversionError, match=message):
        curate.check_args(args(**kw))


def test_keep_defaults_to_n_capped_by_best_of():
    assert curate.keep_count(args(best_of=16)) == 4
    assert curate.keep_count(args(best_of=2)) == 2
    assert curate.keep_count(args(best_of=16, keep=3)) == 3


def test_select_without_best_of_keeps_everything():
    assert [i for i, _ in curate.select([None] * 3, args())] == [0, 1, 2]


def test_select_keeps_best_with_concept_from_the_embedding_run(tmp_path):
    """The sample CLI path: concept folder found from args.json beside EMBEDDING=, learned word stripped."""
    concept = tmp_path / "concept"
    concept.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (10, 10, 10)).save(concept / f"{i}.png")
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"options": {"concept": str(concept)}}))
    emb = run / "learned_embeds.safetensors"
    scorer = FakeScorer(TABLE, {"a photo of in the snow": [0.0, 1.0]})
    a = args(best_of=4, keep=2, embedding=str(emb))
    chosen = curate.select(coded(3, 0, 1, 2), a, ["<cat>"], scorer=scorer)
    assert [i for i, _ in chosen] == [3, 1]  # (1,1) is closest to both; then a tie → order
    assert scorer.text_calls == ["a photo of in the snow"]
    assert len(chosen) == 2 and all(isinstance(s, float) for _, s in chosen)


def test_select_prompt_only_learned_word_without_concept_is_an_error():
    a = args(best_of=2, prompt="<cat>")
    with pytest.raises(InversionError, match="nothing to rank against"):
        curate.select(coded(0, 1), a, ["<cat>"], scorer=FakeScorer(TABLE, {}))
