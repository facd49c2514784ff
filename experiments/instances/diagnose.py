"""Where a pretrained instances model stops using its captions, and how well it denoises: no sampling, no judge.

    python -m experiments.instances.diagnose [--model weights/instances.safetensors] [--renders 200] [--draws 16]

All three compare the UNet's ε-error (or output) under two contexts at the same noisy latents, so they take a
minute where a judged evaluation takes many; at a fixed t an error ratio is the same whichever quantity the
UNet predicts (ε, v or x₀ errors differ by a factor that depends on t only), so ε- and v-models compare.

- `caption_ratio`: ε-MSE on held-out renders (posterior means, one draw of noise) with their captions shuffled
  among them ÷ with their own captions, at each t of `TIMESTEPS`. 1 means the captions are ignored.
- `swap_ratio`: the same renders captioned "a photo of a ⟨colour⟩ ⟨body⟩ toy on a ⟨background⟩ background"; one
  word replaced by a wrong one ÷ every word right. Which words the UNet uses, at which noise.
- `text_swap`: the same swaps seen by the text tower alone: RMS change of the context (all rows) when the word
  is replaced ÷ RMS distance of the right context from the empty prompt's. 0 means the tower cannot tell the
  words apart, so no UNet could follow them; a swap ratio of 1 with a text swap well above 0 means the UNet
  does not read what the tower gives it.
- `context_rows`: the RMS change of the UNet's output (over `draws` noise draws) when one row of the context of
  `PROMPT` is replaced by the empty prompt's row, for each row up to EOS, then for all padding rows together.
  Which rows of the context it reads.
- `denoise_error`: at each t of `DENOISE_TIMESTEPS` (with its SNR), the mean squared error of the UNet's
  predicted clean latent on the held-out renders with their own captions, and that of a per-channel Wiener
  filter (the best linear guess from the renders' own channel means and variances, no UNet), both in units of
  the latents' variance. How much of a render the UNet gives back at each noise level: errors of ≈ 0.04 (0.2 σ)
  already scatter coloured pixels through an object (README, `latent-noise.png`).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from experiments.instances import world

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "weights" / "instances.safetensors"
TIMESTEPS = (300, 600, 900)
PROMPT = "a photo of a red round toy with horns on a white background"
SWAPS = ("colour", "body", "background")
DENOISE_TIMESTEPS = (20, 100, 200, 400, 600, 800)
RENDER_BASE = world.HELD_OUT_BASE + 5000  # held-out instances no concept of the study uses (concepts: + 0…)


def _eps_mse(model, z: torch.Tensor, context: torch.Tensor, t: int, noise: torch.Tensor) -> float:
    schedule = model.schedule
    x_t = schedule.q_sample(z, t, noise)
    out = model.unet(x_t, torch.full((len(z),), t), context)
    return float((schedule.prediction.to_eps(out, x_t, t) - noise).pow(2).mean())


def _ratios(model, z: torch.Tensor, right: torch.Tensor, others: dict[str, torch.Tensor], noise: torch.Tensor):
    """{name: {t: ε-MSE(other) ÷ ε-MSE(right)}}."""
    out: dict[str, dict[str, float]] = {name: {} for name in others}
    for t in TIMESTEPS:
        base = _eps_mse(model, z, right, t, noise)
        for name, context in others.items():
            out[name][str(t)] = round(_eps_mse(model, z, context, t, noise) / base, 4)
    return out


def _swapped(labels, which: str | None) -> list[str]:
    """The fixed caption of every render, with `which` (None: nothing) replaced by another value."""
    colours, bodies, backgrounds = world.COLOUR_NAMES, world.BODIES, world.BACKGROUND_NAMES
    out = []
    for lab in labels:
        colour, body, bg = lab.instance.colour, lab.instance.body, lab.scene.background
        colour = (colour + len(colours) // 2) % len(colours) if which == "colour" else colour
        body = (body + len(bodies) // 2) % len(bodies) if which == "body" else body
        bg = (bg + 1) % len(backgrounds) if which == "background" else bg
        out.append(f"a photo of a {colours[colour]} {bodies[body]} {world.NOUN} on a {backgrounds[bg]} background")
    return out


@torch.no_grad()
def diagnose(model, renders: int = 200, seed: int = 0, draws: int = 16) -> dict:
    """Every number of the JSON line (see the module docstring)."""
    images, labels = world.generate(renders, 1, base=RENDER_BASE)
    z = model.encode_images(world.to_tensor(images), sample=False)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
    captions = [world.caption(lab, np.random.default_rng(seed + i)) for i, lab in enumerate(labels)]
    context = model.encode_prompts(captions)
    shuffled = context[torch.randperm(len(z), generator=torch.Generator().manual_seed(seed + 1))]
    out = {"caption_ratio": _ratios(model, z, context, {"shuffled": shuffled}, noise)["shuffled"]}
    fixed = model.encode_prompts(_swapped(labels, None))
    out["swap_ratio"] = _ratios(
        model, z, fixed, {which: model.encode_prompts(_swapped(labels, which)) for which in SWAPS}, noise
    )
    empty = model.encode_prompts([""])
    scale = float((fixed - empty).pow(2).mean().sqrt())
    out["text_swap"] = {
        which: round(float((model.encode_prompts(_swapped(labels, which)) - fixed).pow(2).mean().sqrt()) / scale, 4)
        for which in SWAPS
    }
    out["context_rows"] = context_rows(model, PROMPT, draws, seed)
    out["denoise_error"] = denoise_error(model, z, context, noise)
    out.update({"renders": renders, "draws": draws, "seed": seed, "timesteps": list(TIMESTEPS)})
    return out


@torch.no_grad()
def denoise_error(model, z: torch.Tensor, context: torch.Tensor, noise: torch.Tensor) -> dict[str, dict[str, float]]:
    """{t: {"snr", "unet", "wiener"}}: x₀-MSE of the UNet and of a per-channel Wiener filter ÷ the latents' variance."""
    schedule = model.schedule
    mean, var = z.mean(dim=(0, 2, 3), keepdim=True), z.var(dim=(0, 2, 3), keepdim=True)
    scale = float(z.var())
    out = {}
    for t in DENOISE_TIMESTEPS:
        x_t = schedule.q_sample(z, t, noise)
        a, s = schedule.coefficients(t, z)
        x0 = schedule.prediction.to_x0(model.unet(x_t, torch.full((len(z),), t), context), x_t, t)
        wiener = wiener_x0(x_t, a, s, mean, var)
        out[str(t)] = {
            "snr": round(float((a * a / (s * s)).flatten()[0]), 4),
            "unet": round(float((x0 - z).pow(2).mean()) / scale, 4),
            "wiener": round(float((wiener - z).pow(2).mean()) / scale, 4),
        }
    return out


def wiener_x0(x_t: torch.Tensor, a, s, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """The per-channel Wiener filter's clean latent from x_t = a·x₀ + s·ε, given the latents' channel means and
    variances: the best linear guess."""
    return mean + a * var / (a * a * var + s * s) * (x_t - a * mean)


@torch.no_grad()
def context_rows(model, prompt: str, draws: int = 16, seed: int = 0) -> dict[str, dict[str, float]]:
    """{t: {"<i>:<token>": RMS change of the output with row i replaced by the empty prompt's, …, "padding": …}}."""
    tok = model.tokenizer
    ids = tok([prompt])[0].tolist()
    end = ids.index(tok.eos_id) + 1  # rows up to and including EOS; after it, padding
    words = [f"{i}:{tok.decode([t]).strip()}" for i, t in enumerate(ids[1 : end - 1], 1)]
    names = ["0:<bos>", *words, f"{end - 1}:<eos>"]
    context, empty = model.encode_prompts([prompt]), model.encode_prompts([""])
    shape = (draws, model.config.unet["in_channels"], model.config.unet["image_size"], model.config.unet["image_size"])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    out = {}
    for t in TIMESTEPS:
        ts = torch.full((draws,), t)
        base = model.unet(x, ts, context.expand(draws, -1, -1))
        row = {}
        for i, name in [*enumerate(names), (slice(end, None), "padding")]:
            changed = context.clone()
            changed[:, i] = empty[:, i]
            row[name] = round(float((model.unet(x, ts, changed.expand(draws, -1, -1)) - base).pow(2).mean().sqrt()), 4)
        out[str(t)] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(MODEL), help="an instances model file")
    p.add_argument("--renders", type=int, default=200, help="held-out renders for the two ratios")
    p.add_argument("--draws", type=int, default=16, help="noise draws for the context rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    for name, value, least in (("--renders", a.renders, 2), ("--draws", a.draws, 1), ("--threads", a.threads, 1)):
        if value < least:
            print(f"error: {name}={value} must be ≥ {least}", file=sys.stderr)
            return 2
    if not Path(a.model).is_file():
        print(f"error: --model {a.model}: no such file (make pretrain-instances writes one)", file=sys.stderr)
        return 2
    from ldm.checkpoint import load_model

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(a.threads)
    sys.stdout.write(json.dumps(diagnose(load_model(a.model), a.renders, a.seed, a.draws)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
