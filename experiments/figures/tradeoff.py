"""Reconstruction vs editability (Gal et al. 2022, Fig. 10): one point per variant, and experiments/RESULTS.md.

Every variant is a trainer option (`make train` flags), never a fork of the trainer; the two human-caption
variants train nothing and put a caption where S* stands. Each is scored with the paper's protocol
(`inversion.evaluate.evaluate`): image similarity of "A photo of S*" samples to the training images
(reconstruction, y axis) and text similarity of the editing prompts' samples to the prompts without S*
(editability, x axis). The table of the model/concept pair in RESULTS.md is rewritten with the new rows.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from experiments.figures import _common as C
from experiments.results import RESULTS, read_section, write_section

NAME = "tradeoff"
REG_WEIGHT = 0.1  # ours: the official configs ship embedding_reg_weight 0 (off)
LOW_LRS = ("1e-3", "1e-4")  # ours: lower base LRs than the paper's 5e-3 (the paper's values unverified)
CAPTIONS = {  # (short, long) human captions per concept folder name
    "cat": ("cat", "a grey and brown striped tabby cat with yellow-green eyes and white whiskers"),
    "shapes-ring": ("shape", "a large thick ring, a hollow circle, in one bright colour on a plain background"),
    "shapes-star": ("shape", "a large five-pointed star shape in one bright colour on a plain background"),
    "shapes-circle": ("circle", "a large round circle in one bright colour on a plain background"),
}


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    changes: dict = field(default_factory=dict)  # TrainConfig changes; as_flags gives `make train ARGS="…"`

    @property
    def flags(self) -> list[str]:
        return C.as_flags(self.changes)

    caption: str | None = None  # "short" | "long": a human caption instead of a learned word


def variants(steps: int) -> list[Variant]:
    """The paper's variants; progressive adds a vector every steps/3 (official: 2,000 of 6,100)."""
    every = max(1, steps // 3)
    return [
        Variant("one-word", "Textual inversion (one word, ours)"),
        Variant("caption-short", "Human caption (short)", caption="short"),
        Variant("caption-long", "Human caption (long)", caption="long"),
        Variant("two-words", "2 vectors", {"vectors": 2}),
        Variant("three-words", "3 vectors", {"vectors": 3}),
        Variant("progressive", "Progressive (to 3 vectors)", {"vectors": 3, "progressive": every}),
        Variant("regularised", f"Regularised toward the init word (weight {REG_WEIGHT:g})", {"reg_weight": REG_WEIGHT}),
        Variant("per-image", "Per-image tokens", {"per_image_tokens": True}),
        *[Variant(f"lr-{lr}", f"Base LR {lr}", {"lr": float(lr)}) for lr in LOW_LRS],
    ]


def add_arguments(p) -> None:
    a = p.add_argument
    a("--variants", default=None, help="comma-separated variant keys (default all; see --list-variants)")
    a("--list-variants", action="store_true", help="print the variants and their trainer flags, then stop")
    a("--eval-n", type=int, default=None, help="samples per prompt (default 64, the paper's; tiny N)")
    a("--caption-short", default=None, help="short human caption of the concept (default from a table)")
    a("--caption-long", default=None, help="long human caption of the concept")
    a("--results", default=str(RESULTS), help="RESULTS.md to update ('none' to skip)")
    a("--save-samples", action="store_true", help="keep one PNG grid per variant and prompt")


def check_args(args) -> None:
    pick(args.variants, variants(args.steps or 1))
    results = Path(args.results)
    if args.results != "none" and not results.parent.is_dir():
        raise C.FigureError(f"--results {args.results}: folder {results.parent} does not exist ('none' to skip)")


def captions(ctx: C.Context, concept: str) -> tuple[str, str]:
    a = ctx.args
    short, long = CAPTIONS.get(concept, (concept.replace("-", " ").replace("_", " "), None))
    short = a.caption_short or short
    long = a.caption_long or long
    if long is None:
        C.log.warning("no long caption known for %s; pass --caption-long (using the short one)", concept)
        long = short
    return short, long


def pick(keys: str | None, all_variants: list[Variant]) -> list[Variant]:
    if not keys:
        return all_variants
    known = {v.key: v for v in all_variants}
    chosen = C.split_list(keys)
    bad = [k for k in chosen if k not in known]
    if bad:
        raise C.FigureError(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(known)}")
    return [known[k] for k in chosen]


def plot(points: list[dict], path: Path, title: str, reference: float | None = None) -> int:
    """Scatter of (text similarity, image similarity), one labelled point per variant; returns points drawn."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = "os^vD<>pPX*h"
    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=110)
    for i, p in enumerate(points):
        ax.scatter(
            [p["text_similarity"]],
            [p["image_similarity"]],
            s=46,
            marker=markers[i % len(markers)],
            label=p["label"],
            zorder=3,
        )
        ax.annotate(
            p["key"],
            (p["text_similarity"], p["image_similarity"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=7,
        )
    if reference is not None:
        ax.axhline(reference, ls="--", lw=1, c="gray", label="training images vs each other (reference)")
    ax.set_xlabel("text similarity (editability) →")
    ax.set_ylabel("image similarity (reconstruction) →")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    drawn = sum(len(c.get_offsets()) for c in ax.collections)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    C.atomic_write(path, lambda f: f.write(buf.getvalue()))
    return drawn


# --- RESULTS.md --------------------------------------------------------------------------------------------

TABLE_HEAD = "| Variant | Trainer flags | Image similarity ↑ | Text similarity ↑ | Run |\n|---|---|---|---|---|\n"


def row(point: dict) -> str:
    flags = (
        f"`{' '.join(point['flags'])}`"
        if point["flags"]
        else ("caption: “" + point["caption"] + "”" if point.get("caption") else "—")
    )
    run = f"`{point['run']}`" if point.get("run") else "—"
    return f"| {point['label']} | {flags} | {point['image_similarity']:.4f} | {point['text_similarity']:.4f} | {run} |"


def update_results(path: Path, key: str, title: str, note: str, new_rows: dict[str, str], order: list[str]) -> Path:
    """Rewrite the `key` section (rows of variants not run this time are kept), or append it."""
    kept = {}
    for line in (read_section(path, f"results:{key}") or "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] != "Variant":
            kept[cells[0]] = line
    rows = {**kept, **new_rows}
    ordered = [rows[label] for label in order if label in rows] + [r for lb, r in rows.items() if lb not in order]
    return write_section(path, f"results:{key}", f"### {title}\n\n{note}\n\n{TABLE_HEAD}" + "\n".join(ordered))


# --- the figure --------------------------------------------------------------------------------------------


def run(ctx: C.Context) -> dict:
    from inversion import data as D
    from inversion import evaluate as E
    from inversion import train as T

    a = ctx.args
    steps = a.steps or T.STEPS
    chosen = pick(a.variants, variants(steps))
    if a.list_variants:
        for v in chosen:
            print(f"{v.key:14s} {' '.join(v.flags) or ('caption: ' + v.caption if v.caption else '(defaults)')}")
        return {"png": "-", "summary": f"{len(chosen)} variants"}
    if a.run and len(C.split_list(a.run)) != 1 or len(C.split_list(a.concept)) > 1:
        raise C.FigureError("the trade-off plot is for one concept: give one --concept (or one --run)")
    base_word = ctx.load_run(Path(a.run)) if a.run else None
    concept_name = (
        base_word.concept.name
        if base_word and base_word.concept
        else (C.split_list(a.concept) or C.default_concepts(ctx))[0]
    )
    folder = base_word.concept if base_word and base_word.concept else C.resolve_concept(concept_name, ctx.out_root)
    if folder is None:
        raise C.FigureError(f"RUN={a.run} does not name its concept folder; give --concept")
    short, long = captions(ctx, folder.name)
    size = ctx.size
    images = D.ConceptImages(folder, size)
    train_images = images.batch(list(range(len(images))), [False] * len(images))
    eval_n = a.eval_n or (a.n if a.smoke else E.N_SAMPLES)
    eval_steps = a.sample_steps or E.STEPS
    scale = E.GUIDANCE if a.scale is None else a.scale
    scorer = ctx.scorer()
    out = C.out_dir(a, NAME)
    started = time.time()
    points = []
    for v in chosen:
        if v.caption:
            model, token, run = ctx.fresh(), short if v.caption == "short" else long, None
        else:
            word = (
                base_word
                if (v.key == "one-word" and base_word)
                else ctx.train_word(str(folder), v.changes, v.key if v.changes else "word")
            )
            model, token, run = ctx.model_with([word]), word.token, str(word.run)
        result = E.evaluate(
            model,
            scorer,
            train_images,
            token,
            E.EDITING_PROMPTS,
            E.RECONSTRUCTION_PROMPT,
            n=eval_n,
            steps=eval_steps,
            scale=scale,
            eta=E.ETA,
            size=size,
            seed=a.seed,
            batch=min(E.BATCH, eval_n),
            samples_dir=out / "samples" / v.key if a.save_samples else None,
            progress=False,
        )
        points.append(
            {
                "key": v.key,
                "label": v.label,
                "flags": list(v.flags),
                "caption": token if v.caption else None,
                "run": run,
                "image_similarity": result["image_similarity"],
                "text_similarity": result["text_similarity"],
                "prompts": result["prompts"],
            }
        )
        C.log.info("%s: image %.4f, text %.4f", v.key, points[-1]["image_similarity"], points[-1]["text_similarity"])
    feats = scorer.image_features(train_images)
    reference = 1.0 - _diversity(feats) if len(images) > 1 else None
    model_name = ctx.base().config.name
    clip = "random CLIP: numbers are meaningless" if scorer.weights == E.RANDOM else "CLIP ViT-B/32"
    title = f"{model_name} · {folder.name}: {steps} training steps, {eval_n} samples/prompt, {clip}"
    drawn = plot(points, out / f"{NAME}.png", title, reference)
    info = {
        **C.header(ctx, NAME, []),
        "concept": str(folder),
        "training_steps": steps,
        "protocol": {
            "samples_per_prompt": eval_n,
            "sampler": "ddim",
            "steps": eval_steps,
            "eta": E.ETA,
            "guidance": scale,
            "size": size,
            "reconstruction_prompt": E.RECONSTRUCTION_PROMPT,
            "editing_prompts": list(E.EDITING_PROMPTS),
            "clip_weights": scorer.weights,
        },
        "reference_image_similarity": reference,
        "points": points,
        "plotted_points": drawn,
        "seconds": round(time.time() - started, 1),
    }
    C.save_json(info, out / f"{NAME}.json")
    if a.results and a.results.lower() != "none":
        key = f"{model_name}/{folder.name}"
        kind = (
            "smoke run — random weights and random CLIP, the numbers only prove the pipeline"
            if a.smoke
            else ("random CLIP — numbers meaningless" if scorer.weights == E.RANDOM else "real run")
        )
        note = (
            f"{kind}. Written by `python -m experiments.figures tradeoff` on {time.strftime('%Y-%m-%d')}: "
            f"{steps} training steps at {size} px (seed {a.seed}); evaluation {eval_n} samples per prompt, "
            f"DDIM {eval_steps} steps, eta 0, guidance {scale:g}, CLIP {scorer.weights}; reference "
            f"(training images vs each other): {reference if reference is None else f'{reference:.4f}'}."
        )
        update_results(
            Path(a.results),
            key,
            f"{model_name} · {folder.name}",
            note,
            {p["label"]: row(p) for p in points},
            [v.label for v in variants(steps)],
        )
    summary = (
        f"{drawn} points; "
        + ", ".join(f"{p['key']} ({p['text_similarity']:.3f}, {p['image_similarity']:.3f})" for p in points[:3])
        + " …"
    )
    return {**info, "png": str(out / f"{NAME}.png"), "summary": summary}


def _diversity(feats) -> float:
    from experiments.figures.bias import diversity

    return diversity(feats)


if __name__ == "__main__":
    sys.exit(C.script_main(sys.modules[__name__]))
