"""Interruptions and faults: kill -9 at random moments, a disk that fills during a save, Ctrl-C while
training and while sampling. Nothing already saved may be lost, and every stop says what to do next."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, subprocess_env, train_argv
from PIL import Image

from inversion import train as T
from inversion.config import TrainConfig
from inversion.embedding import load_embedding_file

PY = sys.executable
MAIN_FILES = ("embeddings.pt", "learned_embeds.safetensors", "cat.pt")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _loss_steps(run: Path) -> list[int]:
    return [r[0] for r in T.read_loss_csv(run / "loss.csv", 10**9)]


def _check_run_dir(run: Path) -> int:
    """Everything a killed run leaves must load; returns the step of its resume state (0: none yet)."""
    if (run / "args.json").exists():
        json.loads((run / "args.json").read_text())
    for f in sorted((run / "steps").glob("*")) if (run / "steps").is_dir() else []:
        if not f.name.startswith("."):  # temp files of an unfinished save are ignored
            assert torch.isfinite(next(iter(load_embedding_file(f).values()))).all(), f
    for name in MAIN_FILES:
        if (run / name).exists():
            assert torch.isfinite(next(iter(load_embedding_file(run / name).values()))).all(), name
    if not (run / "state.pt").exists():
        return 0
    state = T.load_state(run / "state.pt")
    step = state["step"]
    saved = {
        k: load_embedding_file(run / "steps" / f"learned_embeds-step{k}.safetensors")["<cat>"]
        for k in (step, step + 1)
        if (run / "steps" / f"learned_embeds-step{k}.safetensors").exists()
    }
    assert step in saved and torch.equal(saved[step], state["vectors"])
    for name in MAIN_FILES:  # the latest save, or the one after it when the kill fell between file and state
        v = next(iter(load_embedding_file(run / name).values()))
        assert any(torch.equal(v, s) for s in saved.values()), name
    return step


ZYGOTE = r"""
import json, os, sys, traceback
import torch
torch.set_num_threads(1)
import torch._dynamo                       # what AdamW imports on first use
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
import ldm
from inversion import train as T
for line in sys.stdin:                      # one training process per line, forked from warm imports
    argv = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            T.train(T.TrainConfig.from_argv(argv))
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(status, flush=True)
"""


@pytest.mark.slow
def test_kill_9_at_20_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    """One run directory, 20 SIGKILLs at random moments (start-up, steps, saves every step), a RESUME after each;
    after every kill all files load and the state matches its saved step; in the end the loss log and vectors
    equal those of an uninterrupted run, bit for bit."""
    seed = int(os.environ.get("ONEWORD_KILL_SEED", "8"))
    rng = random.Random(seed)
    run = tmp_path / "run"
    first = train_argv(tmp_path, "--steps", "100000", "--save-every", "1", out="run")
    log = open(tmp_path / "zygote.log", "w")
    zygote = subprocess.Popen(
        [PY, "-c", ZYGOTE],
        cwd=ROOT,
        env=subprocess_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    kills, steps_seen, delays, mid_save = 0, [], [], 0
    try:
        while kills < 20 or (sum(s > 0 for s in steps_seen) < 10 and kills < 40):  # slow machine: kill more
            argv = first if not (run / "args.json").exists() else ["--resume", str(run), "--no-progress"]
            if argv is first and run.exists():
                argv = [*first, "--overwrite"]  # killed before args.json: nothing to resume yet
            zygote.stdin.write(json.dumps(argv) + "\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            delay = rng.uniform(0.1, 1.8)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            status = int(zygote.stdout.readline())
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (status, delay)
            kills += 1
            delays.append(round(delay, 2))
            mid_save += bool(list(run.rglob(".*.tmp")))  # the kill fell between a temp file and its rename
            step = _check_run_dir(run)
            assert not steps_seen or step >= steps_seen[-1], "a resume went backwards"
            steps_seen.append(step)
        last = steps_seen[-1]
        final = last + 3
        zygote.stdin.write(json.dumps(["--resume", str(run), "--no-progress", "--steps", str(final)]) + "\n")
        zygote.stdin.flush()
        zygote.stdout.readline()
        assert int(zygote.stdout.readline()) == 0, (tmp_path / "zygote.log").read_text()[-3000:]
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=60)
        log.close()
    print(f"kill seed {seed}: delays {delays} s, saved steps after each kill {steps_seen}, {mid_save} kills mid-save")
    assert sum(s > 0 for s in steps_seen) >= 10, "most kills should land after the first save"
    assert _loss_steps(run) == list(range(1, final + 1))  # no gap, no duplicate after 20 resumes
    ref_argv = train_argv(tmp_path, "--steps", str(final), "--save-every", str(final), out="ref")
    ref = T.train(TrainConfig.from_argv(ref_argv))
    assert (run / "loss.csv").read_text() == (ref / "loss.csv").read_text()
    for name in MAIN_FILES:
        assert torch.equal(load_embedding_file(run / name)["<cat>"], load_embedding_file(ref / name)["<cat>"])
    assert not list(run.rglob(".*.tmp")), "a resume removes the temp files of the saves a kill interrupted"


@pytest.mark.parametrize("victim", ["embedding", "state"])
def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_file(tmp_path, capsys, monkeypatch, victim):
    """RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG), as a full disk refuses them (ENOSPC)."""
    monkeypatch.setenv("ONEWORD_LOG", "WARNING")
    out = T.train(TrainConfig.from_argv(train_argv(tmp_path, "--steps", "2", "--save-every", "2")))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    sizes = {p.name: len(b) for p, b in before.items()}
    small = max(sizes["args.json"], sizes["loss.csv"]) + 512
    limit = {"embedding": small, "state": sizes["state.pt"] - 1}[victim]
    assert limit < sizes["state.pt"] and (victim == "state" or limit < sizes["embeddings.pt"])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        rc = T.cli_main(["--resume", str(out), "--steps", "4", "--no-progress"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and not any("Traceback" in line for line in err), err
    failed = "steps/embeddings-step4.pt" if victim == "embedding" else "state.pt"
    assert f"{failed}: File too large; the previous file is unchanged — free some space" in errors[0]
    # a resume rewrites args.json and loss.csv first; when state.pt is the file that fails, the embedding files
    # before it in the save already hold step 4 (and a resume from the step-2 state recomputes them exactly)
    moved = {"loss.csv", "args.json"} | (set() if victim == "embedding" else set(MAIN_FILES))
    for p, data in before.items():
        if p.name not in moved:
            assert p.read_bytes() == data, p
    for name in MAIN_FILES:
        load_embedding_file(out / name)
    assert T.load_state(out / "state.pt")["step"] == 2
    assert not [p for p in out.rglob(".*.tmp")], "no temp file is left behind"
    resumed = T.train(TrainConfig.from_argv(["--resume", str(out), "--steps", "4", "--no-progress"]))
    assert T.load_state(resumed / "state.pt")["step"] == 4 and _loss_steps(resumed) == [1, 2, 3, 4]


def test_ctrl_c_during_training_saves_and_exits_0(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [PY, "-m", "inversion.train", *train_argv(tmp_path, "--steps", "100000", "--save-every", "100000")],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while len(_loss_steps(run)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    state = T.load_state(run / "state.pt")
    step = state["step"]
    assert f"stopped by Ctrl-C at step {step} of 100000" in stdout and f"RESUME={run}" in stdout
    assert "finishing this step and saving" in stderr and "Traceback" not in stderr
    assert _loss_steps(run) == list(range(1, step + 1))
    for name in MAIN_FILES:
        assert torch.equal(load_embedding_file(run / name)["<cat>"], state["vectors"])
    T.train(TrainConfig.from_argv(["--resume", str(run), "--steps", str(step + 2), "--no-progress"]))
    assert T.load_state(run / "state.pt")["step"] == step + 2 and _loss_steps(run) == list(range(1, step + 3))


def test_ctrl_c_during_sampling_keeps_the_images_already_written(tmp_path):
    out = tmp_path / "samples"
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "apps.sample",
            "--model",
            "tiny",
            "--prompt",
            "a photo of a cat",
            "--n",
            "200",
            "--batch-size",
            "1",
            "--steps",
            "4",
            "--H",
            "32",
            "--W",
            "32",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while (not out.is_dir() or len(list(out.glob("0*.png"))) < 3) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    pngs = sorted(out.glob("0*.png"))
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert f"interrupted: the {len(pngs)} image(s) already written in {out} are kept" in stderr
    assert 3 <= len(pngs) < 200 and not list(out.glob(".tmp-*")), "only whole images, no temp files"
    for i, p in enumerate(pngs):
        assert p.name.startswith(f"{i:05d}-")
        with Image.open(p) as im:
            im.load()
            assert im.size == (32, 32) and "a photo of a cat" in im.text["parameters"]
