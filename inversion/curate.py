"""Automatic curation (BEST_OF / KEEP / RANK=clip): keep the samples closest, in CLIP space, to the concept
images and to the prompt — the paper's two CLIP metrics (Gal et al. 2022, §5.3) used per sample as a ranking.

    score_i = w · mean_j cos(f(sample_i), f(concept_j)) + (1 − w) · cos(f(sample_i), g(prompt without S*))

with f, g CLIP's image and text towers, w = IMAGE_WEIGHT (0.5); ties keep the sampling order.

How `ldm/sample.py` uses it (`make sample PROMPT=… EMBEDDING=… BEST_OF=16 KEEP=4 RANK=clip`):

    curate.add_arguments(p)                     # in parse_args: --best-of --keep --rank --concept --clip-weights …
    curate.check_args(args)                     # in main, before the model loads (one-line errors)
    total = args.best_of or args.n              # draw BEST_OF candidates instead of N
    … sample `total` images (keep image i with seed args.seed + i) without saving …
    chosen = curate.select(images, args, words, device)   # [(index, score)], best first, KEEP long
    … save images[i] for i, _ in chosen (add f"Curated: {rank} {score:.4f}, best {KEEP} of {BEST_OF}") …
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from inversion import data as D
from inversion.clip import CLIP_WEIGHTS, RANDOM, CLIPScorer, clip_text, cosine
from inversion.embedding import InversionError
from inversion.rundir import RunDir
from ldm.images import from_pil

log = logging.getLogger(__name__)

RANKS = ("clip",)
IMAGE_WEIGHT = 0.5
CONCEPT_SIZE = 224  # concept images are read at CLIP's input size


# --- pure scoring ------------------------------------------------------------------------------------------


def clip_scores(
    sample_feats: torch.Tensor,
    concept_feats: torch.Tensor | None,
    text_feats: torch.Tensor | None,
    image_weight: float = IMAGE_WEIGHT,
) -> torch.Tensor:
    """(N,) scores: w·(mean cosine to the concept images) + (1−w)·(cosine to the text); a missing side drops out."""
    if concept_feats is None and text_feats is None:
        raise InversionError("RANK=clip needs concept images or a prompt to rank against")
    if not 0.0 <= image_weight <= 1.0:
        raise InversionError(f"--image-weight {image_weight} must be in [0, 1]")
    img = cosine(sample_feats, concept_feats).mean(dim=1) if concept_feats is not None else None
    txt = cosine(sample_feats, text_feats).mean(dim=1) if text_feats is not None else None
    if img is None:
        return txt
    if txt is None:
        return img
    return image_weight * img + (1.0 - image_weight) * txt


def _as_images(images) -> torch.Tensor:
    """(B, 3, H, W) in [−1, 1] from a tensor or a list of PIL images of one size."""
    if isinstance(images, torch.Tensor):
        return images
    return from_pil(list(images))


def rank(candidates, concept_images, prompt: str | None, scorer, image_weight: float = IMAGE_WEIGHT) -> list[int]:
    """Candidate indices, best first, by CLIP closeness to the concept images and the prompt.

    candidates / concept_images: (B, 3, H, W) tensors in [−1, 1] or lists of PIL images (concept_images may
    be None or empty); prompt: the text CLIP compares with (None or "" to rank on images only); scorer: any
    object with `image_features(images) -> (B, D)` and `text_features([text]) -> (1, D)`.
    """
    return [i for i, _ in ranked(candidates, concept_images, prompt, scorer, image_weight)]


def ranked(
    candidates, concept_images, prompt: str | None, scorer, image_weight: float = IMAGE_WEIGHT
) -> list[tuple[int, float]]:
    """(index, score) pairs, best first; ties keep the candidates' order."""
    cands = _as_images(candidates)
    if cands.shape[0] == 0:
        raise InversionError("no candidates to rank")
    feats = scorer.image_features(cands)
    concept = None
    if concept_images is not None and len(concept_images) > 0:
        concept = scorer.image_features(_as_images(concept_images))
    text = scorer.text_features([prompt]) if prompt and prompt.strip() else None
    scores = clip_scores(feats, concept, text, image_weight).tolist()
    return sorted(enumerate(scores), key=lambda p: (-p[1], p[0]))


# --- the sample CLI's side ---------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--best-of, --keep, --rank, --concept, --clip-weights, --image-weight (BEST_OF= KEEP= RANK= …)."""
    a = p.add_argument
    a("--best-of", type=int, default=None, help="draw this many candidates and keep the best KEEP (BEST_OF=)")
    a("--keep", type=int, default=None, help="candidates kept with BEST_OF (KEEP=, default N)")
    a("--rank", default="clip", help=f"how BEST_OF ranks: {', '.join(RANKS)} (RANK=)")
    a(
        "--concept",
        default=None,
        help="concept folder(s) for RANK=clip, comma-separated (default: the run folders of EMBEDDING=)",
    )
    a("--clip-weights", default=None, help="CLIP ViT-B/32 weights for RANK=clip ('random' for smoke runs)")
    a(
        "--image-weight",
        type=float,
        default=IMAGE_WEIGHT,
        help=f"weight of concept-image closeness vs prompt closeness (default {IMAGE_WEIGHT})",
    )


def keep_count(args: argparse.Namespace) -> int:
    return args.keep if args.keep is not None else min(getattr(args, "n", 4) or 4, args.best_of)


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for BEST_OF/KEEP/RANK before anything loads."""
    if args.best_of is None:
        if args.keep is not None:
            raise InversionError("KEEP= needs BEST_OF= (how many candidates to draw)")
        return
    if args.best_of < 1:
        raise InversionError(f"BEST_OF={args.best_of} must be at least 1")
    if args.rank not in RANKS:
        raise InversionError(f"unknown RANK={args.rank!r}; choose one of {', '.join(RANKS)}")
    keep = keep_count(args)
    if not 1 <= keep <= args.best_of:
        raise InversionError(f"KEEP={keep} must be between 1 and BEST_OF={args.best_of}")
    if not 0.0 <= args.image_weight <= 1.0:
        raise InversionError(f"--image-weight {args.image_weight} must be in [0, 1]")


def check_files(args: argparse.Namespace) -> None:
    """With BEST_OF, the CLIP weights and CONCEPT= folders must exist before sampling starts, not after."""
    if not args.best_of:
        return
    weights = Path(args.clip_weights or CLIP_WEIGHTS)
    if str(weights) != RANDOM and not weights.is_file():
        raise InversionError(f"CLIP={weights}: no such file (RANK=clip needs OpenAI's ViT-B-32 weights there)")
    concept_folders(args)


def concept_folders(args: argparse.Namespace) -> list[Path]:
    """--concept folders, else the concept named in args.json beside each EMBEDDING= file (trainer runs)."""
    if args.concept:
        return [D.resolve_concept(c.strip()) for c in args.concept.split(",") if c.strip()]
    folders = []
    for f in [f for f in (getattr(args, "embedding", None) or "").split(",") if f]:
        run = RunDir(Path(f).parent)
        try:
            concept = run.options().get("concept")
            if concept:
                folders.append(D.resolve_concept(concept))
        except InversionError as e:
            log.warning("%s: no usable concept folder (%s)", run.path, e)
    return folders


def load_concept_images(folders: Sequence[Path], size: int = CONCEPT_SIZE) -> torch.Tensor | None:
    """Every image of the folders, official preprocessing without flips, (B, 3, size, size) in [−1, 1]."""
    batches = []
    for folder in folders:
        images = D.ConceptImages(folder, size)
        batches.append(images.batch(list(range(len(images))), [False] * len(images)))
    return torch.cat(batches) if batches else None


def select(
    images, args: argparse.Namespace, words: Sequence[str] = (), device: torch.device | str = "cpu", scorer=None
) -> list[tuple[int, float]]:
    """The KEEP best of the sampled candidates as (index, score), best first (all of them, unscored, without
    BEST_OF). `words` are the learned tokens in the prompt; `scorer` defaults to CLIPScorer(--clip-weights)."""
    if not args.best_of:
        return [(i, float("nan")) for i in range(len(images))]
    check_args(args)
    folders = concept_folders(args)
    concept = load_concept_images(folders)
    text = clip_text(args.prompt, words)
    if concept is None:
        log.warning(
            "RANK=clip: no concept images (give CONCEPT= or an EMBEDDING= inside a training run); "
            "ranking by the prompt alone"
        )
    if concept is None and not text:
        raise InversionError(
            "RANK=clip has nothing to rank against: the prompt holds only learned words and no "
            "concept images were found; give CONCEPT=folder"
        )
    if scorer is None:
        scorer = CLIPScorer.load(args.clip_weights, device)
    order = ranked(images, concept, text, scorer, args.image_weight)
    keep = keep_count(args)
    log.info("RANK=clip kept %d of %d: %s", keep, len(order), ", ".join(f"#{i} ({s:.4f})" for i, s in order[:keep]))
    return order[:keep]
