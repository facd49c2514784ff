"""Text-guided synthesis (Gal et al. 2022, Fig. 3/5): the learned word in new scenes and styles."""

from __future__ import annotations

import sys

from experiments.figures import _common as C

NAME = "text-guided"
PROMPTS = (
    "a photo of S* on the beach",
    "an oil painting of S*",
    "a S* made of lego",
    "a photo of S* in the jungle",
    "a watercolor painting of S* in the snow",
    "Elmo holding a S*",
)


def add_arguments(p) -> None:
    pass


def run(ctx: C.Context) -> dict:
    a = ctx.args
    words = ctx.words(C.default_concepts(ctx), count=1)
    model = ctx.model_with(words)
    prompts = C.prompts_or(a, PROMPTS)
    head = [("training images", C.concept_images(words[0].concept, ctx.size, limit=a.n))]
    return C.prompt_figure(ctx, NAME, words, model, head, prompts, f"text-guided synthesis with {words[0].token}")


if __name__ == "__main__":
    sys.exit(C.script_main(sys.modules[__name__]))
