"""Text-to-image for the web app: one model kept loaded between generations, the learned words of each request
installed on it, and every image saved as `make sample` saves it.

The loaded model changes only when a request names another checkpoint. Learned words are per browser tab: each
request brings its embedding files, read under the CLI's guards (`workspace.read_embedding`), and they replace the
words of the request before (a fresh tokenizer, the new rows). Images are written to outputs/samples/ as
`NNNNN-<seed>.png` with AUTOMATIC1111's `parameters` text (apps.sample's `infotext`, `save_png`, `next_index`,
`model_hash`: the same bytes of metadata as `make sample`), numbered after what is there, never overwriting.

Editing (`Generator.edit`) shares that model and those words: an uploaded image (and optional mask, white = edit)
read under the Train tab's upload guards (`read_upload`), fitted and checked by `make edit`'s own functions
(apps.edit: `check_edit`, `check_mask`, `prepare`, `extra_parameters`), saved to outputs/edits/ with the same
img2img `parameters` text as `make edit` (Denoising strength, and Mask blur with a mask).
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from apps import edit as edit_cli
from apps import workspace
from apps.sample import SAMPLER_NAMES, infotext, next_index, save_png
from apps.workspace import UIError, read_embedding
from inversion import models
from inversion.embedding import InversionError, check_width
from inversion.models import model_hash
from ldm import cli
from ldm.pipeline import build_tokenizer

log = logging.getLogger(__name__)

MAX_COUNT = 16
MAX_STEPS = 1000


@dataclass
class Request:
    """One generation as the page asks for it; None takes the model's default."""

    prompt: str
    negative: str = ""
    sampler: str = "ddim"
    steps: int | None = None
    scale: float | None = None
    seed: int = -1
    count: int = 4

    def check(self) -> None:
        if not self.prompt.strip():
            raise UIError("the prompt is empty")
        if self.sampler not in SAMPLER_NAMES:
            raise UIError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
        if self.steps is not None and not 1 <= self.steps <= MAX_STEPS:
            raise UIError(f"steps={self.steps} must be between 1 and {MAX_STEPS}")
        if self.scale is not None and not 0 <= self.scale <= 50:
            raise UIError(f"scale={self.scale} must be between 0 and 50")
        if not 1 <= self.count <= MAX_COUNT:
            raise UIError(f"count={self.count} must be between 1 and {MAX_COUNT}")
        if not -1 <= self.seed < 2**31:
            raise UIError(f"seed={self.seed} must be -1 (random) or between 0 and {2**31 - 1}")


@dataclass
class EditRequest(Request):
    """One edit as the page asks for it: a Request plus img2img's strength and the mask's feathered edge."""

    strength: float = 0.75
    mask_blur: int = 4

    def check(self) -> None:
        super().check()
        try:
            edit_cli.check_edit(self.strength, self.mask_blur)
        except cli.UsageError as e:
            raise UIError(str(e)) from None


def read_upload(path: str, what: str) -> Image.Image:
    """One uploaded image under the Train tab's guards (workspace.read_upload); the message starts with `what`."""
    try:
        return workspace.read_upload(path)
    except UIError as e:
        raise UIError(f"{what} {e}") from None


def read_words(files: list[Path]) -> dict[str, torch.Tensor]:
    """{word: vectors} of several embedding files; a word defined twice is an error naming both files."""
    words: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for f in files:
        for word, vectors in read_embedding(f).items():
            if word in words:
                raise UIError(f"the word {word} is in both {origin[word].name} and {f.name}; unload one")
            words[word], origin[word] = vectors, f
    return words


class Generator:
    """Holds the loaded model; `generate` runs one request at a time."""

    def __init__(self, device: str = "auto") -> None:
        self.device = cli.pick_device(device)
        self.model = None
        self.path: Path | None = None
        self._hashes: dict[Path, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def load(self, path: Path):
        """The model of checkpoint `path`, loading it only if another one is loaded."""
        if self.path != path:
            self.model, self.path = None, None  # free the old weights before reading the new ones
            log.info("loading %s", path)
            try:
                self.model = models.load(None, str(path), self.device, torch.float32)
            except (cli.UsageError, ValueError, OSError) as e:
                raise UIError(f"cannot load {path.name}: {e}") from None
            self.path = path
        return self.model

    def identity(self, path: Path) -> tuple[str, str]:
        if path not in self._hashes:
            self._hashes[path] = model_hash(None, str(path))
        return self._hashes[path]

    def _ready(self, path: Path, words: dict[str, torch.Tensor]):
        """The model of `path` with exactly `words` installed (the lock held)."""
        model = self.load(path)
        model.tokenizer, model.extra_embeddings = build_tokenizer(model.config), None
        try:
            for word, vectors in words.items():
                check_width(vectors, model, f"the word {word}")
                model.add_embedding(word, vectors)
        except (InversionError, ValueError) as e:
            raise UIError(str(e)) from None
        return model

    @staticmethod
    def _settings(model, req: Request) -> tuple[int, float, int]:
        """(steps, scale, seed) of a request, the model's defaults filled in and a random seed drawn."""
        cfg = model.config
        steps = req.steps or cfg.steps
        try:
            cli.check([cli.steps_rule("steps", steps, model)])
        except cli.UsageError as e:
            raise UIError(str(e)) from None
        scale = cfg.guidance if req.scale is None else req.scale
        seed = random.randrange(2**31 - 1) if req.seed == -1 else req.seed
        return steps, scale, seed

    @staticmethod
    def _save(images: list[Image.Image], out: Path, seed: int, params) -> list[tuple[Path, str]]:
        try:
            cli.check_writable(out)
        except cli.UsageError as e:
            raise UIError(str(e)) from None
        start, saved = next_index(out), []
        for i, image in enumerate(images):
            text = params(seed + i)
            saved.append((save_png(image, out / f"{start + i:05d}-{seed + i}.png", text), text))
        log.info("saved %d image(s) in %s", len(saved), out)
        return saved

    def generate(self, path: Path, files: list[Path], req: Request, out: Path) -> list[tuple[Path, str]]:
        """Sample req.count images with the words of `files` and save them in `out`; [(png, parameters)]."""
        req.check()
        words = read_words(files)
        with self._lock:
            model = self._ready(path, words)
            steps, scale, seed = self._settings(model, req)
            size = model.config.image_size
            images = model.sample(
                [req.prompt] * req.count,
                [req.negative] * req.count,
                steps=steps,
                scale=scale,
                sampler=req.sampler,
                seed=seed,
                height=size,
                width=size,
                progress=False,
            )
            mhash, mname = self.identity(path)
            return self._save(
                images,
                out,
                seed,
                lambda s: infotext(req.prompt, req.negative, steps, req.sampler, scale, s, size, size, mhash, mname),
            )

    def edit(
        self, path: Path, files: list[Path], req: EditRequest, image: Path, mask: Path | None, out: Path
    ) -> list[tuple[Path, str]]:
        """Edit the uploaded `image` (within the uploaded `mask`, white = edit) req.count times as `make edit`
        does, with the words of `files`, and save the results in `out`; [(png, parameters)]."""
        req.check()
        picture = read_upload(str(image), "image")
        drawn = read_upload(str(mask), "mask") if mask else None
        image_name, mask_name = Path(image).name, Path(mask).name if mask else None
        try:
            if drawn is not None:
                edit_cli.check_mask(drawn, 0, mask_name)
        except cli.UsageError as e:
            raise UIError(str(e)) from None
        words = read_words(files)
        with self._lock:
            model = self._ready(path, words)
            try:
                picture, drawn = edit_cli.prepare(picture, drawn, model, 0, image_name, mask_name)
            except cli.UsageError as e:
                raise UIError(str(e)) from None
            steps, scale, seed = self._settings(model, req)
            try:
                images = model.edit(
                    picture,
                    [req.prompt] * req.count,
                    negative_prompts=[req.negative] * req.count,
                    mask=drawn,
                    strength=req.strength,
                    steps=steps,
                    scale=scale,
                    sampler=req.sampler,
                    seed=seed,
                    mask_blur=req.mask_blur,
                    progress=False,
                )
            except ValueError as e:
                raise UIError(str(e)) from None
            mhash, mname = self.identity(path)
            width, height = picture.size
            extra = edit_cli.extra_parameters(req.strength, drawn, req.mask_blur)
            return self._save(
                images,
                out,
                seed,
                lambda s: infotext(
                    req.prompt, req.negative, steps, req.sampler, scale, s, width, height, mhash, mname, extra
                ),
            )
