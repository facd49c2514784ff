"""A procedural captioned world of unique toy creatures: every object is one instance of a rich parameter space.

An `Instance` is drawn from its own seed: body kind and proportions, a continuous body colour, a pattern (kind,
colour, geometry), horns or ears (kind, count, placement, colour), legs (count, length, placement) and eyes
(count, size). A `Scene` places it in a context a prompt can ask for: background, size, position and an
optional second object (a ball or a block). `render(Labels)` draws it at 32×32 with the shapes world's
supersampled renderer.

Captions name coarse attributes only and drop each at random: the colour *word* (nearest of seven hue bins),
the pattern kind, the body kind, "with horns/ears", "with legs". The rest has no word at all: proportions,
the exact hue, saturation and value, the pattern's colour and geometry, part counts, placement and colour,
eyes. `caption()` reads only `Instance.worded()` and the scene, so no caption can name an unworded property —
the way no caption pins down one particular cat. `lookalike()` draws another instance with the same worded
attributes: the distractors against which the judge scores reconstruction.

Instance ids: pretraining and the judge draw ids below `HELD_OUT_BASE`; `concept_id(n)` (the concept tool's
`--seed n`) lies at or above it, so a concept is never seen in pretraining.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from experiments.shapes.world import BACKGROUND_NAMES, BACKGROUNDS, OBJECT_TEMPLATES, RESOLUTION, SUPERSAMPLE
from experiments.shapes.world import to_tensor as to_tensor

NOUN = "toy"
BODIES = ("round", "square", "pointy", "dome")
PATTERNS = ("plain", "striped", "spotted", "two-tone")
TOPS = ("none", "horns", "ears")
COLOUR_HUES = {
    "red": 0.0,
    "orange": 28.0,
    "yellow": 54.0,
    "green": 125.0,
    "blue": 220.0,
    "purple": 280.0,
    "pink": 325.0,
}
COLOUR_NAMES = tuple(COLOUR_HUES)
HUE_JITTER = 10.0  # degrees either side of the bin centre: the exact hue has no word
SIZE_NAMES = ("small", "large")
POSITIONS = ("left", "center", "right")
COMPANIONS = ("none", "ball", "block")
POSITION_PHRASES = {"left": "on the left", "center": "in the center", "right": "on the right"}
TEMPLATES = tuple(t for t in OBJECT_TEMPLATES if not set(t.split()) & set(SIZE_NAMES))  # size is context here

PRETRAIN_SEED_SPACE = 1_000_000  # pretraining instance ids: [0, HELD_OUT_BASE)
HELD_OUT_BASE = 1_000_000  # concept ids: HELD_OUT_BASE + n
JUDGE_BASE = 500_000  # the judge trains on [JUDGE_BASE, JUDGE_BASE + n) — inside the pretraining range
JUDGE_EVAL_BASE = 2_000_000  # the judge is evaluated on instances nobody trains on

NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
DARK, LIGHT = "charcoal", "ivory"  # the near-black and near-white pattern and part colours
FINE_WORDS = frozenset(
    {"pale", "vivid", "deep", "light", "wide", "tall", "one-eyed", "two-eyed", DARK, LIGHT}
)  # Instance.fine()
PATTERN_NOUNS = {"striped": "stripes", "spotted": "spots", "two-tone": "half"}
FINE_KEEP = 0.35  # each fine attribute (Instance.fine) is named in a pretraining caption with this chance

# Caption keep-probabilities: each worded attribute is named with this chance.
KEEP = {
    "colour": 0.8,
    "pattern": 0.6,
    "body": 0.6,
    "top": 0.5,
    "legs": 0.5,
    "size": 0.5,
    "background": 0.5,
    "position": 0.5,
    "companion": 0.8,
}


@dataclass(frozen=True)
class Instance:
    """One unique object. Worded: body, colour, pattern, top, bool(legs); everything else has no word."""

    body: int
    aspect: float  # width / height
    colour: int  # the colour word's index; hsv is the exact colour
    hsv: tuple[float, float, float]
    pattern: int
    pattern_rgb: tuple[int, int, int]
    pattern_angle: float
    pattern_period: float  # stripes: period in px; spots: radius in px
    pattern_phase: float
    spots: tuple[tuple[float, float], ...]
    top: int
    top_count: int
    top_spread: float
    top_length: float
    part_rgb: tuple[int, int, int]
    legs: int  # 0, 2, 3 or 4
    leg_length: float
    leg_spread: float
    eyes: int  # 1 or 2
    eye_radius: float
    eye_height: float

    def fine(self) -> dict[str, str | None]:
        """Finer words that only pretraining captions use (never the human captions): tone, proportions, eyes,
        the pattern's and the parts' colour words and the part counts. The exact values stay unworded."""
        h, sat, val = self.hsv
        tone = "pale" if sat < 0.7 else "vivid" if sat >= 0.85 else None
        shade = "deep" if val < 0.78 else "light" if val > 0.9 else None
        parts = TOPS[self.top] != "none"
        return {
            "tone": " ".join(w for w in (tone, shade) if w) or None,
            "shape": "wide" if self.aspect > 1.15 else "tall" if self.aspect < 0.85 else None,
            "eyes": ("one-eyed", "two-eyed")[self.eyes - 1],
            "pattern_colour": None if PATTERNS[self.pattern] == "plain" else colour_word(self.pattern_rgb),
            "part_colour": colour_word(self.part_rgb) if parts else None,
            "top_count": NUMBERS[self.top_count] if parts else None,
            "legs_count": NUMBERS[self.legs] if self.legs else None,
        }

    def worded(self) -> dict[str, str | None]:
        """The attributes a caption may name, as words (None: nothing to name)."""
        return {
            "colour": COLOUR_NAMES[self.colour],
            "pattern": PATTERNS[self.pattern],
            "body": BODIES[self.body],
            "top": None if TOPS[self.top] == "none" else TOPS[self.top],
            "legs": "legs" if self.legs else None,
        }

    @property
    def rgb(self) -> tuple[int, int, int]:
        return _rgb(self.hsv)


@dataclass(frozen=True)
class Scene:
    """The context around an instance: every field is something a prompt can ask for."""

    background: int
    size: int
    position: int
    companion: int
    companion_rgb: tuple[int, int, int] = (200, 200, 200)
    jitter: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Labels:
    """One image: an instance (with its id) in a scene."""

    instance_id: int
    instance: Instance
    scene: Scene


def _rgb(hsv: tuple[float, float, float]) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hsv[0] / 360.0 % 1.0, hsv[1], hsv[2])
    return (int(round(r * 255)), int(round(g * 255)), int(round(b * 255)))


def colour_word(rgb: tuple[int, int, int]) -> str:
    """The nearest colour word of a pattern or part colour (charcoal / ivory for the near-greys)."""
    h, sat, val = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    if sat < 0.25:
        return DARK if val < 0.5 else LIGHT
    hue = h * 360.0
    return min(COLOUR_NAMES, key=lambda n: min(abs(hue - COLOUR_HUES[n]), 360.0 - abs(hue - COLOUR_HUES[n])))


def _random_rgb(rng: np.random.Generator, avoid_hue: float) -> tuple[int, int, int]:
    """A colour whose hue is ≥ 60° from avoid_hue, or a near-black / near-white."""
    if rng.random() < 0.25:
        v = float(rng.choice([rng.uniform(0.08, 0.2), rng.uniform(0.9, 1.0)]))
        return _rgb((0.0, 0.0, v))
    hue = (avoid_hue + rng.uniform(60.0, 300.0)) % 360.0
    return _rgb((hue, float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.45, 1.0))))


_SPACES = {"instance": 13_001, "scene": 13_002}


def _rng(space: str, n: int) -> np.random.Generator:
    return np.random.default_rng([_SPACES[space], n])


def sample_instance(instance_id: int, fixed: dict[str, int | bool] | None = None) -> Instance:
    """The instance of an id (deterministic); `fixed` pins worded attributes (body, colour, pattern, top,
    has_legs) for lookalikes."""
    rng = _rng("instance", instance_id)
    fixed = fixed or {}
    body = int(rng.integers(len(BODIES)))
    colour = int(rng.integers(len(COLOUR_NAMES)))
    pattern = int(rng.integers(len(PATTERNS)))
    top = int(rng.integers(len(TOPS)))
    legs = int(rng.choice([0, 2, 3, 4]))
    body, colour, pattern, top = (
        int(fixed.get(k, v)) for k, v in (("body", body), ("colour", colour), ("pattern", pattern), ("top", top))
    )
    if "has_legs" in fixed and bool(fixed["has_legs"]) != bool(legs):
        legs = int(rng.choice([2, 3, 4])) if fixed["has_legs"] else 0
    hue = (COLOUR_HUES[COLOUR_NAMES[colour]] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 360.0
    sat_lo = 0.35 if COLOUR_NAMES[colour] == "pink" else 0.6
    hsv = (float(hue), float(rng.uniform(sat_lo, 0.95)), float(rng.uniform(0.7, 0.97)))
    n_spots = int(rng.integers(2, 6))
    top_count = {"none": 0, "horns": int(rng.integers(1, 4)), "ears": 2}[TOPS[top]]
    return Instance(
        body=body,
        aspect=float(rng.uniform(0.7, 1.4)),
        colour=colour,
        hsv=hsv,
        pattern=pattern,
        pattern_rgb=_random_rgb(rng, hue),
        pattern_angle=float(rng.uniform(-math.pi / 2, math.pi / 2)),
        pattern_period=float(rng.uniform(5.0, 8.0)) if PATTERNS[pattern] != "spotted" else float(rng.uniform(1.6, 2.6)),
        pattern_phase=float(rng.uniform(0, 1)),
        spots=tuple((float(u), float(v)) for u, v in rng.uniform(-0.6, 0.6, size=(n_spots, 2))),
        top=top,
        top_count=top_count,
        top_spread=float(rng.uniform(0.3, 0.75)),
        top_length=float(rng.uniform(0.35, 0.6)),
        part_rgb=(_rgb(hsv) if rng.random() < 0.3 else _random_rgb(rng, hue)),
        legs=legs,
        leg_length=float(rng.uniform(0.3, 0.5)),
        leg_spread=float(rng.uniform(0.4, 0.75)),
        eyes=int(rng.integers(1, 3)),
        eye_radius=float(rng.uniform(0.17, 0.26)),
        eye_height=float(rng.uniform(-0.45, 0.0)),
    )


def concept_id(n: int) -> int:
    """The instance id of held-out concept n (the concept tool's --seed n): never a pretraining id."""
    if n < 0:
        raise ValueError(f"concept seed {n} must be ≥ 0")
    return HELD_OUT_BASE + n


def instance_from_dict(d: dict) -> Instance:
    """The inverse of dataclasses.asdict for an Instance (JSON lists back to tuples)."""
    fields = {
        k: (tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v)
        for k, v in d.items()
    }
    return Instance(**fields)


def lookalike(instance: Instance, instance_id: int) -> Instance:
    """Another instance (from its own id) with the same worded attributes: the same long caption."""
    return sample_instance(
        instance_id,
        fixed={
            "body": instance.body,
            "colour": instance.colour,
            "pattern": instance.pattern,
            "top": instance.top,
            "has_legs": bool(instance.legs),
        },
    )


def sample_scene(rng: np.random.Generator, **fixed: int) -> Scene:
    """A random context; keyword arguments pin fields. A companion only sits beside a small off-centre object:
    a drawn companion makes the object small unless the size is pinned, a pinned large size has none."""
    size = int(fixed.get("size", rng.integers(len(SIZE_NAMES))))
    companion = int(fixed.get("companion", rng.choice(len(COMPANIONS), p=[0.6, 0.2, 0.2])))
    if COMPANIONS[companion] != "none" and "size" not in fixed:
        size = SIZE_NAMES.index("small")
    if SIZE_NAMES[size] == "large":
        position = POSITIONS.index("center")
        companion = COMPANIONS.index("none")
    else:
        position = int(fixed.get("position", rng.integers(len(POSITIONS))))
        if COMPANIONS[companion] != "none" and POSITIONS[position] == "center":
            position = POSITIONS.index(str(rng.choice(["left", "right"])))
    return Scene(
        background=int(fixed.get("background", rng.integers(len(BACKGROUND_NAMES)))),
        size=size,
        position=position,
        companion=companion,
        companion_rgb=_random_rgb(rng, float(rng.uniform(0, 360))),
        jitter=(float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))),
    )


# -- rendering ------------------------------------------------------------------------------------------------


def _body_mask(inst: Instance, cx: float, cy: float, h: float, big: int, s: float) -> Image.Image:
    w = h * inst.aspect
    mask = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(mask)
    box = [(cx - w) * s, (cy - h) * s, (cx + w) * s, (cy + h) * s]
    kind = BODIES[inst.body]
    if kind == "round":
        d.ellipse(box, fill=255)
    elif kind == "square":
        d.rounded_rectangle(box, radius=0.3 * min(w, h) * s, fill=255)
    elif kind == "pointy":
        d.polygon(
            [(cx * s, (cy - h) * s), ((cx + w) * s, cy * s), (cx * s, (cy + h) * s), ((cx - w) * s, cy * s)], fill=255
        )
    else:  # dome: the top half of an ellipse of height 2h standing on its flat side
        a = np.linspace(math.pi, 2 * math.pi, 40)
        d.polygon([((cx + w * math.cos(t)) * s, (cy + h + 2 * h * math.sin(t)) * s) for t in a], fill=255)
    return mask


def _pattern_mask(inst: Instance, cx: float, cy: float, h: float, big: int, s: float) -> np.ndarray:
    """Where the pattern colour shows inside the body, as a bool (big, big) array."""
    kind = PATTERNS[inst.pattern]
    yy, xx = (np.mgrid[0:big, 0:big] + 0.5) / s
    w = h * inst.aspect
    u, v = (xx - cx) / w, (yy - cy) / h
    ca, sa = math.cos(inst.pattern_angle), math.sin(inst.pattern_angle)
    if kind == "striped":
        along = (xx - cx) * ca + (yy - cy) * sa
        scale = h / 8.0
        return ((along / (inst.pattern_period * scale) + inst.pattern_phase) % 1.0) < 0.5
    if kind == "spotted":
        r = inst.pattern_period * h / 8.0
        out = np.zeros((big, big), dtype=bool)
        for su, sv in inst.spots:
            out |= ((xx - cx - su * w) ** 2 + (yy - cy - sv * h) ** 2) < r * r
        return out
    if kind == "two-tone":
        return (u * ca + v * sa) > (inst.pattern_phase - 0.5) * 0.6
    return np.zeros((big, big), dtype=bool)


def _draw_parts(d: ImageDraw.ImageDraw, inst: Instance, cx: float, cy: float, h: float, s: float) -> None:
    """Horns or ears on top and legs below, drawn behind the body."""
    w = h * inst.aspect
    colour = inst.part_rgb
    top_y = cy - h if BODIES[inst.body] != "pointy" else cy - h * 0.6
    if TOPS[inst.top] == "horns":
        xs = [0.0] if inst.top_count == 1 else np.linspace(-inst.top_spread, inst.top_spread, inst.top_count)
        for x in xs:
            bx = cx + x * w * (0.6 if BODIES[inst.body] == "pointy" else 1.0)
            base = 0.22 * h
            tip = (bx * s, (top_y - inst.top_length * h - 0.15 * h) * s)
            d.polygon(
                [((bx - base) * s, (top_y + 0.3 * h) * s), ((bx + base) * s, (top_y + 0.3 * h) * s), tip], fill=colour
            )
    elif TOPS[inst.top] == "ears":
        r = inst.top_length * h * 0.7
        for sign in (-1, 1):
            ex = cx + sign * inst.top_spread * w * (0.6 if BODIES[inst.body] == "pointy" else 1.0)
            d.ellipse([(ex - r) * s, (top_y - r * 0.6) * s, (ex + r) * s, (top_y + r * 1.4) * s], fill=colour)
    if inst.legs:
        bottom = cy + h * (0.55 if BODIES[inst.body] in ("round", "pointy") else 0.8)
        lw = 0.13 * h
        for x in np.linspace(-inst.leg_spread, inst.leg_spread, inst.legs):
            lx = cx + x * w * (0.6 if BODIES[inst.body] == "pointy" else 1.0)
            d.rectangle(
                [(lx - lw) * s, (bottom - 0.3 * h) * s, (lx + lw) * s, (cy + h + inst.leg_length * h) * s], fill=colour
            )


def _draw_eyes(d: ImageDraw.ImageDraw, inst: Instance, cx: float, cy: float, h: float, s: float) -> None:
    w = h * inst.aspect
    r = inst.eye_radius * h
    y = cy + inst.eye_height * h
    xs = [cx] if inst.eyes == 1 else [cx - 0.32 * min(w, h), cx + 0.32 * min(w, h)]
    for x in xs:
        d.ellipse([(x - r) * s, (y - r) * s, (x + r) * s, (y + r) * s], fill=(250, 250, 250))
        p = r * 0.5
        d.ellipse([(x - p) * s, (y - p) * s, (x + p) * s, (y + p) * s], fill=(15, 15, 15))


def geometry(scene: Scene) -> tuple[float, float, float]:
    """(cx, cy, half-height) of the body in 32-px units."""
    large = SIZE_NAMES[scene.size] == "large"
    h = 7.6 if large else 5.0
    cx = {"left": 10.0, "center": 16.0, "right": 22.0}[POSITIONS[scene.position]]
    return cx + scene.jitter[0], 15.5 + scene.jitter[1], h


def render(labels: Labels, resolution: int = RESOLUTION) -> Image.Image:
    """Draw one image (RGB, resolution²) with 4× supersampling and a box filter, like the shapes world."""
    inst, scene = labels.instance, labels.scene
    s = resolution / RESOLUTION * SUPERSAMPLE
    big = resolution * SUPERSAMPLE
    bg = BACKGROUNDS[BACKGROUND_NAMES[scene.background]]
    img = Image.new("RGB", (big, big), bg)
    d = ImageDraw.Draw(img)
    cx, cy, h = geometry(scene)
    if COMPANIONS[scene.companion] != "none":
        ox = 32.0 - cx
        r = 3.6
        box = [(ox - r) * s, (cy + 2 - r) * s, (ox + r) * s, (cy + 2 + r) * s]
        if COMPANIONS[scene.companion] == "ball":
            d.ellipse(box, fill=scene.companion_rgb)
        else:
            d.rectangle(box, fill=scene.companion_rgb)
    _draw_parts(d, inst, cx, cy, h, s)
    mask = _body_mask(inst, cx, cy, h, big, s)
    body = np.empty((big, big, 3), dtype=np.uint8)
    body[:] = inst.rgb
    body[_pattern_mask(inst, cx, cy, h, big, s)] = inst.pattern_rgb
    img.paste(Image.fromarray(body), (0, 0), mask)
    _draw_eyes(ImageDraw.Draw(img), inst, cx, cy, h, s)
    return img.resize((resolution, resolution), Image.BOX)


# -- captions -------------------------------------------------------------------------------------------------


def phrase(worded: dict[str, str | None], size: str | None = None, fine: dict[str, str | None] | None = None) -> str:
    """The noun phrase for the named attributes, e.g. 'small red striped round toy with horns and legs', or
    with fine words 'small pale red striped round wide one-eyed toy with blue stripes with two green horns and
    three legs'."""
    fine = fine or {}
    head = (size, fine.get("tone"), worded.get("colour"), worded.get("pattern"), worded.get("body"), fine.get("shape"))
    words = [w for w in (*head, fine.get("eyes")) if w]
    text = " ".join([*words, NOUN])
    pattern = worded.get("pattern") or fine.get("pattern_kind")
    if fine.get("pattern_colour") and pattern in PATTERN_NOUNS:
        article = "a " if pattern == "two-tone" else ""
        text += f" with {article}{fine['pattern_colour']} {PATTERN_NOUNS[pattern]}"
    top = worded.get("top")
    if top:
        top = " ".join(w for w in (fine.get("top_count"), fine.get("part_colour"), top) if w)
    legs = worded.get("legs")
    if legs and fine.get("legs_count"):
        legs = f"{fine['legs_count']} legs"
    parts = [w for w in (top, legs) if w]
    if parts:
        text += " with " + " and ".join(parts)
    return text


def context_phrase(scene: Scene, keep: dict[str, bool]) -> str:
    """The scene words kept: background, position, companion."""
    out = []
    if keep.get("background"):
        out.append(f"on a {BACKGROUND_NAMES[scene.background]} background")
    if keep.get("position") and SIZE_NAMES[scene.size] == "small":
        out.append(POSITION_PHRASES[POSITIONS[scene.position]])
    if keep.get("companion") and COMPANIONS[scene.companion] != "none":
        out.append(f"next to a {COMPANIONS[scene.companion]}")
    return " ".join(out)


def caption(labels: Labels, rng: np.random.Generator) -> str:
    """A templated caption naming a random subset of the worded attributes and the context."""
    keep = {k: bool(rng.random() < p) for k, p in KEEP.items()}
    worded = {k: (v if keep[k] else None) for k, v in labels.instance.worded().items()}
    size = SIZE_NAMES[labels.scene.size] if keep["size"] else None
    fine = {k: (v if rng.random() < FINE_KEEP else None) for k, v in labels.instance.fine().items()}
    fine["pattern_kind"] = PATTERNS[labels.instance.pattern]  # "with blue stripes" names the kind as well
    text = phrase(worded, size, fine)
    if rng.random() < 0.5:
        text = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(text)
    else:
        text = f"a {text}"
    tail = context_phrase(labels.scene, keep)
    return " ".join(f"{text} {tail}".split())


def human_captions(inst: Instance) -> tuple[str, str]:
    """(short, long) captions a person would write: the colour and the noun; every worded attribute."""
    w = inst.worded()
    return f"a {w['colour']} {NOUN}", f"a {phrase(w)}"


def caption_words() -> set[str]:
    """Every word a caption can contain."""
    words = set(" ".join(t.format("") for t in TEMPLATES).split())
    words |= {NOUN, "with", "and", "legs", "a", "on", "background", "next", "to", "in", "the"}
    words |= set(BODIES) | set(PATTERNS) | set(TOPS) | set(COLOUR_NAMES) | set(SIZE_NAMES) | set(BACKGROUND_NAMES)
    words |= set(COMPANIONS) | set(" ".join(POSITION_PHRASES.values()).split())
    words |= FINE_WORDS
    words |= set(NUMBERS.values()) | set(PATTERN_NOUNS.values())
    return words - {"none"}


# -- datasets -------------------------------------------------------------------------------------------------


def scene_rng(instance_id: int, view: int) -> np.random.Generator:
    return _rng("scene", instance_id * 1000 + view)


def views(
    instance_id: int, n: int, first_view: int = 0, instance: Instance | None = None, **fixed: int
) -> list[Labels]:
    """n renders' labels of one instance in random scenes (view indices first_view…)."""
    inst = instance or sample_instance(instance_id)
    return [Labels(instance_id, inst, sample_scene(scene_rng(instance_id, first_view + v), **fixed)) for v in range(n)]


def generate(
    n_instances: int, views_per_instance: int, base: int = 0, resolution: int = RESOLUTION
) -> tuple[np.ndarray, list[Labels]]:
    """Images (uint8, (n, H, W, 3)) and labels of instances base… base+n_instances-1, each in several scenes."""
    labels = [lab for i in range(base, base + n_instances) for lab in views(i, views_per_instance)]
    images = np.stack([np.asarray(render(lab, resolution)) for lab in labels])
    return images, labels


def labels_dict(labels: Labels) -> dict:
    """JSON-ready parameters of one render."""
    return {"instance_id": labels.instance_id, "instance": asdict(labels.instance), "scene": asdict(labels.scene)}


def context_targets(labels: list[Labels]) -> torch.Tensor:
    """(n, 4) LongTensor: background, size, position, companion."""
    return torch.tensor(
        [[lab.scene.background, lab.scene.size, lab.scene.position, lab.scene.companion] for lab in labels]
    )
