"""Fused GEGLU (Shazeer 2020): a·GELU_erf(gate) with a, gate = h.chunk(2, -1); Triton forward/backward + twin.

Dispatch as `ldm.kernels.norm`: `backend` argument, else $ONEWORD_KERNELS, else "auto" (Triton on CUDA once the
warm-up in `ldm.kernels.routing` passed). One program per (row, BLOCK columns): contiguous, vectorisable loads.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ldm.kernels._common import CALLS, count, kernel_backend, on_device, use_triton

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
    if name == "triton":
        return _GEGLU.apply(h)
    from ldm.kernels import routing

    key = routing.geglu_key(h)
    if key is not None:
        try:
            return _GEGLU.apply(h)
        except Exception as err:  # a toolchain failure the warm-up missed: the reference from now on
            routing.failed(key, err, "the reference")
    return geglu_reference(h)


if triton is not None:

    @triton.jit(do_not_specialize=["inner"])
    def _geglu_fwd(H, Y, inner, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
        """y[r, c] = h[r, c]·Φ(h[r, inner + c])·h[r, inner + c] for one BLOCK of columns of row r, fp32 math."""
        if ALIGN > 1:  # host-checked: the compiler can then prove 16-byte rows (128-bit loads)
            inner = (inner // ALIGN) * ALIGN
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < inner
        src = H + row * (2 * inner) + cols
        a = tl.load(src, mask=m, other=0.0).to(tl.float32)
        g = tl.load(src + inner, mask=m, other=0.0).to(tl.float32)
        y = a * (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)))
        tl.store(Y + row * inner + cols, y.to(Y.dtype.element_ty), mask=m)

    @triton.jit(do_not_specialize=["inner"])
    def _geglu_bwd(H, DY, DH, inner, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
        """da = dy·GELU(g); dg = dy·a·(Φ(g) + g·φ(g))."""
        if ALIGN > 1:
            inner = (inner // ALIGN) * ALIGN
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < inner
        src = row * (2 * inner) + cols
        a = tl.load(H + src, mask=m, other=0.0).to(tl.float32)
        g = tl.load(H + src + inner, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * inner + cols, mask=m, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327
        tl.store(DH + src, (dy * g * cdf).to(DH.dtype.element_ty), mask=m)
        tl.store(DH + src + inner, (dy * a * (cdf + g * pdf)).to(DH.dtype.element_ty), mask=m)


def launch_meta(align: int = 8) -> dict:
    """Block size, warps and stages of both launches: one row per grid row, BLOCK columns per program."""
    return {"BLOCK": _BLOCK, "ALIGN": align, "num_warps": 4, "num_stages": 1}


def _align(inner: int, *tensors: torch.Tensor) -> int:
    """Elements per 16 bytes when every row of every tensor starts 16-byte aligned, else 1."""
    per = 16 // tensors[0].element_size()
    return per if inner % per == 0 and all(t.data_ptr() % 16 == 0 for t in tensors) else 1


def _grid(rows: int, inner: int, block: int) -> tuple[int, int]:
    """(rows, column blocks): rows on axis 0 (2³¹ − 1 programs), the few column blocks on axis 1 (≤ 65,535)."""
    return rows, triton.cdiv(inner, block)


class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):  # type: ignore[override]
        h = h.contiguous()
        inner = h.shape[-1] // 2
        y = torch.empty((*h.shape[:-1], inner), device=h.device, dtype=h.dtype)
        meta = launch_meta(_align(inner, h, y))
        with on_device(h):
            _geglu_fwd[_grid(y.numel() // inner, inner, meta["BLOCK"])](h, y, inner, **meta)
        count("geglu_fwd")
        ctx.save_for_backward(h)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        (h,) = ctx.saved_tensors
        dy = dy.contiguous()
        inner = h.shape[-1] // 2
        dh = torch.empty_like(h)
        meta = launch_meta(_align(inner, h, dy, dh))
        with on_device(h):
            _geglu_bwd[_grid(dy.numel() // inner, inner, meta["BLOCK"])](h, dy, dh, inner, **meta)
        count("geglu_bwd")
        return dh


__all__ = ["geglu", "geglu_reference", "launch_meta", "CALLS"]
