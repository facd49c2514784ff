"""STEPS=auto: the fixed-batch objective, the stop rule, and a run that stops by itself and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from inversion import stopping
from inversion import train as T
from inversion.config import BASE_LR, TrainConfig
from inversion.embedding import load_embedding_file
from tests.helpers import train_argv

AUTO = ("--steps", "auto", "--stop-every", "5", "--stop-window", "3", "--lr", "5e-2")


def test_the_rule_waits_for_a_plateau_and_not_longer():
    rule = stopping.StopRule(window=3, threshold=0.1, min_evaluations=4)
    falling = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]  # still improving steadily: recent variance stays high
    assert all(rule.update(5 * i, v) is None for i, v in enumerate(falling))
    reasons = [rule.update(5 * (len(falling) + i), 0.45 + 1e-4 * (-1) ** i) for i in range(3)]
    assert reasons[0] is None and "settled" in (reasons[1] or reasons[2])  # within one window of the plateau


def test_the_rule_never_stops_on_noise_without_a_trend_before_its_minimum():
    rule = stopping.StopRule(window=5, threshold=0.1, min_evaluations=8)
    g = torch.Generator().manual_seed(0)
    values = (0.5 + 0.01 * torch.randn(7, generator=g)).tolist()
    assert all(rule.update(i, v) is None for i, v in enumerate(values))


def test_the_rule_state_round_trips():
    a, b = stopping.StopRule(), stopping.StopRule()
    for i, v in enumerate([0.9, 0.5, 0.3]):
        a.update(i, v)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.history == a.history


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auto")
    out = T.train(TrainConfig.from_argv(train_argv(tmp, *AUTO, "--max-steps", "200", "--save-every", "1000")))
    return tmp, out, json.loads((out / "stop.json").read_text())


def test_an_auto_run_stops_by_itself_and_records_why(auto_run):
    _, out, info = auto_run
    assert 0 < info["stopped_at"] < 200 and "settled" in info["reason"]
    steps = [e["step"] for e in info["objective"]]
    assert steps == list(range(0, info["stopped_at"] + 1, 5))
    assert (out / "learned_embeds.safetensors").is_file()
    assert len(T.read_loss_csv(out / "loss.csv", 10**9)) == info["stopped_at"]


def test_the_objective_touches_no_randomness_of_the_run(auto_run):
    """An auto run stopped at S holds exactly the vectors of a STEPS=S run: same batches, same updates."""
    tmp, out, info = auto_run
    fixed = T.train(
        TrainConfig.from_argv(
            train_argv(tmp, "--lr", "5e-2", "--steps", str(info["stopped_at"]), "--save-every", "1000", out="fixed")
        )
    )
    a = load_embedding_file(out / "learned_embeds.safetensors")["<cat>"]
    b = load_embedding_file(fixed / "learned_embeds.safetensors")["<cat>"]
    assert torch.equal(a, b)
    assert not (fixed / "stop.json").exists()


def test_resume_continues_the_rule_where_it_was(auto_run):
    """Cut at the cap, then RESUME with a higher cap: the same stop step, history and vectors as one run."""
    tmp, out, info = auto_run
    cut_at = (info["stopped_at"] // 10) * 5
    first = T.train(
        TrainConfig.from_argv(train_argv(tmp, *AUTO, "--max-steps", str(cut_at), "--save-every", "1000", out="cut"))
    )
    assert json.loads((first / "stop.json").read_text())["reason"].startswith("reached --max-steps")
    resumed = T.train(TrainConfig.from_argv(["--resume", str(first), "--max-steps", "200", "--no-progress"]))
    again = json.loads((resumed / "stop.json").read_text())
    assert again["stopped_at"] == info["stopped_at"] and again["objective"] == info["objective"]
    a = load_embedding_file(out / "learned_embeds.safetensors")["<cat>"]
    b = load_embedding_file(resumed / "learned_embeds.safetensors")["<cat>"]
    assert torch.equal(a, b)


def test_a_new_run_without_steps_stops_by_itself_and_steps_n_runs_exactly_n():
    """STEPS left out: auto, capped at MAX_STEPS; STEPS=N: exactly N steps, no rule."""
    base = ["--concept", "cat"]
    default = TrainConfig.from_argv(base)
    assert default.auto and default.steps == default.max_steps == 6100
    capped = TrainConfig.from_argv([*base, "--max-steps", "300"])
    assert capped.auto and capped.steps == 300
    fixed = TrainConfig.from_argv([*base, "--steps", "300"])
    assert not fixed.auto and fixed.steps == 300


@pytest.mark.parametrize(
    ("extra", "lr"),
    [((), 4 * BASE_LR), (("--recipe", "official"), BASE_LR), (("--recipe", "official", "--lr", "1e-3"), 1e-3)],
    ids=["fast-by-default", "official", "lr-given"],
)
def test_the_recipe_sets_the_learning_rate_the_user_left_out(tmp_path, extra, lr):
    s = T.setup(TrainConfig.from_argv(train_argv(tmp_path, *extra)))
    saved = json.loads((s.out.path / "args.json").read_text())
    assert s.config.lr == saved["options"]["lr"] == lr
    assert saved["lr"] == pytest.approx(lr * s.config.batch)  # the official scale_lr on top
    assert saved["options"]["recipe"] == ("official" if extra else "fast")


def test_the_rules_clock_is_the_cap_and_resume_keeps_it(tmp_path):
    """One evaluation every MAX_STEPS // 30 steps, fixed in args.json: RESUME with another cap keeps it."""
    s = T.setup(TrainConfig.from_argv(train_argv(tmp_path, "--steps", "auto", "--max-steps", "300")))
    assert s.config.stop_every == stopping.every(300) == 10
    assert json.loads((s.out.path / "args.json").read_text())["options"]["stop_every"] == 10
    assert TrainConfig.from_run(s.out.path, max_steps=6100).resolve(s.model, s.out.path, True).stop_every == 10
    assert stopping.every(6100) == 203 and stopping.every(20) == 1
