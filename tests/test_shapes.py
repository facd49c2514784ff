"""The shapes world (issue 7): generator, captions, judge, shipped model and the inversion demo."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from experiments.shapes import judge, world

ROOT = judge.JUDGE_PATH.parents[1]


# -- the world -------------------------------------------------------------------------------------------------

def test_generator_is_deterministic_and_seed_dependent():
    a, la = world.generate(16, seed=3)
    b, lb = world.generate(16, seed=3)
    c, _ = world.generate(16, seed=4)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and la == lb
    assert not np.array_equal(a, c)


def test_every_shape_colour_and_background_is_drawn():
    _, labels = world.generate(600, seed=0)
    assert {lab.shape for lab in labels} == set(range(len(world.SHAPES)))
    assert {lab.colour for lab in labels} == set(range(len(world.COLOUR_NAMES)))
    assert {lab.background for lab in labels} == set(range(len(world.BACKGROUND_NAMES)))


def test_shape_pixels_have_the_labelled_colour():
    images, labels = world.generate(50, seed=1)
    for img, lab in zip(images, labels):
        bg = np.array(world.BACKGROUNDS[world.BACKGROUND_NAMES[lab.background]])
        fg = np.array(world.COLOURS[world.COLOUR_NAMES[lab.colour]])
        px = img.reshape(-1, 3).astype(float)
        near_fg = np.abs(px - fg).sum(1) < np.abs(px - bg).sum(1)
        assert near_fg.sum() > 10
        assert np.abs(np.median(px[near_fg], 0) - fg).max() < 30


def test_the_held_out_word_never_appears_and_the_generic_word_is_uninformative():
    rng = np.random.default_rng(0)
    _, labels = world.generate(7000, seed=2)
    generic = Counter()
    total = Counter()
    for lab in labels:
        text = world.caption(lab, rng)
        assert world.HELD_OUT not in text
        name = world.SHAPES[lab.shape]
        total[name] += 1
        generic[name] += world.GENERIC_WORD in text.split()
        if name != world.HELD_OUT and world.GENERIC_WORD not in text.split():
            assert name in text.split()
    rates = {s: generic[s] / total[s] for s in world.SHAPES}
    assert all(abs(r - world.GENERIC_PROB) < 0.05 for r in rates.values()), rates
    star_given_generic = generic[world.HELD_OUT] / sum(generic.values())
    assert star_given_generic < 0.2


def test_captions_use_the_inversion_templates():
    from inversion.templates import OBJECT_TEMPLATES

    assert set(world.OBJECT_TEMPLATES) == set(OBJECT_TEMPLATES)


# -- the judge -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped_judge():
    if not judge.JUDGE_PATH.is_file():
        pytest.fail(f"{judge.JUDGE_PATH} is missing; run python -m experiments.shapes.judge")
    return judge.load_judge()


def test_shipped_judge_is_accurate_on_a_fresh_world(shipped_judge):
    acc_shape, acc_colour = judge.accuracy(shipped_judge, n=1000, seed=4242)
    assert acc_shape >= 0.98 and acc_colour >= 0.98, (acc_shape, acc_colour)


def test_judge_takes_pil_uint8_and_float_inputs(shipped_judge):
    from PIL import Image

    images, labels = world.generate(8, seed=5)
    s1, c1 = judge.predict(shipped_judge, images)
    s2, c2 = judge.predict(shipped_judge, [Image.fromarray(im) for im in images])
    s3, c3 = judge.predict(shipped_judge, world.to_tensor(images))
    big = torch.nn.functional.interpolate(world.to_tensor(images), scale_factor=2, mode="nearest")
    s4, c4 = judge.predict(shipped_judge, big)
    assert torch.equal(s1, s2) and torch.equal(s1, s3) and torch.equal(c1, c3)
    assert (s4 == s1).float().mean() >= 0.85 and torch.equal(c4, c1)


def test_load_judge_rejects_a_file_without_the_marker(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="not a shapes judge"):
        judge.load_judge(bad)
