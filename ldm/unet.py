"""The LDM denoising UNet (Rombach et al. 2022) with the original `model.diffusion_model.*` key names."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.attention import attention
from ldm.kernels.geglu import geglu
from ldm.layers import GroupNorm32, NormSiLUSequential, normalization, timestep_embedding, zero_module

__all__ = [
    "BasicTransformerBlock",
    "CrossAttention",
    "Downsample",
    "FeedForward",
    "GEGLU",
    "ResBlock",
    "SpatialTransformer",
    "TimestepEmbedSequential",
    "UNetModel",
    "Upsample",
    "timestep_embedding",
]

log = logging.getLogger(__name__)

TRANSFORMER_NORM_EPS = 1e-6  # SpatialTransformer.norm; ResBlocks and out.0 keep GroupNorm's 1e-5


def _maybe_checkpoint(enabled: bool, fn, *args: torch.Tensor | None) -> torch.Tensor:
    """Gradient checkpointing (Chen et al. 2016) of `fn(*args)` when enabled and autograd is recording."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class ResBlock(nn.Module):
    """Residual block with an additive timestep embedding (Ho et al. 2020, as in the LDM UNet)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.in_layers = NormSiLUSequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = NormSiLUSequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return _maybe_checkpoint(self.use_checkpoint, self._forward, x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Halve the resolution: 3x3 stride-2 conv (pad 1), or 2x2 average pooling without conv."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels == channels:
            self.op = nn.AvgPool2d(2, stride=2)
        else:
            raise ValueError("Downsample without conv cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then an optional 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        elif out_channels != channels:
            raise ValueError("Upsample without conv cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class CrossAttention(nn.Module):
    """Multi-head (cross-)attention, Vaswani et al. 2017; self-attention when `context` is None."""

    def __init__(
        self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)  # (B, H, N, D)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(context))
        out = attention(q, k, v)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class GEGLU(nn.Module):
    """GEGLU (Shazeer 2020): proj -> (x, gate) -> x * GELU(gate), exact erf GELU, via the fused dispatcher."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return geglu(self.proj(x))


class FeedForward(nn.Module):
    """The transformer MLP: GEGLU to 4x width, dropout, linear back (keys ff.net.0.proj, ff.net.2)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention on the context, GEGLU feed-forward, each residual."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        disable_self_attn: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.use_checkpoint = use_checkpoint
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return _maybe_checkpoint(self.use_checkpoint, self._forward, x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, conditioned on `context` (LDM §3.3)."""

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = GroupNorm32(32, in_channels, eps=TRANSFORMER_NORM_EPS)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, 1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim, disable_self_attn, use_checkpoint)
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous()  # (B, H*W, C) -> (B, C, H, W), NCHW memory
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class TimestepEmbedSequential(nn.Sequential):
    """A sequence that hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _per_level(name: str, value, levels: int, kind: type) -> list:
    """An int broadcast to every resolution level, or a per-level list checked for length and type."""
    if isinstance(value, kind) and not isinstance(value, bool):
        return [value] * levels
    if isinstance(value, Sequence) and len(value) == levels and all(isinstance(v, kind) for v in value):
        return list(value)
    raise ValueError(
        f"{name}={value!r}: expected one {kind.__name__} or a list of {levels} (one per channel_mult level)"
    )


def _reject(name: str, value, allowed) -> None:
    if value != allowed:
        raise ValueError(f"{name}={value!r} is not supported by this UNet (only {name}={allowed!r})")


class UNetModel(nn.Module):
    """The LDM/Stable Diffusion UNet; takes `unet_config.params` of the original yaml verbatim."""

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes=None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        n_embed=None,
        legacy: bool = True,
        disable_self_attentions: Sequence[bool] | None = None,
        num_attention_blocks: Sequence[int] | None = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        # image_size, use_fp16 and (with spatial transformers) num_heads_upsample and
        # use_new_attention_order do not change what the original builds.
        _reject("dims", dims, 2)
        _reject("num_classes", num_classes, None)
        _reject("use_scale_shift_norm", use_scale_shift_norm, False)
        _reject("resblock_updown", resblock_updown, False)
        _reject("n_embed", n_embed, None)
        _reject("use_spatial_transformer", bool(use_spatial_transformer), True)
        if not isinstance(context_dim, int) or isinstance(context_dim, bool) or context_dim <= 0:
            raise ValueError(f"context_dim={context_dim!r}: a spatial-transformer UNet needs one positive int")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("num_heads and num_head_channels are both -1: set one of them")
        if not isinstance(transformer_depth, int) or isinstance(transformer_depth, bool) or transformer_depth < 1:
            raise ValueError(f"transformer_depth={transformer_depth!r}: expected a positive int")
        channel_mult = list(channel_mult)
        if not channel_mult or not all(isinstance(m, int) and m > 0 for m in channel_mult):
            raise ValueError(f"channel_mult={channel_mult!r}: expected a list of positive ints")
        for m in [1, *channel_mult]:
            if (model_channels * m) % 32:
                raise ValueError(
                    f"model_channels={model_channels} x channel_mult {m} is not a multiple of 32 (GroupNorm groups)"
                )
        levels = len(channel_mult)
        res_blocks = _per_level("num_res_blocks", num_res_blocks, levels, int)
        if num_attention_blocks is not None:
            num_attention_blocks = _per_level("num_attention_blocks", list(num_attention_blocks), levels, int)
            if any(a > r for a, r in zip(num_attention_blocks, res_blocks)):
                raise ValueError(f"num_attention_blocks={num_attention_blocks} exceeds num_res_blocks={res_blocks}")
        if disable_self_attentions is not None:
            disable_self_attentions = _per_level("disable_self_attentions", list(disable_self_attentions), levels, bool)
        if dropout and not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r}: expected a probability in [0, 1)")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.context_dim = context_dim

        def heads(ch: int) -> tuple[int, int]:
            """(num_heads, dim_head) at width ch, exactly as the original computes them."""
            if num_head_channels == -1:
                n, d = num_heads, ch // num_heads
            else:
                n, d = ch // num_head_channels, num_head_channels
            if legacy:
                d = ch // n
            if n < 1 or d < 1:
                raise ValueError(
                    f"width {ch} with num_heads={num_heads}, num_head_channels="
                    f"{num_head_channels} gives {n} heads of {d} channels"
                )
            return n, d

        def transformer(ch: int, disable_sa: bool) -> SpatialTransformer:
            n, d = heads(ch)
            return SpatialTransformer(
                ch, n, d, transformer_depth, dropout, context_dim, disable_sa, use_linear_in_transformer, use_checkpoint
            )

        def resblock(ch: int, out_ch: int) -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, out_ch, use_checkpoint)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            disable_sa = bool(disable_self_attentions[level]) if disable_self_attentions else False
            for nr in range(res_blocks[level]):
                layers: list[nn.Module] = [resblock(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions and (num_attention_blocks is None or nr < num_attention_blocks[level]):
                    layers.append(transformer(ch, disable_sa))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample)))
                chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            resblock(ch, ch), transformer(ch, disable_middle_self_attn), resblock(ch, ch)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            disable_sa = bool(disable_self_attentions[level]) if disable_self_attentions else False
            for i in range(res_blocks[level] + 1):
                layers = [resblock(ch + chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions and (num_attention_blocks is None or i < num_attention_blocks[level]):
                    layers.append(transformer(ch, disable_sa))
                if level and i == res_blocks[level]:
                    layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = NormSiLUSequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1))
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Turn gradient checkpointing of every ResBlock and transformer block on or off."""
        for m in self.modules():
            if isinstance(m, (ResBlock, BasicTransformerBlock)):
                m.use_checkpoint = enabled

    def _timesteps(self, timesteps: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=device)
        if t.numel() == 1:
            return t.reshape(1).expand(batch)
        if t.shape != (batch,):
            raise ValueError(
                f"timesteps of shape {tuple(t.shape)} for a batch of {batch}: expected ({batch},) or a scalar"
            )
        return t

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor | float | int, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the noise (or v) for latents x (B, C, H, W) at timesteps (B,) given context (B, L, D)."""
        dtype = self.dtype
        t = self._timesteps(timesteps, x.shape[0], x.device)
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(dtype))
        if context is not None:
            context = context.to(dtype)
        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).to(x.dtype)
