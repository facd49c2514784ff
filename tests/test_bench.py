"""Smoke test of the `make bench` harness on the tiny config: same weights in both libraries, JSON fields."""
from __future__ import annotations

import json

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
    assert R.main(["--config", "tiny", "--device", "cpu", "--quick", "--reps", "1", "--sample-steps", "2",
                   "--train-steps", "1", "--batches", "1", "--size", "32", "--threads", "1",
                   "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("device", "device_name", "nproc", "threads", "versions", "date", "loadavg_start", "loadavg_end",
                "sampling", "training", "attention", "notes"):
        assert key in report
    assert report["device"] == "cpu" and report["threads"] == 1
    assert {"torch", "diffusers", "transformers"} <= set(report["versions"])
    (sample,), (train,) = report["sampling"], report["training"]
    for row in (sample, train):
        for key in ("size", "batch", "dtype", "oneword_s_per_step", "diffusers_s_per_step", "ratio",
                    "oneword_peak_delta_mib", "diffusers_peak_delta_mib", "oneword_samples", "diffusers_samples"):
            assert key in row
        assert row["oneword_s_per_step"] > 0 and row["diffusers_s_per_step"] > 0
        assert row["ratio"] == pytest.approx(row["diffusers_s_per_step"] / row["oneword_s_per_step"])
    assert sample["kind"] == "sampling" and len(sample["oneword_samples"]) == 1  # 2 steps, first excluded
    assert train["kind"] == "train" and train["batch"] == 1 and len(train["diffusers_samples"]) == 1
