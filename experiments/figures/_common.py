"""What the figure scripts share: options, one frozen model, trained-or-reused runs, grids and JSON files.

Every figure script is `python -m experiments.figures <name> [options]` (or `make figure-<name>`); it trains the
concept words it needs through the trainer's own API (`inversion.train`, flags only, never a fork), or reuses
`--run` directories, and writes `<out>/<name>.png` laid out like the paper's figure plus `<out>/<name>.json`.

With MODEL=tiny every unset option takes the smoke values of SMOKE (32 px, a few steps, random CLIP), so
`make figures MODEL=tiny` exercises every script in a couple of minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from inversion import models
from inversion.config import TrainConfig, as_flags
from inversion.embedding import InversionError, atomic_write
from inversion.rundir import RunDir
from inversion.templates import MARKER
from inversion.train import train
from ldm import cli
from ldm.images import image_grid

log = logging.getLogger("experiments.figures")

ROOT = Path(__file__).resolve().parents[2]
OUT_ROOT = Path("outputs") / "figures"
SMOKE = {"steps": 4, "size": 32, "sample_steps": 4, "n": 2, "batch": 1, "clip_weights": "random"}
FULL = {"steps": None, "size": None, "sample_steps": None, "n": 4, "batch": None, "clip_weights": None}
SHAPES = {**FULL, "steps": 300, "batch": 4, "n": 8}  # the shapes demo's recipe (experiments/shapes/demo.py)
MODEL_TRAIN = {"shapes": {"init": "shape"}}  # the shapes world's generic word as the init word
SHAPES_PREFIX = "shapes-"  # concepts drawn on demand from experiments/shapes/world.py


class FigureError(InversionError):
    """Bad input for a figure: one line on stderr, exit status 2 (cli.run catches InversionError)."""


# --- options -----------------------------------------------------------------------------------------------


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The options every figure takes (each script adds its own)."""
    p = cli.ArgumentParser(prog=f"python -m experiments.figures {name}", description=description)
    a = p.add_argument
    a("--model", default=None, help="sd15 | sd21 | sd21-v | shapes | tiny (MODEL=, default sd15)")
    a("--ckpt", default=None, help="checkpoint file or diffusers folder, overrides --model (CKPT=)")
    a("--concept", default=None, help="concept folder(s), comma-separated; 'shapes-<shape>[-<colour>]' is drawn")
    a("--run", default=None, help="existing training run dir(s) with embeddings, comma-separated (RUN=)")
    a("--out", default=None, help=f"output folder (OUT=, default {OUT_ROOT}/<name>/)")
    a("--runs-dir", default=None, help=f"where trained runs are kept and reused (default {OUT_ROOT}/runs)")
    a("--steps", type=int, default=None, help="training steps when a word must be trained (STEPS=)")
    a("--batch", type=int, default=None, help="training batch (BATCH=, default the trainer's)")
    a("--size", type=int, default=None, help="image size in pixels (default the model's; tiny 32)")
    a("--n", type=int, default=None, help="images per prompt (N=)")
    a("--sample-steps", type=int, default=None, help="sampling steps (default the model's; tiny 3)")
    a("--scale", type=float, default=None, help="guidance scale (default the model's)")
    a("--seed", type=int, default=23, help="seed for training and sampling (SEED=, default 23)")
    a("--device", default="auto", help="auto | cpu | cuda | mps (DEVICE=)")
    a("--clip-weights", default=None, help="CLIP ViT-B/32 weights for metrics; 'random' = smoke (CLIP=)")
    a("--overwrite", action="store_true", help="redraw a figure whose PNG/JSON already exist in OUT")
    a("--prompts", default=None, help="';'-separated prompts replacing the figure's own (S* = the word)")
    return p


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options with the smoke values (MODEL=tiny) or the full ones, and check them."""
    tiny = args.ckpt is None and args.model == "tiny"
    preset = SMOKE if tiny else SHAPES if args.ckpt is None and args.model == "shapes" else FULL
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.smoke = tiny
    cli.check(
        [
            *(
                cli.at_least(f"--{key.replace('_', '-')}", getattr(args, key, None))
                for key in ("steps", "n", "sample_steps", "batch", "rows", "eval_n")
            ),
            cli.at_least("--size", args.size, 8),
            cli.finite("--scale", args.scale),
            cli.seed_rule("--seed", args.seed),
            *models.choice_rules(args.model, args.ckpt, "--model ", "--ckpt "),
            *((Path(r).is_dir(), f"--run {r}: no such run directory") for r in split_list(args.run)),
            (args.prompts is None or bool(prompts_or(args, ())), f"--prompts {args.prompts!r} holds no prompt"),
            (
                args.clip_weights in (None, "random") or Path(args.clip_weights).is_file(),
                f"--clip-weights {args.clip_weights}: no such file",
            ),
            (
                args.runs_dir is None or not Path(args.runs_dir).exists() or Path(args.runs_dir).is_dir(),
                f"--runs-dir {args.runs_dir} is a file, not a folder",
            ),
        ],
        FigureError,
    )
    cli.pick_device(args.device)
    if args.out:
        cli.check_writable(Path(args.out), "--out")
    return args


def split_list(spec: str | None) -> list[str]:
    return [s.strip() for s in (spec or "").split(",") if s.strip()]


def prompts_or(args: argparse.Namespace, default: Sequence[str]) -> list[str]:
    if not args.prompts:
        return list(default)
    return [p.strip() for p in args.prompts.split(";") if p.strip()]


# --- concepts drawn from the shapes world ------------------------------------------------------------------


def shapes_concept(name: str, root: Path, n_per_colour: int = 1, resolution: int = 128) -> Path:
    """'shapes-<shape>' → one image per colour (a colour-balanced set); 'shapes-<shape>-<colour>' → 5 images."""
    import numpy as np

    from experiments.shapes import world

    parts = name[len(SHAPES_PREFIX) :].split("-")
    shape = parts[0]
    colours = parts[1:] or list(world.COLOUR_NAMES)
    if shape not in world.SHAPES or any(c not in world.COLOUR_NAMES for c in colours) or len(parts) > 2:
        raise FigureError(
            f"concept {name!r}: write shapes-<shape>[-<colour>] with a shape from "
            f"{', '.join(world.SHAPES)} and a colour from {', '.join(world.COLOUR_NAMES)}"
        )
    folder = root / name
    count = n_per_colour * len(colours) if len(colours) > 1 else 5
    if folder.is_dir() and len(list(folder.glob("*.png"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(_stable_seed(name))
    for i in range(count):
        colour = colours[i % len(colours)]
        lo, hi = world.SIZES["large"]
        radius = float(rng.uniform(lo, hi))
        margin = radius + 1.0
        cx, cy = (float(v) for v in rng.uniform(margin, world.RESOLUTION - margin, size=2))
        labels = world.Labels(
            shape=world.SHAPES.index(shape),
            colour=world.COLOUR_NAMES.index(colour),
            background=i % len(world.BACKGROUND_NAMES),
            size=world.SIZE_NAMES.index("large"),
            radius=radius,
            cx=cx,
            cy=cy,
            angle=float(rng.uniform(-0.2, 0.2)),
            colour_jitter=(0, 0, 0),
        )
        image = world.render(labels, resolution)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        atomic_write(folder / f"{i:02d}-{colour}.png", lambda f, b=buf: f.write(b.getvalue()))
    return folder


def _stable_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def resolve_concept(name: str, out_root: Path) -> Path:
    """A shipped concept name, a path, or shapes-<shape>[-<colour>] (drawn under <out_root>/concepts)."""
    from inversion import data as D

    if name.startswith(SHAPES_PREFIX) and not Path(name).is_dir() and not (D.CONCEPTS_DIR / name).is_dir():
        return shapes_concept(name, out_root / "concepts")
    return D.resolve_concept(name)


# --- the model, the words, the runs ------------------------------------------------------------------------


@dataclass
class Word:
    """A learned word ready to use: its token, its run directory and concept folder."""

    token: str
    run: Path
    concept: Path | None
    vectors: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


class Context:
    """One frozen model (loaded once), one CLIP scorer, and the words the figures train or reuse."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._base = None
        self._scorer = None
        self._device = None
        self.runs_dir = Path(args.runs_dir) if args.runs_dir else OUT_ROOT / "runs"
        self.out_root = self.runs_dir.parent  # generated shapes concepts go to <out_root>/concepts

    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = cli.pick_device(self.args.device)
        return self._device

    def base(self):
        """The frozen LatentDiffusion, loaded once and shared by every fresh copy."""
        if self._base is None:
            self._base = models.load(self.args.model, self.args.ckpt, self.device, torch.float32).eval()
            self._base.requires_grad_(False)
        return self._base

    def fresh(self):
        """A LatentDiffusion sharing the frozen modules, with a new tokenizer and no learned words."""
        from ldm.pipeline import LatentDiffusion, build_tokenizer

        b = self.base()
        return LatentDiffusion(b.config, b.unet, b.vae, b.text_encoder, build_tokenizer(b.config), b.schedule).eval()

    def scorer(self):
        if self._scorer is None:
            from inversion.clip import CLIPScorer

            self._scorer = CLIPScorer.load(self.args.clip_weights, self.device)
        return self._scorer

    @property
    def size(self) -> int:
        size = self.args.size or self.base().config.image_size
        cli.check([cli.multiple_rule("--size", size, self.base().latent_factor)], FigureError)
        return size

    @property
    def sample_steps(self) -> int:
        steps = self.args.sample_steps or self.base().config.steps
        cli.check([cli.steps_rule("--sample-steps", steps, self.base())], FigureError)
        return steps

    @property
    def scale(self) -> float:
        return self.base().config.guidance if self.args.scale is None else self.args.scale

    def model_name(self) -> str:
        return self.args.ckpt or self.args.model or "sd15"

    def train_word(self, concept: str, changes: dict | None = None, tag: str = "word") -> Word:
        """Train (or reuse an identical finished run of) the concept's word with these TrainConfig changes."""
        folder = resolve_concept(concept, self.out_root)
        a = self.args
        changes = {**MODEL_TRAIN.get(self.base().config.name, {}), **(changes or {})}  # a variant's win
        key = json.dumps(
            {
                "model": self.model_name(),
                "concept": str(folder.resolve()),
                "flags": as_flags(changes),
                "steps": a.steps,
                "size": self.size,
                "batch": a.batch,
                "seed": a.seed,
            }
        )
        run = self.runs_dir / f"{folder.name}-{tag}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
        if (
            (run / "embeddings.pt").is_file()
            and (run / "figure-key.json").is_file()
            and (run / "figure-key.json").read_text() == key
        ):
            log.info("reusing %s", run)
            return self.load_run(run)
        steps = {"steps": a.steps, "save_every": a.steps} if a.steps else {}
        config = TrainConfig(
            concept=str(folder),
            model=a.model,
            ckpt=a.ckpt,
            out=str(run),
            overwrite=True,
            recipe="official",  # the figures reproduce the paper
            seed=a.seed,
            size=self.size,
            batch=a.batch,
            val_every=0,
            latent_cache="",
            no_progress=True,
            device=str(self.device),
            **steps,
            **changes,
        )
        log.info("training %s (%s) → %s", folder.name, " ".join(as_flags(changes)) or "defaults", run)
        train(config, model=self.fresh())
        atomic_write(run / "figure-key.json", lambda f: f.write(key.encode()))
        return self.load_run(run)

    def load_run(self, run: Path) -> Word:
        """A run directory's learned word(s) (all rows of the file, per-image tokens included)."""
        from inversion.embedding import load_embedding_file

        info = RunDir(run).options()
        vectors = load_embedding_file(RunDir(run).embedding_file())
        token = info.get("token") or next(iter(vectors))
        if token not in vectors:
            vectors = {token: next(iter(vectors.values()))}
        concept = info.get("concept")
        folder = None
        if concept:
            try:
                folder = resolve_concept(concept, self.out_root)
            except InversionError:
                log.warning("run %s: its concept %s is gone", run, concept)
        return Word(token, run, folder, vectors)

    def words(
        self, default_concepts: Sequence[str], changes: dict | None = None, tag: str = "word", count: int | None = None
    ) -> list[Word]:
        """--run dirs if given, else --concept (or the figure's default concepts) trained with `changes`."""
        a = self.args
        given = split_list(a.run) if a.run else (split_list(a.concept) or list(default_concepts))
        if count is not None and len(given) != count:
            what = "--run" if a.run else "--concept"
            raise FigureError(
                f"this figure needs {count} learned word(s) but {what} names {len(given)}; "
                f"give {what} " + ",".join(f"X{i + 1}" for i in range(count))
            )
        if a.run:
            return [self.load_run(Path(r)) for r in given]
        return [self.train_word(c, changes, tag) for c in given]

    def model_with(self, words: Sequence[Word]):
        """A fresh model holding these words (tokens must differ)."""
        model = self.fresh()
        seen: set[str] = set()
        for w in words:
            for token, vectors in w.vectors.items():
                if token in seen:
                    raise FigureError(f"two runs both learned {token!r}; retrain one with another TOKEN=")
                seen.add(token)
                model.add_embedding(token, vectors.to(torch.float32))
        return model

    def sample(self, model, prompt: str, n: int | None = None, seed: int | None = None) -> list[Image.Image]:
        """n images of one prompt; image i uses seed + i."""
        return model.sample(
            [prompt] * (n or self.args.n),
            steps=self.sample_steps,
            scale=self.scale,
            seed=self.args.seed if seed is None else seed,
            height=self.size,
            width=self.size,
            progress=False,
        )


def fill(prompt: str, words: Sequence[Word]) -> str:
    """S* → the first word's token; S1, S2 → the first and second."""
    for i, w in enumerate(words):
        prompt = re.sub(rf"\bS{i + 1}\b", w.token, prompt)
    return prompt.replace(MARKER, words[0].token) if words else prompt


def concept_images(folder: Path | None, size: int, limit: int = 8) -> list[Image.Image]:
    """The concept's training images as PIL (official preprocessing, no flip), at most `limit`."""
    if folder is None:
        return []
    from inversion import data as D
    from ldm.images import to_pil

    images = D.ConceptImages(folder, size)
    k = min(limit, len(images))
    return to_pil(images.batch(list(range(k)), [False] * k))


# --- pictures and files ------------------------------------------------------------------------------------


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], cell: int | None = None, title: str = "") -> Image.Image:
    """Rows of images, each under its caption (the paper's figure layout), on white."""
    images = [im for _, ims in rows for im in ims]
    if not images:
        raise FigureError("nothing to draw")
    cell = cell or max(96, min(256, images[0].size[0]))
    text_h = max(14, cell // 8)
    font = _font(text_h - 4)
    cols = max(len(ims) for _, ims in rows)
    top = text_h + 4 if title else 0
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max([cols * cell] + [int(measure.textlength(t, font=font)) + 8 for t in [title, *(c for c, _ in rows)]])
    canvas = Image.new("RGB", (width, top + len(rows) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    for r, (caption, ims) in enumerate(rows):
        y = top + r * (cell + text_h)
        draw.text((4, y + 1), caption, fill="black", font=font)
        if ims:
            cells = [
                im.convert("RGB").resize((cell, cell), Image.NEAREST if im.size[0] < cell else Image.BICUBIC)
                for im in ims
            ]
            canvas.paste(image_grid(cells, cols=len(cells)), (0, y + text_h))
    return canvas


def save_png(image: Image.Image, path: Path) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def save_json(obj: dict, path: Path) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def out_dir(args: argparse.Namespace, name: str) -> Path:
    out = Path(args.out) if args.out else OUT_ROOT / name
    done = [p for p in (out / f"{name}.png", out / f"{name}.json") if p.exists()]
    if done and not getattr(args, "overwrite", False):
        raise FigureError(
            f"{done[0]} already exists; pass --overwrite (ARGS=--overwrite) to redraw it, or choose another OUT"
        )
    try:
        return cli.check_writable(out, "--out")
    except cli.UsageError as e:
        raise FigureError(str(e)) from None


def header(ctx: Context, name: str, words: Sequence[Word]) -> dict:
    """The metadata every figure JSON starts with."""
    a = ctx.args
    return {
        "figure": name,
        "model": ctx.base().config.name,
        "ckpt": a.ckpt,
        "smoke": a.smoke,
        "words": [{"token": w.token, "run": str(w.run), "concept": str(w.concept)} for w in words],
        "size": ctx.size,
        "sample_steps": ctx.sample_steps,
        "scale": ctx.scale,
        "seed": a.seed,
        "n": a.n,
        "training_steps": a.steps,
    }


def prompt_figure(
    ctx: Context, name: str, words: Sequence[Word], model, head: list, prompts: Sequence[str], title: str, **extra
) -> dict:
    """A grid of `head` rows, then one row of samples per prompt (S* filled in); writes <name>.png and
    <name>.json (header, prompts, `extra`) and returns that metadata with the png path and a summary."""
    rows = head + [(f'"{p}"', ctx.sample(model, fill(p, words))) for p in prompts]
    rows = [r for r in rows if r[1]]
    out = out_dir(ctx.args, name)
    png = save_png(grid(rows, title=title), out / f"{name}.png")
    info = {**header(ctx, name, words), "prompts": prompts, **extra}
    save_json(info, out / f"{name}.json")
    return {**info, "png": str(png), "summary": f"{len(prompts)} prompts × {ctx.args.n}"}


def default_concepts(ctx: Context, count: int = 1) -> list[str]:
    """The figures' default concept(s): the held-out shape on the shapes model, else the shipped cat."""
    from experiments.shapes.world import HELD_OUT

    shapes = ctx.args.ckpt is None and ctx.args.model == "shapes"
    pool = [f"shapes-{HELD_OUT}", "shapes-heart"] if shapes else ["cat", f"shapes-{HELD_OUT}"]
    return pool[:count]


def run_figure(module, argv: Sequence[str] | None = None, ctx: Context | None = None) -> dict:
    """Parse a figure's options, run it, and print one summary line (the `python -m` entry of every script)."""
    p = base_parser(module.NAME, module.__doc__.split("\n")[0])
    module.add_arguments(p)
    args = finish_args(p.parse_args(argv))
    if hasattr(module, "check_args"):  # the figure's own options, before anything loads
        module.check_args(args)
    if ctx is None:
        ctx = Context(args)
    else:  # shared by `all`: same model and runs, this figure's options
        ctx.args = args
    result = module.run(ctx)
    print(f"{module.NAME}: {result['png']} ({result['summary']})")
    return result


def script_main(module) -> int:
    """`python -m experiments.figures.<script>`: run_figure with one-line errors (exit 2)."""

    def main(argv: list[str] | None) -> int:
        run_figure(module, argv)
        return 0

    return cli.run(main)
