"""The paper's CLIP metrics (Gal et al. 2022, §5.3) as the official evaluation code computes them.

    python -m inversion.evaluate --run runs/cat-… [--prompts "A photo of S* on the beach;…"] [--n 64] …

Protocol (official `evaluation/clip_eval.py`, `LDMCLIPEvaluator`): for each prompt, 64 samples with DDIM,
50 steps, eta 0, guidance 5.0, unconditional prompt "", at 256 px for LDM-1.4B (the model's default size
otherwise), decoded and clamped to [−1, 1]; CLIP ViT-B/32 (OpenAI weights) embeds them after
[−1, 1] → [0, 1], bicubic resize of the short side to 224, centre crop 224 and CLIP's mean/std; features are
L2-normalised.
  image similarity = mean cosine over every (training image, sample) pair, on the samples of "A photo of S*";
  text similarity  = mean cosine between the prompt with S* removed and each of its samples, averaged over the
                     paper's editing prompts (background "… on the moon", style "An oil painting of S*",
                     composition "Elmo holding a S*").
The paper's text says "the average CLIP embedding of the samples"; the official code averages the cosines,
which this module follows (the two differ only by the norm of the mean sample embedding).

Writes RUN/eval.json (or --out) and prints one summary line.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from inversion import data as D
from inversion import models
from inversion.clip import CLIP_ARCH, CLIP_WEIGHTS, RANDOM, CLIPScorer, clip_text, cosine
from inversion.embedding import InversionError, atomic_write, load_embedding_file
from inversion.rundir import RunDir
from inversion.templates import MARKER
from ldm import cli
from ldm.images import image_grid, to_pil

log = logging.getLogger("inversion.evaluate")

RECONSTRUCTION_PROMPT = "A photo of S*"
EDITING_PROMPTS = ("A photo of S* on the moon", "An oil painting of S*", "Elmo holding a S*")
N_SAMPLES = 64
STEPS = 50
ETA = 0.0
GUIDANCE = 5.0
BATCH = 8  # official samples_per_batch
SEED = 23


# --- metrics (pure) ----------------------------------------------------------------------------------------


def image_similarity(feats_a, feats_b) -> float:
    """Mean cosine over every (a, b) pair: the paper's reconstruction score (training images vs samples)."""
    return float(cosine(feats_a, feats_b, "image features a", "image features b").mean())


def text_similarity(text_feats, image_feats) -> float:
    """Mean cosine between the text feature(s) and each image: the paper's editability score for one prompt."""
    return float(cosine(text_feats, image_feats, "text features", "image features").mean())


def paper_scores(
    train_feats, recon_feats, edit_text_feats: Sequence, edit_image_feats: Sequence
) -> tuple[float, float]:
    """(image similarity on the reconstruction samples, text similarity averaged over editing prompts)."""
    if len(edit_text_feats) != len(edit_image_feats) or not edit_text_feats:
        raise ValueError(
            f"give one text feature and one sample set per editing prompt "
            f"({len(edit_text_feats)} texts, {len(edit_image_feats)} sample sets)"
        )
    texts = [text_similarity(t, i) for t, i in zip(edit_text_feats, edit_image_feats)]
    return image_similarity(train_feats, recon_feats), sum(texts) / len(texts)


def parse_prompts(spec: str | Sequence[str] | None) -> list[str]:
    """';'-separated prompts (or a list), each holding S*; None → the paper's editing prompts."""
    if spec is None:
        return list(EDITING_PROMPTS)
    prompts = [p.strip() for p in (spec.split(";") if isinstance(spec, str) else spec) if p.strip()]
    if not prompts:
        raise InversionError("PROMPTS= is empty; give ';'-separated prompts such as 'A photo of S* on the moon'")
    for p in prompts:
        if MARKER not in p:
            raise InversionError(f"PROMPTS: {p!r} has no {MARKER}; write {MARKER} where the learned word goes")
    return prompts


# --- a training run -----------------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model,
    prompt: str,
    n: int = N_SAMPLES,
    steps: int = STEPS,
    scale: float = GUIDANCE,
    eta: float = ETA,
    size: int = 256,
    seed: int = SEED,
    batch: int = BATCH,
    progress: bool = False,
) -> torch.Tensor:
    """n DDIM samples of one prompt, decoded and clamped to [−1, 1] (B, 3, size, size) on the CPU; sample i
    uses seed + i whatever the batch size."""
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        latents = model.sample_latents(
            [prompt] * b,
            steps=steps,
            scale=scale,
            eta=eta,
            sampler="ddim",
            seed=seed + start,
            height=size,
            width=size,
            progress=progress,
        )
        out.append(model.decode_latents(latents).float().clamp(-1.0, 1.0).cpu())
    return torch.cat(out)


def evaluate(
    model,
    scorer: CLIPScorer,
    train_images: torch.Tensor,
    token: str,
    prompts: Sequence[str] = EDITING_PROMPTS,
    reconstruction: str = RECONSTRUCTION_PROMPT,
    n: int = N_SAMPLES,
    steps: int = STEPS,
    scale: float = GUIDANCE,
    eta: float = ETA,
    size: int = 256,
    seed: int = SEED,
    batch: int = BATCH,
    samples_dir: Path | None = None,
    progress: bool = True,
) -> dict:
    """Sample every prompt (S* → token) and score it; returns the metrics and a per-prompt breakdown."""
    from tqdm.auto import tqdm

    train_feats = scorer.image_features(train_images)
    rows = []
    order = [reconstruction, *[p for p in prompts if p != reconstruction]]
    for prompt in tqdm(order, desc="evaluating prompts", disable=not progress):
        samples = generate(model, prompt.replace(MARKER, token), n, steps, scale, eta, size, seed, batch)
        if samples_dir is not None:
            save_grid(samples, samples_dir / f"{len(rows):02d}-{_slug(prompt)}.png")
        feats = scorer.image_features(samples)
        text = clip_text(prompt, [token])
        rows.append(
            {
                "prompt": prompt,
                "text": text,
                "editing": prompt in prompts,
                "image_similarity": image_similarity(train_feats, feats),
                "text_similarity": text_similarity(scorer.text_features([text]), feats),
            }
        )
    edits = [r for r in rows if r["editing"]]
    recon = next(r for r in rows if r["prompt"] == reconstruction)
    return {
        "image_similarity": recon["image_similarity"],
        "text_similarity": sum(r["text_similarity"] for r in edits) / len(edits),
        "prompts": rows,
    }


def _slug(prompt: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in prompt.replace(MARKER, "S").lower())
    return "-".join(p for p in keep.split("-") if p)[:60]


def save_grid(samples: torch.Tensor, path: Path, columns: int = 8) -> Path:
    """Samples in [−1, 1] → one PNG grid."""
    images = to_pil(samples)
    grid = image_grid(images, cols=min(columns, len(images)), background="black")
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


# --- CLI ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m inversion.evaluate", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--run", required=True, help="training run directory (RUN=)")
    a("--prompts", default=None, help="';'-separated editing prompts with S* (PROMPTS=; default the paper's)")
    a(
        "--reconstruction",
        default=RECONSTRUCTION_PROMPT,
        help=f"prompt whose samples give the image similarity (default {RECONSTRUCTION_PROMPT!r})",
    )
    a("--n", type=int, default=N_SAMPLES, help=f"samples per prompt (N=, default {N_SAMPLES})")
    a("--steps", type=int, default=STEPS, help=f"DDIM steps (STEPS=, default {STEPS})")
    a("--scale", type=float, default=GUIDANCE, help=f"guidance scale (SCALE=, default {GUIDANCE})")
    a("--eta", type=float, default=ETA, help=f"DDIM eta (default {ETA})")
    a("--size", type=int, default=None, help="sample and training-image size in px (default the model's: LDM 256)")
    a("--batch", type=int, default=BATCH, help=f"samples per sampler call (default {BATCH})")
    a("--seed", type=int, default=SEED, help=f"sample i uses seed + i (SEED=, default {SEED})")
    a(
        "--clip-weights",
        default=None,
        help=f"CLIP weights file (CLIP=, default {CLIP_WEIGHTS}); '{RANDOM}' = untrained, smoke runs only",
    )
    a("--clip-arch", default=CLIP_ARCH, help=f"open_clip architecture (default {CLIP_ARCH}, the paper's)")
    a("--model", default=None, help="override the run's MODEL (default: from RUN/args.json)")
    a("--ckpt", default=None, help="override the run's CKPT")
    a("--concept", default=None, help="override the run's concept folder (the training images)")
    a("--embedding", default=None, help="embedding file (default RUN/embeddings.pt or learned_embeds.safetensors)")
    a("--token", default=None, help="the learned word in that file (default the run's TOKEN)")
    a("--out", default=None, help="JSON path (default RUN/eval.json)")
    a("--save-samples", action="store_true", help="also write one PNG grid per prompt under RUN/eval-samples/")
    a("--overwrite", action="store_true", help="replace an existing eval.json (--out) and eval-samples/ grids")
    a("--device", default="auto", help="auto | cpu | cuda | mps (DEVICE=)")
    a("--dtype", default="fp32", help="fp32 | fp16 | bf16 for the diffusion model (DTYPE=)")
    a("--no-progress", action="store_true", help="no progress bars")
    return p


def _check(args: argparse.Namespace) -> None:
    cli.check(
        [
            cli.at_least("N", args.n),
            cli.at_least("STEPS", args.steps),
            cli.at_least("--batch", args.batch),
            cli.finite("SCALE", args.scale),
            cli.finite("--eta", args.eta, 0.0),
            cli.seed_rule("SEED", args.seed),
            cli.at_least("--size", args.size, 8),
            (args.dtype in cli.DTYPES, f"unknown DTYPE={args.dtype!r}; choose one of {', '.join(cli.DTYPES)}"),
            *models.choice_rules(args.model, args.ckpt),
            (args.embedding is None or Path(args.embedding).is_file(), f"--embedding {args.embedding}: no such file"),
        ],
        InversionError,
    )
    if args.concept:
        D.resolve_concept(args.concept)
    if MARKER not in args.reconstruction:
        raise InversionError(f"--reconstruction {args.reconstruction!r} has no {MARKER}")


def _pick_words(words: dict[str, torch.Tensor], token: str | None, path: Path) -> str:
    if token is not None and token in words:
        return token
    if token is not None and len(words) == 1:
        return token
    if token is None and len(words) == 1:
        return next(iter(words))
    raise InversionError(f"{path} holds {', '.join(words)}; say which word to evaluate with --token")


def main(argv: list[str] | None = None, scorer: CLIPScorer | None = None, model=None) -> int:
    """CLI entry; `scorer`/`model` may be given by tests (a small CLIP, an already-built model)."""
    args = build_parser().parse_args(argv)
    _check(args)
    run = Path(args.run)
    info = RunDir(run).options() if run.is_dir() else {}
    emb_path = Path(args.embedding) if args.embedding else RunDir(run).embedding_file()
    words = load_embedding_file(emb_path)
    token = _pick_words(words, args.token or info.get("token"), emb_path)
    if token not in words:  # a one-word file saved under another name
        words = {token: next(iter(words.values()))}
    concept = args.concept or info.get("concept")
    if not concept:
        raise InversionError(f"RUN={run} does not name its concept (no args.json); give --concept FOLDER")
    prompts = parse_prompts(args.prompts)
    out = Path(args.out) if args.out else run / "eval.json"
    samples = run / "eval-samples"
    if not args.overwrite:
        if out.exists():
            raise InversionError(f"{out} already exists; pass --overwrite to replace it, or choose --out")
        if args.save_samples and samples.is_dir() and any(samples.iterdir()):
            raise InversionError(f"{samples} already holds grids; pass --overwrite to replace them")
    cli.check_writable(out.parent, "--out")

    device = cli.pick_device(args.device)
    dtype = cli.pick_dtype(args.dtype, device)
    if scorer is None:
        scorer = CLIPScorer.load(args.clip_weights, device, args.clip_arch)  # fail fast, before the big model
    if model is None:
        model = models.load(args.model or info.get("model"), args.ckpt or info.get("ckpt"), device, dtype)
    model.eval()
    for word, vectors in words.items():  # per-image tokens too, so every id of the file is defined
        model.add_embedding(word, vectors)
    size = args.size or model.config.image_size
    cli.check(
        [cli.multiple_rule("--size", size, model.latent_factor), cli.steps_rule("STEPS", args.steps, model)],
        InversionError,
    )
    images = D.ConceptImages(D.resolve_concept(concept), size)
    train_images = images.batch(list(range(len(images))), [False] * len(images))  # official: flip_p 0

    started = time.time()
    result = evaluate(
        model,
        scorer,
        train_images,
        token,
        prompts,
        args.reconstruction,
        args.n,
        args.steps,
        args.scale,
        args.eta,
        size,
        args.seed,
        args.batch,
        samples if args.save_samples else None,
        progress=not args.no_progress,
    )
    report = {
        "run": str(run),
        "token": token,
        "embedding": str(emb_path),
        "model": model.config.name,
        "concept": str(concept),
        "training_images": len(images),
        "image_similarity": result["image_similarity"],
        "text_similarity": result["text_similarity"],
        "protocol": {
            "samples_per_prompt": args.n,
            "sampler": "ddim",
            "steps": args.steps,
            "eta": args.eta,
            "guidance": args.scale,
            "size": size,
            "seed": args.seed,
            "reconstruction_prompt": args.reconstruction,
            "editing_prompts": prompts,
            "clip": {"arch": args.clip_arch, "weights": scorer.weights},
        },
        "prompts": result["prompts"],
        "seconds": round(time.time() - started, 1),
    }
    atomic_write(out, lambda f: f.write(json.dumps(report, indent=2).encode()))
    note = " [RANDOM CLIP: smoke run]" if scorer.weights == RANDOM else ""
    print(
        f"{token}: image similarity {report['image_similarity']:.4f} ({args.reconstruction!r}), "
        f"text similarity {report['text_similarity']:.4f} (mean of {len(prompts)} editing prompts), "
        f"{args.n} samples/prompt{note} → {out}"
    )
    return 0


def cli_main(argv: list[str] | None = None) -> int:
    return cli.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli_main())
