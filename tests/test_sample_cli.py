"""`python -m apps.sample` / `make sample` on the tiny model: files, metadata, determinism, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "apps.sample", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


BASE = ("--model", "tiny", "--n", "2", "--steps", "3", "--H", "32", "--W", "32")


def test_sample_writes_pngs_with_a1111_parameters(tmp_path):
    r = run("--prompt", "a photo of a cat", "--neg", "blurry", "--seed", "5", "--out", str(tmp_path), *BASE)
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    assert files == ["00000-5.png", "00000-grid.png", "00001-6.png"]
    params = Image.open(tmp_path / "00001-6.png").text["parameters"]
    assert params.splitlines() == [
        "a photo of a cat",
        "Negative prompt: blurry",
        "Steps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 6, Size: 32x32, Model hash: tiny, Model: tiny",
    ]


def test_same_seed_gives_byte_identical_pngs_and_never_overwrites(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert run("--prompt", "a cat", "--seed", "1", "--out", str(out), *BASE).returncode == 0
    assert (a / "00000-1.png").read_bytes() == (b / "00000-1.png").read_bytes()
    assert run("--prompt", "a cat", "--seed", "1", "--out", str(a), *BASE).returncode == 0
    assert (a / "00002-1.png").read_bytes() == (a / "00000-1.png").read_bytes()  # numbered, not overwritten


@pytest.mark.parametrize(
    "args, message",
    [
        (("--H", "30"), "H=30 must be a positive multiple of 4 (this model's latent factor)"),
        (("--steps", "0"), "STEPS=0 must be at least 1"),
        (("--sampler", "euler_z"), "unknown SAMPLER"),
        (("--model", "sd99"), "unknown MODEL"),
        (("--ckpt", "/nonexistent/model.safetensors"), "no such file"),
        (("--model", "sd15"), "make weights MODEL=sd15"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, message):
    r = run("--prompt", "a cat", "--out", str(tmp_path), "--model", "tiny", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], r.stderr
    assert "Traceback" not in r.stderr


def test_not_a_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_text("hello, I am text")
    r = run("--prompt", "a cat", "--out", str(tmp_path / "o"), "--ckpt", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: ")


def test_unwritable_out_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run("--prompt", "a cat", "--out", str(blocker / "sub"), *BASE)
    assert r.returncode == 2 and "cannot write to" in r.stderr and "Traceback" not in r.stderr


def test_fp16_on_cpu_falls_back_with_a_notice(tmp_path):
    r = run("--prompt", "a cat", "--out", str(tmp_path), "--dtype", "fp16", "--device", "cpu", *BASE)
    assert r.returncode == 0, r.stderr
    assert "using fp32" in r.stderr


def test_long_prompt_warns_with_dropped_words_then_samples(tmp_path):
    prompt = "a cat " * 60 + "zebra finale"
    r = run("--prompt", prompt, "--out", str(tmp_path), *BASE)
    assert r.returncode == 0, r.stderr
    assert "finale" in r.stderr and len(list(tmp_path.glob("*.png"))) == 3
