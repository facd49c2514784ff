"""Downstream application (Gal et al. 2022, Fig. 12): S* put into a masked region with Blended Latent Diffusion.

Rows: input images, their masks, the localized edits. On the shapes model the inputs are world images of other
shapes, masked around the shape, and the JSON records how often the judge sees the held-out shape in the edits;
on other models the inputs are the model's own samples of SCENE with a central mask.
"""

from __future__ import annotations

import sys

from PIL import Image, ImageDraw

from experiments.figures import _common as C

NAME = "downstream"
PROMPT = "a photo of S*"
SCENE = "a photo of an empty wooden bench in a park"


def add_arguments(p) -> None:
    p.add_argument("--strength", type=float, default=1.0, help="denoising strength inside the mask (default 1)")


def check_args(args) -> None:
    if not 0 < args.strength <= 1:
        raise C.FigureError(f"--strength {args.strength} must be in (0, 1]")


def inputs(ctx: C.Context, n: int) -> tuple[list[Image.Image], list[tuple[float, float, float]]]:
    """n input images and a disk (cx, cy, r) in pixels to edit in each."""
    size = ctx.size
    if ctx.base().config.name != "shapes":
        return ctx.sample(ctx.fresh(), SCENE, n), [(size / 2, size * 0.55, size / 4)] * n
    from experiments.shapes import world

    images, labels = world.generate(4 * n, seed=ctx.args.seed, resolution=size)
    f = size / world.RESOLUTION
    pairs = [
        (Image.fromarray(im), (lab.cx * f, lab.cy * f, (lab.radius + 1.5) * f))
        for im, lab in zip(images, labels)
        if world.SHAPES[lab.shape] != world.HELD_OUT
    ][:n]
    return [im for im, _ in pairs], [d for _, d in pairs]


def run(ctx: C.Context) -> dict:
    a = ctx.args
    words = ctx.words(C.default_concepts(ctx), count=1)
    model = ctx.model_with(words)
    prompt = C.prompts_or(a, [PROMPT])[0]
    images, disks = inputs(ctx, a.n)
    masks = []
    for cx, cy, r in disks:
        m = Image.new("L", images[0].size, 0)
        ImageDraw.Draw(m).ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        masks.append(m)
    edits = model.edit(
        images,
        C.fill(prompt, words),
        mask=masks,
        strength=a.strength,
        steps=ctx.sample_steps,
        scale=ctx.scale,
        seed=a.seed,
        mask_blur=max(1, ctx.size // 32),
        progress=False,
    )
    extra = {"prompt": prompt, "strength": a.strength, "edits": len(edits)}
    if ctx.base().config.name == "shapes":
        from experiments.shapes import judge, world

        extra["held_out_rate"] = (judge.score(edits)[0] == world.SHAPES.index(world.HELD_OUT)).float().mean().item()
    rows = [("input", images), ("mask (white = edit)", [m.convert("RGB") for m in masks]), (f'"{prompt}"', edits)]
    out = C.out_dir(a, NAME)
    png = C.save_png(
        C.grid(rows, title=f"localized edits with {words[0].token} ({ctx.base().config.name})"), out / f"{NAME}.png"
    )
    info = {**C.header(ctx, NAME, words), **extra}
    C.save_json(info, out / f"{NAME}.json")
    rate = f", judged {extra['held_out_rate']:.0%} held-out shape" if "held_out_rate" in extra else ""
    return {**info, "png": str(png), "summary": f"{len(edits)} edits of {prompt!r}{rate}"}


if __name__ == "__main__":
    sys.exit(C.script_main(sys.modules[__name__]))
