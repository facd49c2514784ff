"""Loading strictly: split a state dict by module prefix, assign every tensor with its shape checked, and build
the LatentDiffusion (`load_model`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm import diffusers_keys as dk
from ldm.checkpoint.detect import detect_variant, prediction_from_file
from ldm.checkpoint.read import CONFIG_KEY, KNOWN_EXTRAS, PREFIXES, CheckpointError, LazyStateDict, read_checkpoint
from ldm.config import ModelConfig
from ldm.pipeline import LatentDiffusion, build_modules, build_tokenizer
from ldm.schedule import Schedule

log = logging.getLogger(__name__)


# -- loading -------------------------------------------------------------------------------------------------


def split_state_dict(
    state_dict: Mapping[str, Tensor], config: ModelConfig, source: str = "the checkpoint"
) -> dict[str, LazyStateDict]:
    """{"unet", "vae", "text"} → prefix-stripped state dicts; known extras dropped, any other key an error.
    Nothing is read: the parts stay as lazy as the input."""
    kind = config.text["kind"]
    if kind not in PREFIXES:
        raise NotImplementedError(f"text tower {kind!r} cannot be loaded from a checkpoint yet")
    lazy = state_dict if isinstance(state_dict, LazyStateDict) else LazyStateDict.of(dict(state_dict))
    keys: dict[str, dict[str, str]] = {"unet": {}, "vae": {}, "text": {}}
    for key in lazy:
        for part, prefix in (("unet", dk.UNET_PREFIX), ("vae", dk.VAE_PREFIX), ("text", PREFIXES[kind])):
            if key.startswith(prefix):
                if not KNOWN_EXTRAS.fullmatch(key):
                    keys[part][key[len(prefix) :]] = key
                break
        else:
            if not KNOWN_EXTRAS.fullmatch(key):
                raise CheckpointError(
                    f"{source} has an unexpected key {key} for {config.name} (not a part of "
                    "the UNet, VAE or text encoder)"
                )
    return {
        part: LazyStateDict({k: lazy.shapes[full] for k, full in names.items()}, lambda k, names=names: lazy[names[k]])
        for part, names in keys.items()
    }


def _fill_unused_projection(text: nn.Module, sd: LazyStateDict, config: ModelConfig) -> LazyStateDict:
    """diffusers folders lack open_clip's text_projection, which Stable Diffusion never uses: NaN, so that any
    use of it is loud rather than silently wrong."""
    if config.text["kind"] != "openclip" or "text_projection" in sd or not hasattr(text, "text_projection"):
        return sd
    log.info("text_projection is not in diffusers folders and unused by Stable Diffusion; set to NaN")
    nan = torch.full(tuple(text.text_projection.shape), float("nan"))
    return LazyStateDict.union(sd, LazyStateDict.of({"text_projection": nan}))


def _assign(
    module: nn.Module,
    sd: LazyStateDict,
    prefix: str,
    config: ModelConfig,
    source: str,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Strict load with named errors, casting tensor by tensor, assigning (no second copy of the weights)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source} has no key {prefix}{missing[0]}{more} — is this a {config.name} checkpoint?")
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source} has an unexpected key {prefix}{unexpected[0]}{more} for {config.name}")
    for k, ref in expected.items():
        have = sd.shapes[k]
        if not isinstance(have, Tensor):
            raise CheckpointError(f"{source}: {prefix}{k} is a {type(have).__name__}, not a tensor")
        if tuple(have.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: {prefix}{k} has shape {tuple(have.shape)} but {config.name} needs {tuple(ref.shape)}"
            )
        if ref.is_floating_point() and not (have.is_floating_point() and have.dtype.itemsize >= 2):
            raise CheckpointError(
                f"{source}: {prefix}{k} is stored as {str(have.dtype).removeprefix('torch.')}; "
                "weights must be float16, bfloat16, float32 or float64"
            )
    cast = {}
    for k in expected:
        t = sd[k]  # read now, one tensor at a time
        cast[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        del t
    module.load_state_dict(cast, strict=True, assign=True)
    module.to(device=device, dtype=dtype)  # buffers the state dict does not carry


def _plausible_alphas(alphas: Tensor, timesteps: int) -> bool:
    """ᾱ_t as a schedule must be finite, in (0, 1] and non-increasing, one value per training timestep."""
    if alphas.ndim != 1 or alphas.numel() != timesteps or not alphas.is_floating_point():
        return False
    a = alphas.double()
    return bool(torch.isfinite(a).all() and (a > 0).all() and (a <= 1).all() and (a[1:] <= a[:-1]).all())


def load_model(
    path_or_dir: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    prediction: str | None = None,
    allow_pickle: bool = False,
    known_files: Sequence[Mapping] = (),
):
    """Load a Stable Diffusion 1.x/2.x checkpoint (.safetensors, .ckpt, diffusers folder) into a frozen
    LatentDiffusion, strictly; dtype defaults to float32, device to CPU.

    Parameters are built on the meta device and assigned tensor by tensor, each cast on its own, so peak
    memory is about one model in the target dtype. .safetensors tensors are read into fresh memory; .ckpt
    tensors stay memory-mapped when no cast or move is needed (PyTorch's mmap + assign recipe).
    `prediction` ("eps" | "v") overrides what the files say (a diffusers scheduler config, a sibling .yaml,
    `known_files`: published files as {file, size, sha256, prediction}, e.g. weights/manifest.json's entries);
    SD 2.x weights alone cannot tell eps from v, and default to eps."""
    path = Path(path_or_dir)
    source = str(path)
    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    sd, hints = read_checkpoint(path, allow_pickle)
    with _malformed(source):
        return _load(path, source, sd, hints, device, dtype, prediction, known_files)


@contextlib.contextmanager
def _malformed(source: str) -> Iterator[None]:
    """Shapes no real checkpoint has make index, arithmetic or constructor errors while the config is derived
    and the modules built: report them as a CheckpointError naming the file, never a traceback."""
    try:
        yield
    except (CheckpointError, NotImplementedError, torch.OutOfMemoryError):
        raise
    except (
        IndexError,
        KeyError,
        TypeError,
        ValueError,
        ZeroDivisionError,
        AssertionError,
        RuntimeError,
        OverflowError,
        AttributeError,
    ) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CheckpointError(
            f"{source}: its tensors do not describe a model this tool can build "
            f"({type(e).__name__}{': ' + first if first else ''}) — is it a complete Stable "
            "Diffusion 1.x/2.x checkpoint?"
        ) from None


def _load(
    path: Path,
    source: str,
    sd: LazyStateDict,
    hints: dict,
    device: torch.device,
    dtype: torch.dtype,
    prediction: str | None,
    known_files: Sequence[Mapping],
):
    config = detect_variant(sd, prediction, source=source, hints=hints)
    if (
        prediction is None
        and "prediction" not in hints
        and CONFIG_KEY not in sd
        and config.text["kind"] == "openclip"
        and path.is_file()
    ):
        found = prediction_from_file(path, known_files)
        if found:
            config = detect_variant(sd, found, source=source, hints=hints)
        else:
            log.warning(
                "%s: SD 2.x weights do not say eps from v; assuming eps (pass prediction='v' for 768-v models)", source
            )
    log.info("%s: detected %s (%s prediction)", source, config.name, config.parameterization)
    alphas = sd["alphas_cumprod"] if "alphas_cumprod" in sd else None
    parts = split_state_dict(sd, config, source)
    del sd
    unet, vae, text = build_modules(config, device="meta")
    if hints.get("source_format") == "diffusers":
        parts["text"] = _fill_unused_projection(text, parts["text"], config)
    text_prefix = PREFIXES[config.text["kind"]]
    for module, part, prefix in (
        (unet, "unet", dk.UNET_PREFIX),
        (vae, "vae", dk.VAE_PREFIX),
        (text, "text", text_prefix),
    ):
        _assign(module, parts.pop(part), prefix, config, source, device, dtype)
    schedule = Schedule.from_config(config)
    if alphas is not None and not _plausible_alphas(alphas, config.timesteps):
        log.warning("%s: its alphas_cumprod is not a decreasing schedule in (0, 1]; recomputing it", source)
        alphas = None
    if alphas is not None and alphas.dtype in (torch.float32, torch.float64):
        schedule = Schedule(alphas, config.parameterization)  # the checkpoint's own ᾱ
    elif alphas is not None:
        log.info("%s: alphas_cumprod stored as %s; recomputing the schedule in float64", source, alphas.dtype)
    try:
        tokenizer = build_tokenizer(config)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    model = LatentDiffusion(config, unet, vae, text, tokenizer, schedule)
    return model.eval().requires_grad_(False)
