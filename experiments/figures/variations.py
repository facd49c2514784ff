"""Object variations (Gal et al. 2022, Fig. 1/4): "a photo of S*" samples beside the concept's training images."""

from __future__ import annotations

import sys

from experiments.figures import _common as C

NAME = "variations"
PROMPT = "a photo of S*"


def add_arguments(p) -> None:
    p.add_argument("--rows", type=int, default=1, help="rows of N samples (default 1)")


def run(ctx: C.Context) -> dict:
    a = ctx.args
    words = ctx.words(C.default_concepts(ctx), count=1)
    model = ctx.model_with(words)
    prompt = C.prompts_or(a, [PROMPT])[0]
    rows = [("training images", C.concept_images(words[0].concept, ctx.size, limit=max(a.n, 4)))]
    for r in range(max(1, a.rows)):
        rows.append((f'"{prompt}"' if r == 0 else "", ctx.sample(model, C.fill(prompt, words), seed=a.seed + r * a.n)))
    rows = [r for r in rows if r[1]]
    out = C.out_dir(a, NAME)
    png = C.save_png(
        C.grid(rows, title=f"object variations of {words[0].token} ({ctx.base().config.name})"), out / f"{NAME}.png"
    )
    info = {
        **C.header(ctx, NAME, words),
        "prompt": prompt,
        "rows": [cap for cap, _ in rows],
        "samples": sum(len(ims) for cap, ims in rows[1:]),
    }
    C.save_json(info, out / f"{NAME}.json")
    return {**info, "png": str(png), "summary": f"{info['samples']} samples of {prompt!r}"}


if __name__ == "__main__":
    sys.exit(C.script_main(sys.modules[__name__]))
