"""`make demo`: learn a word for the held-out star on the shipped shapes model, then judge the samples.

    python -m experiments.shapes.demo [--steps N] [--vectors K] [--progressive N] [--reg-weight W]

Textual inversion (Gal et al. 2022) with the normal trainer (inversion.train), init word = the generic
word "shape". Reconstruction = the judge's star rate for "a photo of a shape" (init) and "a photo of S*"
(learned); editability = the rate at which "a <colour> S*" comes out in the asked colour. Ends with one line:
    demo: reconstruction init=NN% learned=NN%; editability=NN%
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from experiments.shapes import world
from experiments.shapes.pretrain import MODEL_PATH, ROOT

log = logging.getLogger(__name__)

CONCEPT = "shapes-star"
CONCEPT_DIR = ROOT / "experiments" / "concepts" / CONCEPT
TOKEN = "S*"
OUT = ROOT / "outputs" / "demo-shapes"
# Inversion recipe for the demo and the CI test (fixed; no retries).
STEPS = 300
BATCH = 4
LR = 5e-3          # base LR; the trainer scales it by batch (official scale_lr)
N_SAMPLES = 32     # per reconstruction prompt
N_PER_COLOUR = 8   # per "a <colour> S*" prompt
SEED = 0


@dataclass
class DemoResult:
    """The three rates the summary line reports, plus details."""

    init_rate: float
    learned_rate: float
    edit_rate: float
    edit_star_rate: float
    run_dir: Path
    grids: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"demo: reconstruction init={round(100 * self.init_rate)}% "
                f"learned={round(100 * self.learned_rate)}%; editability={round(100 * self.edit_rate)}%")


def write_concept(folder: Path = CONCEPT_DIR) -> list[Path]:
    """(Re)draw the five concept images (the shipped files were made by this function)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, lab in enumerate(world.concept_labels(), 1):
        path = folder / (f"star-{i}-{world.COLOUR_NAMES[lab.colour]}-on-"
                         f"{world.BACKGROUND_NAMES[lab.background]}.png")
        world.render(lab).save(path)
        paths.append(path)
    return paths


def save_grid(rows: list[list[Image.Image]], path: Path, zoom: int = 3) -> Path:
    """Rows of images → one PNG, each image enlarged (nearest) so that 32-px samples are visible."""
    size = rows[0][0].size[0] * zoom
    grid = Image.new("RGB", (size * max(len(r) for r in rows), size * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im.resize((size, size), Image.NEAREST), (c * size, r * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _sample(model, prompts: list[str], seed: int) -> list[Image.Image]:
    size = model.config.image_size
    return model.sample(prompts, steps=model.config.steps, scale=model.config.guidance, seed=seed,
                        height=size, width=size, progress=False)


def run_demo(model_path: Path = MODEL_PATH, out: Path = OUT, steps: int = STEPS, batch: int = BATCH,
             lr: float = LR, vectors: int = 1, progressive: int = 0, reg_weight: float = 0.0,
             n_samples: int = N_SAMPLES, n_per_colour: int = N_PER_COLOUR, seed: int = SEED,
             extra_args: tuple[str, ...] = ()) -> DemoResult:
    """Init rate → textual inversion with inversion.train → learned and editability rates, grids in `out`."""
    import ldm
    from experiments.shapes import judge
    from inversion import train as trainer
    from inversion.embedding import load_embedding_file

    t0 = time.time()
    star = world.SHAPES.index(world.HELD_OUT)
    model = ldm.load_model(model_path)
    init_images = _sample(model, [f"a photo of a {world.GENERIC_WORD}"] * n_samples, seed)
    init_rate = (judge.score(init_images)[0] == star).float().mean().item()

    run_dir = out / "run"
    argv = ["--concept", str(CONCEPT_DIR), "--ckpt", str(model_path), "--init", world.GENERIC_WORD,
            "--token", TOKEN, "--steps", str(steps), "--batch", str(batch), "--lr", str(lr),
            "--vectors", str(vectors), "--reg-weight", str(reg_weight), "--seed", str(seed),
            "--out", str(run_dir), "--overwrite", "--save-every", str(steps), "--val-every", "0",
            "--latent-cache", "", "--device", "cpu", "--no-progress", *extra_args]
    if progressive:
        argv += ["--progressive", str(progressive)]
    args = trainer.resolve_args(argv)
    trainer.train(args, model=model)
    vecs = load_embedding_file(run_dir / "learned_embeds.safetensors", token=TOKEN)[TOKEN]
    model.extra_embeddings = vecs.to(model.device, model.dtype)

    learned_images = _sample(model, [f"a photo of {TOKEN}"] * n_samples, seed)
    learned_rate = (judge.score(learned_images)[0] == star).float().mean().item()
    edit_prompts = [f"a {c} {TOKEN}" for c in world.COLOUR_NAMES for _ in range(n_per_colour)]
    edit_images = _sample(model, edit_prompts, seed + 1)
    es, ec = judge.score(edit_images)
    want = torch.arange(len(world.COLOUR_NAMES)).repeat_interleave(n_per_colour)
    per_row = min(n_samples, 16)
    grids = [
        save_grid([init_images[i:i + per_row] for i in range(0, n_samples, per_row)], out / "init-shape.png"),
        save_grid([learned_images[i:i + per_row] for i in range(0, n_samples, per_row)], out / "learned-S.png"),
        save_grid([edit_images[i:i + n_per_colour] for i in range(0, len(edit_images), n_per_colour)],
                  out / "edit-colours.png"),
    ]
    return DemoResult(init_rate, learned_rate, (ec == want).float().mean().item(),
                      (es == star).float().mean().item(), run_dir, grids, time.time() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=str(MODEL_PATH))
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--vectors", type=int, default=1)
    p.add_argument("--progressive", type=int, default=0)
    p.add_argument("--reg-weight", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    torch.set_num_threads(a.threads)
    if not Path(a.ckpt).is_file():
        raise SystemExit(f"error: {a.ckpt} is missing; run `make pretrain-shapes` to rebuild it")
    r = run_demo(Path(a.ckpt), Path(a.out), a.steps, a.batch, a.lr, a.vectors, a.progressive, a.reg_weight,
                 seed=a.seed)
    log.warning("grids: %s; run: %s; %.0f s; 'a <colour> S*' judged a star %.0f%% of the time",
                ", ".join(str(g) for g in r.grids), r.run_dir, r.seconds, 100 * r.edit_star_rate)
    print(r.summary(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
