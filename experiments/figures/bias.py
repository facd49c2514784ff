"""Bias reduction (Gal et al. 2022, Fig. 8): a word learned from a small balanced set vs the plain word.

The default set is `shapes-<shape>`: one image of the shape in each of the world's six colours. The figure
samples "a photo of a <word>" and "a photo of a S*" and reports, per row, the diversity of the samples
(1 − mean pairwise CLIP cosine) and, when the shapes judge (weights/shapes-judge.safetensors) is present,
the judged colour histogram and its normalised entropy (1 = all colours equally often). On the tiny or any
random-weight model the samples are noise and the numbers only prove the pipeline runs.
"""

from __future__ import annotations

import math
import sys

import torch

from experiments.figures import _common as C

NAME = "bias"


def add_arguments(p) -> None:
    p.add_argument("--word", default=None, help="the plain word (default: the shape of a shapes-<shape> set)")
    p.add_argument("--rows", type=int, default=None, help="rows of N samples per word (default 1; 4 full size)")


def diversity(features: torch.Tensor) -> float:
    """1 − mean cosine over distinct pairs of samples (0: identical, higher: more diverse)."""
    f = torch.nn.functional.normalize(features.double(), dim=1)
    n = f.shape[0]
    if n < 2:
        raise C.FigureError("diversity needs at least two samples; raise --n")
    sims = f @ f.T
    return float(1.0 - (sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def colour_entropy(counts: list[int]) -> float:
    """Entropy of a histogram divided by log(#bins): 1 when every bin is equally full, 0 for one bin."""
    total = sum(counts)
    if total == 0 or len(counts) < 2:
        return 0.0
    h = -sum(c / total * math.log(c / total) for c in counts if c)
    return max(0.0, h / math.log(len(counts)))


def judge_colours(images) -> dict | None:
    """{colour: count} from the shapes judge, or None when its weights are missing."""
    from experiments.shapes import judge, world

    if not judge.JUDGE_PATH.is_file():
        return None
    _, colours = judge.score(images)
    return {name: int((colours == i).sum()) for i, name in enumerate(world.COLOUR_NAMES)}


def check_args(args) -> None:
    if args.word is not None and not args.word.strip():
        raise C.FigureError(f"--word {args.word!r} must be a word, e.g. --word doctor")


def plain_word(ctx: C.Context, concept: str | None) -> str:
    if ctx.args.word:
        return ctx.args.word
    if concept and concept.startswith(C.SHAPES_PREFIX):
        return concept[len(C.SHAPES_PREFIX) :].split("-")[0]
    raise C.FigureError("give --word (the plain word to compare with, e.g. --word doctor)")


def run(ctx: C.Context) -> dict:
    from ldm.images import from_pil

    a = ctx.args
    if not a.run:
        plain_word(ctx, (C.split_list(a.concept) or ["shapes-circle"])[0])  # fail before training
    scorer = ctx.scorer()  # so does missing CLIP
    words = ctx.words(["shapes-circle"], count=1)
    word = plain_word(ctx, words[0].concept.name if words[0].concept else None)
    model = ctx.model_with(words)
    rows_per = a.rows or (1 if a.smoke else 4)
    report, rows = {}, [("balanced training set", C.concept_images(words[0].concept, ctx.size, limit=max(8, a.n)))]
    for key, prompt in (("plain", f"a photo of a {word}"), ("learned", "a photo of a S*")):
        images = []
        for r in range(rows_per):
            images += ctx.sample(model, C.fill(prompt, words), seed=a.seed + r * a.n)
        feats = scorer.image_features(from_pil(images))
        colours = judge_colours(images)
        entry = {"prompt": prompt, "samples": len(images), "clip_diversity": diversity(feats)}
        text = f"div {entry['clip_diversity']:.3f}"
        if colours is not None:
            entry["judge_colours"] = colours
            entry["colour_entropy"] = colour_entropy(list(colours.values()))
            text += f", colour entropy {entry['colour_entropy']:.2f}"
        report[key] = entry
        for r in range(rows_per):
            rows.append((f'"{prompt}" ({text})' if r == 0 else "", images[r * a.n : (r + 1) * a.n]))
    rows = [r for r in rows if r[1]]
    out = C.out_dir(a, NAME)
    note = " [random weights: noise]" if a.smoke else ""
    png = C.save_png(
        C.grid(rows, title=f"plain '{word}' vs {words[0].token} learned from a balanced set{note}"), out / f"{NAME}.png"
    )
    info = {**C.header(ctx, NAME, words), "word": word, "clip_weights": scorer.weights, **report}
    C.save_json(info, out / f"{NAME}.json")
    summary = (
        f"diversity plain {report['plain']['clip_diversity']:.3f} vs learned {report['learned']['clip_diversity']:.3f}"
    )
    return {**info, "png": str(png), "summary": summary}


if __name__ == "__main__":
    sys.exit(C.script_main(sys.modules[__name__]))
