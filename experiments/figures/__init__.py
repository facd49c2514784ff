"""The paper's figures (Gal et al. 2022), one script each: `python -m experiments.figures <name>|all`.

variations    object variations: "a photo of S*" next to the training images (paper Fig. 1/4)
text-guided   the concept in new scenes and styles (Fig. 3/5)
style         a style word: "... in the style of S*" (Fig. 6)
composition   two learned words in one prompt (Fig. 7)
bias          a word learned from a small balanced set vs the plain word (Fig. 8)
tradeoff      reconstruction (image similarity) vs editability (text similarity) per variant (Fig. 10),
              and the table in experiments/RESULTS.md
downstream    localized editing: S* put into a masked region with Blended Latent Diffusion (Fig. 12)
"""

from __future__ import annotations

FIGURES = {
    "variations": "experiments.figures.variations",
    "text-guided": "experiments.figures.text_guided",
    "style": "experiments.figures.style",
    "composition": "experiments.figures.composition",
    "bias": "experiments.figures.bias",
    "tradeoff": "experiments.figures.tradeoff",
    "downstream": "experiments.figures.downstream",
}


def figure_module(name: str):
    """The script module of a figure name; an unknown name is a one-line FigureError."""
    import importlib

    from experiments.figures._common import FigureError

    if name not in FIGURES:
        raise FigureError(f"unknown figure {name!r}; choose one of {', '.join(FIGURES)} or all")
    return importlib.import_module(FIGURES[name])
