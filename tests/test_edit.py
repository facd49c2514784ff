"""Editing: SDEdit parity with the original img2img indexing, Blended Latent Diffusion invariants, the
`python -m ldm.edit` CLI, and the offline proof on the shipped shapes model with a learned ring word."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from ldm import pipeline, samplers
from ldm.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]
BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def model():
    return ldm.tiny_model(seed=0)


def picture(size=32, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))


def square_mask(size=32, box=(8, 8, 20, 20), mode="L") -> Image.Image:
    m = Image.new(mode, (size, size), 0)
    m.paste(255 if mode == "L" else (255, 255, 255), box)
    return m


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# --- parity: the original img2img's DDIM stochastic_encode + decode, against diffusers' DDIMScheduler ------

def oracle_img2img(model_fn, z0, noise, steps, strength, eta, generator):
    """The original img2img path, driven through diffusers' DDIMScheduler (CompVis settings: steps_offset=1,
    set_alpha_to_one=False, "leading" spacing → timesteps 981, 961, …, 1 for 50 steps).

    Indexing: the original's t_enc = int(strength·steps) indexes the ascending DDIM subsequence; stochastic_encode
    noises to ts_asc[t_enc] and decode runs ts_asc[:t_enc] in reverse. In diffusers' descending list that is
    `t_start = len − t_enc`: the steps are timesteps[t_start:], but the noise level is timesteps[t_start − 1], one
    step earlier. diffusers' own img2img pipeline noises to timesteps[t_start] instead (no off-by-one), so it is
    driven by hand here with add_noise at timesteps[t_start − 1]."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sch.set_timesteps(steps)
    ts = sch.timesteps
    t_enc = int(strength * steps)
    t_start = len(ts) - t_enc
    x = sch.add_noise(z0, noise, ts[t_start - 1:t_start])
    for t in ts[t_start:]:
        x = sch.step(model_fn(x, t.repeat(x.shape[0])), t, x, eta=eta, generator=generator).prev_sample
    return x, sch


@pytest.mark.parametrize("steps, strength, eta", [(50, 0.75, 0.0), (10, 0.3, 0.0), (20, 0.5, 1.0)])
def test_img2img_latents_equal_the_original_ddim_path(model, steps, strength, eta):
    from diffusers import DDIMScheduler

    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    prompts, negs, scale = ["a red ring", "a photo of a cat"], ["", "blurry"], 3.0
    # ᾱ as diffusers accumulates it (float32) so that both sides use the same numbers
    m = pipeline.LatentDiffusion(model.config, model.unet, model.vae, model.text_encoder, model.tokenizer,
                                 Schedule(DDIMScheduler(**BETAS).alphas_cumprod))
    ours = m.edit_latents(z0, prompts, negs, noise=noise, strength=strength, steps=steps, scale=scale, eta=eta,
                          generator=torch.Generator().manual_seed(5), progress=False)
    model_fn = m._guided(prompts, negs, scale)
    ref, sch = oracle_img2img(model_fn, z0, noise, steps, strength, eta, torch.Generator().manual_seed(5))
    assert rel(ours, ref) <= 1e-5
    # diffusers' own img2img convention (noise to the first step's timestep) is measurably different
    ts = sch.timesteps
    t_start = len(ts) - int(strength * steps)
    x = sch.add_noise(z0, noise, ts[t_start:t_start + 1])
    sch.set_timesteps(steps)
    for t in ts[t_start:]:
        x = sch.step(model_fn(x, t.repeat(2)), t, x, eta=eta, generator=torch.Generator().manual_seed(5)).prev_sample
    assert rel(x, ref) > 1e-3


def test_strength_one_is_text_to_image(model):
    kw = dict(steps=4, scale=3.0, seed=11, progress=False)
    a = model.sample(["a cat", "a dog"], height=32, width=32, **kw)
    b = model.edit(picture(), ["a cat", "a dog"], strength=1.0, **kw)
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5, float("nan"), True])
def test_strength_outside_0_1_is_an_error(model, strength):
    with pytest.raises(ValueError, match="strength must be in"):
        model.edit(picture(), "a cat", strength=strength, steps=4, progress=False)


def test_strength_counts_steps_like_the_original(model):
    calls = []
    model.edit(picture(), "a cat", strength=0.5, steps=10, seed=1, progress=False,
               callback=lambda i, t, x: calls.append(t))
    assert calls == [401, 301, 201, 101, 1]  # int(0.5·10) = 5 steps: ts_asc[:5] reversed
    calls.clear()
    model.edit(picture(), "a cat", strength=0.5, steps=10, seed=1, sampler="dpmpp_2m", progress=False,
               callback=lambda i, t, x: calls.append(t))
    assert calls == samplers.dpm_timesteps(10)[5:]


# --- Blended Latent Diffusion ------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLERS))
def test_masked_edit_keeps_every_pixel_outside_the_dilated_mask(model, sampler):
    image = picture(seed=3)
    mask = square_mask(mode="RGB")
    out = model.edit(image, ["a cat", "a dog"], mask=mask, strength=0.8, steps=4, scale=3.0, sampler=sampler,
                     seed=2, mask_dilate=2, mask_blur=3, progress=False)
    inside = np.zeros((32, 32), bool)
    inside[6:22, 6:22] = True  # the 12-px square dilated by 2 px
    for im in out:
        a, b = np.asarray(im), np.asarray(image)
        assert np.array_equal(a[~inside], b[~inside])
        assert np.abs(a[inside].astype(int) - b[inside]).mean() > 5  # something was edited


def test_masked_latents_outside_follow_the_noised_input(model):
    """After every step the latents outside the mask are the input latents at that step's noise level."""
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    seen = []
    out = model.edit_latents(z0, ["a cat"], noise=noise, strength=1.0, steps=5, scale=2.0, mask=mask,
                             generator=torch.Generator().manual_seed(1), progress=False,
                             callback=lambda i, t, x: seen.append(x.clone()))
    ab = model.schedule.alphas_cumprod
    for x in seen:  # x outside = √ᾱ·z0 + √(1−ᾱ)·n for some unit-variance n: its mean tracks √ᾱ·z0
        assert not torch.allclose(x[..., 2:6, 2:6], z0[..., 2:6, 2:6], atol=1e-3)
    resid = (seen[-1] - ab[0].sqrt().item() * z0)[mask.expand_as(z0) == 0]
    assert resid.std().item() == pytest.approx((1 - ab[0]).sqrt().item(), rel=0.3)
    assert torch.equal(out, seen[-1])


def test_full_mask_is_image_to_image_and_empty_mask_is_an_error(model):
    kw = dict(strength=0.6, steps=4, seed=5, progress=False)
    plain = model.edit(picture(), "a cat", **kw)[0]
    full = model.edit(picture(), "a cat", mask=Image.new("L", (32, 32), 255), **kw)[0]
    assert plain.tobytes() == full.tobytes()
    with pytest.raises(ValueError, match="empty.*nothing to edit"):
        model.edit(picture(), "a cat", mask=Image.new("L", (32, 32), 0), **kw)


def test_mask_of_another_size_is_resized_with_a_warning(model, caplog):
    m = pipeline.mask_tensor(square_mask(64, (16, 16, 40, 40)), 32, 32)
    assert "resized" in caplog.text
    assert m.shape == (1, 1, 32, 32) and m[0, 0, 8:20, 8:20].all() and m.sum() == 144


def test_feather_ramps_inside_the_mask_only():
    m = torch.zeros(1, 1, 16, 16)
    m[..., 4:12, 4:12] = 1
    w = pipeline.feather(m, 3)
    assert torch.equal(w[m == 0], torch.zeros_like(w[m == 0]))
    assert w[0, 0, 4, 8].item() == pytest.approx(1 / 3) and w[0, 0, 5, 8].item() == pytest.approx(2 / 3)
    assert w[0, 0, 8, 8].item() == 1.0


def test_bad_edit_arguments(model):
    with pytest.raises(ValueError, match="multiples of 4"):
        model.edit(picture(30), "a cat", steps=4, progress=False)
    with pytest.raises(ValueError, match="2 images and 3 prompts"):
        model.edit([picture(), picture(seed=1)], ["a", "b", "c"], steps=4, progress=False)
    with pytest.raises(ValueError, match="unknown sampler"):
        model.edit(picture(), "a cat", steps=4, sampler="euler", progress=False)
