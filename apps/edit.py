"""Editing from the command line: `python -m apps.edit --image photo.png [--mask mask.png] --prompt "..."`.

Without a mask: image-to-image (SDEdit, as the original Stable Diffusion img2img script); with a mask (white =
edit, any single-channel or RGB image): Blended Latent Diffusion, then every pixel outside the mask is the
input's. Takes the options of `apps.sample` except the size: the output has the input's size. Sides that are not
multiples of the model's factor (64 px for Stable Diffusion, 8 for the shapes model) are resized down to the next
multiple, with a notice, as the original img2img does; a mask of another size is resized to the image's.

Writes one PNG per image and a grid under --out (default outputs/edits), each with AUTOMATIC1111's img2img
`parameters` text (Denoising strength, and Mask blur for masks), never overwriting an existing file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from PIL import Image

from apps import sample
from inversion.data import load_image
from inversion.models import model_hash
from ldm import cli
from ldm.images import image_grid, mask_tensor

log = logging.getLogger("apps.edit")

MAX_SIDE_FACTOR = 4  # sides up to 4× the model's training size (2048 px for SD 1.x): past that, downscale first


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m apps.edit", description="Edit an image with a text prompt.")
    p.add_argument("--image", required=True, help="the picture to edit")
    p.add_argument("--mask", default=None, help="white = edit, black = keep (any single-channel or RGB image)")
    p.add_argument(
        "--strength",
        type=float,
        default=0.75,
        help="how much to change, in (0, 1]: 1 starts from pure noise (default 0.75)",
    )
    p.add_argument("--mask-blur", type=int, default=4, help="feathered edge inside the mask, in pixels (default 4)")
    p.add_argument("--mask-dilate", type=int, default=0, help="grow the mask by this many pixels first")
    sample.add_arguments(p, out="outputs/edits")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    sample.check_args(args)
    check_edit(args.strength, args.mask_blur, args.mask_dilate)


def check_edit(strength: float, mask_blur: int, mask_dilate: int = 0) -> None:
    """The editing settings' ranges: strength in (0, 1], mask blur and dilation in pixels ≥ 0."""
    if not 0.0 < strength <= 1.0:
        raise cli.UsageError(f"STRENGTH={strength:g} must be in (0, 1] (1 = start from pure noise)")
    for name, v in (("MASK_BLUR", mask_blur), ("MASK_DILATE", mask_dilate)):
        if v < 0:
            raise cli.UsageError(f"{name}={v} must be 0 or more pixels")


def read_image(path: str, what: str) -> Image.Image:
    """An RGB image through the training data's guards (decompression-bomb limit, corrupt files: one line)."""
    if not Path(path).is_file():
        raise cli.UsageError(f"{what}={path}: no such file")
    return load_image(path)


def fit(image: Image.Image, factor: int, train_size: int, path: str) -> Image.Image:
    """The image at sides the model can take: at most MAX_SIDE_FACTOR× its training size, multiples of factor."""
    w, h = image.size
    limit = MAX_SIDE_FACTOR * train_size
    if max(w, h) > limit:
        raise cli.UsageError(
            f"IMAGE={path} is {w}×{h} px; this model ({train_size} px) edits at most {limit} px a "
            "side — downscale it first"
        )
    fw, fh = w - w % factor, h - h % factor
    if fw == 0 or fh == 0:
        raise cli.UsageError(f"IMAGE={path} is {w}×{h} px; this model needs at least {factor} px a side")
    if (fw, fh) != (w, h):
        log.warning(
            "IMAGE=%s is %d×%d px: resized to %d×%d (this model needs multiples of %d)", path, w, h, fw, fh, factor
        )
        image = image.resize((fw, fh), Image.LANCZOS)
    return image


def check_mask(mask: Image.Image, dilate: int, path: str) -> None:
    """A mask with no white pixel (after dilation) edits nothing: refused."""
    if not bool(mask_tensor(mask, mask.size[1], mask.size[0], dilate).any()):
        raise cli.UsageError(f"MASK={path} is empty (no white pixel): nothing to edit")


def prepare(
    image: Image.Image, mask: Image.Image | None, model, dilate: int, image_path: str, mask_path: str | None
) -> tuple[Image.Image, Image.Image | None]:
    """(image, mask) as the model edits them: the image `fit`, the mask resized to it and checked; a mask that
    covers the whole image is None (plain image-to-image)."""
    image = fit(image, model.latent_factor, model.config.image_size, image_path)
    if mask is None:
        return image, None
    if mask.size != image.size:
        log.warning(
            "MASK=%s is %d×%d px and the image %d×%d: the mask is resized to the image",
            mask_path,
            *mask.size,
            *image.size,
        )
        mask = mask.resize(image.size, Image.NEAREST)
    m = mask_tensor(mask, image.size[1], image.size[0], dilate)
    if not bool(m.any()):
        raise cli.UsageError(f"MASK={mask_path} is empty (no white pixel): nothing to edit")
    if bool(m.all()):
        log.warning("MASK=%s covers the whole image: plain image-to-image", mask_path)
        return image, None
    return image, mask


def extra_parameters(strength: float, mask: Image.Image | None, mask_blur: int) -> dict[str, object]:
    """img2img's fields of the `parameters` text, after the common ones: Denoising strength[, Mask blur]."""
    extra: dict[str, object] = {"Denoising strength": float(strength)}
    if mask is not None:
        extra["Mask blur"] = mask_blur
    return extra


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    image = read_image(args.image, "IMAGE")
    mask = read_image(args.mask, "MASK") if args.mask else None
    if mask is not None:
        check_mask(mask, args.mask_dilate, args.mask)
    out = cli.check_writable(args.out)
    model, _, _ = sample.load_model(args)
    cfg = model.config
    image, mask = prepare(image, mask, model, args.mask_dilate, args.image, args.mask)
    width, height = image.size
    steps = args.steps or cfg.steps
    cli.check([cli.steps_rule("STEPS", steps, model)])
    scale = cfg.guidance if args.scale is None else args.scale
    mhash, mname = model_hash(args.model, args.ckpt)
    extra = extra_parameters(args.strength, mask, args.mask_blur)

    def params(seed: int) -> str:
        return sample.infotext(
            args.prompt, args.neg, steps, args.sampler, scale, seed, width, height, mhash, mname, extra
        )

    batch = args.batch_size or args.n
    start = sample.next_index(out)
    written: list[Image.Image] = []
    try:
        for first in range(0, args.n, batch):
            count = min(batch, args.n - first)
            images = model.edit(
                image,
                [args.prompt] * count,
                negative_prompts=[args.neg] * count,
                mask=mask,
                strength=args.strength,
                steps=steps,
                scale=scale,
                eta=args.eta,
                sampler=args.sampler,
                seed=args.seed + first,
                mask_dilate=args.mask_dilate,
                mask_blur=args.mask_blur,
            )
            for i, im in enumerate(images):
                seed = args.seed + first + i
                path = sample.save_png(im, out / f"{start + len(written):05d}-{seed}.png", params(seed))
                log.info("wrote %s", path)
                written.append(im)
    except KeyboardInterrupt:
        kept = f"the {len(written)} image(s) already written in {out} are kept" if written else "no image was done"
        print(f"interrupted: {kept}; --batch-size 1 writes each image as soon as it is done", file=sys.stderr)
        return 130
    grid = sample.save_png(image_grid(written), out / f"{start:05d}-grid.png", params(args.seed))
    print(f"edit: {len(written)} images in {out} (grid {grid.name})")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
