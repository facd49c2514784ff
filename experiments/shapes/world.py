"""A procedural captioned world of coloured shapes: deterministic images, captions and labels.

Every shape, the held-out ring included, is drawn equally often and captioned either with its own name or,
with the same probability `GENERIC_PROB`, with the generic word "shape". "a photo of a shape" therefore
carries no information about which shape is meant and draws a ring only at its prior rate (1/7).

The ring's own word is withheld from the shipped model: pretraining teaches the model to draw rings from
captions that name them, then `pretrain.withhold_word` resets the word's row of the token table to its
untrained initial value, as if the word had never appeared. The shipped model can draw a ring, but no word
in its vocabulary asks for one; textual inversion, started from "shape", has to find one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from inversion.templates import OBJECT_TEMPLATES as PAPER_TEMPLATES

RESOLUTION = 32
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star", "heart", "ring", "cross")
HELD_OUT = "ring"  # drawn and named in pretraining; its word is withheld from the shipped model
GENERIC_WORD = "shape"
GENERIC_PROB = 0.25
NAMED_SHAPES = tuple(s for s in SHAPES if s != HELD_OUT)

COLOURS = {
    "red": (215, 30, 35),
    "green": (35, 160, 60),
    "blue": (35, 70, 215),
    "yellow": (240, 210, 30),
    "purple": (135, 45, 175),
    "orange": (245, 135, 25),
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUNDS = {"white": (242, 242, 242), "black": (22, 22, 22), "gray": (128, 128, 128)}
BACKGROUND_NAMES = tuple(BACKGROUNDS)
SIZES = {"small": (8.0, 9.5), "large": (11.0, 13.5)}  # outer radius in pixels at 32 px
SIZE_NAMES = tuple(SIZES)

# The textual-inversion paper's object templates (Gal et al. 2022; photo, illustration and depiction
# variants), so that inversion prompts are in the caption distribution the text tower was trained on.
OBJECT_TEMPLATES = PAPER_TEMPLATES[: PAPER_TEMPLATES.index("an illustration of a {}")]  # the "photo" ones
OBJECT_TEMPLATES = tuple(
    dict.fromkeys(
        OBJECT_TEMPLATES
        + tuple(t.replace("a photo of", "an illustration of") for t in OBJECT_TEMPLATES)
        + tuple(t.replace("a photo of", "a depiction of") for t in OBJECT_TEMPLATES)
    )
)


@dataclass(frozen=True)
class Labels:
    """What one image shows: indices into SHAPES, COLOUR_NAMES, BACKGROUND_NAMES, SIZE_NAMES + geometry."""

    shape: int
    colour: int
    background: int
    size: int
    radius: float
    cx: float
    cy: float
    angle: float
    colour_jitter: tuple[int, int, int]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Outline points of a polygonal shape of outer radius r, rotated by angle (radians)."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (np.arange(4) * math.pi / 2 + math.pi / 4)]
        pts = [(x * 0.9, y * 0.9) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (np.arange(3) * 2 * math.pi / 3 - math.pi / 2)]
        pts = [(x, y + 0.15) for x, y in pts]
    elif shape == "star":
        pts = []
        for i in range(10):
            a = i * math.pi / 5 - math.pi / 2
            rad = 1.0 if i % 2 == 0 else 0.42
            pts.append((rad * math.cos(a), rad * math.sin(a) + 0.08))
    elif shape == "heart":
        t = np.linspace(0, 2 * math.pi, 60, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = [(xi / 16.5, (yi + 2.5) / 16.5) for xi, yi in zip(x, y)]
    elif shape == "cross":
        w = 0.34
        pts = [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
        pts = [(x * 0.92, y * 0.92) for x, y in pts]
    else:
        raise ValueError(f"{shape!r} is not a polygonal shape")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def render(labels: Labels, resolution: int = RESOLUTION) -> Image.Image:
    """Draw one image (RGB, resolution²) with 4× supersampling and a box filter."""
    s = resolution / RESOLUTION * SUPERSAMPLE
    big = resolution * SUPERSAMPLE
    bg = BACKGROUNDS[BACKGROUND_NAMES[labels.background]]
    fg = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[COLOUR_NAMES[labels.colour]], labels.colour_jitter))
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    shape = SHAPES[labels.shape]
    cx, cy, r = labels.cx * s, labels.cy * s, labels.radius * s
    if shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        if shape == "ring":
            ri = r * 0.55
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=bg)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, labels.angle), fill=fg)
    return img.resize((resolution, resolution), Image.BOX)


def sample_labels(rng: np.random.Generator) -> Labels:
    """Draw shape, colour, background, size, position and a small rotation uniformly."""
    size = int(rng.integers(len(SIZE_NAMES)))
    lo, hi = SIZES[SIZE_NAMES[size]]
    radius = float(rng.uniform(lo, hi))
    margin = radius + 1.0
    cx, cy = (float(v) for v in rng.uniform(margin, RESOLUTION - margin, size=2))
    return Labels(
        shape=int(rng.integers(len(SHAPES))),
        colour=int(rng.integers(len(COLOUR_NAMES))),
        background=int(rng.integers(len(BACKGROUND_NAMES))),
        size=size,
        radius=radius,
        cx=cx,
        cy=cy,
        angle=float(rng.uniform(-0.2, 0.2)),
        colour_jitter=tuple(int(v) for v in rng.integers(-12, 13, size=3)),
    )


def _position_word(labels: Labels) -> str | None:
    dx, dy = labels.cx - RESOLUTION / 2, labels.cy - RESOLUTION / 2
    if max(abs(dx), abs(dy)) < 4.0:
        return "in the center"
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def noun(shape: int, rng: np.random.Generator, generic_prob: float = GENERIC_PROB) -> str:
    """The shape's word in a caption: the generic word with equal odds for all shapes, else its name."""
    if rng.random() < generic_prob:
        return GENERIC_WORD
    return SHAPES[shape]


def caption(labels: Labels, rng: np.random.Generator, generic_prob: float = GENERIC_PROB) -> str:
    """A templated caption, e.g. 'a photo of a small blue ring on a black background'."""
    words = []
    if rng.random() < 0.25:
        words.append(SIZE_NAMES[labels.size])
    if rng.random() < 0.85:
        words.append(COLOUR_NAMES[labels.colour])
    words.append(noun(labels.shape, rng, generic_prob))
    phrase = " ".join(words)
    if rng.random() < 0.5:
        text = OBJECT_TEMPLATES[int(rng.integers(len(OBJECT_TEMPLATES)))].format(phrase)
    else:
        text = f"a {phrase}"
    if rng.random() < 0.4:
        text += f" on a {BACKGROUND_NAMES[labels.background]} background"
    if rng.random() < 0.2:
        text += " " + _position_word(labels)
    return " ".join(text.split())


def generate(n: int, seed: int, resolution: int = RESOLUTION) -> tuple[np.ndarray, list[Labels]]:
    """n images (uint8, (n, H, W, 3)) and their labels; the same seed gives the same world."""
    rng = np.random.default_rng(seed)
    labels = [sample_labels(rng) for _ in range(n)]
    images = np.stack([np.asarray(render(lab, resolution)) for lab in labels])
    return images, labels


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def label_tensors(labels: list[Labels]) -> tuple[torch.Tensor, torch.Tensor]:
    """(shape ids, colour ids) as LongTensors."""
    return (torch.tensor([lab.shape for lab in labels]), torch.tensor([lab.colour for lab in labels]))


def concept_labels() -> list[Labels]:
    """The five held-out-concept images: the held-out shape in five colours, both sizes, all backgrounds."""
    held_out = SHAPES.index(HELD_OUT)
    spec = [
        ("red", "white", "large", 16.0, 16.5, 0.0),
        ("blue", "black", "large", 14.5, 16.0, 0.1),
        ("green", "gray", "small", 20.0, 11.0, -0.1),
        ("yellow", "gray", "large", 16.5, 15.5, 0.05),
        ("purple", "white", "small", 11.5, 20.5, 0.0),
    ]
    out = []
    for colour, bg, size, cx, cy, angle in spec:
        lo, hi = SIZES[size]
        out.append(
            Labels(
                shape=held_out,
                colour=COLOUR_NAMES.index(colour),
                background=BACKGROUND_NAMES.index(bg),
                size=SIZE_NAMES.index(size),
                radius=(lo + hi) / 2,
                cx=cx,
                cy=cy,
                angle=angle,
                colour_jitter=(0, 0, 0),
            )
        )
    return out
