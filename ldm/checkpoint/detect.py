"""Detecting the variant of a state dict (SD 1.x, SD 2.x eps or v, LDM-1.4B, or a config marker) from its keys
and shapes; a file that is none of them is a CheckpointError that says why."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

from ldm import config as configs
from ldm import diffusers_keys as dk
from ldm.checkpoint.read import CONFIG_KEY, CheckpointError, LazyStateDict, config_from_tensor
from ldm.config import ModelConfig

log = logging.getLogger(__name__)


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
        raise CheckpointError(
            f"{source} is a Stable Diffusion XL checkpoint (conditioner.embedders / label_emb "
            "keys); SDXL is not supported — use an SD 1.x or 2.x checkpoint"
        )
    if not any(k.startswith(u) for k in sd):
        if any(k.startswith((dk.VAE_PREFIX, "encoder.", "decoder.")) for k in sd):
            raise CheckpointError(
                f"{source} holds only a VAE (autoencoder); load_model needs a full Stable "
                "Diffusion checkpoint with UNet and text encoder"
            )
        raise CheckpointError(
            f"{source} has no key {u}input_blocks.0.0.weight — is this a Stable Diffusion checkpoint?"
        )
    first = _need(sd, u + "input_blocks.0.0.weight", source)
    if first.shape[1] == 9:
        raise CheckpointError(
            f"{source} is an inpainting model (the UNet takes 9 input channels); inpainting "
            "checkpoints are not supported — use the base model"
        )
    if first.shape[1] != 4:
        raise CheckpointError(
            f"{source}: the UNet takes {first.shape[1]} input channels (depth/upscaler "
            "models?); only text-to-image models with 4 latent channels are supported"
        )
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
            attn.append(2**lv)
    mid = f"{u}middle_block.1"
    depth = len(_indices(sd, re.escape(mid) + r"\.transformer_blocks\.(\d+)\."))
    return dict(
        in_channels=first.shape[1],
        out_channels=_need(sd, u + "out.2.weight", source).shape[0],
        model_channels=mc,
        attention_resolutions=attn,
        num_res_blocks=nrb,
        channel_mult=mult,
        transformer_depth=depth,
        context_dim=_need(sd, f"{mid}.transformer_blocks.0.attn2.to_k.weight", source).shape[1],
        use_linear_in_transformer=_need(sd, f"{mid}.proj_in.weight", source).ndim == 2,
    )


def _derive_vae(sd: dict[str, Tensor], source: str, resolution: int) -> dict:
    """AutoencoderKL hyperparameters from shapes."""
    v = dk.VAE_PREFIX
    conv_in = _need(sd, v + "encoder.conv_in.weight", source)
    ch = conv_in.shape[0]
    levels = _indices(sd, re.escape(v) + r"encoder\.down\.(\d+)\.")
    z = _need(sd, v + "decoder.conv_in.weight", source).shape[1]
    attn = [resolution // 2**i for i in levels if f"{v}encoder.down.{i}.attn.0.norm.weight" in sd]
    ddconfig = dict(
        double_z=_need(sd, v + "encoder.conv_out.weight", source).shape[0] == 2 * z,
        z_channels=z,
        in_channels=conv_in.shape[1],
        out_ch=_need(sd, v + "decoder.conv_out.weight", source).shape[0],
        ch=ch,
        ch_mult=[_need(sd, f"{v}encoder.down.{i}.block.0.conv2.weight", source).shape[0] // ch for i in levels],
        num_res_blocks=len(_indices(sd, re.escape(v) + r"encoder\.down\.0\.block\.(\d+)\.")),
        attn_resolutions=attn,
    )
    return {"ddconfig": ddconfig, "embed_dim": _need(sd, v + "post_quant_conv.weight", source).shape[1]}


def _derive_text(sd: dict[str, Tensor], source: str) -> dict:
    """Text tower kind and sizes from shapes (not the head count)."""
    c, o = dk.CLIP_PREFIX + "text_model.", dk.OPENCLIP_PREFIX
    if c + "embeddings.token_embedding.weight" in sd:
        vocab, width = sd[c + "embeddings.token_embedding.weight"].shape
        return dict(
            kind="clip",
            vocab_size=vocab,
            width=width,
            layers=len(_indices(sd, re.escape(c) + r"encoder\.layers\.(\d+)\.")),
            context_length=_need(sd, c + "embeddings.position_embedding.weight", source).shape[0],
        )
    if o + "token_embedding.weight" in sd:
        vocab, width = sd[o + "token_embedding.weight"].shape
        return dict(
            kind="openclip",
            vocab_size=vocab,
            width=width,
            layers=len(_indices(sd, re.escape(o) + r"transformer\.resblocks\.(\d+)\.")),
            context_length=_need(sd, o + "positional_embedding", source).shape[0],
        )
    b = dk.CLIP_PREFIX
    if b + "token_emb.weight" in sd:  # LDM-1.4B: x-transformers encoder, two entries per layer
        vocab, width = sd[b + "token_emb.weight"].shape
        inner = _need(sd, b + "attn_layers.layers.0.1.to_q.weight", source, "LDM-1.4B").shape[0]
        return dict(
            kind="ldmbert",
            vocab_size=vocab,
            width=width,
            heads=inner // 64,
            dim_head=64,
            layers=len(_indices(sd, re.escape(b) + r"attn_layers\.layers\.(\d+)\.")) // 2,
            max_seq_len=_need(sd, b + "pos_emb.emb.weight", source, "LDM-1.4B").shape[0],
        )
    raise CheckpointError(
        f"{source} has no text encoder (no key {c}embeddings.token_embedding.weight or "
        f"{o}token_embedding.weight) — is this a Stable Diffusion 1.x/2.x checkpoint?"
    )


def _signature(cfg_unet: dict, cfg_vae: dict, cfg_text: dict) -> tuple:
    """What shapes can tell about a config: everything but head counts, text depth and output layer."""
    u, d = cfg_unet, cfg_vae["ddconfig"]
    return (
        (
            u["in_channels"],
            u["out_channels"],
            u["model_channels"],
            tuple(sorted(u["attention_resolutions"])),
            u["num_res_blocks"],
            tuple(u["channel_mult"]),
            u.get("transformer_depth", 1),
            u["context_dim"],
            bool(u.get("use_linear_in_transformer", False)),
        ),
        (
            d["ch"],
            tuple(d["ch_mult"]),
            d["num_res_blocks"],
            d["z_channels"],
            d["in_channels"],
            d["out_ch"],
            bool(d["double_z"]),
            cfg_vae["embed_dim"],
            len(d.get("attn_resolutions", [])),
        ),
        (
            cfg_text["kind"],
            cfg_text["vocab_size"],
            cfg_text["width"],
            cfg_text.get("context_length", cfg_text.get("max_seq_len")),
        ),
    )


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


def detect_variant(
    state_dict: Mapping[str, Tensor],
    prediction: str | None = None,
    *,
    source: str = "the checkpoint",
    hints: dict | None = None,
) -> ModelConfig:
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
    base = next(
        (
            p
            for p in (configs.sd1(), configs.sd2(), configs.ldm_1p4b(), configs.tiny())
            if _signature(p.unet, p.vae, p.text) == sig
        ),
        None,
    )
    custom = base is None
    if custom:
        base = {"clip": configs.sd1, "openclip": configs.sd2, "ldmbert": configs.ldm_1p4b}[text["kind"]]()
        if not ("unet_heads" in hints and "text_heads" in hints):
            log.warning(
                "%s: sizes match no preset (UNet %s, text %s); head counts guessed from %s",
                source,
                unet,
                text,
                base.name,
            )
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
    return base.with_(
        name=f"{base.name}-custom" if custom else base.name,
        unet=unet,
        vae=vae,
        text=text,
        parameterization=prediction or base.parameterization,
        **extra,
    )


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def prediction_from_file(path: Path, known_files: Sequence[Mapping] = ()) -> str | None:
    """eps/v for a single file: a sibling .yaml (`parameterization: "v"`), else the published files it matches
    ({file, size, sha256, prediction} entries) by name, size and (when the name is unknown) sha256."""
    yaml = path.with_suffix(".yaml")
    if yaml.is_file():
        m = re.search(r"parameterization:\s*[\"']?(\w+)", yaml.read_text(errors="replace"))
        log.info("%s: parameterization from %s", path, yaml)
        return "v" if m and m.group(1) == "v" else "eps"
    entries = list(known_files)
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
