"""Smoke test of the `make bench` harness on the tiny config: same weights in both libraries, JSON fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from bench import common as C  # noqa: E402
from bench import run as R  # noqa: E402


@pytest.fixture(scope="module")
def tiny_pair():
    config = C.get_config("tiny")
    unet, vae, text = C.random_modules(config, seed=0)
    d_unet, d_vae, d_text = C.diffusers_modules(C.original_state_dict(unet, vae, text), config)
    return config, (unet, vae, text), (d_unet, d_vae, d_text)


def test_diffusers_modules_share_our_weights_and_agree(tiny_pair):
    _, (unet, vae, text), (d_unet, d_vae, d_text) = tiny_pair
    assert d_unet.conv_in.weight.data_ptr() == unet.input_blocks[0][0].weight.data_ptr()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        ours, theirs = unet(x, t, ctx), d_unet(x, t, ctx).sample
        assert float((ours - theirs).abs().max() / ours.abs().max()) < 1e-5
        ids = torch.randint(0, 49406, (2, 77), generator=g)
        assert float((text(ids) - d_text(ids)[0]).abs().max()) < 1e-5


def test_hf_tokenizer_matches_ours(tmp_path):
    from ldm.tokenizer import Tokenizer

    tok = C.hf_tokenizer(tmp_path)
    prompts = ["a photo of a cat, sitting!!", "", "x " * 100]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, Tokenizer("sd1")(prompts))


def test_rss_peak_sees_an_allocation():
    with C.RSSPeak() as m:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB
        x += 1
        del x
    if m.delta_mib is not None:  # Linux with /proc/self/clear_refs
        assert m.delta_mib > 48


def test_tiny_run_writes_json_with_every_field(tmp_path):
    out = tmp_path / "r.json"
    assert (
        R.main(
            [
                "--config",
                "tiny",
                "--device",
                "cpu",
                "--quick",
                "--reps",
                "1",
                "--sample-steps",
                "2",
                "--train-steps",
                "1",
                "--batches",
                "1",
                "--size",
                "32",
                "--threads",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    for key in (
        "device",
        "device_name",
        "nproc",
        "threads",
        "versions",
        "date",
        "loadavg_start",
        "loadavg_end",
        "sampling",
        "training",
        "attention",
        "notes",
    ):
        assert key in report
    assert report["device"] == "cpu" and report["threads"] == 1
    assert {"torch", "diffusers", "transformers"} <= set(report["versions"])
    (sample,), (train,) = report["sampling"], report["training"]
    for row in (sample, train):
        for key in (
            "size",
            "batch",
            "dtype",
            "oneword_s_per_step",
            "diffusers_s_per_step",
            "ratio",
            "oneword_peak_delta_mib",
            "diffusers_peak_delta_mib",
            "oneword_samples",
            "diffusers_samples",
        ):
            assert key in row
        assert row["oneword_s_per_step"] > 0 and row["diffusers_s_per_step"] > 0
        assert row["ratio"] == pytest.approx(row["diffusers_s_per_step"] / row["oneword_s_per_step"])
    assert sample["kind"] == "sampling" and len(sample["oneword_samples"]) == 1  # 2 steps, first excluded
    assert train["kind"] == "train" and train["batch"] == 1 and len(train["diffusers_samples"]) == 1


# --- bench/gpu.sh and the phases that must survive a bare GPU machine ---------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _fake_wheel(folder: Path, dist: str) -> Path:
    """A minimal valid pure-Python wheel of distribution `dist` (module `dist`)."""
    path = folder / f"{dist}-0.1-py3-none-any.whl"
    info = f"{dist}-0.1.dist-info"
    files = {
        f"{dist}/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_gpu_sh_without_venv_falls_back_to_python3_and_stops_at_preflight(tmp_path):
    """A checkout without .venv: python3 from PATH, missing wheels installed, preflight.json written, exit 1."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("bench", "ldm"):
        (repo / name).symlink_to(ROOT / name)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (fake_bin / "python3").chmod(0o755)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels, "onewordfake")
    _fake_wheel(wheels, "torch")  # installed already: never shadowed
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "OUT", "TRITON_INTERPRET", "PYTHONPATH")}
    env.update(PATH=f"{fake_bin}:{env['PATH']}", WHEELS=str(wheels))
    proc = subprocess.run(
        ["bash", str(repo / "bench" / "gpu.sh"), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    log_text = (out / "gpu.log").read_text()
    assert proc.returncode == 1, log_text
    assert "python=python3" in log_text and "preflight failed" in log_text
    assert "installed 1 wheel(s)" in log_text and "onewordfake-0.1" in log_text and "torch-0.1" not in log_text
    report = json.loads((out / "preflight.json").read_text())
    assert report["cuda"] is False and "torch sees no CUDA device" in report["problems"]
    assert report["ldm"] == "ok" and report["optional"]["diffusers"] == diffusers_version()
    assert not (out / "results.json").exists()  # nothing ran past the preflight


def diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def test_preflight_trivial_launch_runs_in_the_interpreter():
    from bench import preflight

    report, problems = preflight.check(allow_cpu=True)
    assert report["triton_launch"] == "ok", report
    assert not any("Triton" in p or "CUDA" in p for p in problems)


def test_phases_write_json_as_they_finish_and_a_failing_phase_costs_only_itself(tmp_path, monkeypatch):
    def no_diffusers(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'diffusers'")

    monkeypatch.setattr(R, "build", no_diffusers)
    out = tmp_path / "r.json"
    args = [
        "--config",
        "tiny",
        "--device",
        "cpu",
        "--quick",
        "--reps",
        "1",
        "--sample-steps",
        "2",
        "--size",
        "32",
        "--threads",
        "1",
        "--out",
        str(out),
        "--phase-dir",
        str(tmp_path / "phases"),
    ]
    assert R.main(args) == 0
    build = json.loads((tmp_path / "phases" / "phase-build.json").read_text())
    assert build["status"] == "failed" and "No module named 'diffusers'" in build["error"]
    oneword = json.loads((tmp_path / "phases" / "phase-oneword.json").read_text())
    assert oneword["status"] == "ok"
    rows = {r["name"]: r for r in oneword["result"]["rows"]}
    assert rows["unet_forward_cfg_batch2"]["ms"] > 0 and rows["sampling_ddim_cfg_batch1_eager"]["it_per_s_last_run"] > 0
    report = json.loads(out.read_text())
    assert report["phases"]["build"]["status"] == "failed" and report["sampling"] == report["training"] == []

    out2 = tmp_path / "late.json"
    assert R.main([*args[:-4], "--out", str(out2), "--deadline-s", "0"]) == 0
    assert {p["status"] for p in json.loads(out2.read_text())["phases"].values()} == {"skipped"}


def test_attention_bench_records_a_failing_row_and_runs_the_rest(monkeypatch):
    import argparse

    import ldm.attention as attn_mod
    from bench import attention as A

    real = attn_mod.attention

    def flaky(q, k, v, *, backend=None, causal=False):
        if backend == "triton":
            raise RuntimeError("PassManager::run failed")
        return real(q, k, v, backend=backend, causal=causal)

    monkeypatch.setattr(attn_mod, "attention", flaky)
    report = A.run(argparse.Namespace(dtype="fp32", batch=1, heads=1, repeats=1, backward=False))
    rows = report["results"]
    assert {r["head_dim"] for r in rows} == {40, 64, 80, 160} and len(rows) == 24
    for r in rows:
        if r["backend"] == "triton":
            assert r["error"] == "RuntimeError: PassManager::run failed" and r["ms"] != r["ms"]
        else:
            assert r["error"] is None and r["ms"] > 0 and r["max_rel_err"] < 1e-5


def test_routes_from_a_forward_and_a_backward_report():
    from bench import attention as A
    from ldm.kernels import routing

    def report(backward, triton_ms):
        rows = [
            dict(head_dim=d, kind=kind, backend=b, ms=(triton_ms[d] if b == "triton" else 1.0))
            for d in (40, 80)
            for kind in ("self", "cross")
            for b in ("math", "sdpa", "triton")
        ]
        return {
            "device": "H200",
            "arch": "sm_90",
            "dtype": "fp16",
            "backward": backward,
            "date": "2026-12-01",
            "timings_meaningful": True,
            "results": rows,
        }

    lines = A.routes(report(False, {40: 0.5, 80: float("nan")}), report(True, {40: 0.9, 80: 0.5}))
    assert len(lines) == 1  # head dim 80 has a failed row: no route
    row = eval(lines[0].rstrip(","), {"Measured": routing.Measured})
    assert row == routing.Measured("sm_90", "float16", 40, 1.0, 2.0, 1.8, 2.0, "H200", "2026-12-01")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(routing, "MEASURED", (row,))
        assert routing.measured_faster("sm_90", torch.float16, 40) == row
        assert routing.measured_faster("sm_80", torch.float16, 40) is None
    with pytest.raises(ValueError, match="forward"):
        A.routes(report(True, {40: 0.5, 80: 0.5}), report(True, {40: 0.5, 80: 0.5}))
