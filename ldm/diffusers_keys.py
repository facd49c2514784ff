"""diffusers folder keys → original single-file keys, by rule, not by table.

The maps work on key names only and return recipes {original key: (op, diffusers keys)}, so that a loader can
apply them lazily, one tensor at a time: "copy"; "conv1x1" (a Linear (C, C) weight as a 1×1 conv); "cat"
(q, k, v rows into one packed in_proj).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch

Tensor = torch.Tensor
Recipe = tuple[str, tuple[str, ...]]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}  # second row: diffusers < 0.14
_VAE_TOP = {"conv_norm_out": "norm_out"}
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


class KeyMapError(KeyError):
    """A diffusers key that no rule maps."""


def _sub(name: str, table: dict[str, str]) -> str:
    """Replace the leading dotted component(s) of `name` that `table` names."""
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return name


def _count(keys, pattern: str) -> int:
    """How many distinct integers fill the `(\\d+)` of pattern among keys."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def unet_to_original(sd: Iterable[str]) -> dict[str, Recipe]:
    """UNet2DConditionModel keys → `model.diffusion_model.*` (CompVis openaimodel indexing)."""
    sd = list(sd)
    nrb = _count(sd, r"down_blocks\.0\.resnets\.(\d+)\.")
    per = nrb + 1  # input/output blocks per resolution level
    up_with_attn = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out: dict[str, Recipe] = {}
    for key in sd:
        name = _sub(key, _UNET_TOP)
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            sub = f"0.{_sub(rest, _UNET_RESNET)}" if kind == "resnets" else f"1.{rest}"
            name = f"input_blocks.{1 + b * per + j}.{sub}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            name = f"input_blocks.{(int(m.group(1)) + 1) * per}.0.op.{m.group(2)}"
        elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
            kind, j, rest = m.groups()
            idx = 1 if kind == "attentions" else 2 * int(j)
            name = f"middle_block.{idx}.{_sub(rest, _UNET_RESNET) if kind == 'resnets' else rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            sub = f"0.{_sub(rest, _UNET_RESNET)}" if kind == "resnets" else f"1.{rest}"
            name = f"output_blocks.{b * per + j}.{sub}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            b = int(m.group(1))
            name = f"output_blocks.{b * per + nrb}.{2 if b in up_with_attn else 1}.conv.{m.group(2)}"
        elif name == key and not key.startswith(("input_blocks.", "output_blocks.", "middle_block.")):
            raise KeyMapError(f"no rule maps the diffusers UNet key {key!r}")
        out[UNET_PREFIX + name] = ("copy", (key,))
    return out


def vae_to_original(sd: Iterable[str]) -> dict[str, Recipe]:
    """diffusers AutoencoderKL keys → `first_stage_model.*`; Linear attention → 1×1 conv, `up` reversed."""
    sd = list(sd)
    levels = _count(sd, r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, Recipe] = {}
    for key in sd:
        op = "copy"
        part, _, rest = key.partition(".")
        if part not in ("encoder", "decoder"):
            if part not in ("quant_conv", "post_quant_conv"):
                raise KeyMapError(f"no rule maps the diffusers VAE key {key!r}")
            out[VAE_PREFIX + key] = (op, (key,))
            continue
        rest = _sub(rest, _VAE_TOP)
        if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
            rest = f"down.{m.group(1)}.block.{m.group(2)}.{_sub(m.group(3), {'conv_shortcut': 'nin_shortcut'})}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", rest):
            rest = f"down.{m.group(1)}.downsample.conv.{m.group(2)}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
            k = levels - 1 - int(m.group(1))
            rest = f"up.{k}.block.{m.group(2)}.{_sub(m.group(3), {'conv_shortcut': 'nin_shortcut'})}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", rest):
            rest = f"up.{levels - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
            rest = f"mid.block_{int(m.group(1)) + 1}.{_sub(m.group(2), {'conv_shortcut': 'nin_shortcut'})}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", rest):
            rest = f"mid.attn_1.{_sub(m.group(1), _VAE_ATTN)}"
            op = "conv1x1"
        elif not re.match(r"(conv_in|conv_out|norm_out)\.", rest):
            raise KeyMapError(f"no rule maps the diffusers VAE key {key!r}")
        out[f"{VAE_PREFIX}{part}.{rest}"] = (op, (key,))
    return out


def _hf_text_keys(sd: Iterable[str]) -> dict[str, str]:
    """transformers CLIPTextModel keys with the `text_model.` level (the file may lack it) → the file's key."""
    return {
        key if key.startswith("text_model.") else "text_model." + key: key
        for key in sd
        if not key.endswith("position_ids")
    }


def clip_to_original(sd: Iterable[str]) -> dict[str, Recipe]:
    """transformers CLIPTextModel (SD1) keys → `cond_stage_model.transformer.text_model.*`."""
    return {CLIP_PREFIX + k: ("copy", (key,)) for k, key in _hf_text_keys(sd).items()}


def openclip_from_hf(sd: Iterable[str]) -> dict[str, Recipe]:
    """transformers CLIPTextModel (SD2, HF layout) keys → open_clip layout `cond_stage_model.model.*`.

    q/k/v projections are concatenated in that order into `attn.in_proj_{weight,bias}`.
    """
    out: dict[str, Recipe] = {}
    qkv: dict[str, dict[str, str]] = {}
    for key, file_key in _hf_text_keys(sd).items():
        rest = key[len("text_model.") :]
        if rest == "embeddings.token_embedding.weight":
            name = "token_embedding.weight"
        elif rest == "embeddings.position_embedding.weight":
            name = "positional_embedding"
        elif rest.startswith("final_layer_norm."):
            name = "ln_final." + rest.rsplit(".", 1)[1]
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", rest):
            qkv.setdefault(f"transformer.resblocks.{m.group(1)}.attn.in_proj_{m.group(3)}", {})[m.group(2)] = file_key
            continue
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.*)", rest):
            inner = _sub(m.group(2), _OPENCLIP_LAYER)
            if inner == m.group(2):
                raise KeyMapError(f"no rule maps the text encoder key {key!r}")
            name = f"transformer.resblocks.{m.group(1)}.{inner}"
        else:
            raise KeyMapError(f"no rule maps the text encoder key {key!r}")
        out[OPENCLIP_PREFIX + name] = ("copy", (file_key,))
    for name, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyMapError(f"{name}: the text encoder has only {sorted(parts)} of q/k/v projections")
        out[OPENCLIP_PREFIX + name] = ("cat", (parts["q"], parts["k"], parts["v"]))
    return out


def apply(recipe: Recipe, get: Callable[[str], Tensor]) -> Tensor:
    """The original tensor a recipe describes, reading its sources through `get`."""
    op, keys = recipe
    if op == "cat":
        return torch.cat([get(k) for k in keys])
    t = get(keys[0])
    return t[:, :, None, None] if op == "conv1x1" and t.ndim == 2 else t


def convert(recipes: Mapping[str, Recipe], sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Apply every recipe to an in-memory diffusers state dict (meta tensors give the shapes alone)."""
    return {name: apply(r, sd.__getitem__) for name, r in recipes.items()}
