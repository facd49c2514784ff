"""Text-guided synthesis (Gal et al. 2022, Fig. 3/5): the learned word in new scenes and styles."""
from __future__ import annotations

import sys

from experiments.figures import _common as C

NAME = "text-guided"
PROMPTS = ("a photo of S* on the beach", "an oil painting of S*", "a S* made of lego",
           "a photo of S* in the jungle", "a watercolor painting of S* in the snow", "Elmo holding a S*")


def add_arguments(p) -> None:
    pass


def run(ctx: C.Context) -> dict:
    a = ctx.args
    words = ctx.words(C.default_concepts(ctx), count=1)
    model = ctx.model_with(words)
    prompts = C.prompts_or(a, PROMPTS)
    rows = [("training images", C.concept_images(words[0].concept, ctx.size, limit=a.n))]
    rows += [(f'"{p}"', ctx.sample(model, C.fill(p, words))) for p in prompts]
    rows = [r for r in rows if r[1]]
    out = C.out_dir(a, NAME)
    png = C.save_png(C.grid(rows, title=f"text-guided synthesis with {words[0].token}"), out / f"{NAME}.png")
    info = {**C.header(ctx, NAME, words), "prompts": prompts}
    C.save_json(info, out / f"{NAME}.json")
    return {**info, "png": str(png), "summary": f"{len(prompts)} prompts × {a.n}"}


if __name__ == "__main__":
    sys.exit(C.script_main(sys.modules[__name__]))
