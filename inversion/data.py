"""Concept images → the official preprocessing (Gal et al. 2022, ldm/data/personalized.py) and cached latents.

Folder rules: *.jpg/*.jpeg/*.png/*.webp are images (any mode; EXIF orientation applied; alpha composited on
white; grayscale, palette, CMYK and 16-bit converted to RGB). Other files are skipped with a warning naming
them, except hidden files and LICENSE*/README*/NOTICE*/*.md notes, skipped silently. An empty folder or a
corrupt image is an error. Tiny images are upscaled like any other (the official code resizes whatever it
gets), with a warning when a side grows more than 2×.

Preprocessing: optional centre square crop, bicubic resize straight to SIZE×SIZE, horizontal flip p=0.5,
pixels to [−1, 1]. Latent cache: the VAE posterior q(z|x) = N(μ, σ²) of each (image, flip) is computed
once and kept on disk, keyed by image sha256, size, crop, flip and a hash of the VAE weights; a training
step draws z = μ + σ·n — the distribution the official code samples by encoding every step.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from inversion.embedding import InversionError, atomic_write

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
NOTE_PREFIXES = ("license", "licence", "readme", "notice", "copying", "credits")
CONCEPTS_DIR = Path(__file__).resolve().parent.parent / "experiments" / "concepts"
DEFAULT_CACHE = Path(".cache") / "latents"


def resolve_concept(concept: str | os.PathLike) -> Path:
    """CONCEPT: a folder under experiments/concepts/ (by name) or a path to a folder."""
    path = Path(concept)
    if not path.is_dir() and (CONCEPTS_DIR / str(concept)).is_dir():
        path = CONCEPTS_DIR / str(concept)
    if not path.is_dir():
        shipped = sorted(p.name for p in CONCEPTS_DIR.iterdir() if p.is_dir()) if CONCEPTS_DIR.is_dir() else []
        raise InversionError(f"CONCEPT={concept}: no such folder (shipped concepts: {', '.join(shipped) or 'none'})")
    return path


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files of a concept folder, sorted by name; other files skipped with a warning naming them."""
    folder = Path(folder)
    images, skipped = [], []
    for p in sorted(folder.iterdir()):
        name = p.name.lower()
        if p.is_dir() or name.startswith(".") or name.startswith(NOTE_PREFIXES) or name.endswith(".md"):
            continue
        (images if p.suffix.lower() in IMAGE_SUFFIXES else skipped).append(p)
    if skipped:
        log.warning("skipping %d non-image file(s) in %s: %s", len(skipped), folder, ", ".join(p.name for p in skipped))
    if not images:
        raise InversionError(f"concept folder {folder} holds no images ({'/'.join(IMAGE_SUFFIXES)})")
    return images


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB; transparency composited on white; 16-bit/float grayscale rescaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        image = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def max_pixels() -> int:
    """PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, ~89.5 MP, ~0.25 GiB as RGB) or 89.5 MP if unset."""
    return int(Image.MAX_IMAGE_PIXELS or 89_478_485)


def load_image(path: str | os.PathLike) -> Image.Image:
    """An RGB PIL image with EXIF orientation applied; a corrupt, truncated or oversized file is a one-line
    InversionError. The size is checked from the header before any pixel is decoded, so memory stays bounded."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels():
                    raise InversionError(
                        f"{path}: {w}×{h} pixels is over the limit of {max_pixels() / 1e6:.0f} "
                        "megapixels (PIL's decompression-bomb guard); downscale it first"
                    )
                if w < 1 or h < 1:
                    raise InversionError(f"{path}: the image is {w}×{h} pixels")
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except InversionError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InversionError(f"{path}: {str(e).splitlines()[0]}; downscale it first") from None
    except MemoryError:
        raise InversionError(f"{path}: not enough memory to decode this image; downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InversionError(f"{path}: not a readable image ({reason}); remove or replace it") from None
    except Exception as e:  # decoders of hostile bytes raise many other classes (struct.error, IndexError, …)
        raise InversionError(
            f"{path}: not a readable image ({type(e).__name__} while decoding); remove or replace it"
        ) from None


def preprocess(
    image: Image.Image, size: int, center_crop: bool = False, flip: bool = False, name: str = "image"
) -> torch.Tensor:
    """Official preprocessing: [centre crop], bicubic resize to size×size, [flip] → (3, size, size) in [−1, 1]."""
    w, h = image.size
    if center_crop:
        c = min(w, h)
        image = image.crop(((w - c) // 2, (h - c) // 2, (w - c) // 2 + c, (h - c) // 2 + c))
        w = h = c
    if size > 2 * min(w, h):
        log.warning("%s is %d×%d: upscaled to %d×%d, expect a blurry concept", name, w, h, size, size)
    image = image.resize((size, size), resample=Image.BICUBIC)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def module_hash(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes): the VAE part of the cache key."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ConceptImages:
    """The images of one concept folder, preprocessed per (index, flip) on demand."""

    def __init__(self, folder: str | os.PathLike, size: int, center_crop: bool = False) -> None:
        self.folder = Path(folder)
        self.paths = find_images(self.folder)
        self.size, self.center_crop = size, center_crop
        self.images = [load_image(p) for p in self.paths]  # fail early on a corrupt file
        self.hashes = [file_sha256(p) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def pixels(self, index: int, flip: bool) -> torch.Tensor:
        return preprocess(self.images[index], self.size, self.center_crop, flip, self.paths[index].name)

    def batch(self, indices: list[int], flips: list[bool]) -> torch.Tensor:
        return torch.stack([self.pixels(i, f) for i, f in zip(indices, flips)])


class LatentCache:
    """Posterior moments (μ, σ) per (image, flip), computed once (and kept on disk); draws z = s·(μ + σ·n)."""

    def __init__(
        self, model, images: ConceptImages, cache_dir: str | os.PathLike | None = DEFAULT_CACHE, batch_size: int = 4
    ) -> None:
        self.scale = float(model.config.scale_factor)
        self.vae_hash = module_hash(model.vae)[:16]
        n = len(images)
        keys = [(i, f) for i in range(n) for f in (False, True)]
        moments: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        todo = []
        for i, f in keys:
            path = self._path(cache_dir, images, i, f)
            loaded = self._load(path) if path is not None else None
            if loaded is None:
                todo.append((i, f))
            else:
                moments[(i, f)] = loaded
        self.encoded = len(todo)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            x = images.batch([i for i, _ in chunk], [f for _, f in chunk])
            with torch.no_grad():
                post = model.posterior(x)
            for j, key in enumerate(chunk):
                mean, std = post.mean[j].float().cpu().clone(), post.std[j].float().cpu().clone()
                moments[key] = (mean, std)
                path = self._path(cache_dir, images, *key)
                if path is not None:
                    self._save(path, mean, std)
        if todo:
            log.info("latent cache: encoded %d of %d (image, flip) pairs with the VAE", len(todo), len(keys))
        self.mean = torch.stack([torch.stack([moments[(i, f)][0] for f in (False, True)]) for i in range(n)])
        self.std = torch.stack([torch.stack([moments[(i, f)][1] for f in (False, True)]) for i in range(n)])

    def _path(self, cache_dir, images: ConceptImages, i: int, flip: bool) -> Path | None:
        if cache_dir is None:
            return None
        crop = "crop" if images.center_crop else "full"
        return (
            Path(cache_dir)
            / self.vae_hash
            / f"{images.hashes[i][:24]}-{images.size}-{crop}-{'flip' if flip else 'orig'}.safetensors"
        )

    @staticmethod
    def _load(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not path.is_file():
            return None
        try:
            from safetensors.torch import load_file

            d = load_file(str(path))
            return d["mean"], d["std"]
        except Exception as e:  # a damaged cache entry is recomputed, never trusted
            log.warning("latent cache entry %s unreadable (%s); re-encoding", path, e)
            return None

    @staticmethod
    def _save(path: Path, mean: torch.Tensor, std: torch.Tensor) -> None:
        from safetensors.torch import save

        data = save({"mean": mean.contiguous(), "std": std.contiguous()})
        try:
            atomic_write(path, lambda f: f.write(data))
        except OSError as e:
            log.warning("cannot write latent cache %s (%s); continuing without it", path, e)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape[2:])

    def draw(self, indices: list[int], flips: list[bool], normals: torch.Tensor) -> torch.Tensor:
        """Scaled latents s·(μ + σ·n) for a batch; `normals` (B, C, h, w) are the standard-normal draws."""
        idx, fl = torch.tensor(indices), torch.tensor([int(f) for f in flips])
        return self.scale * (self.mean[idx, fl] + self.std[idx, fl] * normals)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (NumPy SeedSequence hashing): independent streams per (seed, sample)."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0]
        & 0x7FFFFFFFFFFFFFFF
    )


@lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, length: int) -> tuple[int, ...]:
    """The shuffled order of one epoch over the repeated dataset (official: DataLoader shuffle=True)."""
    g = torch.Generator().manual_seed(mix_seed(seed, 0x5EED, epoch))
    return tuple(torch.randperm(length, generator=g).tolist())


def dataset_item(seed: int, k: int, num_images: int, repeats: int) -> int:
    """Image index of global sample k: epochs of num_images × repeats shuffled items, item i ↦ image i % n."""
    length = num_images * repeats
    return epoch_order(seed, k // length, length)[k % length] % num_images


def sample_generator(seed: int, k: int) -> torch.Generator:
    """The generator of global sample k: flip, template, timestep, noise and latent draw come from it alone,
    so one process with batch 2B and two with batch B (or accumulation) see the same samples."""
    return torch.Generator().manual_seed(mix_seed(seed, k))
