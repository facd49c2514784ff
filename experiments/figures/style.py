"""Style transfer (Gal et al. 2022, Fig. 6): a word learned with the style templates, used as "… in the style of S*"."""

from __future__ import annotations

import sys

from experiments.figures import _common as C

NAME = "style"
PROMPTS = (
    "a painting of a dog in the style of S*",
    "a photo of a house in the style of S*",
    "a portrait of a woman in the style of S*",
    "a landscape with mountains in the style of S*",
)


def add_arguments(p) -> None:
    p.add_argument("--init", default="painting", help="one-token init word of the style word (default painting)")


def run(ctx: C.Context) -> dict:
    a = ctx.args
    changes = {"templates": "style", "init": a.init}
    words = ctx.words(C.default_concepts(ctx), changes=changes, tag="style", count=1)
    model = ctx.model_with(words)
    prompts = C.prompts_or(a, PROMPTS)
    head = [("style images", C.concept_images(words[0].concept, ctx.size, limit=a.n))]
    return C.prompt_figure(
        ctx,
        NAME,
        words,
        model,
        head,
        prompts,
        f"style transfer with {words[0].token} (style templates)",
        trainer_flags=[] if a.run else C.as_flags(changes),
    )


if __name__ == "__main__":
    sys.exit(C.script_main(sys.modules[__name__]))
