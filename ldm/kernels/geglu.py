"""Fused GEGLU (Shazeer 2020): a·GELU_erf(gate) with a, gate = h.chunk(2, -1); Triton forward/backward + twin.

Dispatch as `ldm.kernels.norm`: `backend` argument, else $ONEWORD_KERNELS, else "auto" (Triton on CUDA).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ldm.kernels._common import CALLS, kernel_backend, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference twin still works
    triton = None

log = logging.getLogger(__name__)

_BLOCK = 1024


def geglu_reference(h: torch.Tensor) -> torch.Tensor:
    """Reference: a·GELU(gate) with exact erf GELU, in fp32 (float64 stays float64), cast back to h's dtype."""
    a, gate = h.to(torch.promote_types(h.dtype, torch.float32)).chunk(2, dim=-1)
    return (a * F.gelu(gate)).to(h.dtype)


def geglu(h: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """GEGLU on the projection output h (..., 2·inner) → (..., inner)."""
    if h.dim() == 0 or h.shape[-1] % 2:
        raise ValueError(f"geglu: last dim of h {tuple(h.shape)} must be even (a and gate halves)")
    name = kernel_backend(backend)
    if h.numel() == 0 or not use_triton(name, (h,), "geglu"):
        return geglu_reference(h)
    return _GEGLU.apply(h)


if triton is not None:

    @triton.jit
    def _load_halves(H, total, inner, BLOCK: tl.constexpr):
        """This program's flat output offsets, their mask, the h offsets of `a`, and the a and gate halves (fp32)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < total
        row = offs // inner
        col = offs - row * inner
        src = row * (2 * inner) + col
        a = tl.load(H + src, mask=m, other=0.0).to(tl.float32)
        g = tl.load(H + src + inner, mask=m, other=0.0).to(tl.float32)
        return offs, m, src, a, g

    @triton.jit
    def _geglu_fwd(H, Y, total, inner, BLOCK: tl.constexpr):
        """y[r, c] = h[r, c]·Φ(h[r, inner + c])·h[r, inner + c], fp32 math."""
        offs, m, src, a, g = _load_halves(H, total, inner, BLOCK)
        y = a * (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)))
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _geglu_bwd(H, DY, DH, total, inner, BLOCK: tl.constexpr):
        """da = dy·GELU(g); dg = dy·a·(Φ(g) + g·φ(g))."""
        offs, m, src, a, g = _load_halves(H, total, inner, BLOCK)
        dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327
        tl.store(DH + src, (dy * g * cdf).to(DH.dtype.element_ty), mask=m)
        tl.store(DH + src + inner, (dy * a * (cdf + g * pdf)).to(DH.dtype.element_ty), mask=m)


class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):  # type: ignore[override]
        h = h.contiguous()
        inner = h.shape[-1] // 2
        y = torch.empty((*h.shape[:-1], inner), device=h.device, dtype=h.dtype)
        total = y.numel()
        _geglu_fwd[(triton.cdiv(total, _BLOCK),)](h, y, total, inner, BLOCK=_BLOCK)
        CALLS["geglu_fwd"] += 1
        ctx.save_for_backward(h)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        (h,) = ctx.saved_tensors
        dy = dy.contiguous()
        inner = h.shape[-1] // 2
        dh = torch.empty_like(h)
        total = dy.numel()
        _geglu_bwd[(triton.cdiv(total, _BLOCK),)](h, dy, dh, total, inner, BLOCK=_BLOCK)
        CALLS["geglu_bwd"] += 1
        return dh


__all__ = ["geglu", "geglu_reference", "CALLS"]
