"""Numerics: the NaN/inf guard (skip, count, stop after K in a row with advice, nothing
lost) and --deterministic (bit-identical reruns; what it promises per device)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import train_argv

import ldm
from inversion import train as T
from inversion.config import TrainConfig
from inversion.embedding import InversionError, load_embedding_file
from ldm import attention, determinism

CUDA = torch.cuda.is_available()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def restore_determinism():
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        attention._default_backend,
        os.environ.get("ONEWORD_KERNELS"),
    )
    yield
    torch.use_deterministic_algorithms(saved[0])
    (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    ) = saved[1:5]
    attention.set_backend(saved[5])
    if saved[6] is None:
        os.environ.pop("ONEWORD_KERNELS", None)
    else:
        os.environ["ONEWORD_KERNELS"] = saved[6]


def _args(tmp_path, *extra: str, out: str = "run") -> list[str]:
    return train_argv(tmp_path, *extra, out=out, steps=6, save_every=1)


def _nan_model(bad_calls: set[int] | None):
    """The tiny model whose UNet returns NaN on the given call numbers (all calls when None)."""
    model = ldm.tiny_model(0)
    forward, calls = model.unet.forward, [0]

    def patched(x, t, c):
        calls[0] += 1
        out = forward(x, t, c)
        return out * float("nan") if bad_calls is None or calls[0] in bad_calls else out

    model.unet.forward = patched
    return model


def _vectors(run, step):
    return load_embedding_file(run / "steps" / f"learned_embeds-step{step}.safetensors")["<cat>"]


def test_nan_steps_are_skipped_counted_and_leave_the_vectors_alone(tmp_path, caplog):
    out = T.train(TrainConfig.from_argv(_args(tmp_path)), model=_nan_model({2, 3}))
    rows = T.read_loss_csv(out / "loss.csv", 6)
    assert [r[3] for r in rows] == [0, 1, 2, 2, 2, 2]  # the `skipped` column counts them
    assert torch.equal(_vectors(out, 1), _vectors(out, 3)) and not torch.equal(_vectors(out, 3), _vectors(out, 4))
    assert all(torch.isfinite(_vectors(out, k)).all() for k in range(1, 7))
    state = T.load_state(out / "state.pt")
    assert (state["skipped"], state["bad_in_row"]) == (2, 0)
    assert torch.isfinite(state["optimizer"]["state"][0]["exp_avg_sq"]).all()  # no NaN in Adam's moments
    assert "2 step(s) skipped for NaN/inf loss or gradients" in caplog.text


def test_k_bad_steps_in_a_row_stop_with_advice_and_keep_the_vectors(tmp_path, capsys, monkeypatch):
    from inversion import models

    monkeypatch.setenv("ONEWORD_LOG", "WARNING")
    monkeypatch.setattr(models, "load", lambda *a, **k: _nan_model({3, 4, 5, 6}))
    rc = T.cli_main(_args(tmp_path, "--max-bad-steps", "3", "--steps", "20", "--save-every", "100"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(err) == 1
    assert "3 steps in a row gave NaN/inf loss or gradients (last at step 5;" in err[0]
    assert "lower LR, use PRECISION=bf16 or fp32, or check the checkpoint" in err[0]
    run = tmp_path / "run"
    state = T.load_state(run / "state.pt")  # saved at the stop, though SAVE_EVERY=100
    assert (state["step"], state["skipped"], state["bad_in_row"]) == (5, 3, 3)
    assert torch.equal(load_embedding_file(run / "learned_embeds.safetensors")["<cat>"], _vectors(run, 5))
    assert torch.isfinite(state["vectors"]).all()


def test_nan_samples_are_reported_and_written_black(caplog):
    model = ldm.tiny_model(0)
    model.vae.decode = lambda z: torch.full((z.shape[0], 3, z.shape[2] * 2, z.shape[3] * 2), float("nan"))
    images = model.sample(["a cat"] * 2, steps=1, height=32, width=32, seed=7, progress=False)
    assert "NaN/inf in 2 of 2 sample(s) (seeds 7, 8)" in caplog.text and "use DTYPE=bf16 or fp32" in caplog.text
    assert all(im.getextrema() == ((0, 0), (0, 0), (0, 0)) for im in images)


def test_deterministic_mode_sets_its_switches_and_reruns_are_bit_identical(tmp_path, restore_determinism):
    assert set(determinism.GUARANTEES) == {"cpu", "cuda", "mps"}
    doc = determinism.__doc__
    assert all(f"\n  {d} " in doc for d in ("cpu", "cuda", "mps"))  # the promise is written down per device
    a = T.train(TrainConfig.from_argv(_args(tmp_path, "--deterministic", "--steps", "3", out="a")))
    assert torch.are_deterministic_algorithms_enabled() and attention.current_backend() == "math"
    assert os.environ["ONEWORD_KERNELS"] == "math" and not torch.backends.cudnn.benchmark
    b = T.train(TrainConfig.from_argv(_args(tmp_path, "--deterministic", "--steps", "3", out="b")))
    assert (a / "loss.csv").read_text() == (b / "loss.csv").read_text()
    assert torch.equal(
        load_embedding_file(a / "learned_embeds.safetensors")["<cat>"],
        load_embedding_file(b / "learned_embeds.safetensors")["<cat>"],
    )


def test_deterministic_sampling_gives_identical_files(tmp_path, restore_determinism, capsys):
    from apps import sample as S

    for out in ("a", "b"):
        assert (
            S.main(
                [
                    "--model",
                    "tiny",
                    "--prompt",
                    "a cat",
                    "--n",
                    "2",
                    "--steps",
                    "2",
                    "--H",
                    "32",
                    "--W",
                    "32",
                    "--device",
                    "cpu",
                    "--deterministic",
                    "--out",
                    str(tmp_path / out),
                ]
            )
            == 0
        )
    names = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert names and all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_fp16_guard_and_deterministic_reruns(tmp_path, restore_determinism):
    """fp16 on CUDA: GradScaler overflow steps and injected NaN steps are skipped and counted, and two
    --deterministic runs on the same GPU agree bit for bit."""
    runs = []
    for out in ("a", "b"):
        model = _nan_model({2}).to("cuda")
        runs.append(
            T.train(
                TrainConfig.from_argv(
                    _args(
                        tmp_path, "--device", "cuda", "--precision", "fp16", "--deterministic", "--steps", "4", out=out
                    )
                ),
                model=model,
            )
        )
    a, b = runs
    state = T.load_state(a / "state.pt")
    assert state["skipped"] >= 1 and torch.isfinite(state["vectors"]).all()
    assert (a / "loss.csv").read_text() == (b / "loss.csv").read_text()
    assert torch.equal(
        load_embedding_file(a / "learned_embeds.safetensors")["<cat>"],
        load_embedding_file(b / "learned_embeds.safetensors")["<cat>"],
    )
    with pytest.raises(InversionError, match="steps in a row gave NaN/inf"):
        T.train(
            TrainConfig.from_argv(
                _args(tmp_path, "--device", "cuda", "--precision", "fp16", "--max-bad-steps", "2", out="c")
            ),
            model=_nan_model(None).to("cuda"),
        )
