"""Score a textual-inversion run on an instances concept with the instance judge; one JSON line on stdout.

    python -m experiments.instances.score --concept DIR --run RUN_DIR [--samples 32] [--seed S] [--ckpt PATH]
                                          [--steps N]

Reconstruction (judge.reconstruction: the fraction of (sample, lookalike) pairs in which a sample is nearer the
concept's held-out renders than an instance sharing all its worded attributes; 0.5 = a caption's worth) of
`--samples` samples of "a photo of S*" (`reconstruction`), of the init word "a photo of a toy"
(`init_reconstruction`), and of the concept's two human captions in place of S* (`caption_short`,
`caption_long`). Editability: the judge's context classifier on "S*" prompts that each ask for one context
(three backgrounds, a companion ball or block, left or right): the fraction in the asked context. The same
four prompts' objective on the concept's held-out renders, without sampling or judge (`loss`, `init_loss`,
`caption_short_loss`, `caption_long_loss`: the trainer's prediction MSE, lower = the prompt explains the
renders better; see `heldout_loss`), and `word_norm`, the learned vectors' mean L2 norm. Fixed seeds:
every prompt set is sampled from `--seed` with the model's own sampling steps and guidance (`--steps`
overrides the steps); the model is the run's (args.json) unless `--ckpt` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from experiments.instances import judge, world
from experiments.instances.concept import load_concept

log = logging.getLogger(__name__)

N_LOOKALIKES = 16
LOOKALIKE_VIEWS = 3
PHOTO = "a photo of {}"
LOSS_STRATA = 10  # heldout_loss: one timestep drawn in each tenth of the schedule …
LOSS_DRAWS = 4  # … this many times per held-out render


def edit_prompts(word: str) -> list[tuple[str, str, int]]:
    """(prompt, judge head, wanted class): each prompt asks for one context."""
    small = f"a small {word}" if not word.startswith("a ") else word.replace("a ", "a small ", 1)
    out = [(f"a photo of {word} on a {bg} background", "background", k) for k, bg in enumerate(world.BACKGROUND_NAMES)]
    out += [(f"a photo of {small} next to a {c}", "companion", k) for k, c in enumerate(world.COMPANIONS) if k]
    out += [
        (f"a photo of {small} {world.POSITION_PHRASES[p]}", "position", world.POSITIONS.index(p))
        for p in ("left", "right")
    ]
    return out


def _run_model(run: Path, ckpt: str | None):
    """The run's model (args.json: --ckpt, else --model) and its learned vectors and token."""
    from inversion import models
    from inversion.embedding import load_embedding_file
    from inversion.rundir import RunDir

    opts = RunDir(run).options()
    token = opts["token"]
    vecs = load_embedding_file(run / "learned_embeds.safetensors", token=token)[token]
    model = models.load(
        opts.get("model") if not (ckpt or opts.get("ckpt")) else None,
        ckpt or opts.get("ckpt"),
        torch.device("cpu"),
        torch.float32,
    )
    model.add_embedding(token, vecs)  # the token now tokenizes to its learned rows (prompts without it are unchanged)
    return model, token, vecs


def _references(info: dict, concept: Path) -> tuple[list, list]:
    """(the concept's held-out renders, its lookalikes' renders): what reconstruction is measured against."""
    from PIL import Image

    ref = [Image.open(concept / h["file"]).convert("RGB") for h in info["heldout"]]
    others = [
        judge.render_all(v)
        for v in judge.lookalike_views(info["object"], N_LOOKALIKES, LOOKALIKE_VIEWS, seed=info["seed"])
    ]
    return ref, others


def loss_draws(n: int, latent_shape: tuple[int, ...], num_timesteps: int, seed: int) -> tuple[torch.Tensor, ...]:
    """heldout_loss's (timesteps, noise) for n renders, each repeated LOSS_STRATA × LOSS_DRAWS times (render-major):
    one timestep drawn uniformly in each tenth of the schedule, LOSS_DRAWS times over."""
    g = torch.Generator().manual_seed(seed)
    strata = torch.arange(LOSS_STRATA).repeat(LOSS_DRAWS * n)
    t = ((strata + torch.rand(len(strata), generator=g)) * (num_timesteps / LOSS_STRATA)).long()
    return t, torch.randn((len(strata), *latent_shape), generator=g)


@torch.no_grad()
def heldout_loss(model, images, prompts: dict[str, str], seed: int = 0) -> dict[str, float]:
    """The inversion objective (MSE of the model's prediction against its target, as `inversion.train`'s loss takes
    it) of each prompt on `images` (the concept's held-out renders, posterior means) at the timesteps and noise of
    `loss_draws`, the same for every prompt, so the prompts differ only in their context. A word that holds the
    concept explains renders it never saw better than a caption does, whatever the sampler draws from noise."""
    x0 = model.encode_images(judge.as_tensor(images).to(model.device), sample=False)
    t, noise = (
        v.to(model.device) for v in loss_draws(len(x0), tuple(x0.shape[1:]), model.schedule.num_timesteps, seed)
    )
    x0 = x0.repeat_interleave(LOSS_STRATA * LOSS_DRAWS, 0)
    x_t = model.schedule.q_sample(x0, t, noise)
    target = model.schedule.prediction.target(x0, noise, t).float()
    out = {}
    for name, prompt in prompts.items():
        context = model.encode_prompts([prompt]).expand(len(x0), -1, -1)
        out[name] = float(((model.unet(x_t, t, context).float() - target) ** 2).mean())
    return out


@torch.no_grad()
def score(
    concept: Path, run: Path, samples: int = 32, seed: int = 0, ckpt: str | None = None, steps: int | None = None
) -> dict:
    """Every number of the JSON line (see the module docstring)."""
    info = load_concept(concept)
    j = judge.shipped()
    ref, others = _references(info, concept)
    model, token, vecs = _run_model(run, ckpt)

    def rec(words: str) -> float:
        return judge.reconstruction(
            j, model.sample([PHOTO.format(words)] * samples, steps=steps, seed=seed, progress=False), ref, others
        )

    init, short, long = f"a {info['init_word']}", info["caption_short"], info["caption_long"]
    out = {
        "reconstruction": rec(token),
        "init_reconstruction": rec(init),
        "caption_short": rec(short),
        "caption_long": rec(long),
    }
    fields = {"loss": token, "init_loss": init, "caption_short_loss": short, "caption_long_loss": long}
    out |= heldout_loss(model, ref, {k: PHOTO.format(w) for k, w in fields.items()}, seed=seed)
    out["word_norm"] = float(vecs.float().norm(dim=-1).mean())
    asks = edit_prompts(token)
    per = max(1, samples // len(asks))
    pred = judge.classify(
        j, model.sample([p for p, _, _ in asks for _ in range(per)], steps=steps, seed=seed + 1, progress=False)
    )
    hits = [bool(pred[head][i * per + k] == want) for i, (_, head, want) in enumerate(asks) for k in range(per)]
    out["editability"] = float(np.mean(hits))
    out.update(
        {
            "samples": samples,
            "seed": seed,
            "steps": steps or model.config.steps,
            "edit_samples_per_prompt": per,
            "concept_seed": info["seed"],
            "token": token,
            "lookalikes": N_LOOKALIKES,
        }
    )
    return out


@torch.no_grad()
def curve(concept: Path, run: Path, samples: int = 16, seed: int = 0, steps: int | None = None) -> dict[str, float]:
    """Reconstruction of the word the run kept at each step (steps/learned_embeds-step<N>.safetensors), by step."""
    from inversion.embedding import load_embedding_file

    info = load_concept(concept)
    j = judge.shipped()
    ref, others = _references(info, concept)
    model, token, _ = _run_model(run, None)
    # step 0: S* starts as the init word's row, so "a photo of S*" is then "a photo of <init word>"
    first = model.sample([PHOTO.format(info["init_word"])] * samples, steps=steps, seed=seed, progress=False)
    out = {"0": judge.reconstruction(j, first, ref, others)}
    files = sorted(run.glob("steps/learned_embeds-step*.safetensors"), key=lambda f: int(f.stem.rsplit("step", 1)[1]))
    for f in files:
        step = int(f.stem.rsplit("step", 1)[1])
        word = f"<step{step}>"
        model.add_embedding(word, load_embedding_file(f, token=token)[token])
        images = model.sample([PHOTO.format(word)] * samples, steps=steps, seed=seed, progress=False)
        out[str(step)] = judge.reconstruction(j, images, ref, others)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concept", required=True, help="a folder written by experiments.instances.concept")
    p.add_argument("--run", required=True, help="a run folder written by inversion.train")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", default=None, help="model file (default: the run's)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default the model's)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name, value in (("--samples", a.samples), ("--steps", a.steps), ("--threads", a.threads)):
        if value is not None and value < 1:
            print(f"error: {name}={value} must be ≥ 1", file=sys.stderr)
            return 2
    for name, folder, need in (("--concept", a.concept, "concept.json"), ("--run", a.run, "args.json")):
        if not (Path(folder) / need).is_file():
            print(f"error: {name} {folder} has no {need}", file=sys.stderr)
            return 2
    if not (Path(a.run) / "learned_embeds.safetensors").is_file():
        print(f"error: --run {a.run} has no learned_embeds.safetensors (has it saved yet?)", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    result = score(Path(a.concept), Path(a.run), a.samples, a.seed, a.ckpt, a.steps)
    sys.stdout.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
