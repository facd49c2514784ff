"""Text-to-image sampling from the command line: `python -m apps.sample --prompt "a photo of a cat"`.

Writes one PNG per image and a grid, each carrying its parameters in a PNG text chunk named `parameters`
(the AUTOMATIC1111 convention), never overwriting an existing file.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from inversion import curate, models
from inversion.embedding import check_width, load_embedding_file
from inversion.models import model_hash
from ldm import attention, cli, determinism
from ldm.attention import BACKENDS
from ldm.images import image_grid
from ldm.precision import DTYPES, maybe_compile

log = logging.getLogger("apps.sample")

SAMPLER_NAMES = {"ddim": "DDIM", "plms": "PLMS", "ddpm": "DDPM", "dpmpp_2m": "DPM++ 2M"}


def add_arguments(p: argparse.ArgumentParser, out: str = "outputs/samples") -> None:
    """The options `make sample` and `make edit` share: prompt, model, sampling, output, device, learned words."""
    p.add_argument("--prompt", required=True)
    p.add_argument("--neg", default="", help="negative prompt")
    p.add_argument("--model", default=None, help=f"one of {', '.join(models.MODEL_CHOICES)} (default sd15)")
    p.add_argument("--ckpt", default=None, help="a checkpoint file or diffusers folder (overrides --model)")
    p.add_argument("--prediction", choices=("eps", "v"), default=None, help="override the parameterisation")
    p.add_argument(
        "--allow-pickle", action="store_true", help="let a .ckpt run pickled code (only for files you trust)"
    )
    p.add_argument("--n", type=int, default=4, help="number of images")
    p.add_argument("--batch-size", type=int, default=None, help="images per UNet batch (default: all)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--scale", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--sampler", default="ddim", help=f"one of {', '.join(SAMPLER_NAMES)}")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--attention", default=None, help="attention backend: math, sdpa, triton, auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (first step is slow)")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms, reference kernels (per-device promise: ldm/determinism.py)",
    )
    p.add_argument("--embedding", default=None, help="learned embedding file(s), comma-separated")
    p.add_argument("--token", default=None, help="the word to use for a single embedding file")


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m apps.sample", description="Sample images from a text prompt.")
    add_arguments(p)
    p.add_argument("--H", type=int, default=None, help="height in pixels (default: the model's)")
    p.add_argument("--W", type=int, default=None, help="width in pixels (default: the model's)")
    p.add_argument("--cuda-graph", action="store_true", help="replay the UNet step as a CUDA graph (CUDA only)")
    curate.add_arguments(p)  # --best-of --keep --rank --concept --clip-weights --image-weight
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def next_index(folder: Path) -> int:
    """One past the highest numbered image already in folder, so nothing is overwritten."""
    taken = [int(m.group(1)) for f in folder.iterdir() if (m := re.match(r"(\d{5})-", f.name))]
    return max(taken, default=-1) + 1


def save_png(image: Image.Image, path: Path, parameters: str) -> Path:
    """Write a PNG with a `parameters` text chunk, atomically and never over an existing file."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.link(tmp, path)  # fails if path exists: never overwrite
    finally:
        os.unlink(tmp)
    return path


def infotext(
    prompt: str,
    neg: str,
    steps: int,
    sampler: str,
    scale: float,
    seed: int,
    width: int,
    height: int,
    mhash: str,
    mname: str,
    extra: dict[str, object] | None = None,
) -> str:
    """AUTOMATIC1111's parameters text: prompt, negative prompt, then one line of key: value pairs (`extra` last,
    e.g. img2img's Denoising strength)."""
    lines = [prompt]
    if neg:
        lines.append(f"Negative prompt: {neg}")
    fields = [
        f"Steps: {steps}",
        f"Sampler: {SAMPLER_NAMES[sampler]}",
        f"CFG scale: {scale:g}",
        f"Seed: {seed}",
        f"Size: {width}x{height}",
    ]
    if mhash:
        fields.append(f"Model hash: {mhash}")
    fields.append(f"Model: {mname}")
    fields += [f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}" for k, v in (extra or {}).items()]
    lines.append(", ".join(fields))
    return "\n".join(lines)


def add_embeddings(model, spec: str, token: str | None) -> list[str]:
    """Load learned words from files (official, diffusers, AUTOMATIC1111, kohya) into the model."""
    files = [s for s in spec.split(",") if s]
    if token and len(files) > 1:
        raise cli.UsageError("TOKEN= names the word of a single embedding file; give one file")
    words = []
    for f in files:
        if not Path(f).exists():
            raise cli.UsageError(f"EMBEDDING={f}: no such file")
        for word, vectors in load_embedding_file(f, token=token).items():
            check_width(vectors, model)
            model.add_embedding(word, vectors)
            words.append(word)
    return words


def check_args(args: argparse.Namespace) -> None:
    """Every add_arguments option that can be checked before the model loads: one line naming it, exit 2."""
    cli.check(
        [
            (
                args.sampler in SAMPLER_NAMES,
                f"unknown SAMPLER={args.sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}",
            ),
            cli.at_least("STEPS", args.steps),
            cli.at_least("N", args.n),
            cli.at_least("--batch-size", args.batch_size),
            cli.finite("SCALE", args.scale),
            cli.finite("ETA", args.eta, 0.0),
            cli.seed_rule("SEED", args.seed),
            *models.choice_rules(args.model, args.ckpt),
            (args.dtype in DTYPES, f"unknown DTYPE={args.dtype!r}; choose one of {', '.join(DTYPES)}"),
            (
                args.attention is None or args.attention in BACKENDS,
                f"unknown ATTENTION={args.attention!r}; choose one of {', '.join(BACKENDS)}",
            ),
            (
                not (args.token and args.embedding and "," in args.embedding),
                "TOKEN= names the word of a single embedding file; give one EMBEDDING= file",
            ),
            (not (args.token and not args.embedding), f"TOKEN={args.token!r} needs EMBEDDING= (the file it names)"),
        ]
    )
    for f in [s for s in (args.embedding or "").split(",") if s]:
        if not Path(f).is_file():
            raise cli.UsageError(f"EMBEDDING={f}: no such file")


def check_size(model, height: int, width: int) -> None:
    """Image sides must be multiples of the model's latent factor: an error, never a silent rounding."""
    cli.check([cli.multiple_rule("H", height, model.latent_factor), cli.multiple_rule("W", width, model.latent_factor)])


def load_model(args: argparse.Namespace):
    """(model with the learned words, those words, device) from add_arguments' options."""
    if args.attention:
        attention.set_backend(args.attention)
    device = cli.pick_device(args.device)
    if args.deterministic:
        determinism.enable(device, args.seed)
    dtype = cli.pick_dtype(args.dtype, device)
    model = models.load(args.model, args.ckpt, device, dtype, args.prediction, args.allow_pickle)
    if args.compile:
        maybe_compile(model.unet, True)
    words: list[str] = []
    if args.embedding:
        words = add_embeddings(model, args.embedding, args.token)
        log.info("learned words: %s", ", ".join(words))
    return model, words, device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    cli.check([cli.at_least("H", args.H, 8), cli.at_least("W", args.W, 8)])
    curate.check_args(args)
    curate.check_files(args)
    out = cli.check_writable(args.out)
    model, words, device = load_model(args)
    cfg = model.config
    steps = args.steps or cfg.steps
    cli.check([cli.steps_rule("STEPS", steps, model)])
    scale = cfg.guidance if args.scale is None else args.scale
    height, width = args.H or cfg.image_size, args.W or cfg.image_size
    check_size(model, height, width)
    mhash, mname = model_hash(args.model, args.ckpt)
    total = args.best_of or args.n  # BEST_OF candidates, KEEP of them saved
    batch = args.batch_size or total
    start = next_index(out)
    written: list[Image.Image] = []

    def write(image: Image.Image, seed: int, note: str = "") -> None:
        params = infotext(args.prompt, args.neg, steps, args.sampler, scale, seed, width, height, mhash, mname)
        path = save_png(image, out / f"{start + len(written):05d}-{seed}.png", params + note)
        log.info("wrote %s", path)
        written.append(image)

    drawn: list[tuple[Image.Image, int]] = []
    try:
        for first in range(0, total, batch):
            count = min(batch, total - first)
            images = model.sample(
                [args.prompt] * count,
                [args.neg] * count,
                steps=steps,
                scale=scale,
                eta=args.eta,
                sampler=args.sampler,
                seed=args.seed + first,
                height=height,
                width=width,
                cuda_graph=args.cuda_graph,
            )
            for i, image in enumerate(images):
                if args.best_of:
                    drawn.append((image, args.seed + first + i))
                else:
                    write(image, args.seed + first + i)  # written as they come: Ctrl-C keeps what is done
    except KeyboardInterrupt:
        kept = f"the {len(written)} image(s) already written in {out} are kept" if written else "no image was done"
        print(f"interrupted: {kept}; --batch-size 1 writes each image as soon as it is done", file=sys.stderr)
        return 130
    if args.best_of:
        chosen = curate.select([im for im, _ in drawn], args, words, device)
        for i, score in chosen:
            write(drawn[i][0], drawn[i][1], f", Curated: {args.rank} {score:.4f}, best {len(chosen)} of {total}")
    params = infotext(args.prompt, args.neg, steps, args.sampler, scale, args.seed, width, height, mhash, mname)
    grid = save_png(image_grid(written), out / f"{start:05d}-grid.png", params)
    print(f"sample: {len(written)} images in {out} (grid {grid.name})")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
