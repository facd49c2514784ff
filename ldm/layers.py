"""Small shared primitives of the LDM networks: fp32 GroupNorm, sinusoidal timestep embedding, zero init."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_PERIOD = 10000
GROUPS = 32


class GroupNorm32(nn.GroupNorm):
    """GroupNorm (Wu & He 2018) computed in fp32 whatever the input dtype, cast back on return."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """The LDM normalisation layer: 32-group GroupNorm in fp32."""
    return GroupNorm32(GROUPS, channels, eps=eps)


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
