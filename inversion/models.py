"""The MODEL= names (sd15, sd21, sd21-v, ldm-1.4b, shapes, instances, tiny) resolved to checkpoints through
weights/, loaded, and identified for the files that record which model they belong to (A1111's `sd_checkpoint`,
PNG metadata)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

import ldm
from ldm.cli import UsageError, check
from weights.download import WEIGHTS_DIR, DownloadError, local_path, manifest

MODEL_CHOICES = ("sd15", "sd21", "sd21-v", "ldm-1.4b", "shapes", "instances", "tiny")
SHIPPED = {"shapes": "make pretrain-shapes", "instances": "make pretrain-instances"}  # built here, and how


def model_path(model: str) -> Path:
    """The checkpoint file behind a MODEL name (downloaded ones and the shipped ones live in weights/)."""
    if model in SHIPPED:
        return WEIGHTS_DIR / f"{model}.safetensors"
    try:
        return local_path(model)
    except DownloadError as e:
        raise UsageError(f"{e}; or use MODEL=shapes / MODEL=tiny, or CKPT=path") from None


def choice_rules(
    model: str | None, ckpt: str | None, model_as: str = "MODEL=", ckpt_as: str = "CKPT="
) -> list[tuple[bool, str]]:
    """What `load` needs before it loads anything (ldm.cli.check rules): a CKPT that exists, else a known MODEL name
    (`model_as`/`ckpt_as`: how the tool's user spells the two settings)."""
    return [
        (ckpt is None or Path(ckpt).exists(), f"{ckpt_as}{ckpt}: no such file or folder"),
        (
            ckpt is not None or model is None or model in MODEL_CHOICES,
            f"unknown {model_as}{model!r}; choose one of {', '.join(MODEL_CHOICES)} or give {ckpt_as}path",
        ),
    ]


def load(
    model: str | None,
    ckpt: str | None,
    device: torch.device,
    dtype: torch.dtype,
    prediction: str | None = None,
    allow_pickle: bool = False,
):
    """A LatentDiffusion from MODEL (a known name) or CKPT (a path); missing weights say how to get them."""
    check(choice_rules(model, ckpt or None))
    known = list(manifest().values())
    if ckpt:
        return ldm.load_model(
            Path(ckpt), device=device, dtype=dtype, prediction=prediction, allow_pickle=allow_pickle, known_files=known
        )
    model = model or "sd15"
    if model == "tiny":
        return ldm.tiny_model(seed=0).to(device=device, dtype=dtype)
    path = model_path(model)
    if not path.exists():
        if model in SHIPPED:
            raise UsageError(f"{path} is missing; run `{SHIPPED[model]}` to rebuild it")
        raise UsageError(
            f"no weights for MODEL={model} at {path}; download them with `make weights MODEL={model}`, "
            "or try the offline `make demo` (MODEL=shapes)"
        )
    if prediction is None and model == "sd21-v":
        prediction = "v"
    return ldm.load_model(
        path, device=device, dtype=dtype, prediction=prediction, allow_pickle=allow_pickle, known_files=known
    )


def model_hash(model: str | None, ckpt: str | None) -> tuple[str, str]:
    """(AUTOMATIC1111-style short sha256, model name) of the checkpoint used."""
    model = model or "sd15"
    if ckpt is None and model == "tiny":
        return "tiny", "tiny"
    if ckpt is None and model not in SHIPPED:
        entry = manifest()[model]
        if entry["sha256"]:
            return entry["sha256"][:10], Path(entry["file"]).stem
    path = Path(ckpt) if ckpt else model_path(model)
    if path.is_dir():
        return "", path.name
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:10], path.stem
