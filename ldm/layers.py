"""Shared primitives of the LDM networks: fp32 GroupNorm (+ fused SiLU), sinusoidal timestep embedding, zero init."""

from __future__ import annotations

import math

import torch
from torch import nn

from ldm.kernels.norm import group_norm

MAX_PERIOD = 10000
GROUPS = 32


class GroupNorm32(nn.GroupNorm):
    """GroupNorm (Wu & He 2018) with fp32 statistics via the fused-kernel dispatcher; output in x's dtype.

    `forward` is the plain norm; `forward_silu` is SiLU(GroupNorm(x)) in one kernel. Both go through
    `ldm.kernels.norm.group_norm` (backend: $ONEWORD_KERNELS, "auto" = Triton on CUDA, reference elsewhere).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.weight, self.bias, self.num_groups, self.eps)

    def forward_silu(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(GroupNorm(x)) (Elfwing et al. 2018) fused: one read and one write of x."""
        return group_norm(x, self.weight, self.bias, self.num_groups, self.eps, silu=True)


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """The LDM normalisation layer: 32-group GroupNorm in fp32."""
    return GroupNorm32(GROUPS, channels, eps=eps)


class NormSiLUSequential(nn.Sequential):
    """nn.Sequential(GroupNorm32, SiLU, *rest) whose norm and SiLU run as one fused kernel; keys stay put."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, act, *rest = self
        if not (isinstance(norm, GroupNorm32) and isinstance(act, nn.SiLU)):
            return super().forward(x)
        x = norm.forward_silu(x)
        for layer in rest:
            x = layer(x)
        return x


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017) in the LDM order cat[cos, sin]; t (B,) -> (B, dim) fp32."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * i / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` (the LDM init of residual output layers) and return it."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module
