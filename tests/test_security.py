"""Security: no pickle runs code without an explicit opt-in, every download is
sha256-verified, names from files/tokens/folders never write outside the output folder, nothing is overwritten
without --overwrite; and the CI gate runs ruff plus the README's commands."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from helpers import train_argv
from hypothesis import given, settings
from hypothesis import strategies as st

import ldm
from inversion import train as T
from inversion.config import TrainConfig
from inversion.embedding import InversionError, LearnedWords, file_stem, load_embedding_file, save_embedding_files
from ldm.checkpoint import CheckpointError
from ldm.tokenizer import Tokenizer
from weights import download as W

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = [
    p for folder in ("ldm", "inversion", "weights", "experiments/figures") for p in (ROOT / folder).rglob("*.py")
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class Evil:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _args(tmp_path, *extra: str, out: str = "run") -> list[str]:
    return train_argv(tmp_path, *extra, out=out, steps=1, save_every=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sec")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return T.train(TrainConfig.from_argv(_args(tmp)))
    finally:
        torch.set_num_threads(n)


# --- no pickle runs code without an opt-in ----------------------------------------------------------------


def test_pickled_code_in_an_embedding_file_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"string_to_param": {"*": Evil(marker)}, "name": "x"}, tmp_path / "evil.pt")
    with pytest.raises(
        InversionError,
        match=r"evil.pt: not a readable embedding file \(it holds pickled Python "
        r"code \((posix|os|nt)\.system\), which was not run\)",
    ):
        load_embedding_file(tmp_path / "evil.pt")
    assert not marker.exists()


def test_pickled_code_in_a_resume_state_is_refused_not_run(run, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setenv("ONEWORD_LOG", "WARNING")
    victim = tmp_path / "victim"
    shutil.copytree(run, victim)
    info = json.loads((victim / "args.json").read_text())
    info["options"]["out"] = info["options"]["resume"] = str(victim)
    (victim / "args.json").write_text(json.dumps(info))
    marker = tmp_path / "pwned"
    state = T.load_state(run / "state.pt")
    state["rng"]["python"] = Evil(marker)
    torch.save(state, victim / "state.pt")
    rc = T.cli_main(["--resume", str(victim), "--steps", "2", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not marker.exists() and "Traceback" not in "\n".join(err)
    assert re.search(
        r"state.pt: unreadable resume state \(it holds pickled Python code \((posix|os|nt)\.system\), "
        r"which was not run\); start a new run",
        err[-1],
    ), err[-1]


def test_pickled_code_in_checkpoints_needs_the_opt_in(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(
        {"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "evil": Evil(marker)}, tmp_path / "model.ckpt"
    )
    with pytest.raises(CheckpointError, match="nothing was executed"):
        ldm.load_model(tmp_path / "model.ckpt")
    assert not marker.exists()
    diffusers = tmp_path / "folder"
    (diffusers / "unet").mkdir(parents=True)
    torch.save({"w": Evil(marker)}, diffusers / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="nothing was executed"):
        ldm.load_model(diffusers)
    assert not marker.exists()
    with pytest.raises(CheckpointError):  # the explicit opt-in (--allow-pickle) is the only way it runs
        ldm.load_model(tmp_path / "model.ckpt", allow_pickle=True)
    assert marker.exists()


def test_pickled_code_in_clip_weights_is_refused_not_run(tmp_path):
    from inversion.clip import read_clip_state_dict

    marker = tmp_path / "pwned"
    torch.save({"visual.proj": Evil(marker)}, tmp_path / "clip.pt")
    with pytest.raises(InversionError, match="CLIP weights .*clip.pt are not readable"):
        read_clip_state_dict(tmp_path / "clip.pt")
    assert not marker.exists()


def test_library_code_never_unpickles_without_weights_only():
    """Static guard: every torch.load passes weights_only (True, or `not allow_pickle` behind the flag), and no
    pickle/yaml/eval/exec/marshal loader appears in library code."""
    banned = re.compile(
        r"weights_only\s*=\s*False|pickle\.loads?\(|yaml\.(unsafe_)?load\(|(?<![\w.])eval\(|"
        r"(?<![\w.])exec\(|marshal\.loads?\(|allow_pickle\s*=\s*True|import dill|import shelve"
    )
    offenders, loads = [], []
    for p in LIBRARY:
        for n, line in enumerate(p.read_text().splitlines(), 1):
            code = re.sub(r'"[^"]*"|\'[^\']*\'', '""', line.split("#")[0])  # strings and comments aside
            if banned.search(code):
                offenders.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
            if "torch.load(" in line:
                loads.append((p.relative_to(ROOT), line))
    assert not offenders, offenders
    assert loads and all(re.search(r"weights_only=(True|not allow_pickle)", line) for _, line in loads), loads


# --- downloads ---------------------------------------------------------------------------------------------


def test_only_the_verified_downloader_touches_the_network():
    net = re.compile(
        r"urlopen|urllib\.request|import requests|http\.client|hf_hub_download|snapshot_download|"
        r"torch\.hub|pretrained=(?!None)[\w\"']"
    )
    users = sorted(
        {
            str(p.relative_to(ROOT))
            for p in LIBRARY
            for line in p.read_text().splitlines()
            if net.search(line) and not line.lstrip().startswith("#")
        }
    )
    assert users == ["weights/download.py"], users


def test_every_download_is_verified_or_refused(tmp_path, monkeypatch):
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(b"the user's own file")
    with pytest.raises(W.DownloadError, match="sha256 does not match"):  # no network is even tried
        W.fetch("https://invalid.invalid/x", dest, "0" * 64, progress=False)
    assert dest.read_bytes() == b"the user's own file"
    entries = {
        "up": {"file": "../escape.bin", "url": "https://example.invalid/x", "sha256": "0" * 64},
        "abs": {"file": "/tmp/escape.bin", "url": "https://example.invalid/x", "sha256": "0" * 64},
        "plain": {"file": "x.bin", "url": "http://example.invalid/x", "sha256": "0" * 64},
        "nohash": {"file": "y.bin", "url": "https://example.invalid/y", "sha256": None},
    }
    monkeypatch.setattr(W, "manifest", lambda: entries)
    for name, message in (("up", "outside"), ("abs", "outside"), ("plain", "not https"), ("nohash", "--unverified")):
        with pytest.raises(W.DownloadError, match=message):
            W.download(name, tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


# --- nothing written outside the output folder -------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(token=st.text(max_size=40))
def test_file_names_from_tokens_stay_in_the_folder(token):
    from inversion.evaluate import _slug

    for name in (file_stem(token), _slug(token)):
        assert "/" not in name and "\\" not in name and "\0" not in name and name not in (".", "..")
    out = Path("/tmp/oneword-out")
    assert (out / f"{file_stem(token)}-step1.pt").resolve().parent == out.resolve()
    assert file_stem(token) and not file_stem(token).startswith(".")


NASTY = [
    "../../evil",
    "/etc/evil",
    "..",
    "a/../../b",
    "C:\\evil\\x",
    "<x>/../../y",
    "....",
    "~/.bashrc",
    "%2e%2e%2fevil",
    "evil\x00.pt",
]


def test_nasty_tokens_save_inside_the_folder(tmp_path):
    model = ldm.tiny_model(0)
    out = tmp_path / "out"
    for i, token in enumerate(NASTY):
        model.tokenizer = Tokenizer("sd1")
        try:
            words = LearnedWords(model, token, 2, ["cat"], per_image=2)
        except InversionError as e:  # e.g. '..' is a word of CLIP's vocabulary
            assert "already a vocabulary word" in str(e)
            continue
        for path in save_embedding_files(out, words, 1, suffix=f"-{i}"):
            assert path.resolve().parent == out.resolve(), (token, path)
            assert token in load_embedding_file(path) or path.name.startswith(file_stem(token))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_training_with_a_traversal_token_and_a_dotdot_concept_stays_inside(tmp_path, monkeypatch):
    import shutil

    from inversion.data import CONCEPTS_DIR

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c" / "sub").mkdir(parents=True)
    for f in sorted(CONCEPTS_DIR.joinpath("cat").glob("*.jp*g"))[:2]:
        shutil.copy(f, tmp_path / "c")
    concept = str(tmp_path / "c" / "sub" / "..")  # its name is '..'
    argv = [
        "--concept",
        concept,
        "--model",
        "tiny",
        "--size",
        "32",
        "--batch",
        "1",
        "--steps",
        "1",
        "--val-every",
        "1",
        "--val-n",
        "1",
        "--val-steps",
        "1",
        "--init",
        "cat",
        "--per-image-tokens",
        "--latent-cache",
        "",
        "--no-progress",
    ]
    out = T.train(TrainConfig.from_argv(argv))  # default OUT and default token <..>
    assert out.resolve().parent == (tmp_path / "runs").resolve()
    out2 = T.train(TrainConfig.from_argv([*argv, "--token", "../../../evil", "--out", str(tmp_path / "o2")]))
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    allowed = (out.resolve(), out2.resolve(), (tmp_path / "c").resolve())
    assert all(any(p.resolve().is_relative_to(a) for a in allowed) for p in written), written
    assert (out2 / "evil.pt").is_file() and load_embedding_file(out2 / "evil.pt").keys() == {"../../../evil"}


# --- nothing overwritten without --overwrite ---------------------------------------------------------------


def test_no_tool_overwrites_without_the_flag(run, tmp_path, capsys, monkeypatch):
    from inversion import evaluate as E

    monkeypatch.setenv("ONEWORD_LOG", "WARNING")
    mine = tmp_path / "mine.json"
    mine.write_text("the user's file")
    rc = E.cli_main(["--run", str(run), "--out", str(mine), "--clip-weights", "random", "--n", "1"])
    assert rc == 2 and "mine.json already exists; pass --overwrite" in capsys.readouterr().err
    assert mine.read_text() == "the user's file"
    (run / "eval-samples").mkdir(exist_ok=True)
    (run / "eval-samples" / "00-a-photo-of-s.png").write_bytes(b"keep")
    rc = E.cli_main(["--run", str(run), "--out", str(tmp_path / "new.json"), "--save-samples", "--n", "1"])
    assert rc == 2 and "eval-samples already holds grids; pass --overwrite" in capsys.readouterr().err
    assert (run / "eval-samples" / "00-a-photo-of-s.png").read_bytes() == b"keep"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    rc = T.cli_main(_args(tmp_path, out="busy"))
    assert rc == 2 and "already holds files; choose another OUT, pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]


def test_figures_do_not_redraw_over_an_existing_figure_without_the_flag(tmp_path):
    import argparse

    from experiments.figures import _common as C

    (tmp_path / "variations.png").write_bytes(b"an earlier figure")
    with pytest.raises(C.FigureError, match="variations.png already exists; pass --overwrite"):
        C.out_dir(argparse.Namespace(out=str(tmp_path), overwrite=False), "variations")
    assert C.out_dir(argparse.Namespace(out=str(tmp_path), overwrite=True), "variations") == tmp_path
    assert C.out_dir(argparse.Namespace(out=str(tmp_path), overwrite=False), "style") == tmp_path


# --- the CI gate -------------------------------------------------------------------------------------------


def test_make_test_runs_ruff_and_ci_runs_the_readme_commands():
    makefile = (ROOT / "Makefile").read_text()
    test_rule = re.search(r"^test:(.*)$", makefile, re.M).group(1)
    assert "lint" in test_rule.split() and re.search(r"^lint:.*\n\t.*ruff check \.", makefile, re.M)
    ci = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))
    ]
    readme = (ROOT / "README.md").read_text()
    assert ci == ["make install", "make test"], ci
    assert "make test" in readme and "make install" in readme
