"""`make demo`: learn a word for the held-out shape on the shipped shapes model, then judge the samples.

    python -m experiments.shapes.demo [--steps auto|N] [--max-steps N] [--recipe fast|official] [--vectors K] …
    python -m experiments.shapes.demo --variants      # every variant; rewrites its section of RESULTS.md

Textual inversion (Gal et al. 2022) with the normal trainer (inversion.train) and its defaults — the fast recipe,
stopping by itself (STEPS=auto) within a 300-step cap — init word = the generic word "shape". Reconstruction =
the judge's held-out-shape rate for "a photo of a shape" (init) and "a photo of S*" (learned); editability =
the rate at which "a <colour> S*" comes out in the asked colour. Ends with one line:
    demo: reconstruction init=NN% learned=NN%; editability=NN%; stopped at step S (auto)
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch
from PIL import Image

from experiments.results import RESULTS, write_section
from experiments.shapes import world
from experiments.shapes.pretrain import MODEL_PATH, ROOT
from ldm.images import image_grid

log = logging.getLogger(__name__)

CONCEPT = f"shapes-{world.HELD_OUT}"
CONCEPT_DIR = ROOT / "experiments" / "concepts" / CONCEPT
TOKEN = "S*"
OUT = ROOT / "outputs" / "demo-shapes"
# Inversion recipe for the demo and the CI test (fixed; no retries).
STEPS = 300  # the cap of the demo's auto run; the variants' fixed length
BATCH = 4
LR = 5e-3  # the variants' base LR (the official recipe's); the trainer scales it by batch (official scale_lr)
N_SAMPLES = 32  # per reconstruction prompt
N_PER_COLOUR = 8  # per "a <colour> S*" prompt
SEED = 0
# The paper's variants on the shapes world, each run as the paper does (official recipe, STEPS fixed steps):
# (label, run_demo keyword arguments, trainer flags shown).
OFFICIAL = dict(steps=STEPS, recipe="official", lr=LR)
VARIANTS = (
    ("Textual inversion (one word)", {}, "—"),
    ("3 vectors", dict(vectors=3), "`--vectors 3`"),
    (
        "Progressive (to 3 vectors)",
        dict(vectors=3, progressive=STEPS // 3),
        f"`--vectors 3 --progressive {STEPS // 3}`",
    ),
    ("Regularised toward “shape” (weight 0.1)", dict(reg_weight=0.1), "`--reg-weight 0.1`"),
    ("Regularised toward “shape” (weight 0.01)", dict(reg_weight=0.01), "`--reg-weight 0.01`"),
)


@dataclass
class DemoResult:
    """The three rates the summary line reports, plus details."""

    init_rate: float
    learned_rate: float
    edit_rate: float
    edit_held_out_rate: float
    run_dir: Path
    steps: int
    auto: bool
    grids: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"demo: reconstruction init={round(100 * self.init_rate)}% "
            f"learned={round(100 * self.learned_rate)}%; editability={round(100 * self.edit_rate)}%; "
            + (f"stopped at step {self.steps} (auto)" if self.auto else f"{self.steps} steps")
        )


def write_concept(folder: Path = CONCEPT_DIR) -> list[Path]:
    """(Re)draw the five concept images (the shipped files were made by this function)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, lab in enumerate(world.concept_labels(), 1):
        path = folder / (
            f"{world.HELD_OUT}-{i}-{world.COLOUR_NAMES[lab.colour]}-on-{world.BACKGROUND_NAMES[lab.background]}.png"
        )
        world.render(lab).save(path)
        paths.append(path)
    return paths


def save_grid(rows: list[list[Image.Image]], path: Path, zoom: int = 3) -> Path:
    """Rows of images → one PNG, each image enlarged (nearest) so that 32-px samples are visible."""
    size, cols = rows[0][0].size[0] * zoom, max(len(r) for r in rows)
    blank = Image.new("RGB", (size, size), "white")
    cells = []
    for row in rows:
        cells += [im.resize((size, size), Image.NEAREST) for im in row] + [blank] * (cols - len(row))
    grid = image_grid(cells, cols=cols)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def run_demo(
    model_path: Path = MODEL_PATH,
    out: Path = OUT,
    steps: int | str = "auto",
    batch: int = BATCH,
    lr: float | None = None,
    vectors: int = 1,
    progressive: int = 0,
    reg_weight: float = 0.0,
    n_samples: int = N_SAMPLES,
    n_per_colour: int = N_PER_COLOUR,
    seed: int = SEED,
    recipe: str = "fast",
    max_steps: int = STEPS,
    changes: dict | None = None,
) -> DemoResult:
    """Init rate → textual inversion with inversion.train → learned and editability rates, grids in `out`."""
    import ldm
    from experiments.shapes import judge
    from inversion.config import TrainConfig, parse_steps
    from inversion.embedding import load_embedding_file
    from inversion.train import run

    t0 = time.time()
    held_out = world.SHAPES.index(world.HELD_OUT)
    model = ldm.load_model(model_path)
    init_images = model.sample([f"a photo of a {world.GENERIC_WORD}"] * n_samples, seed=seed, progress=False)
    init_rate = (judge.score(init_images)[0] == held_out).float().mean().item()

    run_dir = out / "run"
    config = TrainConfig(
        concept=str(CONCEPT_DIR),
        ckpt=str(model_path),
        init=world.GENERIC_WORD,
        token=TOKEN,
        **parse_steps(steps, max_steps),
        max_steps=max_steps,
        recipe=recipe,
        batch=batch,
        lr=lr,
        vectors=vectors,
        progressive=progressive,
        reg_weight=reg_weight,
        seed=seed,
        out=str(run_dir),
        overwrite=True,
        save_every=max_steps,
        val_every=0,
        latent_cache="",
        device="cpu",
        no_progress=True,
        **(changes or {}),
    )
    done = run(config, model=model)
    vecs = load_embedding_file(run_dir / "learned_embeds.safetensors", token=TOKEN)[TOKEN]
    model.extra_embeddings = vecs.to(model.device, model.dtype)

    learned_images = model.sample([f"a photo of {TOKEN}"] * n_samples, seed=seed, progress=False)
    learned_rate = (judge.score(learned_images)[0] == held_out).float().mean().item()
    edit_prompts = [f"a {c} {TOKEN}" for c in world.COLOUR_NAMES for _ in range(n_per_colour)]
    edit_images = model.sample(edit_prompts, seed=seed + 1, progress=False)
    es, ec = judge.score(edit_images)
    want = torch.arange(len(world.COLOUR_NAMES)).repeat_interleave(n_per_colour)
    per_row = min(n_samples, 16)
    grids = [
        save_grid([init_images[i : i + per_row] for i in range(0, n_samples, per_row)], out / "init-shape.png"),
        save_grid([learned_images[i : i + per_row] for i in range(0, n_samples, per_row)], out / "learned-S.png"),
        save_grid(
            [edit_images[i : i + n_per_colour] for i in range(0, len(edit_images), n_per_colour)],
            out / "edit-colours.png",
        ),
    ]
    return DemoResult(
        init_rate,
        learned_rate,
        (ec == want).float().mean().item(),
        (es == held_out).float().mean().item(),
        run_dir,
        done.step,
        config.auto,
        grids,
        time.time() - t0,
    )


def run_variants(model_path: Path = MODEL_PATH, out: Path = OUT, results: Path = RESULTS) -> list[str]:
    """Run every variant with the official recipe for STEPS steps and rewrite the shapes-judge section of RESULTS.md."""
    rows = []
    for label, kwargs, flags in VARIANTS:
        r = run_demo(model_path, out / re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-"), **OFFICIAL, **kwargs)
        log.warning("%s: %s (%.0f s)", label, r.summary(), r.seconds)
        rows.append(
            f"| {label} | {flags} | {100 * r.init_rate:.0f} % | {100 * r.learned_rate:.0f} % | "
            f"{100 * r.edit_rate:.0f} % | {100 * r.edit_held_out_rate:.0f} % |"
        )
    body = (
        f"### shapes · {CONCEPT}, judged (the demo's numbers)\n\n"
        f"Written by `python -m experiments.shapes.demo --variants` on {date.today().isoformat()}: the demo "
        f"recipe ({STEPS} steps, batch {BATCH}, base LR {LR}, seed {SEED}, init word "
        f"“{world.GENERIC_WORD}”) per variant; the shipped judge scores {N_SAMPLES} samples of “a photo of "
        f"a {world.GENERIC_WORD}” (init) and of “a photo of S*” (learned), and {N_PER_COLOUR} of “a <colour> "
        f"S*” for each of {len(world.COLOUR_NAMES)} colours (editability = in the asked colour; the last "
        f"column: those samples that are still {world.HELD_OUT}s).\n\n"
        f"| Variant | Trainer flags | Init word: {world.HELD_OUT} | S*: {world.HELD_OUT} ↑ | "
        f"“a <colour> S*”: colour ↑ | “a <colour> S*”: {world.HELD_OUT} ↑ |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows)
    )
    write_section(results, f"judged:shapes/{CONCEPT}", body)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=str(MODEL_PATH))
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--steps", default="auto", help="'auto' (stop by itself; the default) or a number of steps")
    p.add_argument("--max-steps", type=int, default=STEPS, help="the cap of an auto run")
    p.add_argument("--recipe", choices=("fast", "official"), default="fast")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--lr", type=float, default=None, help="base LR (default: the recipe's)")
    p.add_argument("--vectors", type=int, default=1)
    p.add_argument("--progressive", type=int, default=0)
    p.add_argument("--reg-weight", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default, one per core)")
    p.add_argument(
        "--variants",
        action="store_true",
        help="run every variant (one word, 3 vectors, progressive, regularised) and record them in "
        "experiments/RESULTS.md",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    if not Path(a.ckpt).is_file():
        raise SystemExit(f"error: {a.ckpt} is missing; run `make pretrain-shapes` to rebuild it")
    if a.variants:
        print("\n".join(run_variants(Path(a.ckpt), Path(a.out))))
        return 0
    from inversion.embedding import InversionError

    try:
        r = run_demo(
            Path(a.ckpt),
            Path(a.out),
            a.steps,
            a.batch,
            a.lr,
            a.vectors,
            a.progressive,
            a.reg_weight,
            seed=a.seed,
            recipe=a.recipe,
            max_steps=a.max_steps,
        )
    except InversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.warning(
        "grids: %s; run: %s; %.0f s; 'a <colour> S*' judged a %s %.0f%% of the time",
        ", ".join(str(g) for g in r.grids),
        r.run_dir,
        r.seconds,
        world.HELD_OUT,
        100 * r.edit_held_out_rate,
    )
    print(r.summary(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
