"""Text-to-image sampling from the command line: `python -m ldm.sample --prompt "a photo of a cat"`.

Writes one PNG per image and a grid, each carrying its parameters in a PNG text chunk named `parameters`
(the AUTOMATIC1111 convention), never overwriting an existing file.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import re
import sys
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from ldm import cli

log = logging.getLogger("ldm.sample")

SAMPLER_NAMES = {"ddim": "DDIM", "plms": "PLMS", "ddpm": "DDPM", "dpmpp_2m": "DPM++ 2M"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ldm.sample", description="Sample images from a text prompt.")
    p.add_argument("--prompt", required=True)
    p.add_argument("--neg", default="", help="negative prompt")
    p.add_argument("--model", default=None, help=f"one of {', '.join(cli.MODEL_CHOICES)} (default sd15)")
    p.add_argument("--ckpt", default=None, help="a checkpoint file or diffusers folder (overrides --model)")
    p.add_argument("--prediction", choices=("eps", "v"), default=None, help="override the parameterisation")
    p.add_argument("--allow-pickle", action="store_true",
                   help="let a .ckpt run pickled code (only for files you trust)")
    p.add_argument("--n", type=int, default=4, help="number of images")
    p.add_argument("--batch-size", type=int, default=None, help="images per UNet batch (default: all)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--scale", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--sampler", default="ddim", help=f"one of {', '.join(SAMPLER_NAMES)}")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--H", type=int, default=None, help="height in pixels (default: the model's)")
    p.add_argument("--W", type=int, default=None, help="width in pixels (default: the model's)")
    p.add_argument("--out", type=Path, default=Path("outputs/samples"))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--attention", default=None, help="attention backend: math, sdpa, triton, auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (first step is slow)")
    p.add_argument("--cuda-graph", action="store_true", help="replay the UNet step as a CUDA graph (CUDA only)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms, reference kernels (per-device promise: ldm/determinism.py)")
    p.add_argument("--embedding", default=None, help="learned embedding file(s), comma-separated")
    p.add_argument("--token", default=None, help="the word to use for a single embedding file")
    from inversion import curate

    curate.add_arguments(p)          # --best-of --keep --rank --concept --clip-weights --image-weight
    return p.parse_args(argv)


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


def model_hash(args: argparse.Namespace) -> tuple[str, str]:
    """(AUTOMATIC1111-style short sha256, model name) of the checkpoint used."""
    model = args.model or "sd15"
    if args.ckpt is None and model == "tiny":
        return "tiny", "tiny"
    if args.ckpt is None and model not in cli.LOCAL_MODELS:
        from weights.download import manifest

        entry = manifest()[model]
        if entry["sha256"]:
            return entry["sha256"][:10], Path(entry["file"]).stem
    path = Path(args.ckpt) if args.ckpt else cli.model_path(model)
    if path.is_dir():
        return "", path.name
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:10], path.stem


def infotext(prompt: str, neg: str, steps: int, sampler: str, scale: float, seed: int, width: int, height: int,
             mhash: str, mname: str) -> str:
    """AUTOMATIC1111's parameters text: prompt, negative prompt, then one line of key: value pairs."""
    lines = [prompt]
    if neg:
        lines.append(f"Negative prompt: {neg}")
    fields = [f"Steps: {steps}", f"Sampler: {SAMPLER_NAMES[sampler]}", f"CFG scale: {scale:g}", f"Seed: {seed}",
              f"Size: {width}x{height}"]
    if mhash:
        fields.append(f"Model hash: {mhash}")
    fields.append(f"Model: {mname}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def make_grid(images: list[Image.Image]) -> Image.Image:
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def add_embeddings(model, spec: str, token: str | None) -> list[str]:
    """Load learned words from files (official, diffusers, AUTOMATIC1111, kohya) into the model."""
    from inversion.embedding import check_width, load_embedding_file

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sampler not in SAMPLER_NAMES:
        raise cli.UsageError(f"unknown SAMPLER={args.sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    if args.steps is not None and args.steps <= 0:
        raise cli.UsageError(f"STEPS must be a positive number, got {args.steps}")
    if args.n <= 0:
        raise cli.UsageError(f"N must be a positive number, got {args.n}")
    from inversion import curate

    curate.check_args(args)
    for name, v in (("H", args.H), ("W", args.W)):
        if v is not None and (v <= 0 or v % 8):
            raise cli.UsageError(f"{name}={v} must be a positive multiple of 8")
    if args.attention:
        from ldm import attention

        attention.set_backend(args.attention)
    out = cli.check_writable(args.out)
    device = cli.pick_device(args.device)
    if args.deterministic:
        from ldm import determinism

        determinism.enable(device, args.seed)
    dtype = cli.pick_dtype(args.dtype, device)
    model = cli.load(args.model, args.ckpt, device, dtype, args.prediction, args.allow_pickle)
    if args.compile:
        from ldm.precision import maybe_compile

        maybe_compile(model.unet, True)
    words: list[str] = []
    if args.embedding:
        words = add_embeddings(model, args.embedding, args.token)
        log.info("learned words: %s", ", ".join(words))
    cfg = model.config
    steps = args.steps or cfg.steps
    scale = cfg.guidance if args.scale is None else args.scale
    height, width = args.H or cfg.image_size, args.W or cfg.image_size
    mhash, mname = model_hash(args)
    total = args.best_of or args.n                     # BEST_OF candidates, KEEP of them saved
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
            images = model.sample([args.prompt] * count, [args.neg] * count, steps=steps, scale=scale,
                                  eta=args.eta, sampler=args.sampler, seed=args.seed + first, height=height,
                                  width=width, cuda_graph=args.cuda_graph)
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
    grid = save_png(make_grid(written), out / f"{start:05d}-grid.png", params)
    print(f"sample: {len(written)} images in {out} (grid {grid.name})")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
