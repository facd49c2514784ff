"""Prompt templates of Textual Inversion (Gal et al. 2022, official ldm/data/personalized*.py)."""

from __future__ import annotations

from pathlib import Path

OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
    "an illustration of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "an illustration of a clean {}",
    "an illustration of a dirty {}",
    "a dark photo of the {}",
    "an illustration of my {}",
    "an illustration of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "an illustration of the {}",
    "a good photo of the {}",
    "an illustration of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "an illustration of the clean {}",
    "a rendition of a {}",
    "an illustration of a nice {}",
    "a good photo of a {}",
    "an illustration of the nice {}",
    "an illustration of the small {}",
    "an illustration of the weird {}",
    "an illustration of the large {}",
    "an illustration of a cool {}",
    "an illustration of a small {}",
    "a depiction of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a depiction of a clean {}",
    "a depiction of a dirty {}",
    "a dark photo of the {}",
    "a depiction of my {}",
    "a depiction of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a depiction of the {}",
    "a good photo of the {}",
    "a depiction of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a depiction of the clean {}",
    "a rendition of a {}",
    "a depiction of a nice {}",
    "a good photo of a {}",
    "a depiction of the nice {}",
    "a depiction of the small {}",
    "a depiction of the weird {}",
    "a depiction of the large {}",
    "a depiction of a cool {}",
    "a depiction of a small {}",
)

STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)

# Per-image tokens (official --per_image_tokens): "… {S*} with {image token}", used with probability 0.25.
OBJECT_DUAL_TEMPLATES: tuple[str, ...] = tuple(t + " with {}" for t in OBJECT_TEMPLATES[:27])
STYLE_DUAL_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {} with {}",
    "a rendering in the style of {} with {}",
    "a cropped painting in the style of {} with {}",
    "the painting in the style of {} with {}",
    "a clean painting in the style of {} with {}",
    "a dirty painting in the style of {} with {}",
    "a dark painting in the style of {} with {}",
    "a cool painting in the style of {} with {}",
    "a close-up painting in the style of {} with {}",
    "a bright painting in the style of {} with {}",
    "a cropped painting in the style of {} with {}",
    "a good painting in the style of {} with {}",
    "a painting of one {} in the style of {}",
    "a nice painting in the style of {} with {}",
    "a small painting in the style of {} with {}",
    "a weird painting in the style of {} with {}",
    "a large painting in the style of {} with {}",
)
MIXING_PROB = 0.25
MARKER = "S*"  # the learned word's place in a prompt (evaluation, curation, figures, validation)

BUILTIN = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
DUAL = {"object": OBJECT_DUAL_TEMPLATES, "style": STYLE_DUAL_TEMPLATES}


class TemplateError(ValueError):
    """A template list that cannot be used (one line for the user)."""


def load_templates(spec: str) -> tuple[str, ...]:
    """`object`, `style`, or a text file with one template per line where `{}` marks the word."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec)
    if not path.is_file():
        raise TemplateError(f"templates {spec!r}: neither 'object', 'style' nor a readable file")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise TemplateError(f"templates file {path} holds no template (one per line, '{{}}' marks the word)")
    for n, ln in enumerate(lines, 1):
        if ln.count("{}") != 1:
            raise TemplateError(f"{path}: template {n} {ln!r} must contain '{{}}' exactly once")
    return tuple(lines)


def dual_templates(spec: str) -> tuple[str, ...]:
    """Templates with two slots (S*, per-image token); user files fall back to '<template> with {}'."""
    if spec in DUAL:
        return DUAL[spec]
    return tuple(t + " with {}" for t in load_templates(spec))


def max_vectors(tokenizer, templates: tuple[str, ...], duals: tuple[str, ...] = ()) -> int:
    """The most vectors a word can have so that every prompt still fits the text context whole.

    Each `{}` of a template holds the word's vectors; in a dual template the second `{}` holds one per-image
    token. BOS and EOS take two places."""
    room = tokenizer.context_length - 2
    need = []
    for t in templates:
        need.append((len(tokenizer.encode(t.replace("{}", " "))), t.count("{}")))
    for t in duals:
        need.append((len(tokenizer.encode(t.replace("{}", " "))) + 1, 1))
    return min((room - fixed) // slots for fixed, slots in need if slots) if need else room
