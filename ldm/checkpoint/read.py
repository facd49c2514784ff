"""Reading checkpoints: .safetensors (lazily, no copy), .ckpt/.pt with weights_only, and diffusers folders
(mapped to the original single-file keys); the errors and the config marker every part shares."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from ldm import diffusers_keys as dk
from ldm.config import ModelConfig
from ldm.errors import UserError

log = logging.getLogger(__name__)

CONFIG_KEY = "oneword.config"
PREFIXES = {
    "unet": dk.UNET_PREFIX,
    "vae": dk.VAE_PREFIX,
    "clip": dk.CLIP_PREFIX,
    "openclip": dk.OPENCLIP_PREFIX,
    "ldmbert": dk.CLIP_PREFIX,
}
_SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "lvlb_weights",
)
KNOWN_EXTRAS = re.compile(
    r"model_ema\..*|.*\.position_ids|(.*\.)?logit_scale|"
    r"cond_stage_model\.transformer\.to_logits\..*|" + "|".join(map(re.escape, (*_SCHEDULE_BUFFERS, CONFIG_KEY)))
)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Harmless objects that PyTorch Lightning left in some released .ckpt files (e.g. the SD 1.x training
# checkpoints); weights_only refuses them, so they are unpickled into an inert stand-in instead.
_LIGHTNING_LEFTOVERS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not match a supported model; the message says why."""


class _Inert:
    """Stand-in for a non-tensor object in a checkpoint: keeps nothing, runs nothing."""

    def __setstate__(self, state: object) -> None:
        pass


# -- the config marker for non-standard (tiny) models ---------------------------------------------------------


def config_to_tensor(cfg: ModelConfig) -> Tensor:
    """ModelConfig → uint8 tensor of its JSON, stored under `oneword.config` in a state dict."""
    data = json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def config_from_tensor(t: Tensor) -> ModelConfig:
    """The inverse of config_to_tensor."""
    try:
        fields = json.loads(bytes(t.to(torch.uint8).flatten().tolist()).decode())
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in fields.items() if k in known})
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"the {CONFIG_KEY} entry is not a valid model config ({e})") from None


# -- reading -------------------------------------------------------------------------------------------------


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class LazyStateDict(Mapping[str, Tensor]):
    """A state dict whose tensors are read on access, each into fresh memory; `.shapes` (meta tensors, or
    the tensors themselves) is free to inspect. Loading one tensor at a time keeps peak memory at one model."""

    def __init__(self, shapes: dict[str, Tensor], load: Callable[[str], Tensor]) -> None:
        self.shapes = shapes
        self._load = load

    def __getitem__(self, key: str) -> Tensor:
        if key not in self.shapes:
            raise KeyError(key)
        return self._load(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    @classmethod
    def of(cls, sd: dict[str, Tensor]) -> LazyStateDict:
        """Wrap an in-memory state dict."""
        return cls(sd, sd.__getitem__)

    @classmethod
    def union(cls, *parts: LazyStateDict) -> LazyStateDict:
        owner = {k: p for p in parts for k in p.shapes}
        return cls({k: p.shapes[k] for k, p in owner.items()}, lambda k: owner[k][k])

    def mapped(self, recipes: dict[str, dk.Recipe]) -> LazyStateDict:
        """The same tensors under other keys (diffusers → original), transformed on access."""
        return LazyStateDict(
            {k: dk.apply(r, self.shapes.__getitem__) for k, r in recipes.items()},
            lambda k: dk.apply(recipes[k], self.__getitem__),
        )


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> Mapping[str, Tensor]:
    """All tensors of a .safetensors/.ckpt/.pt/.pth file or of a diffusers folder (mapped to the original
    single-file keys). .safetensors tensors are read lazily, on access; .ckpt files are memory-mapped."""
    return read_checkpoint(Path(path), allow_pickle)[0]


def read_checkpoint(path: Path, allow_pickle: bool) -> tuple[LazyStateDict, dict]:
    """(state dict in original keys, hints that only a diffusers folder's config files carry)."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir():
        return _read_diffusers(path, allow_pickle)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty")
    head = _head(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path), {}
    if path.suffix in PICKLE_SUFFIXES or head[:2] == b"PK" or head[:1] == b"\x80":
        return LazyStateDict.of(_read_pickle(path, allow_pickle, head)), {}
    if head[8:9] == b"{":
        return _read_safetensors(path), {}
    raise CheckpointError(
        f"{path}: unknown checkpoint format; expected .safetensors, .ckpt, .pt, .pth or a diffusers folder"
    )


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(16)


def _read_safetensors(path: Path) -> LazyStateDict:
    """Parse the header (u64 length, JSON {name: dtype, shape, data_offsets}); read tensors on access."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise ValueError(f"its header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
        base = 8 + n
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape = _ST_DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            if end - begin != nbytes:
                raise ValueError(f"{name} has {end - begin} bytes for shape {shape} {info['dtype']}")
            if base + end > size:
                raise ValueError(f"{name} ends at byte {base + end} but the file has {size}")
            entries[name] = (dtype, shape, base + begin, nbytes)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"{path} is not a readable .safetensors file ({type(e).__name__}: {e}) — is it truncated? Download it again"
        ) from None

    def load(name: str) -> Tensor:
        dtype, shape, offset, nbytes = entries[name]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(offset)
            got = f.readinto(buf.numpy()) if nbytes else 0
        if got != nbytes:
            raise CheckpointError(f"{path} ended while reading {name} — was it truncated since it was opened?")
        return buf.view(dtype).reshape(shape)

    shapes = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape, _, _) in entries.items()}
    return LazyStateDict(shapes, load)


def _read_pickle(path: Path, allow_pickle: bool, head: bytes) -> dict[str, Tensor]:
    """torch.load with weights_only (no code from the file runs) unless allow_pickle; mmap for zip files."""
    is_zip = head[:2] == b"PK"
    if not is_zip and head[:1] != b"\x80":
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (it starts with {head[:8]!r}, neither a zip archive nor a pickle)"
        )
    stubs = [(_Inert, name) for name in _LIGHTNING_LEFTOVERS]
    try:
        with torch.serialization.safe_globals(stubs):
            obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=is_zip)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" in text:
            culprit = re.search(r"(Unsupported global|Unsupported operand)[^.\n]*", text)
            why = f" ({culprit.group(0).strip()})" if culprit else ""
            raise CheckpointError(
                f"{path} contains pickled Python objects that only code execution could rebuild{why}; nothing "
                "was executed. Use a .safetensors file instead, or pass allow_pickle=True only if you trust "
                "where this file came from"
            ) from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({text.splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, ImportError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({reason}) — is it truncated?") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return tensors


def _weights_file(folder: Path, stems: tuple[str, ...], allow_pickle: bool) -> LazyStateDict:
    for stem in stems:
        for suffix in (".safetensors", ".bin"):
            f = folder / f"{stem}{suffix}"
            if f.is_file():
                if suffix == ".safetensors":
                    return _read_safetensors(f)
                return LazyStateDict.of(_read_pickle(f, allow_pickle, _head(f)))
    raise CheckpointError(f"{folder} has no weights file ({stems[0]}.safetensors or .bin)")


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def _unet_heads_hint(unet_cfg: dict) -> dict:
    """UNet2DConditionModel config → num_heads or num_head_channels of the original UNet."""
    heads = unet_cfg.get("num_attention_heads") or unet_cfg.get("attention_head_dim")
    channels = unet_cfg.get("block_out_channels")
    if heads is None or channels is None:
        return {}
    heads = [heads] * len(channels) if isinstance(heads, int) else list(heads)
    if len(set(heads)) == 1:
        return {"num_heads": heads[0]}
    dims = {c // h for c, h in zip(channels, heads)}
    if len(dims) == 1:
        return {"num_head_channels": dims.pop()}
    raise CheckpointError(f"UNet attention heads {heads} fit neither a fixed head count nor a fixed head width")


def _read_diffusers(path: Path, allow_pickle: bool) -> tuple[LazyStateDict, dict]:
    """A diffusers Stable Diffusion folder → original single-file keys plus hints from its config files."""
    if not (path / "unet").is_dir():
        raise CheckpointError(
            f"{path} is a folder but not a diffusers model folder (no unet/ inside); give a "
            ".safetensors or .ckpt file, or a diffusers folder"
        )
    index = _json(path / "model_index.json")
    if "XL" in str(index.get("_class_name", "")) or (path / "text_encoder_2").is_dir():
        raise CheckpointError(f"{path} is a Stable Diffusion XL folder; SDXL is not supported (SD 1.x/2.x only)")
    unet_cfg = _json(path / "unet" / "config.json")
    text_cfg = _json(path / "text_encoder" / "config.json")
    sched_cfg = _json(path / "scheduler" / "scheduler_config.json")
    vae_cfg = _json(path / "vae" / "config.json")
    unet = _weights_file(path / "unet", ("diffusion_pytorch_model",), allow_pickle)
    vae = _weights_file(path / "vae", ("diffusion_pytorch_model",), allow_pickle)
    text = _weights_file(path / "text_encoder", ("model", "pytorch_model"), allow_pickle)
    if any(k.startswith(("add_embedding.", "class_embedding.")) for k in unet):
        raise CheckpointError(f"{path}: the UNet takes extra conditioning (SDXL-like); not supported")
    width = next((v.shape[1] for k, v in text.shapes.items() if k.endswith("token_embedding.weight")), None)
    act = text_cfg.get("hidden_act")
    openclip = act == "gelu" if act else width == 1024
    hints: dict = {"source_format": "diffusers", "unet_heads": _unet_heads_hint(unet_cfg)}
    if "num_attention_heads" in text_cfg:
        hints["text_heads"] = text_cfg["num_attention_heads"]
    if openclip:
        hints["text_output"] = "last"  # diffusers runs every stored layer; SD2 folders store 23 of 24
    prediction = sched_cfg.get("prediction_type")
    if prediction in ("epsilon", "v_prediction"):
        hints["prediction"] = "v" if prediction == "v_prediction" else "eps"
    if sched_cfg.get("beta_schedule", "scaled_linear") == "scaled_linear":
        for ours, theirs in (
            ("linear_start", "beta_start"),
            ("linear_end", "beta_end"),
            ("timesteps", "num_train_timesteps"),
        ):
            if theirs in sched_cfg:
                hints[ours] = sched_cfg[theirs]
    elif sched_cfg:
        log.warning(
            "%s: scheduler beta_schedule=%r is not LDM's scaled linear; using scaled linear",
            path,
            sched_cfg["beta_schedule"],
        )
    if "scaling_factor" in vae_cfg:
        hints["scale_factor"] = vae_cfg["scaling_factor"]
    try:
        sd = LazyStateDict.union(
            unet.mapped(dk.unet_to_original(unet)),
            vae.mapped(dk.vae_to_original(vae)),
            text.mapped(dk.openclip_from_hf(text) if openclip else dk.clip_to_original(text)),
        )
    except dk.KeyMapError as e:
        raise CheckpointError(f"{path}: {e.args[0]} — is this a Stable Diffusion 1.x/2.x diffusers folder?") from None
    return sd, hints
