"""Time to concept: how many UNet image-passes each training recipe needs to learn an instances concept.

    python -m experiments.instances.speed [--concepts 8] [--seeds 0] [--recipes official,…] [--steps 300]

(`make bench-concepts`.) For every held-out concept, seed and recipe, two runs of `inversion.train` on
`weights/instances.safetensors`:

- a fixed-length run that keeps its word every `--curve-every` steps: the reconstruction curve
  (`experiments.instances.score.curve`) and, at its last step, reconstruction and editability
  (`experiments.instances.score.score`);
- a `STEPS=auto` run capped at the same length: where the stop rule stopped it (stop.json), and its word's
  reconstruction and editability. An auto run that stops at step S holds exactly the vectors of the fixed run
  at S; `--curve-every` divides the rule's evaluation interval (`inversion.stopping.every(--steps)`), so S is a
  point of the curve.

The bar of a (concept, seed) is 90 % of the official recipe's final reconstruction, read as the mean of its last
`HOLD` curve points (one point of 16 samples is ± 0.1 noise). A recipe reaches the bar at the first curve step
at or above it where the mean of that point and the next `HOLD − 1` is too: a point that only brushes the bar
by chance does not count. Its cost to the bar is the image-passes (optimiser steps × batch × accumulation: a
bigger batch is no shortcut; plus what `--init-search` spent before the first step) to that step, and the wall
seconds of training scaled to it. Every unit is kept as
JSON under `--work` (resumable). The section between the `instances-speed` markers of experiments/RESULTS.md and
`experiments/instances/speed-curves.png` (reconstruction vs image-passes, one line per concept and recipe) are
rewritten from those files.

Recipes are named sets of trainer options. `official` is the paper's recipe as the study runs it, `fast` is the
trainer's `--recipe fast` (`inversion.config.RECIPES`); every other row is an ablation of it or a candidate that
did not earn its place.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from experiments.instances import score as scoring
from experiments.instances import study
from experiments.results import RESULTS, write_section
from inversion import initsearch, stopping

log = logging.getLogger(__name__)

WORK = study.ROOT / ".cache" / "instances-speed"
PLOT = Path(__file__).resolve().parent / "speed-curves.png"
SECTION = "instances-speed"
BAR = 0.9  # the bar: this fraction of the official recipe's final reconstruction
STEPS = 150  # every fixed run and the auto runs' cap: half the study's 300 (a curve every 5 steps costs 5× more)
CURVE_EVERY = 5  # divides stopping.every(STEPS) = 5: every auto-stop step is a point of the curve
AUTO_LATE = 1.5  # the goal: auto-stop at most this many times the first crossing
HOLD = 3  # curve points averaged: the official final value, and a crossing that holds
RECIPES = {
    "official": {},  # the study's recipe: AdamW, base LR × batch, constant LR, init word "toy"
    "fast": {"recipe": "fast", "lr": None},  # the trainer's default recipe: base LR × 4
    "lr-x2": {"lr": 2 * study.LR},  # ablation: half the fast recipe's step
    "lr-x8": {"lr": 8 * study.LR},  # ablation: twice the fast recipe's step
    "init-search": {"init_search": 8},  # candidate: start from the best of "toy" and 8 ranked vocabulary words
}


def _unit(job: tuple) -> dict:
    """One (concept, seed, recipe): the fixed run with its curve and final scores, then the auto run's stop."""
    import torch

    from inversion.train import train

    cdir, run_dir, recipe, changes, seed, a = job
    torch.set_num_threads(1)
    config = study.train_config(cdir, run_dir / "fixed", seed, a, a["curve_every"], **changes)
    t0 = time.time()
    train(config)
    train_s = time.time() - t0
    out = scoring.score(Path(cdir), run_dir / "fixed", a["samples"], seed=a["sample_seed"])
    out["curve"] = scoring.curve(Path(cdir), run_dir / "fixed", a["curve_samples"], seed=a["sample_seed"])
    searched = run_dir / "fixed" / initsearch.FILE
    search = json.loads(searched.read_text()) if searched.is_file() else {"image_passes": 0, "chosen": None}
    # a searched run equals one from the chosen word (tests/test_initsearch.py): the auto run need not search again
    start = {"init": search["chosen"], "init_search": 0} if search["chosen"] else {}
    train(config.replace(out=str(run_dir / "auto"), auto=True, max_steps=a["steps"], save_every=a["steps"], **start))
    stop = json.loads((run_dir / "auto" / "stop.json").read_text())
    at_stop = scoring.score(Path(cdir), run_dir / "auto", a["samples"], seed=a["sample_seed"])
    out.update(
        auto_reconstruction=at_stop["reconstruction"],
        auto_editability=at_stop["editability"],
        recipe=recipe,
        seed=seed,
        concept=Path(cdir).name,
        train_seconds=round(train_s, 1),
        passes_per_step=config.batch * config.accum,
        search_passes=search["image_passes"],
        init_chosen=search["chosen"],
        stopped_at=stop["stopped_at"],
        stop_reason=stop["reason"],
    )
    return out


def run(a: argparse.Namespace) -> list[dict]:
    """Every (concept, seed, recipe) unit of the benchmark."""
    return study.run_units(
        a,
        {r: RECIPES[r] for r in a.recipes},
        _unit,
        lambda out: f"reconstruction {out['reconstruction']:.3f}, auto-stop at {out['stopped_at']}",
    )


def first_crossing(curve: dict[str, float], bar: float, hold: int = HOLD) -> int | None:
    """The first step whose reconstruction is at or above `bar` and whose mean with the next `hold − 1` curve
    points is too (None: never)."""
    steps = sorted(map(int, curve))
    values = [curve[str(s)] for s in steps]
    return next((s for i, s in enumerate(steps) if min(values[i], np.mean(values[i : i + hold])) >= bar), None)


def final(curve: dict[str, float], hold: int = HOLD) -> float:
    """The curve's final value: the mean of its last `hold` points."""
    steps = sorted(map(int, curve))
    return float(np.mean([curve[str(s)] for s in steps[-hold:]]))


def summarise(results: list[dict]) -> dict:
    """Per unit: the bar, each recipe's first crossing in steps, image-passes and seconds, and its auto-stop;
    per recipe: medians and 95 % intervals over the units."""
    units: dict[tuple, dict[str, dict]] = {}
    for r in results:
        units.setdefault((r["concept"], r["seed"]), {})[r["recipe"]] = r
    rows = []
    for (concept, seed), by in sorted(units.items()):
        bar = BAR * final(by["official"]["curve"])
        for recipe, r in by.items():
            cross = first_crossing(r["curve"], bar)
            steps = max(map(int, r["curve"]))
            rows.append(
                {
                    "concept": concept,
                    "seed": seed,
                    "recipe": recipe,
                    "bar": bar,
                    "crossing_step": cross,
                    "passes_to_bar": None if cross is None else cross * r["passes_per_step"] + r["search_passes"],
                    "seconds_to_bar": None if cross is None else r["train_seconds"] * cross / steps,
                    "stopped_at": r["stopped_at"],
                    "auto_over_crossing": None if not cross else r["stopped_at"] / cross,
                    "auto_reconstruction": r["auto_reconstruction"],
                    "auto_editability": r["auto_editability"],
                    "reconstruction": r["reconstruction"],
                    "editability": r["editability"],
                    "curve": r["curve"],
                    "passes_per_step": r["passes_per_step"],
                    "search_passes": r["search_passes"],
                }
            )
    recipes = [k for k in RECIPES if any(u["recipe"] == k for u in rows)]
    official = {(u["concept"], u["seed"]): u for u in rows if u["recipe"] == "official"}
    per: dict[str, dict] = {}
    for recipe in recipes:
        mine = [u for u in rows if u["recipe"] == recipe]
        ratios = [
            official[u["concept"], u["seed"]]["passes_to_bar"] / u["passes_to_bar"]
            for u in mine
            if u["passes_to_bar"] and official[u["concept"], u["seed"]]["passes_to_bar"]
        ]
        late = [u["auto_over_crossing"] for u in mine if u["auto_over_crossing"] is not None]
        per[recipe] = {
            "units": len(mine),
            "reached_bar": sum(u["crossing_step"] is not None for u in mine),
            "crossed_at_init": sum(u["crossing_step"] == 0 for u in mine),
            "median_official_over_recipe_passes": float(np.median(ratios)) if ratios else None,
            "median_passes_to_bar": _median([u["passes_to_bar"] for u in mine]),
            "median_seconds_to_bar": _median([u["seconds_to_bar"] for u in mine]),
            "auto_over_crossing_min_max": (min(late), max(late)) if late else None,
            "auto_in_goal": sum(1.0 <= x <= AUTO_LATE for x in late),
            "reconstruction": study.interval([u["reconstruction"] for u in mine]),
            "editability": study.interval([u["editability"] for u in mine]),
            "auto_reconstruction": study.interval([u["auto_reconstruction"] for u in mine]),
            "auto_editability": study.interval([u["auto_editability"] for u in mine]),
            **{
                f"auto_minus_official_{m}": study.interval(
                    [u[f"auto_{m}"] - official[u["concept"], u["seed"]][m] for u in mine]
                )
                for m in ("reconstruction", "editability")
            },
        }
    return {"units": rows, "recipes": per}


def _median(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.median(kept)) if kept else None


def _num(v, fmt: str = "{:.0f}") -> str:
    return "—" if v is None else fmt.format(v)


def markdown(s: dict, a: argparse.Namespace, seconds: float) -> str:
    """The RESULTS.md section's text (its markers are added by experiments.results)."""
    fmt = study.fmt
    lines = [
        "## instances world: time to concept (`make bench-concepts`)",
        "",
        f"{a.concepts} held-out concepts × seeds {','.join(map(str, a.seeds))}; each recipe trained {a.steps} steps "
        f"(batch {a.batch}) on `weights/instances.safetensors`, its word kept every {a.curve_every} steps and "
        f"scored with {a.curve_samples} samples; final scores with {a.samples}. Bar: {BAR:.0%} of the official "
        f"recipe's final reconstruction (mean of its last {HOLD} curve points), per concept and seed; a recipe "
        f"reaches it at the first point at or above it from which the mean of {HOLD} points is too. Image-passes: "
        f"optimiser steps × batch × accumulation, plus an init search's. Auto-stop: a `STEPS=auto` run capped at "
        f"{a.steps} steps. Written by the script, whose last process ran {seconds / 60:.0f} min (units kept under "
        "--work are read back, not rerun).",
        "",
        "| recipe | options | reached the bar | median image-passes to it | median s to it | official ÷ recipe "
        "passes (median) | auto-stop ÷ crossing (min–max) | auto-stop within 1–1.5× | final reconstruction | "
        "final editability | auto-stopped reconstruction | auto-stopped editability | auto-stopped − official "
        "final: reconstruction | editability |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for recipe, p in s["recipes"].items():
        options = " ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in RECIPES[recipe].items() if v is not None
        )
        mm = p["auto_over_crossing_min_max"]
        at_init = f" ({p['crossed_at_init']} at init)" if p["crossed_at_init"] else ""
        lines.append(
            f"| {recipe} | {options or 'the paper'} | {p['reached_bar']}/{p['units']}{at_init} "
            f"| {_num(p['median_passes_to_bar'])} | {_num(p['median_seconds_to_bar'], '{:.1f}')} "
            f"| {_num(p['median_official_over_recipe_passes'], '{:.2f}')} "
            f"| {'—' if mm is None else f'{mm[0]:.2f}–{mm[1]:.2f}'} | {p['auto_in_goal']}/{p['units']} "
            f"| {fmt(p['reconstruction'])} | {fmt(p['editability'])} | {fmt(p['auto_reconstruction'])} "
            f"| {fmt(p['auto_editability'])} | {fmt(p['auto_minus_official_reconstruction'])} "
            f"| {fmt(p['auto_minus_official_editability'])} |"
        )
    lines += ["", "Per unit (crossing step / auto-stop step):", ""]
    lines += ["| concept | seed | bar | " + " | ".join(s["recipes"]) + " |"]
    lines += ["|---|---|---|" + "---|" * len(s["recipes"])]
    for concept, seed in sorted({(u["concept"], u["seed"]) for u in s["units"]}):
        mine = {u["recipe"]: u for u in s["units"] if (u["concept"], u["seed"]) == (concept, seed)}
        cells = [
            f"{_num(mine[r]['crossing_step'])} / {mine[r]['stopped_at']}" if r in mine else "" for r in s["recipes"]
        ]
        lines.append(f"| {concept} | {seed} | {next(iter(mine.values()))['bar']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", f"Plot: `{Path(a.plot).name}` in `experiments/instances/` (rewritten with this section)."]
    return "\n".join(lines)


def plot(s: dict, path: Path = PLOT) -> None:
    """Reconstruction vs image-passes: one line per concept and recipe (official solid, candidates dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({(u["concept"], u["seed"]) for u in s["units"]})
    styles = ["-", "--", ":", "-."]
    for u in s["units"]:
        steps = sorted(map(int, u["curve"]))
        colour = f"C{keys.index((u['concept'], u['seed'])) % 10}"
        style = styles[list(s["recipes"]).index(u["recipe"]) % len(styles)]
        label = f"{u['recipe']}" if (u["concept"], u["seed"]) == keys[0] else None
        passes = [t * u["passes_per_step"] + u["search_passes"] for t in steps]
        ax.plot(passes, [u["curve"][str(t)] for t in steps], style, color=colour, lw=1, label=label)
    ax.set_xlabel("UNet image-passes")
    ax.set_ylabel("reconstruction (vs lookalikes)")
    ax.set_title("time to concept: one colour per concept and seed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concepts", type=int, default=8)
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {', '.join(RECIPES)}")
    p.add_argument("--steps", type=int, default=STEPS, help="steps of every fixed run and auto cap")
    p.add_argument("--batch", type=int, default=study.BATCH)
    p.add_argument("--lr", type=float, default=study.LR, help="the official base LR (scaled by the batch)")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--curve-every", type=int, default=CURVE_EVERY)
    p.add_argument("--curve-samples", type=int, default=study.CURVE_SAMPLES)
    p.add_argument("--model", default=str(study.MODEL))
    p.add_argument("--work", default=str(WORK), help="concepts, runs and per-unit results (resumable)")
    p.add_argument("--jobs", type=int, default=2, help="processes, one thread each")
    p.add_argument("--results", default=str(RESULTS), help="RESULTS.md to update ('none' to skip)")
    p.add_argument("--plot", default=str(PLOT), help="reconstruction vs image-passes (PNG)")
    a = p.parse_args(argv)
    a.recipes = [r.strip() for r in a.recipes.split(",") if r.strip()]
    bad = any(r not in RECIPES for r in a.recipes) or "official" not in a.recipes
    error = study.check_common(
        a,
        f"--recipes must include official and name only {', '.join(RECIPES)}" if bad else None,
        f"--curve-every {a.curve_every} must divide the stop rule's {stopping.every(a.steps)}-step evaluations "
        f"at --steps {a.steps}"
        if a.curve_every >= 1 and a.steps >= 1 and stopping.every(a.steps) % a.curve_every
        else None,
    )
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    s = summarise(run(a))
    if a.results != "none":
        write_section(Path(a.results), SECTION, markdown(s, a, time.time() - t0))
        plot(s, Path(a.plot))
    print(json.dumps(s["recipes"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
