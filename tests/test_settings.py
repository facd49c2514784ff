"""Every setting of `make train`, `make sample`, `make eval` and the figure scripts is checked: one line naming the
setting, exit status 2, no traceback — and, where the limit does not depend on the model, before the model loads.

The table holds at least one invalid value for every option of each command; `test_the_table_covers_every_option`
fails when a command gains an option that the table does not try.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import ldm
from apps import sample as S
from experiments.figures import FIGURES, figure_module
from experiments.figures import _common as C
from inversion import evaluate as E
from inversion import models
from inversion import train as T
from inversion.config import TrainConfig
from inversion.config import build_parser as train_parser
from inversion.templates import dual_templates, load_templates, max_vectors
from ldm import cli
from tests.helpers import ROOT, subprocess_env, train_argv

PRE, POST = "before the model loads", "once the model is known"
BEFORE_DIFFUSION = "by CLIP's loader, before the diffusion model loads"
FREE_TEXT = {"--neg", "--caption-short", "--caption-long"}  # any string is a valid value


def _set(argv: list[str], extra: list[str]) -> list[str]:
    """argv with extra's flags replacing the same flags (a bare `--x=v` or flag is appended)."""
    argv = list(argv)
    i = 0
    while i < len(extra):
        flag = extra[i]
        has_value = "=" not in flag and i + 1 < len(extra) and not extra[i + 1].startswith("--")
        if has_value and flag in argv:
            argv[argv.index(flag) + 1] = extra[i + 1]
        else:
            argv += extra[i : i + 1 + has_value]
        i += 1 + has_value
    return argv


def _figure_main(name: str):
    module = figure_module(name)

    def main(argv):
        C.run_figure(module, argv)
        return 0

    return main


TRAIN = [  # (option, extra argv, text the one line must hold, when)
    ("--concept", ["--concept", "no-such-concept"], "CONCEPT=", PRE),
    ("--model", ["--model", "sd99"], "MODEL=", PRE),
    ("--ckpt", ["--ckpt", "missing.safetensors"], "CKPT=", PRE),
    ("--steps", ["--steps", "0"], "STEPS=", PRE),
    ("--steps", ["--steps", "many"], "STEPS=", PRE),
    ("--max-steps", ["--steps", "auto", "--max-steps", "0"], "--max-steps", PRE),
    ("--stop-every", ["--steps", "auto", "--stop-every", "0"], "--stop-every", PRE),
    ("--stop-window", ["--steps", "auto", "--stop-window", "1"], "--stop-window", PRE),
    ("--stop-threshold", ["--steps", "auto", "--stop-threshold", "1.5"], "--stop-threshold", PRE),
    ("--recipe", ["--recipe", "slow"], "--recipe", PRE),
    ("--batch", ["--batch", "0"], "BATCH=", PRE),
    ("--accum", ["--accum", "0"], "ACCUM=", PRE),
    ("--lr", ["--lr", "-1"], "LR=", PRE),
    ("--lr", ["--lr", "nan"], "LR=", PRE),
    ("--no-scale-lr", ["--no-scale-lr=1"], "--no-scale-lr", PRE),
    ("--weight-decay", ["--weight-decay", "-0.1"], "--weight-decay", PRE),
    ("--init", ["--init", " "], "INIT=", PRE),
    ("--init", ["--init", "golden retriever"], "init word", POST),
    ("--init-words", ["--init-words", "a,b,c", "--vectors", "2"], "--init-words", PRE),
    ("--random-init", ["--random-init", "--init-words", "cat"], "--random-init", PRE),
    ("--init-search", ["--init-search", "-1"], "--init-search", PRE),
    ("--init-search", ["--init-search", "2", "--random-init"], "--init-search", PRE),
    ("--token", ["--token", "my cat"], "TOKEN=", PRE),
    ("--token", ["--token", "cat"], "TOKEN=", POST),
    ("--vectors", ["--vectors", "0"], "VECTORS=", PRE),
    ("--vectors", ["--vectors", "100"], "VECTORS=", POST),
    ("--progressive", ["--progressive", "-1"], "--progressive", PRE),
    ("--per-image-tokens", ["--per-image-tokens", "--vectors", "67"], "--per-image-tokens", POST),
    ("--reg-weight", ["--reg-weight", "-1"], "--reg-weight", PRE),
    ("--templates", ["--templates", "no-such-templates.txt"], "templates", PRE),
    ("--size", ["--size", "4"], "SIZE=", PRE),
    ("--size", ["--size", "30"], "SIZE=", POST),
    ("--center-crop", ["--center-crop=1"], "--center-crop", PRE),
    ("--repeats", ["--repeats", "0"], "--repeats", PRE),
    ("--flip-p", ["--flip-p", "2"], "--flip-p", PRE),
    ("--seed", ["--seed", "-1"], "SEED=", PRE),
    ("--out", ["--out", "{file}/run"], "OUT=", PRE),
    ("--overwrite", ["--overwrite=yes"], "--overwrite", PRE),
    ("--save-every", ["--save-every", "0"], "SAVE_EVERY=", PRE),
    ("--val-every", ["--val-every", "-1"], "--val-every", PRE),
    ("--val-prompts", ["--val-prompts", "S* " * 10, "--vectors", "10"], "VAL_PROMPTS", POST),
    ("--val-n", ["--val-n", "0"], "--val-n", PRE),
    ("--val-steps", ["--val-steps", "0"], "--val-steps", PRE),
    ("--val-steps", ["--val-steps", "5000"], "--val-steps=5000 must be at most", POST),
    ("--precision", ["--precision", "fp8"], "--precision", PRE),
    ("--checkpointing", ["--checkpointing", "2"], "--checkpointing", PRE),
    ("--resume", ["--resume", "{empty}"], "RESUME=", PRE),
    ("--latent-cache", ["--latent-cache", "{file}"], "--latent-cache", PRE),
    ("--no-latent-cache", ["--no-latent-cache=1"], "--no-latent-cache", PRE),
    ("--device", ["--device", "tpu"], "DEVICE=", PRE),
    ("--max-bad-steps", ["--max-bad-steps", "-1"], "--max-bad-steps", PRE),
    ("--max-bad-steps", ["--max-bad-steps", "0"], "--max-bad-steps", PRE),
    ("--deterministic", ["--deterministic=1"], "--deterministic", PRE),
    ("--no-progress", ["--no-progress=1"], "--no-progress", PRE),
]

SAMPLE = [
    ("--prompt", None, "--prompt", PRE),  # None: the option left out
    ("--model", ["--model", "sd99"], "MODEL=", PRE),
    ("--ckpt", ["--ckpt", "missing.safetensors"], "CKPT=", PRE),
    ("--prediction", ["--prediction", "x0"], "--prediction", PRE),
    ("--allow-pickle", ["--allow-pickle=1"], "--allow-pickle", PRE),
    ("--n", ["--n", "0"], "N=", PRE),
    ("--batch-size", ["--batch-size", "0"], "--batch-size", PRE),
    ("--steps", ["--steps", "0"], "STEPS=", PRE),
    ("--steps", ["--steps", "5000"], "STEPS=5000 must be at most", POST),
    ("--scale", ["--scale", "nan"], "SCALE=", PRE),
    ("--eta", ["--eta", "-1"], "ETA=", PRE),
    ("--sampler", ["--sampler", "euler_z"], "SAMPLER=", PRE),
    ("--seed", ["--seed", "-5"], "SEED=", PRE),
    ("--H", ["--H", "0"], "H=", PRE),
    ("--H", ["--H", "30"], "H=30", POST),
    ("--W", ["--W", "30"], "W=30", POST),
    ("--out", ["--out", "{file}/out"], "OUT=", PRE),
    ("--device", ["--device", "tpu"], "DEVICE=", PRE),
    ("--dtype", ["--dtype", "fp8"], "DTYPE=", PRE),
    ("--attention", ["--attention", "flash"], "ATTENTION=", PRE),
    ("--compile", ["--compile=1"], "--compile", PRE),
    ("--cuda-graph", ["--cuda-graph=1"], "--cuda-graph", PRE),
    ("--deterministic", ["--deterministic=1"], "--deterministic", PRE),
    ("--embedding", ["--embedding", "missing.safetensors"], "EMBEDDING=", PRE),
    ("--token", ["--token", "<cat>"], "TOKEN=", PRE),
    ("--best-of", ["--best-of", "0"], "BEST_OF=", PRE),
    ("--keep", ["--keep", "2"], "KEEP=", PRE),
    ("--rank", ["--best-of", "2", "--rank", "lpips"], "RANK=", PRE),
    ("--concept", ["--best-of", "2", "--clip-weights", "random", "--concept", "no-such-concept"], "CONCEPT=", PRE),
    ("--clip-weights", ["--best-of", "2", "--clip-weights", "missing.pt"], "CLIP=", PRE),
    ("--image-weight", ["--best-of", "2", "--image-weight", "2"], "--image-weight", PRE),
]

EVAL = [
    ("--run", ["--run", "no-such-run"], "RUN=", PRE),
    ("--prompts", ["--prompts", "a photo without the word"], "PROMPTS", PRE),
    ("--reconstruction", ["--reconstruction", "a photo"], "--reconstruction", PRE),
    ("--n", ["--n", "0"], "N=", PRE),
    ("--steps", ["--steps", "0"], "STEPS=", PRE),
    ("--steps", ["--steps", "5000"], "STEPS=5000 must be at most", POST),
    ("--scale", ["--scale", "inf"], "SCALE=", PRE),
    ("--eta", ["--eta", "-1"], "--eta", PRE),
    ("--size", ["--size", "4"], "--size", PRE),
    ("--size", ["--size", "30"], "--size", POST),
    ("--batch", ["--batch", "0"], "--batch", PRE),
    ("--seed", ["--seed", "-1"], "SEED=", PRE),
    ("--clip-weights", ["--clip-weights", "missing.pt"], "CLIP", BEFORE_DIFFUSION),
    ("--clip-arch", ["--clip-arch", "ViT-Z-99"], "--clip-arch", BEFORE_DIFFUSION),
    ("--model", ["--model", "sd99"], "MODEL=", PRE),
    ("--ckpt", ["--ckpt", "missing.safetensors"], "CKPT=", PRE),
    ("--concept", ["--concept", "no-such-concept"], "CONCEPT=", PRE),
    ("--embedding", ["--embedding", "missing.safetensors"], "--embedding", PRE),
    ("--token", ["--embedding", "{two_words}", "--token", "<c>"], "--token", PRE),
    ("--out", ["--out", "{file}"], "--out", PRE),
    ("--save-samples", ["--save-samples=1"], "--save-samples", PRE),
    ("--overwrite", ["--overwrite=1"], "--overwrite", PRE),
    ("--device", ["--device", "tpu"], "DEVICE=", PRE),
    ("--dtype", ["--dtype", "fp8"], "DTYPE=", PRE),
    ("--no-progress", ["--no-progress=1"], "--no-progress", PRE),
]

FIGURE_BASE = [  # the options every figure takes, tried on `variations`
    ("--model", ["--model", "sd99"], "--model", PRE),
    ("--ckpt", ["--ckpt", "missing.safetensors"], "--ckpt", PRE),
    ("--concept", ["--concept", "no-such-concept"], "CONCEPT=", POST),
    ("--run", ["--run", "no-such-run"], "--run", PRE),
    ("--out", ["--out", "{file}/fig"], "--out", PRE),
    ("--runs-dir", ["--runs-dir", "{file}"], "--runs-dir", PRE),
    ("--steps", ["--steps", "0"], "--steps", PRE),
    ("--batch", ["--batch", "0"], "--batch", PRE),
    ("--size", ["--size", "4"], "--size", PRE),
    ("--size", ["--size", "30"], "--size", POST),
    ("--n", ["--n", "0"], "--n", PRE),
    ("--sample-steps", ["--sample-steps", "0"], "--sample-steps", PRE),
    ("--sample-steps", ["--sample-steps", "5000"], "--sample-steps=5000 must be at most", POST),
    ("--scale", ["--scale", "nan"], "--scale", PRE),
    ("--seed", ["--seed", "-1"], "--seed", PRE),
    ("--device", ["--device", "tpu"], "DEVICE=", PRE),
    ("--clip-weights", ["--clip-weights", "missing.pt"], "--clip-weights", PRE),
    ("--overwrite", ["--overwrite=1"], "--overwrite", PRE),
    ("--prompts", ["--prompts", " ; "], "--prompts", PRE),
]

FIGURE_OWN = {  # each figure's own options
    "variations": [("--rows", ["--rows", "0"], "--rows", PRE)],
    "downstream": [("--strength", ["--strength", "1.5"], "--strength", PRE)],
    "bias": [("--word", ["--word", " "], "--word", PRE), ("--rows", ["--rows", "0"], "--rows", PRE)],
    "style": [("--init", ["--init", "golden retriever"], "init word", POST)],
    "tradeoff": [
        ("--variants", ["--variants", "no-such-variant"], "variant", PRE),
        ("--list-variants", ["--list-variants=1"], "--list-variants", PRE),
        ("--eval-n", ["--eval-n", "0"], "--eval-n", PRE),
        ("--results", ["--results", "{file}/RESULTS.md"], "--results", PRE),
        ("--save-samples", ["--save-samples=1"], "--save-samples", PRE),
    ],
}

ROWS = (
    [("train", *r) for r in TRAIN]
    + [("sample", *r) for r in SAMPLE]
    + [("eval", *r) for r in EVAL]
    + [("figure:variations", *r) for r in FIGURE_BASE]
    + [(f"figure:{name}", *r) for name, rows in FIGURE_OWN.items() for r in rows]
)


def parser_options(command: str) -> set[str]:
    if command == "train":
        p = train_parser()
    elif command == "sample":
        p = S.build_parser()
    elif command == "eval":
        p = E.build_parser()
    else:
        name = command.split(":")[1]
        p = C.base_parser(name, "")
        figure_module(name).add_arguments(p)
    return {o for a in p._actions for o in a.option_strings if o.startswith("--")} - {"--help"}


def test_the_table_covers_every_option():
    commands = ["train", "sample", "eval", *(f"figure:{name}" for name in FIGURES)]
    tried: dict[str, set[str]] = {c: set() for c in commands}
    for command, option, *_ in ROWS:
        tried[command].add(option)
    base = {option for option, *_ in FIGURE_BASE}
    for command in commands:
        extra = base if command.startswith("figure:") else set()
        missing = parser_options(command) - tried[command] - extra - FREE_TEXT
        assert not missing, f"{command}: no invalid value tried for {sorted(missing)}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny trained run (for eval), a plain file, an empty folder and a two-word embedding file."""
    root = tmp_path_factory.mktemp("settings")
    assert T.cli_main(train_argv(root, "--steps", "1", "--save-every", "1", out="run")) == 0
    (root / "file").write_text("not a folder")
    (root / "empty").mkdir()
    save_file({"<a>": torch.zeros(1, 32), "<b>": torch.zeros(1, 32)}, str(root / "two.safetensors"))
    return root


def _base(command: str, world, tmp) -> tuple[callable, list[str]]:
    if command == "train":
        return T.main, train_argv(tmp, out="out")
    if command == "sample":
        return S.main, [
            "--prompt",
            "a photo of a cat",
            "--model",
            "tiny",
            "--n",
            "1",
            "--steps",
            "1",
            "--H",
            "32",
            "--W",
            "32",
            "--out",
            str(tmp / "samples"),
        ]
    if command == "eval":
        return E.main, [
            "--run",
            str(world / "run"),
            "--clip-weights",
            "random",
            "--n",
            "1",
            "--steps",
            "1",
            "--no-progress",
            "--out",
            str(tmp / "eval.json"),
        ]
    return _figure_main(command.split(":")[1]), [
        "--model",
        "tiny",
        "--out",
        str(tmp / "fig"),
        "--runs-dir",
        str(tmp / "runs"),
    ]


@pytest.mark.parametrize(
    "command, option, extra, expected, when",
    ROWS,
    ids=[f"{r[0]}{r[1]}={(r[2] or ['(left out)'])[-1].strip()[:12]}" for r in ROWS],
)
def test_an_invalid_setting_is_one_line_with_exit_status_2(
    command, option, extra, expected, when, world, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("ONEWORD_LOG", "ERROR")
    main, argv = _base(command, world, tmp_path)
    if extra is None:
        i = argv.index(option)
        argv = argv[:i] + argv[i + 2 :]
    else:
        fill = {
            "{file}": str(world / "file"),
            "{empty}": str(world / "empty"),
            "{two_words}": str(world / "two.safetensors"),
        }
        argv = _set(argv, [next((a.replace(k, v) for k, v in fill.items() if k in a), a) for a in extra])

    def refuse(*a, **k):
        raise AssertionError(f"{command} {option}: a model loaded before the setting was checked")

    if when != POST:  # these limits do not depend on the model: nothing heavy may have loaded
        monkeypatch.setattr(models, "load", refuse)
    if when == PRE:
        monkeypatch.setattr(E.CLIPScorer, "load", classmethod(lambda cls, *a, **k: refuse()))
    rc = cli.run(main, argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, (argv, err)
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], (expected, lines[0])


def test_vectors_100_on_the_tiny_model_names_the_largest_that_fits(tmp_path):
    """The reported case, as a user runs it: a real process, one line, the limit named and correct."""
    argv = [sys.executable, "-m", "inversion.train", *train_argv(tmp_path, "--vectors", "100")]
    r = subprocess.run(argv, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    fits = max_vectors(ldm.tiny_model(0).tokenizer, load_templates("object") + ("a photo of {}",))
    assert line == (
        f"error: VECTORS=100 does not fit the 77-token text context with TEMPLATES=object; "
        f"the largest VECTORS that fits is {fits}"
    )


def test_the_largest_vectors_that_fits_trains_and_one_more_does_not(tmp_path):
    """The named limit is exact: at it every template keeps the whole word and the rows get gradients."""
    tok = ldm.tiny_model(0).tokenizer
    fits = max_vectors(tok, load_templates("object"), dual_templates("object"))
    assert 1 <= fits < 77
    longest = max(
        load_templates("object") + tuple(dual_templates("object")),
        key=lambda t: len(tok.encode(t.replace("{}", " "))) + (t.count("{}") == 2),
    )
    assert len(tok.encode(longest.replace("{}", " "))) + fits + 2 + (longest.count("{}") == 2) <= 77
    argv = train_argv(tmp_path, "--vectors", str(fits), "--per-image-tokens", "--steps", "1", "--save-every", "1")
    out = T.train(TrainConfig.from_argv(argv))
    assert (out / "learned_embeds.safetensors").is_file()
    with pytest.raises(T.InversionError, match=f"largest VECTORS that fits is {fits}"):
        T.train(
            TrainConfig.from_argv(train_argv(tmp_path, "--vectors", str(fits + 1), "--per-image-tokens", out="more"))
        )


def test_max_bad_steps_1_stops_only_on_a_real_nan(tmp_path, monkeypatch):
    """The smallest allowed value trains normally; the reported `-1` is refused above."""
    out = T.train(TrainConfig.from_argv(train_argv(tmp_path, "--max-bad-steps", "1")))
    rows = T.read_loss_csv(out / "loss.csv", 99)
    assert len(rows) == 3 and all(math.isfinite(r[1]) and r[3] == 0 for r in rows)


def test_too_many_progressive_steps_warn_that_vectors_never_train(tmp_path, caplog):
    T.train(TrainConfig.from_argv(train_argv(tmp_path, "--vectors", "3", "--progressive", "2")))
    assert "the last vectors never train" in caplog.text
