"""The folders the web app may touch, and the guards on every path a user types and every file a user uploads.

Allowed folders, under the workspace root (the folder `make ui` starts in):
    weights/               checkpoints (read)
    experiments/concepts/  concept image folders (read)
    runs/                  training runs; uploaded concept images are kept in runs/uploads/<run name>/
    outputs/               generated and edited images (outputs/samples/, outputs/edits/) and uploaded embeddings
                           (outputs/embeddings/)
A typed path is taken relative to the root, resolved (`..` collapsed, links followed) and must end inside one of
the folders allowed for its use, else `PathRefused` names the path and those folders; an absolute path is held to
the same rule. The folders may themselves be links: their resolved targets are what a path is checked against.

Uploads pass the command line's guards before anything is kept: a size limit (MAX_IMAGE_BYTES,
MAX_EMBEDDING_BYTES), images through `inversion.data.load_image` (pixel count read from the header against
decompression bombs; corrupt and non-image files refused), embeddings through `inversion.embedding.
load_embedding_file` (weights_only: a file holding pickled code is refused and its code never runs). Kept files
get names made here (`file_stem` of the upload's name, numbered), never a path taken from the upload.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from PIL import Image

from inversion.data import load_image
from inversion.embedding import InversionError, atomic_write, file_stem, load_embedding_file
from inversion.rundir import RunDir

log = logging.getLogger(__name__)

FOLDERS = ("weights", "experiments/concepts", "runs", "outputs")
MIN_IMAGES, MAX_IMAGES = 3, 20
MAX_IMAGE_BYTES = 50 * 2**20
MAX_EMBEDDING_BYTES = 16 * 2**20
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")
NOT_MODELS = ("shapes-judge.safetensors", "instances-judge.safetensors")  # the offline worlds' judges: classifiers
KEPT_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}  # copied byte for byte; others become PNG


class UIError(Exception):
    """A refusal or a bad input, shown on the page as one line."""


class PathRefused(UIError):
    """A typed path that resolves outside the folders allowed for its use."""


def unique(path: Path) -> Path:
    """`path`, or `name-2.ext`, `name-3.ext` … if it exists: a kept file never replaces another."""
    if not path.exists():
        return path
    n = 2
    while (candidate := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists():
        n += 1
    return candidate


def _message(e: Exception, path: str | os.PathLike, name: str) -> str:
    """An error about an upload, naming the file as the user called it rather than its temporary path."""
    return str(e).replace(str(path), name)


class Workspace:
    """The root and its allowed folders; every path the app reads or writes goes through `resolve`."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self.folders = {name: Path(os.path.realpath(self.root / name)) for name in FOLDERS}

    def resolve(self, text: str, what: str, allowed: tuple[str, ...] = FOLDERS) -> Path:
        """The real path behind `text` (relative to the root) if it lies inside one of `allowed`."""
        text = (text or "").strip()
        if not text:
            raise UIError(f"{what} is empty")
        shown = ", ".join(f"{name}/" for name in allowed)
        if "\x00" in text:
            raise PathRefused(f"{what} {text!r} holds a NUL character; give a path inside {shown}")
        path = Path(text)
        real = Path(os.path.realpath(path if path.is_absolute() else self.root / path))
        if any(real == self.folders[n] or real.is_relative_to(self.folders[n]) for n in allowed):
            return real
        raise PathRefused(f"{what} {text!r} is outside the allowed folders ({shown}); nothing was read or written")

    def show(self, path: Path) -> str:
        """A path as the page shows it: relative to the root (through the allowed folders' links) where it can."""
        for name, real in self.folders.items():
            if path == real or path.is_relative_to(real):
                return str(Path(name) / path.relative_to(real))
        return str(path)

    # --- listings --------------------------------------------------------------------------------------------

    def models(self) -> list[tuple[str, str]]:
        """(label, path) of the diffusion checkpoints in weights/: files and diffusers folders, shapes first."""
        base = self.folders["weights"]
        found = []
        for p in sorted(base.iterdir()) if base.is_dir() else []:
            checkpoint = p.is_file() and p.suffix in CHECKPOINT_SUFFIXES and p.name not in NOT_MODELS
            if checkpoint or (p.is_dir() and (p / "model_index.json").is_file()):
                found.append(f"weights/{p.name}")
        found.sort(key=lambda v: v != "weights/shapes.safetensors")
        return [
            (f"shapes (the shipped offline model) — {v}" if v == "weights/shapes.safetensors" else v, v) for v in found
        ]

    def concepts(self) -> list[str]:
        base = self.folders["experiments/concepts"]
        if not base.is_dir():
            return []
        return [
            f"experiments/concepts/{p.name}"
            for p in sorted(base.iterdir())
            if p.is_dir() and not p.name.startswith((".", "_"))
        ]

    def runs(self) -> list[Path]:
        """Training run folders (those holding args.json) in runs/, newest first."""
        base = self.folders["runs"]
        runs = [p for p in base.iterdir() if (p / "args.json").is_file()] if base.is_dir() else []
        return sorted(runs, key=lambda p: (p / "args.json").stat().st_mtime, reverse=True)

    def embedding_files(self) -> list[Path]:
        """The embedding files of every run (official, diffusers, AUTOMATIC1111) and those in outputs/embeddings/."""
        files = []
        for run in self.runs():
            token = run_options(run).get("token") or ""
            names = ["learned_embeds.safetensors", "embeddings.pt", f"{file_stem(token)}.pt"]
            files += [run / n for n in dict.fromkeys(names) if (run / n).is_file()]
        uploaded = self.folders["outputs"] / "embeddings"
        if uploaded.is_dir():
            files += sorted(p for p in uploaded.iterdir() if p.is_file() and p.suffix in EMBEDDING_SUFFIXES)
        return files

    # --- uploads ---------------------------------------------------------------------------------------------

    def new_run(self, token: str) -> Path:
        """A fresh run folder name in runs/ (not created: the trainer makes it)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return unique(self.folders["runs"] / f"{file_stem(token)}-{stamp}")

    def keep_images(self, uploads: list[str], run: Path) -> Path:
        """Check the uploaded images (see `check_images`) and keep them in runs/uploads/<run name>/."""
        checked = check_images(uploads)
        dest = unique(self.folders["runs"] / "uploads" / run.name)
        dest.mkdir(parents=True)
        for i, (path, image, fmt) in enumerate(checked):
            name = f"{i + 1:02d}-{file_stem(Path(path).stem)[:60]}"
            if fmt in KEPT_FORMATS:
                data = Path(path).read_bytes()
                atomic_write(dest / f"{name}{KEPT_FORMATS[fmt]}", lambda f, d=data: f.write(d))
            else:
                atomic_write(dest / f"{name}.png", lambda f, im=image: im.save(f, format="PNG"))
        return dest

    def keep_embedding(self, upload: str) -> tuple[Path, dict]:
        """Check an uploaded embedding file and keep it in outputs/embeddings/; returns (path, {word: vectors})."""
        words = read_embedding(upload)
        name = Path(upload).name
        dest = unique(self.folders["outputs"] / "embeddings" / f"{file_stem(Path(name).stem)}{Path(name).suffix}")
        data = Path(upload).read_bytes()
        atomic_write(dest, lambda f: f.write(data))
        return dest, words


def read_upload(path: str) -> Image.Image:
    """One uploaded image (RGB) under the CLI's guards: the size limit and `load_image`'s (decompression bombs,
    corrupt and non-image files); the one-line UIError names the upload's own file name."""
    name = Path(path).name
    size = Path(path).stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise UIError(f"{name}: {size / 2**20:.1f} MiB is over the limit of {MAX_IMAGE_BYTES / 2**20:.0f} MiB")
    try:
        return load_image(path)
    except InversionError as e:
        raise UIError(_message(e, path, name)) from None


def check_images(uploads: list[str]) -> list[tuple[str, Image.Image, str | None]]:
    """(path, RGB image, format) of MIN_IMAGES…MAX_IMAGES uploads that each pass the CLI's image guards;
    otherwise one UIError that names every refused file and why."""
    problems, checked = [], []
    for path in uploads:
        try:
            image = read_upload(path)
        except UIError as e:
            problems.append(str(e))
            continue
        with Image.open(path) as im:
            checked.append((path, image, im.format))
    if problems:
        raise UIError("; ".join(problems))
    if not MIN_IMAGES <= len(checked) <= MAX_IMAGES:
        raise UIError(f"{len(checked)} image(s) uploaded; give {MIN_IMAGES} to {MAX_IMAGES}")
    return checked


def read_embedding(path: str | os.PathLike) -> dict:
    """{word: (n, width) vectors} of an embedding file under the CLI's guards (size, weights_only, layout)."""
    name = Path(path).name
    if Path(path).suffix not in EMBEDDING_SUFFIXES:
        raise UIError(f"{name}: an embedding file ends in {', '.join(EMBEDDING_SUFFIXES)}")
    size = Path(path).stat().st_size
    if size > MAX_EMBEDDING_BYTES:
        raise UIError(
            f"{name}: {size / 2**20:.1f} MiB is over the limit of {MAX_EMBEDDING_BYTES / 2**20:.0f} MiB "
            "for an embedding file"
        )
    try:
        return load_embedding_file(path)
    except InversionError as e:
        raise UIError(_message(e, path, name)) from None


def run_options(run: Path) -> dict:
    """The trainer's resolved options from a run's args.json ({} when it is unreadable)."""
    try:
        return RunDir(run).options()
    except (OSError, InversionError) as e:
        log.debug("unreadable %s: %s", run / "args.json", e)
        return {}
