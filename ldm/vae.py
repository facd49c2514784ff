"""AutoencoderKL: the KL-regularised first stage of Latent Diffusion (Rombach et al. 2022, §3)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.attention import attention
from ldm.layers import GroupNorm32

log = logging.getLogger(__name__)

GROUPS = 32
GN_EPS = 1e-6
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def Normalize(channels: int) -> GroupNorm32:
    """The VAE's norm: 32 groups, eps 1e-6, affine, fp32 statistics (ldm.layers.GroupNorm32)."""
    if channels % GROUPS:
        raise ValueError(f"VAE GroupNorm needs channels divisible by {GROUPS}, got {channels}")
    return GroupNorm32(GROUPS, channels, eps=GN_EPS, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block without time embedding: GN+SiLU (fused), conv, GN+SiLU, dropout, conv."""

    def __init__(
        self, in_channels: int, out_channels: int | None = None, conv_shortcut: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_conv_shortcut = conv_shortcut
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1.forward_silu(x))
        h = self.conv2(self.dropout(self.norm2.forward_silu(h)))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, scale C^-0.5, with a residual (1×1-conv q/k/v)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, 1)
        self.k = nn.Conv2d(in_channels, in_channels, 1)
        self.v = nn.Conv2d(in_channels, in_channels, 1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, hh * ww).transpose(-1, -2)  # (B, C, H, W) -> (B, 1, HW, C)

        out = attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)))
        out = out.transpose(-1, -2).reshape(b, c, hh, ww)  # (B, 1, HW, C) -> (B, C, H, W)
        return x + self.proj_out(out)


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    """The original's attention factory: "vanilla" (AttnBlock) or "none" (identity)."""
    if attn_type == "vanilla":
        return AttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise NotImplementedError(f"VAE attn_type {attn_type!r} is not implemented (only 'vanilla', 'none')")


class Downsample(nn.Module):
    """×1/2: pad (0,1,0,1) then 3×3 stride-2 conv, or 2×2 average pooling without conv."""

    def __init__(self, in_channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """×2: nearest-neighbour interpolation then (optionally) a 3×3 conv."""

    def __init__(self, in_channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


def _attn_type(attn_type: str, use_linear_attn: bool) -> str:
    if use_linear_attn:
        raise NotImplementedError("VAE linear attention (use_linear_attn=True) is not implemented")
    return attn_type


def _level(
    block_in: int, block_out: int, num_blocks: int, with_attn: bool, attn_type: str, dropout: float
) -> nn.Module:
    """One resolution of the original's down/up stack: `block` ResnetBlocks, each followed by `attn` if any."""
    block, attn = nn.ModuleList(), nn.ModuleList()
    for _ in range(num_blocks):
        block.append(ResnetBlock(block_in, block_out, dropout=dropout))
        block_in = block_out
        if with_attn:
            attn.append(make_attn(block_in, attn_type))
    level = nn.Module()
    level.block, level.attn = block, attn
    return level


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i_block, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i_block](h)
    return h


def _mid(block_in: int, attn_type: str, dropout: float) -> nn.Module:
    """The bottleneck: ResnetBlock, attention, ResnetBlock (keys mid.block_1, mid.attn_1, mid.block_2)."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout)
    mid.attn_1 = make_attn(block_in, attn_type)
    mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout)
    return mid


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) → moments (B, 2·z_channels, H/f, W/f), f = 2^(len(ch_mult)−1)."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        **ignored: Any,
    ) -> None:
        super().__init__()
        attn_type = _attn_type(attn_type, use_linear_attn)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_ch_mult = (1, *ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block_in = ch * ch_mult[i_level]
            down = _level(
                ch * in_ch_mult[i_level], block_in, num_res_blocks, curr_res in attn_resolutions, attn_type, dropout
            )
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)
        self.mid = _mid(block_in, attn_type, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            h = _run_level(down, h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(self.norm_out.forward_silu(h))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) → image (B, out_ch, h·f, w·f); `up` is stored reversed (up[-1] first)."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        **ignored: Any,
    ) -> None:
        super().__init__()
        attn_type = _attn_type(attn_type, use_linear_attn)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _mid(block_in, attn_type, dropout)
        ups: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            up = _level(block_in, block_out, num_res_blocks + 1, curr_res in attn_resolutions, attn_type, dropout)
            block_in = block_out
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            h = _run_level(self.up[i_level], h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(self.norm_out.forward_silu(h))
        return torch.tanh(h) if self.tanh_out else h


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from moments split on channels; logvar clamped to [-30, 20]."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = deterministic

    @property
    def std(self) -> torch.Tensor:
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw mean + std·ε (Kingma & Welling 2014); ε drawn on the generator's device."""
        if self.deterministic:
            return self.mean
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self ‖ other), other = N(0, I) by default, summed over (C, H, W)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = [1, 2, 3]
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample`, summed over `dims`."""
        if self.deterministic:
            return torch.zeros((), device=self.mean.device, dtype=self.mean.dtype)
        log2pi = 1.8378770664093453
        return 0.5 * torch.sum(log2pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))


class AutoencoderKL(nn.Module):
    """KL autoencoder: encode(x ∈ [-1, 1]) → DiagonalGaussian of the unscaled latent; decode(z) → image."""

    def __init__(self, ddconfig: dict, embed_dim: int, **ignored_original_kwargs: Any) -> None:
        super().__init__()
        if ignored_original_kwargs:
            log.debug("AutoencoderKL ignores %s", sorted(ignored_original_kwargs))
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig double_z=True (mean and logvar)")
        self.ddconfig = dict(ddconfig)
        self.embed_dim = embed_dim
        z_channels = ddconfig["z_channels"]
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell."""
        return 2 ** (self.encoder.num_resolutions - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, 3, H, W) in [-1, 1] → posterior over z (B, embed_dim, H/f, W/f), unscaled."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled z (B, embed_dim, h, w) → image (B, 3, h·f, w·f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction and posterior, as the original's training step uses them."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
