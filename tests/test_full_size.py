"""Full-size SD1/SD2 key sets (≈1.1 B params, fp16, pattern-filled) load strictly from .safetensors, .ckpt and
a diffusers folder written by diffusers' own converters. Slow: several GB of disk and memory."""

from __future__ import annotations

import resource
import shutil

import pytest
import torch
from helpers import full_size_state_dict, module_prefixes, pattern, write_diffusers_folder
from safetensors.torch import save_file

from ldm import config as configs
from ldm.checkpoint import load_model

pytestmark = pytest.mark.slow
PEAK_RSS_LIMIT = 10 * 2**30


def released_extras(config: configs.ModelConfig) -> dict[str, torch.Tensor]:
    """Non-model entries that the released single files carry and a loader must ignore (or use)."""
    betas = torch.linspace(config.linear_start**0.5, config.linear_end**0.5, config.timesteps, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    extras = {
        "betas": betas.float(),
        "alphas_cumprod": alphas.float(),
        "alphas_cumprod_prev": torch.cat([torch.ones(1), alphas[:-1].float()]),
        "sqrt_alphas_cumprod": alphas.sqrt().float(),
        "posterior_variance": betas.float(),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(0, dtype=torch.int32),
    }
    if config.text["kind"] == "clip":
        extras["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:
        extras["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    return extras


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def full(request, tmp_path_factory):
    config = configs.PRESETS[request.param]()
    sd, index = full_size_state_dict(config, torch.float16)
    sd.update(released_extras(config))
    n = sum(v.numel() for k, v in sd.items() if k in index)
    assert 1.0e9 < n < 1.35e9, n
    folder = tmp_path_factory.mktemp(request.param)
    yield config, sd, index, folder
    shutil.rmtree(folder, ignore_errors=True)


def check_loaded(model, config: configs.ModelConfig, index: dict[str, int]) -> None:
    """Every tensor of the loaded model is exactly the pattern its original key was filled with."""
    for prefix, module in zip(module_prefixes(config), (model.unet, model.vae, model.text_encoder)):
        for k, v in module.state_dict().items():
            if k == "text_projection" and bool(v.isnan().all()):
                continue  # absent from diffusers folders, unused by SD
            assert v.dtype == torch.float16, k
            assert torch.equal(v, pattern(index[prefix + k], tuple(v.shape), torch.float16)), prefix + k
    assert torch.allclose(model.schedule.alphas_cumprod[[0, -1]].float(), torch.tensor([0.99915, 0.0046600]), atol=1e-6)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / 2**30:.1f} GiB"


def test_full_size_safetensors(full):
    config, sd, index, folder = full
    path = folder / f"{config.name}.safetensors"
    save_file(sd, str(path))
    model = load_model(path, dtype=torch.float16)
    assert model.config == config
    check_loaded(model, config, index)
    path.unlink()


def test_full_size_ckpt(full):
    config, sd, index, folder = full
    path = folder / f"{config.name}.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000}, path)
    model = load_model(path, dtype=torch.float16)
    assert model.config == config
    check_loaded(model, config, index)
    del model
    path.unlink()


def test_full_size_diffusers_folder(full):
    config, sd, index, folder = full
    target = write_diffusers_folder(sd, config, folder / "diffusers")
    model = load_model(target, dtype=torch.float16)
    assert model.config.unet == config.unet and model.config.vae == config.vae
    if config.text["kind"] == "openclip":  # diffusers stores 23 of 24 layers: run them all, no extra layer
        assert model.config.text == {**config.text, "layers": 23, "output": "last"}
    else:
        assert model.config.text == config.text
    check_loaded(model, config, index)
    del model
    shutil.rmtree(target)
