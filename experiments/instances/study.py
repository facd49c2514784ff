"""The paper's phenomena on the instances world: ≥ 8 held-out concepts × 2 seeds, 95 % intervals, a Fig. 10 plot.

    python -m experiments.instances.study [--concepts 8] [--seeds 0,1] [--steps 300] [--jobs 2]

For every concept (experiments.instances.concept, never seen in pretraining) and training seed, each variant
(the trade-off figure's trainer options: one word, 2 and 3 vectors, regularised toward the init word) is
trained with `inversion.train` on `weights/instances.safetensors` and scored with
`experiments.instances.score` (reconstruction against lookalikes, editability, the init word and both human
captions, and the same prompts' objective on held-out renders). The one-word runs also keep their word every
`--curve-every` steps, and each kept word's reconstruction is measured: the curve of §5.3 (c). Every unit is
kept as JSON under `--work`, so an interrupted study continues where it stopped. The section between the
`instances-study` markers of experiments/RESULTS.md and `experiments/instances/study-tradeoff.png` are rewritten
from those files.

Intervals: mean ± t(0.975, n−1) · sd / √n over the n = concepts × seeds units (for a comparison, over the
units' paired differences).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from experiments.figures.tradeoff import variants as tradeoff_variants
from experiments.instances import concept as concepts
from experiments.instances import score as scoring
from experiments.results import RESULTS, write_section

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "weights" / "instances.safetensors"
WORK = ROOT / ".cache" / "instances-study"
PLOT = Path(__file__).resolve().parent / "study-tradeoff.png"
SECTION = "instances-study"  # its markers in RESULTS.md
VARIANTS = ("one-word", "two-words", "three-words", "regularised")
STEPS = 300
BATCH = 4
LR = 5e-3
CURVE_EVERY = 25
CURVE_SAMPLES = 16
# what the learned word is compared with: (name, its row, its reconstruction field, its held-out loss field)
BASELINES = (
    ("init word", "init-word", "init_reconstruction", "init_loss"),
    ("short caption", "caption-short", "caption_short", "caption_short_loss"),
    ("long caption", "caption-long", "caption_long", "caption_long_loss"),
)
LOSSES = ("loss", *(b[3] for b in BASELINES))  # score.heldout_loss's fields: a unit scored without them reruns
LOSS = "held-out loss"


# Student's t quantile 0.975 for 1…30 degrees of freedom (beyond: the normal's 1.96 is within 4 %)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
T975 += (2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(n: int) -> float:
    """Student's t quantile 0.975 for n − 1 degrees of freedom (n ≥ 2)."""
    return T975[n - 2] if n - 1 <= len(T975) else 1.96


def interval(values) -> tuple[float, float]:
    """(mean, half-width of the 95 % interval)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), t95(len(v)) * float(v.std(ddof=1)) / math.sqrt(len(v))


def train_config(cdir: Path, run_dir: Path, seed: int, a: dict, save_every: int, **changes):
    """The paper's recipe as the study runs it (init word "toy", the concept's token, a CPU run without progress
    bar, validation or latent cache) with `changes` (TrainConfig fields) on top."""
    from inversion.config import TrainConfig

    return TrainConfig(
        **{
            "concept": str(cdir),
            "ckpt": str(a["model"]),
            "init": concepts.world.NOUN,
            "token": f"<c{Path(cdir).name}>",
            "steps": a["steps"],
            "batch": a["batch"],
            "recipe": "official",
            "lr": a["lr"],
            "seed": seed,
            "out": str(run_dir),
            "overwrite": True,
            "save_every": save_every,
            "val_every": 0,
            "latent_cache": "",
            "device": "cpu",
            "no_progress": True,
            **changes,
        }
    )


def concept_dir(work: Path, n: int) -> Path:
    """Concept n's folder under `work`, written on first use."""
    cdir = work / "concepts" / str(n)
    if not (cdir / "concept.json").is_file():
        concepts.write_concept(n, cdir, overwrite=True)
    return cdir


def _unit(job: tuple) -> dict:
    """Train one variant on one concept with one seed and score it (one process, one thread)."""
    import torch

    from inversion.train import train

    cdir, run_dir, key, changes, seed, a = job
    torch.set_num_threads(1)
    t0 = time.time()
    curve = key == "one-word"
    train(train_config(cdir, run_dir, seed, a, a["curve_every"] if curve else a["steps"], **changes))
    train_s = time.time() - t0
    out = scoring.score(Path(cdir), Path(run_dir), a["samples"], seed=a["sample_seed"])
    out.update(variant=key, seed=seed, concept=Path(cdir).name, train_seconds=round(train_s, 1))
    if curve:
        out["curve"] = scoring.curve(Path(cdir), Path(run_dir), a["curve_samples"], seed=a["sample_seed"])
    return out


def run_units(
    a: argparse.Namespace, options: dict[str, dict], unit, describe, needs: tuple[str, ...] = ()
) -> list[dict]:
    """Every (concept, seed, key of `options`) unit: read back from --work when it was done with the same settings
    and trainer options and holds every field of `needs`, else `unit((concept dir, run dir, key, options, seed,
    settings))` in --jobs processes, each result kept as JSON as soon as it is done; `describe(result)` is its log
    line."""
    work = Path(a.work)
    settings = {
        "model": str(a.model),
        "steps": a.steps,
        "batch": a.batch,
        "lr": a.lr,
        "samples": a.samples,
        "sample_seed": a.sample_seed,
        "curve_every": a.curve_every,
        "curve_samples": a.curve_samples,
    }
    jobs, done = [], []
    for n in range(a.concepts):
        cdir = concept_dir(work, n)
        for seed in a.seeds:
            for key, changes in options.items():
                result = work / "results" / f"{n}-{seed}-{key}.json"
                if result.is_file():
                    saved = json.loads(result.read_text())
                    same = saved.get("settings") == settings and saved.get("options") == changes
                    if same and all(f in saved for f in needs):
                        done.append(saved)
                        continue
                jobs.append((cdir, work / "runs" / f"{n}-{seed}-{key}", key, changes, seed, settings))
    log.info("%d units done, %d to run with %d jobs", len(done), len(jobs), a.jobs)
    (work / "results").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(a.jobs) if a.jobs > 1 and len(jobs) > 1 else nullcontext() as pool:
        for i, (job, out) in enumerate(zip(jobs, (pool.map if pool else map)(unit, jobs), strict=True), 1):
            cdir, _, key, changes, seed, _ = job
            out.update(settings=settings, options=changes)
            (work / "results" / f"{Path(cdir).name}-{seed}-{key}.json").write_text(json.dumps(out) + "\n")
            log.info("[%d/%d] concept %s seed %s %s: %s", i, len(jobs), Path(cdir).name, seed, key, describe(out))
            done.append(out)
    return done


def run(a: argparse.Namespace) -> list[dict]:
    """Every (concept, seed, variant) unit of the study."""
    chosen = {v.key: v.changes for v in tradeoff_variants(a.steps) if v.key in a.variants}
    return run_units(
        a,
        chosen,
        _unit,
        lambda out: f"reconstruction {out['reconstruction']:.3f} editability {out['editability']:.3f}",
        needs=LOSSES,
    )


def summarise(results: list[dict]) -> dict:
    """Means and 95 % intervals per variant, the paired comparisons of (a), and the mean curve."""
    keys = [k for k in VARIANTS if any(r["variant"] == k for r in results)]
    by = {k: sorted((r for r in results if r["variant"] == k), key=lambda r: (r["concept"], r["seed"])) for k in keys}
    base = by["one-word"]
    rows = {}
    for key, rs in by.items():
        rows[key] = {m: interval([r[m] for r in rs]) for m in ("reconstruction", "editability", "loss")}
    pairs = {}
    for name, row, rec, loss in BASELINES:
        rows[row] = {"reconstruction": interval([r[rec] for r in base]), "loss": interval([r[loss] for r in base])}
        pairs[f"one-word − {name}"] = interval([r["reconstruction"] - r[rec] for r in base])
    for name, _, _, loss in BASELINES:
        pairs[f"one-word − {name} ({LOSS})"] = interval([r["loss"] - r[loss] for r in base])
    for key in keys[1:]:
        for m, label in (("reconstruction", "reconstruction"), ("editability", "editability"), ("loss", LOSS)):
            pairs[f"{key} − one-word ({label})"] = interval([o[m] - b[m] for o, b in zip(by[key], base)])
    steps = sorted({int(s) for r in base for s in r.get("curve", {})})
    curve = {s: interval([r["curve"][str(s)] for r in base]) for s in steps}
    if steps:
        pairs[f"curve: step {steps[-1]} − step {steps[0]}"] = interval(
            [r["curve"][str(steps[-1])] - r["curve"][str(steps[0])] for r in base]
        )
    return {"n": len(base), "rows": rows, "pairs": pairs, "curve": curve}


RISE_STEPS = 100  # (c): the curve keeps rising at least this long
RISE_SHARE = 0.9  # … before it reaches this share of its whole rise


def verdicts(s: dict) -> list[str]:
    """Phenomena (a)–(c) of the study, each said as shown or not from the paired intervals alone: a difference is
    shown when its 95 % interval excludes 0 in the expected direction."""

    def shown(key: str, sign: int) -> bool:
        m, h = s["pairs"][key]
        return sign * m - h > 0  # False for an undefined interval (nan: one unit)

    def say(ok: bool) -> str:
        return "shown" if ok else "**not shown**"

    a = all(shown(f"one-word − {name}", 1) for name, *_ in BASELINES)
    out = [f"- (a) the learned word above its init word and both human captions: {say(a)}"]
    below = "; ".join(f"below the {name}: {say(shown(f'one-word − {name} ({LOSS})', -1))}" for name, *_ in BASELINES)
    out.append(f"  - the same comparison in the model's own objective ({LOSS}, no sampling, no judge): {below}")
    for key, sign, what in (
        ("two-words", 1, "2 vectors: higher reconstruction, lower editability"),
        ("three-words", 1, "3 vectors: higher reconstruction, lower editability"),
        ("regularised", -1, "regularised: lower reconstruction, higher editability"),
    ):
        if f"{key} − one-word (reconstruction)" in s["pairs"]:
            ok = shown(f"{key} − one-word (reconstruction)", sign) and shown(f"{key} − one-word (editability)", -sign)
            out.append(f"- (b) {what}: {say(ok)}")
    steps = list(s["curve"])
    if len(steps) > 1:
        means = [s["curve"][k][0] for k in steps]
        top = means[0] + RISE_SHARE * (max(means) - means[0])
        reached = next(k for k, m in zip(steps, means) if m >= top)
        ok = shown(f"curve: step {steps[-1]} − step {steps[0]}", 1) and reached >= RISE_STEPS
        out.append(
            f"- (c) the curve rises for ≥ {RISE_STEPS} steps: {say(ok)} (the mean curve reaches "
            f"{RISE_SHARE:.0%} of its rise at step {reached})"
        )
    return out


def fmt(mi: tuple[float, float], digits: int = 3) -> str:
    m, h = mi
    return f"{m:.{digits}f} ± {h:.{digits}f}"


def markdown(s: dict, a: argparse.Namespace, seconds: float) -> str:
    """The RESULTS.md section's text (its markers are added by experiments.results)."""
    labels = {v.key: v.label for v in tradeoff_variants(a.steps)}
    lines = [
        "## instances world: the paper's phenomena (`python -m experiments.instances.study`)",
        "",
        f"{a.concepts} held-out concepts × seeds {','.join(map(str, a.seeds))} = n = {s['n']} units per variant; "
        f'the paper\'s recipe (AdamW, base LR {a.lr:g} × batch {a.batch}, init word "{concepts.world.NOUN}") for '
        f"{a.steps} steps on `weights/instances.safetensors`; {a.samples} samples per prompt, fixed seeds. "
        "Reconstruction: the instance judge, fraction of (sample, lookalike) pairs in which the sample is nearer the "
        "concept's held-out renders (0.5 = no more than a caption's worth). Editability: the asked context present. "
        f"Mean ± 95 % interval (t, n − 1). Written by the script, whose last process ran {seconds / 60:.0f} min "
        "(units kept under --work are read back, not rerun).",
        "",
        "The held-out loss is the inversion objective itself (the model's prediction MSE, lower = better) on the "
        "concept's held-out renders, prompt by prompt with the same timesteps and noise: how well a prompt explains "
        "renders of the object it never saw, without sampling or judge (`score.heldout_loss`).",
        "",
        f"| variant | reconstruction | editability | {LOSS} |",
        "|---|---|---|---|",
    ]
    for key in [k for k in VARIANTS if k in s["rows"]]:
        r = s["rows"][key]
        lines.append(f"| {labels[key]} | {fmt(r['reconstruction'])} | {fmt(r['editability'])} | {fmt(r['loss'], 4)} |")
    for key, label in (
        ("init-word", f'Init word ("a {concepts.world.NOUN}")'),
        ("caption-short", "Human caption (short)"),
        ("caption-long", "Human caption (long)"),
    ):
        r = s["rows"][key]
        lines.append(f"| {label} | {fmt(r['reconstruction'])} | | {fmt(r['loss'], 4)} |")
    lines += ["", "Paired differences (mean ± 95 % interval; an interval that excludes 0 is a clear difference):", ""]
    lines += ["| comparison | difference |", "|---|---|"]
    lines += [f"| {k} | {fmt(v, 4 if LOSS in k else 3)} |" for k, v in s["pairs"].items()]
    lines += [
        "",
        "The paper's phenomena, as these intervals show them (why where not: experiments/instances/README.md):",
    ]
    lines += ["", *verdicts(s)]
    if s["curve"]:
        lines += ["", f"One-word reconstruction every {a.curve_every} steps ({a.curve_samples} samples each):", ""]
        lines += ["| step | " + " | ".join(str(k) for k in s["curve"]) + " |"]
        lines += ["|---" * (len(s["curve"]) + 1) + "|"]
        lines += ["| reconstruction | " + " | ".join(f"{m:.3f} ± {h:.3f}" for m, h in s["curve"].values()) + " |"]
    lines += ["", f"Plot: `{Path(a.plot).name}` in `experiments/instances/` (rewritten with this section)."]
    return "\n".join(lines)


def plot(s: dict, a: argparse.Namespace, path: Path = PLOT) -> None:
    """Fig. 10: reconstruction (y) vs editability (x), one point per variant with its intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {v.key: v.label for v in tradeoff_variants(a.steps)}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for key in [k for k in VARIANTS if k in s["rows"]]:
        (ry, hy), (ex, hx) = s["rows"][key]["reconstruction"], s["rows"][key]["editability"]
        ax.errorbar(ex, ry, xerr=hx, yerr=hy, fmt="o", capsize=3, label=labels[key])
    for key, style in (("init-word", "--"), ("caption-short", ":"), ("caption-long", "-.")):
        ax.axhline(s["rows"][key]["reconstruction"][0], ls=style, color="grey", lw=1, label=key.replace("-", " "))
    ax.set_xlabel("editability (asked context present)")
    ax.set_ylabel("reconstruction (vs lookalikes)")
    ax.set_title(f"instances world, n = {s['n']} (95 % intervals)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_common(a: argparse.Namespace, *specific: str | None) -> str | None:
    """The options the study and the speed benchmark share (parses --seeds in place), then the caller's `specific`
    problems, then --model: the first problem, or None."""
    try:
        a.seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    except ValueError:
        return f"--seeds {a.seeds!r} must be integers separated by commas"
    for name in ("concepts", "steps", "batch", "samples", "curve_every", "curve_samples", "jobs"):
        if getattr(a, name) < 1:
            return f"--{name.replace('_', '-')}={getattr(a, name)} must be ≥ 1"
    if not a.seeds:
        return "--seeds names no seed"
    if any(specific):
        return next(e for e in specific if e)
    if not Path(a.model).is_file():
        return f"--model {a.model} does not exist (make pretrain-instances writes it)"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concepts", type=int, default=8)
    p.add_argument("--seeds", default="0,1", help="training seeds, comma-separated")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--lr", type=float, default=LR, help="base LR (scaled by the batch, as the paper's recipe)")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--curve-every", type=int, default=CURVE_EVERY)
    p.add_argument("--curve-samples", type=int, default=CURVE_SAMPLES)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--work", default=str(WORK), help="concepts, runs and per-unit results (resumable)")
    p.add_argument("--jobs", type=int, default=2, help="processes, one thread each")
    p.add_argument("--results", default=str(RESULTS), help="RESULTS.md to update ('none' to skip)")
    p.add_argument("--plot", default=str(PLOT), help="the Fig. 10 plot (PNG)")
    a = p.parse_args(argv)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = any(v not in VARIANTS for v in a.variants) or "one-word" not in a.variants
    error = check_common(a, f"--variants must include one-word and name only {', '.join(VARIANTS)}" if bad else None)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    s = summarise(run(a))
    if a.results != "none":
        write_section(Path(a.results), SECTION, markdown(s, a, time.time() - t0))
        plot(s, a, Path(a.plot))
    print(json.dumps({"n": s["n"], "rows": s["rows"], "pairs": s["pairs"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
