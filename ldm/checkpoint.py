"""Read .safetensors/.ckpt files and diffusers folders, detect the model variant, load strictly."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pickle
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm import config as configs
from ldm import diffusers_keys as dk
from ldm.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "read_state_dict", "detect_variant", "load_model", "split_state_dict",
           "config_to_tensor", "config_from_tensor", "CONFIG_KEY"]

CONFIG_KEY = "oneword.config"
PREFIXES = {"unet": dk.UNET_PREFIX, "vae": dk.VAE_PREFIX, "clip": dk.CLIP_PREFIX, "openclip": dk.OPENCLIP_PREFIX,
            "ldmbert": dk.CLIP_PREFIX}
_SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights")
KNOWN_EXTRAS = re.compile(r"model_ema\..*|.*\.position_ids|(.*\.)?logit_scale|"
                          r"cond_stage_model\.transformer\.to_logits\..*|"
                          + "|".join(map(re.escape, (*_SCHEDULE_BUFFERS, CONFIG_KEY))))
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Harmless objects that PyTorch Lightning left in some released .ckpt files (e.g. the SD 1.x training
# checkpoints); weights_only refuses them, so they are unpickled into an inert stand-in instead.
_LIGHTNING_LEFTOVERS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)


class CheckpointError(Exception):
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


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


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
        return LazyStateDict({k: dk.apply(r, self.shapes.__getitem__) for k, r in recipes.items()},
                             lambda k: dk.apply(recipes[k], self.__getitem__))


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> Mapping[str, Tensor]:
    """All tensors of a .safetensors/.ckpt/.pt/.pth file or of a diffusers folder (mapped to the original
    single-file keys). .safetensors tensors are read lazily, on access; .ckpt files are memory-mapped."""
    return _read(Path(path), allow_pickle)[0]


def _read(path: Path, allow_pickle: bool) -> tuple[LazyStateDict, dict]:
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
    raise CheckpointError(f"{path}: unknown checkpoint format; expected .safetensors, .ckpt, .pt, .pth or a "
                          "diffusers folder")


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
        raise CheckpointError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {e}) — is it "
                              "truncated? Download it again") from None

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
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it starts with {head[:8]!r}, neither a "
                              "zip archive nor a pickle)")
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
                "where this file came from") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({text.splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, ImportError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({reason}) — is it truncated?"
                              ) from None
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
        raise CheckpointError(f"{path} is a folder but not a diffusers model folder (no unet/ inside); give a "
                              ".safetensors or .ckpt file, or a diffusers folder")
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
        for ours, theirs in (("linear_start", "beta_start"), ("linear_end", "beta_end"),
                             ("timesteps", "num_train_timesteps")):
            if theirs in sched_cfg:
                hints[ours] = sched_cfg[theirs]
    elif sched_cfg:
        log.warning("%s: scheduler beta_schedule=%r is not LDM's scaled linear; using scaled linear",
                    path, sched_cfg["beta_schedule"])
    if "scaling_factor" in vae_cfg:
        hints["scale_factor"] = vae_cfg["scaling_factor"]
    try:
        sd = LazyStateDict.union(unet.mapped(dk.unet_to_original(unet)), vae.mapped(dk.vae_to_original(vae)),
                                 text.mapped(dk.openclip_from_hf(text) if openclip else dk.clip_to_original(text)))
    except dk.KeyMapError as e:
        raise CheckpointError(f"{path}: {e.args[0]} — is this a Stable Diffusion 1.x/2.x diffusers folder?"
                              ) from None
    return sd, hints


# -- detecting the variant -----------------------------------------------------------------------------------


def _need(sd: dict[str, Tensor], key: str, source: str, family: str = "Stable Diffusion") -> Tensor:
    if key not in sd:
        raise CheckpointError(f"{source} has no key {key} — is this a {family} checkpoint?")
    return sd[key]


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _reject_unsupported(sd: dict[str, Tensor], source: str) -> None:
    """One-line errors for checkpoints of models this project does not (yet) build."""
    u = dk.UNET_PREFIX
    if any(k.startswith(("conditioner.embedders.", u + "label_emb.")) for k in sd):
        raise CheckpointError(f"{source} is a Stable Diffusion XL checkpoint (conditioner.embedders / label_emb "
                              "keys); SDXL is not supported — use an SD 1.x or 2.x checkpoint")
    if not any(k.startswith(u) for k in sd):
        if any(k.startswith((dk.VAE_PREFIX, "encoder.", "decoder.")) for k in sd):
            raise CheckpointError(f"{source} holds only a VAE (autoencoder); load_model needs a full Stable "
                                  "Diffusion checkpoint with UNet and text encoder")
        raise CheckpointError(f"{source} has no key {u}input_blocks.0.0.weight — is this a Stable Diffusion "
                              "checkpoint?")
    first = _need(sd, u + "input_blocks.0.0.weight", source)
    if first.shape[1] == 9:
        raise CheckpointError(f"{source} is an inpainting model (the UNet takes 9 input channels); inpainting "
                              "checkpoints are not supported — use the base model")
    if first.shape[1] != 4:
        raise CheckpointError(f"{source}: the UNet takes {first.shape[1]} input channels (depth/upscaler "
                              "models?); only text-to-image models with 4 latent channels are supported")
    ctx = [v.shape[1] for k, v in sd.items() if k.startswith(u) and k.endswith("attn2.to_k.weight")]
    if ctx and ctx[0] == 2048:
        raise CheckpointError(f"{source} has cross-attention context 2048 (Stable Diffusion XL); not supported")


def _derive_unet(sd: dict[str, Tensor], source: str) -> dict:
    """UNet hyperparameters readable from shapes (not the head count)."""
    u = dk.UNET_PREFIX
    first = _need(sd, u + "input_blocks.0.0.weight", source)
    mc = first.shape[0]
    n_in = len(_indices(sd, re.escape(u) + r"input_blocks\.(\d+)\."))
    ops = _indices(sd, re.escape(u) + r"input_blocks\.(\d+)\.0\.op\.weight")
    nrb = ops[0] - 1 if ops else n_in - 1
    levels = len(ops) + 1
    mult, attn = [], []
    for lv in range(levels):
        block = f"{u}input_blocks.{1 + lv * (nrb + 1)}"
        mult.append(_need(sd, f"{block}.0.out_layers.3.weight", source).shape[0] // mc)
        if f"{block}.1.norm.weight" in sd:
            attn.append(2 ** lv)
    mid = f"{u}middle_block.1"
    depth = len(_indices(sd, re.escape(mid) + r"\.transformer_blocks\.(\d+)\."))
    return dict(in_channels=first.shape[1], out_channels=_need(sd, u + "out.2.weight", source).shape[0],
                model_channels=mc, attention_resolutions=attn, num_res_blocks=nrb, channel_mult=mult,
                transformer_depth=depth,
                context_dim=_need(sd, f"{mid}.transformer_blocks.0.attn2.to_k.weight", source).shape[1],
                use_linear_in_transformer=_need(sd, f"{mid}.proj_in.weight", source).ndim == 2)


def _derive_vae(sd: dict[str, Tensor], source: str, resolution: int) -> dict:
    """AutoencoderKL hyperparameters from shapes."""
    v = dk.VAE_PREFIX
    conv_in = _need(sd, v + "encoder.conv_in.weight", source)
    ch = conv_in.shape[0]
    levels = _indices(sd, re.escape(v) + r"encoder\.down\.(\d+)\.")
    z = _need(sd, v + "decoder.conv_in.weight", source).shape[1]
    attn = [resolution // 2 ** i for i in levels if f"{v}encoder.down.{i}.attn.0.norm.weight" in sd]
    ddconfig = dict(double_z=_need(sd, v + "encoder.conv_out.weight", source).shape[0] == 2 * z, z_channels=z,
                    in_channels=conv_in.shape[1], out_ch=_need(sd, v + "decoder.conv_out.weight", source).shape[0],
                    ch=ch, ch_mult=[_need(sd, f"{v}encoder.down.{i}.block.0.conv2.weight", source).shape[0] // ch
                                    for i in levels],
                    num_res_blocks=len(_indices(sd, re.escape(v) + r"encoder\.down\.0\.block\.(\d+)\.")),
                    attn_resolutions=attn)
    return {"ddconfig": ddconfig, "embed_dim": _need(sd, v + "post_quant_conv.weight", source).shape[1]}


def _derive_text(sd: dict[str, Tensor], source: str) -> dict:
    """Text tower kind and sizes from shapes (not the head count)."""
    c, o = dk.CLIP_PREFIX + "text_model.", dk.OPENCLIP_PREFIX
    if c + "embeddings.token_embedding.weight" in sd:
        vocab, width = sd[c + "embeddings.token_embedding.weight"].shape
        return dict(kind="clip", vocab_size=vocab, width=width,
                    layers=len(_indices(sd, re.escape(c) + r"encoder\.layers\.(\d+)\.")),
                    context_length=_need(sd, c + "embeddings.position_embedding.weight", source).shape[0])
    if o + "token_embedding.weight" in sd:
        vocab, width = sd[o + "token_embedding.weight"].shape
        return dict(kind="openclip", vocab_size=vocab, width=width,
                    layers=len(_indices(sd, re.escape(o) + r"transformer\.resblocks\.(\d+)\.")),
                    context_length=_need(sd, o + "positional_embedding", source).shape[0])
    b = dk.CLIP_PREFIX
    if b + "token_emb.weight" in sd:  # LDM-1.4B: x-transformers encoder, two entries per layer
        vocab, width = sd[b + "token_emb.weight"].shape
        inner = _need(sd, b + "attn_layers.layers.0.1.to_q.weight", source, "LDM-1.4B").shape[0]
        return dict(kind="ldmbert", vocab_size=vocab, width=width, heads=inner // 64, dim_head=64,
                    layers=len(_indices(sd, re.escape(b) + r"attn_layers\.layers\.(\d+)\.")) // 2,
                    max_seq_len=_need(sd, b + "pos_emb.emb.weight", source, "LDM-1.4B").shape[0])
    raise CheckpointError(f"{source} has no text encoder (no key {c}embeddings.token_embedding.weight or "
                          f"{o}token_embedding.weight) — is this a Stable Diffusion 1.x/2.x checkpoint?")


def _signature(cfg_unet: dict, cfg_vae: dict, cfg_text: dict) -> tuple:
    """What shapes can tell about a config: everything but head counts, text depth and output layer."""
    u, d = cfg_unet, cfg_vae["ddconfig"]
    return ((u["in_channels"], u["out_channels"], u["model_channels"], tuple(sorted(u["attention_resolutions"])),
             u["num_res_blocks"], tuple(u["channel_mult"]), u.get("transformer_depth", 1), u["context_dim"],
             bool(u.get("use_linear_in_transformer", False))),
            (d["ch"], tuple(d["ch_mult"]), d["num_res_blocks"], d["z_channels"], d["in_channels"], d["out_ch"],
             bool(d["double_z"]), cfg_vae["embed_dim"], len(d.get("attn_resolutions", []))),
            (cfg_text["kind"], cfg_text["vocab_size"], cfg_text["width"],
             cfg_text.get("context_length", cfg_text.get("max_seq_len"))))


_DEFAULTS = {"use_linear_in_transformer": False, "transformer_depth": 1, "attn_resolutions": []}


def _merge(base: dict, derived: dict) -> dict:
    """base with the derived values that differ from it (keys base lacks count at their defaults)."""
    out = dict(base)
    for k, v in derived.items():
        if out.get(k, _DEFAULTS.get(k)) != v:
            out[k] = v
    return out


def _fitting_heads(unet: dict) -> dict | None:
    """For non-standard widths: the preset's head rule if it divides every level, else a fixed count."""
    widths = [unet["model_channels"] * m for m in unet["channel_mult"]]
    d, n = unet.get("num_head_channels", -1), unet.get("num_heads", -1)
    if (d > 0 and all(w % d == 0 for w in widths)) or (d <= 0 and n > 0 and all(w % n == 0 for w in widths)):
        return None
    return {"num_heads": next(h for h in (8, 4, 2, 1) if all(w % h == 0 for w in widths))}


def detect_variant(state_dict: Mapping[str, Tensor], prediction: str | None = None, *,
                   source: str = "the checkpoint", hints: dict | None = None) -> ModelConfig:
    """The ModelConfig of a state dict in original keys: from its `oneword.config` entry if present, else
    from key names and shapes (a preset when the shapes match one). `prediction` ("eps" | "v") overrides;
    weights alone cannot tell eps from v."""
    hints = hints or {}
    if prediction not in (None, "eps", "v"):
        raise ValueError(f"prediction must be 'eps', 'v' or None, got {prediction!r}")
    prediction = prediction or hints.get("prediction")
    if CONFIG_KEY in state_dict:
        cfg = config_from_tensor(state_dict[CONFIG_KEY])
        return cfg.with_(parameterization=prediction) if prediction else cfg
    shapes = state_dict.shapes if isinstance(state_dict, LazyStateDict) else state_dict
    _reject_unsupported(shapes, source)
    unet, text = _derive_unet(shapes, source), _derive_text(shapes, source)
    vae = _derive_vae(shapes, source, 256)
    sig = _signature(unet, vae, text)
    base = next((p for p in (configs.sd1(), configs.sd2(), configs.ldm_1p4b(), configs.tiny())
                 if _signature(p.unet, p.vae, p.text) == sig), None)
    custom = base is None
    if custom:
        base = {"clip": configs.sd1, "openclip": configs.sd2, "ldmbert": configs.ldm_1p4b}[text["kind"]]()
        if not ("unet_heads" in hints and "text_heads" in hints):
            log.warning("%s: sizes match no preset (UNet %s, text %s); head counts guessed from %s",
                        source, unet, text, base.name)
    if set(unet["attention_resolutions"]) == set(base.unet["attention_resolutions"]):
        unet["attention_resolutions"] = base.unet["attention_resolutions"]
    unet = _merge(base.unet, unet)
    heads = hints.get("unet_heads") or (_fitting_heads(unet) if custom else None)
    if heads:
        unet = {k: v for k, v in unet.items() if k not in ("num_heads", "num_head_channels")} | heads
    vae = _merge(base.vae, {**vae, "ddconfig": _merge(base.vae["ddconfig"], vae["ddconfig"])})
    text = _merge(base.text, text)
    if "text_heads" in hints:
        text["heads"] = hints["text_heads"]
    elif custom and text["width"] % text["heads"]:
        text["heads"] = next(h for h in (text["width"] // 64, 8, 4, 2, 1) if h and text["width"] % h == 0)
    if "text_output" in hints and text["kind"] == "openclip":
        text["output"] = hints["text_output"]
    if prediction == "v" and base.name == "sd2":
        base = configs.sd2_v()
    extra = {k: hints[k] for k in ("linear_start", "linear_end", "timesteps", "scale_factor") if k in hints}
    return base.with_(name=f"{base.name}-custom" if custom else base.name, unet=unet, vae=vae, text=text,
                      parameterization=prediction or base.parameterization, **extra)


def _prediction_from_file(path: Path) -> str | None:
    """eps/v for a single file: a sibling .yaml (`parameterization: "v"`), else the weights manifest by name,
    size and (when the name is unknown) sha256."""
    yaml = path.with_suffix(".yaml")
    if yaml.is_file():
        m = re.search(r"parameterization:\s*[\"']?(\w+)", yaml.read_text(errors="replace"))
        log.info("%s: parameterization from %s", path, yaml)
        return "v" if m and m.group(1) == "v" else "eps"
    try:
        from weights.download import manifest, sha256_of
        entries = list(manifest().values())
    except (ImportError, OSError, ValueError):
        return None
    size = path.stat().st_size
    same = [e for e in entries if e.get("size") == size]
    named = [e for e in same if e.get("file") == path.name]
    if named:
        return named[0].get("prediction", "eps")
    if len({e.get("prediction", "eps") for e in same}) > 1:
        log.info("%s: hashing to tell eps from v (pass prediction= to skip)", path)
        digest = sha256_of(path)
        return next((e.get("prediction", "eps") for e in same if e.get("sha256") == digest), None)
    return same[0].get("prediction", "eps") if same else None


# -- loading -------------------------------------------------------------------------------------------------


def split_state_dict(state_dict: Mapping[str, Tensor], config: ModelConfig, source: str = "the checkpoint"
                     ) -> dict[str, LazyStateDict]:
    """{"unet", "vae", "text"} → prefix-stripped state dicts; known extras dropped, any other key an error.
    Nothing is read: the parts stay as lazy as the input."""
    kind = config.text["kind"]
    if kind not in PREFIXES:
        raise NotImplementedError(f"text tower {kind!r} cannot be loaded yet (issue 6)")
    lazy = state_dict if isinstance(state_dict, LazyStateDict) else LazyStateDict.of(dict(state_dict))
    keys: dict[str, dict[str, str]] = {"unet": {}, "vae": {}, "text": {}}
    for key in lazy:
        for part, prefix in (("unet", dk.UNET_PREFIX), ("vae", dk.VAE_PREFIX), ("text", PREFIXES[kind])):
            if key.startswith(prefix):
                if not KNOWN_EXTRAS.fullmatch(key):
                    keys[part][key[len(prefix):]] = key
                break
        else:
            if not KNOWN_EXTRAS.fullmatch(key):
                raise CheckpointError(f"{source} has an unexpected key {key} for {config.name} (not a part of "
                                      "the UNet, VAE or text encoder)")
    return {part: LazyStateDict({k: lazy.shapes[full] for k, full in names.items()},
                                lambda k, names=names: lazy[names[k]])
            for part, names in keys.items()}


def _fill_unused_projection(text: nn.Module, sd: LazyStateDict, config: ModelConfig) -> LazyStateDict:
    """diffusers folders lack open_clip's text_projection, which Stable Diffusion never uses: NaN, so that any
    use of it is loud rather than silently wrong."""
    if config.text["kind"] != "openclip" or "text_projection" in sd or not hasattr(text, "text_projection"):
        return sd
    log.info("text_projection is not in diffusers folders and unused by Stable Diffusion; set to NaN")
    nan = torch.full(tuple(text.text_projection.shape), float("nan"))
    return LazyStateDict.union(sd, LazyStateDict.of({"text_projection": nan}))


def _assign(module: nn.Module, sd: LazyStateDict, prefix: str, config: ModelConfig, source: str,
            device: torch.device, dtype: torch.dtype) -> None:
    """Strict load with named errors, casting tensor by tensor, assigning (no second copy of the weights)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source} has no key {prefix}{missing[0]}{more} — is this a {config.name} "
                              "checkpoint?")
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source} has an unexpected key {prefix}{unexpected[0]}{more} for "
                              f"{config.name}")
    for k, ref in expected.items():
        have = sd.shapes[k]
        if not isinstance(have, Tensor):
            raise CheckpointError(f"{source}: {prefix}{k} is a {type(have).__name__}, not a tensor")
        if tuple(have.shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: {prefix}{k} has shape {tuple(have.shape)} but "
                                  f"{config.name} needs {tuple(ref.shape)}")
        if ref.is_floating_point() and not (have.is_floating_point() and have.dtype.itemsize >= 2):
            raise CheckpointError(f"{source}: {prefix}{k} is stored as {str(have.dtype).removeprefix('torch.')}; "
                                  "weights must be float16, bfloat16, float32 or float64")
    cast = {}
    for k in expected:
        t = sd[k]                                          # read now, one tensor at a time
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


def load_model(path_or_dir: str | Path, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, prediction: str | None = None, allow_pickle: bool = False):
    """Load a Stable Diffusion 1.x/2.x checkpoint (.safetensors, .ckpt, diffusers folder) into a frozen
    LatentDiffusion, strictly; dtype defaults to float32, device to CPU.

    Parameters are built on the meta device and assigned tensor by tensor, each cast on its own, so peak
    memory is about one model in the target dtype. .safetensors tensors are read into fresh memory; .ckpt
    tensors stay memory-mapped when no cast or move is needed (PyTorch's mmap + assign recipe).
    `prediction` ("eps" | "v") overrides what the files say (a diffusers scheduler config, a sibling .yaml,
    the weights manifest); SD 2.x weights alone cannot tell eps from v, and default to eps."""
    path = Path(path_or_dir)
    source = str(path)
    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    sd, hints = _read(path, allow_pickle)
    with _malformed(source):
        return _load(path, source, sd, hints, device, dtype, prediction)


@contextlib.contextmanager
def _malformed(source: str) -> Iterator[None]:
    """Shapes no real checkpoint has make index, arithmetic or constructor errors while the config is derived
    and the modules built: report them as a CheckpointError naming the file, never a traceback."""
    try:
        yield
    except (CheckpointError, NotImplementedError, torch.OutOfMemoryError):
        raise
    except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError, AssertionError, RuntimeError,
            OverflowError, AttributeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CheckpointError(f"{source}: its tensors do not describe a model this tool can build "
                              f"({type(e).__name__}{': ' + first if first else ''}) — is it a complete Stable "
                              "Diffusion 1.x/2.x checkpoint?") from None


def _load(path: Path, source: str, sd: LazyStateDict, hints: dict, device: torch.device, dtype: torch.dtype,
          prediction: str | None):
    from ldm.pipeline import LatentDiffusion, build_modules, build_tokenizer
    from ldm.schedule import Schedule

    config = detect_variant(sd, prediction, source=source, hints=hints)
    if (prediction is None and "prediction" not in hints and CONFIG_KEY not in sd
            and config.text["kind"] == "openclip" and path.is_file()):
        found = _prediction_from_file(path)
        if found:
            config = detect_variant(sd, found, source=source, hints=hints)
        else:
            log.warning("%s: SD 2.x weights do not say eps from v; assuming eps (pass prediction='v' for "
                        "768-v models)", source)
    log.info("%s: detected %s (%s prediction)", source, config.name, config.parameterization)
    alphas = sd["alphas_cumprod"] if "alphas_cumprod" in sd else None
    parts = split_state_dict(sd, config, source)
    del sd
    unet, vae, text = build_modules(config, device="meta")
    if hints.get("source_format") == "diffusers":
        parts["text"] = _fill_unused_projection(text, parts["text"], config)
    text_prefix = PREFIXES[config.text["kind"]]
    for module, part, prefix in ((unet, "unet", dk.UNET_PREFIX), (vae, "vae", dk.VAE_PREFIX),
                                 (text, "text", text_prefix)):
        _assign(module, parts.pop(part), prefix, config, source, device, dtype)
    schedule = Schedule.from_config(config)
    if alphas is not None and not _plausible_alphas(alphas, config.timesteps):
        log.warning("%s: its alphas_cumprod is not a decreasing schedule in (0, 1]; recomputing it", source)
        alphas = None
    if alphas is not None and alphas.dtype in (torch.float32, torch.float64):
        schedule = Schedule(alphas, config.parameterization)  # the checkpoint's own ᾱ, as DESIGN prefers
    elif alphas is not None:
        log.info("%s: alphas_cumprod stored as %s; recomputing the schedule in float64", source, alphas.dtype)
    try:
        tokenizer = build_tokenizer(config)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    model = LatentDiffusion(config, unet, vae, text, tokenizer, schedule)
    return model.eval().requires_grad_(False)
