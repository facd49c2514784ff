"""Write a held-out concept of the instances world: an object never used in pretraining.

    python -m experiments.instances.concept --seed N --out DIR [--overwrite]

DIR/
    train-1.png … train-5.png   the 5 training renders (large, centred, varied backgrounds): `make train CONCEPT=DIR`
    heldout/heldout-1.png …     HELD_OUT renders of the same object in other scenes (the judge's reference)
    concept.json                the instance's parameters and id, every render's scene, the init word, and the
                                short and long human captions
The object is world.sample_instance(world.concept_id(N)): ids at or above world.HELD_OUT_BASE, which
pretraining never draws. The same N always gives the same files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from experiments.instances import world

log = logging.getLogger(__name__)

N_TRAIN = 5
HELD_OUT = 8
HELD_OUT_FIRST_VIEW = 100  # scene indices of held-out renders: disjoint from the training renders'
LARGE = world.SIZE_NAMES.index("large")


def concept_views(n: int) -> tuple[list[world.Labels], list[world.Labels]]:
    """(training, held-out) render labels of concept n."""
    iid = world.concept_id(n)
    inst = world.sample_instance(iid)
    train = world.views(iid, N_TRAIN, instance=inst, size=LARGE)
    held = world.views(iid, HELD_OUT, first_view=HELD_OUT_FIRST_VIEW, instance=inst, size=LARGE)
    return train, held


def describe(n: int) -> dict:
    """concept.json's content for concept n."""
    train, held = concept_views(n)
    inst = train[0].instance
    short, long = world.human_captions(inst)
    return {
        "world": "instances",
        "seed": n,
        "instance_id": train[0].instance_id,
        "instance": asdict(inst),
        "worded": inst.worded(),
        "init_word": world.NOUN,
        "caption_short": short,
        "caption_long": long,
        "train": [{"file": f"train-{i}.png", "scene": asdict(lab.scene)} for i, lab in enumerate(train, 1)],
        "heldout": [{"file": f"heldout/heldout-{i}.png", "scene": asdict(lab.scene)} for i, lab in enumerate(held, 1)],
    }


def write_concept(n: int, out: Path, overwrite: bool = False) -> dict:
    """Render concept n into `out` (built in a temporary sibling folder, then moved into place)."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; give --overwrite to replace it")
    train, held = concept_views(n)
    info = describe(n)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "heldout").mkdir(parents=True)
    for entry, lab in zip(info["train"] + info["heldout"], train + held):
        world.render(lab).save(tmp / entry["file"])
    (tmp / "concept.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return info


def load_concept(folder: str | os.PathLike) -> dict:
    """concept.json of a concept folder, with the Instance rebuilt under "object"."""
    path = Path(folder) / "concept.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {folder} a folder written by experiments.instances.concept?")
    info = json.loads(path.read_text())
    info["object"] = world.instance_from_dict(info["instance"])
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, required=True, help="concept number N ≥ 0 (instance id HELD_OUT_BASE + N)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.seed < 0 or world.concept_id(a.seed) >= world.JUDGE_EVAL_BASE:
        print(f"error: --seed={a.seed} must be in [0, {world.JUDGE_EVAL_BASE - world.HELD_OUT_BASE})", file=sys.stderr)
        return 2
    try:
        info = write_concept(a.seed, Path(a.out), a.overwrite)
    except (FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("concept %d → %s: %s (init word %r)", a.seed, a.out, info["caption_long"], info["init_word"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
