"""Concept composition (Gal et al. 2022, Fig. 7): two learned words, S1 and S2, in one prompt."""

from __future__ import annotations

import sys

from experiments.figures import _common as C

NAME = "composition"
PROMPTS = (
    "a photo of S1 next to S2",
    "S1 in the style of S2",
    "S2 in the style of S1",
    "a painting of S1 and S2 on the beach",
)


def add_arguments(p) -> None:
    pass


def run(ctx: C.Context) -> dict:
    a = ctx.args
    words = ctx.words(C.default_concepts(ctx, 2), count=2)
    if words[0].token == words[1].token:
        raise C.FigureError(f"both runs learned {words[0].token!r}; composition needs two different words")
    model = ctx.model_with(words)
    prompts = C.prompts_or(a, PROMPTS)
    head = [(f"S{i + 1} = {w.token}", C.concept_images(w.concept, ctx.size, limit=a.n)) for i, w in enumerate(words)]
    return C.prompt_figure(
        ctx,
        NAME,
        words,
        model,
        head,
        prompts,
        f"composition of {words[0].token} and {words[1].token}",
        filled=[C.fill(p, words) for p in prompts],
    )


if __name__ == "__main__":
    sys.exit(C.script_main(sys.modules[__name__]))
