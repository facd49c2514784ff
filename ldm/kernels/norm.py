"""Fused GroupNorm (+ SiLU) (Wu & He 2018) with fp32 statistics: Triton forward/backward and a reference twin.

Dispatch: `backend` argument, else $ONEWORD_KERNELS, else "auto" ("math" | "triton" | "auto"). "auto" uses
Triton on CUDA tensors when triton imports, the reference elsewhere; "triton" also runs on CPU under
TRITON_INTERPRET=1 (how the tests check it) and otherwise falls back to the reference with a debug log.
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


def group_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         num_groups: int, eps: float, silu: bool = False) -> torch.Tensor:
    """Reference: F.group_norm in fp32 (float64 stays float64), then SiLU, cast back to x's dtype."""
    ct = torch.promote_types(x.dtype, torch.float32)
    y = F.group_norm(x.to(ct), num_groups, None if weight is None else weight.to(ct),
                     None if bias is None else bias.to(ct), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def group_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
               eps: float, silu: bool = False, backend: str | None = None) -> torch.Tensor:
    """GroupNorm over (N, C, *) with per-channel affine, optionally followed by SiLU, in one pass."""
    if x.dim() < 2 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm: {x.shape[1] if x.dim() > 1 else '?'} channels of x {tuple(x.shape)} "
                         f"do not split into {num_groups} groups")
    name = kernel_backend(backend)
    params = tuple(p for p in (weight, bias) if p is not None)
    if x.numel() == 0 or not use_triton(name, (x, *params), "group_norm"):
        return group_norm_reference(x, weight, bias, num_groups, eps, silu)
    c = x.shape[1]
    w = weight if weight is not None else torch.ones(c, device=x.device, dtype=torch.float32)
    b = bias if bias is not None else torch.zeros(c, device=x.device, dtype=torch.float32)
    return _GroupNormSiLU.apply(x, w, b, num_groups, float(eps), bool(silu))


if triton is not None:

    @triton.jit
    def _silu_fwd(z):
        return z * tl.sigmoid(z)

    @triton.jit
    def _gn_stats(X, MEAN, RSTD, L, eps, BLOCK: tl.constexpr):
        """Two-pass mean and 1/σ of one (sample, group): L contiguous elements, fp32."""
        pid = tl.program_id(0).to(tl.int64)
        base = X + pid * L
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, L, BLOCK):
            x = tl.load(base + start + offs, mask=start + offs < L, other=0.0).to(tl.float32)
            acc += x
        mean = tl.sum(acc, 0) / L
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, L, BLOCK):
            m = start + offs < L
            x = tl.load(base + start + offs, mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, x - mean, 0.0)
            acc += d * d
        var = tl.sum(acc, 0) / L
        tl.store(MEAN + pid, mean)
        tl.store(RSTD + pid, 1.0 / tl.sqrt(var + eps))

    @triton.jit
    def _gn_apply(X, Y, W, B, MEAN, RSTD, L, S, CG, G, SILU: tl.constexpr, BLOCK: tl.constexpr):
        """y = (x − μ)/σ·w + b (then SiLU) for one BLOCK of one (sample, group)."""
        pid = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < L
        chan = (pid % G) * CG + offs // S
        x = tl.load(X + pid * L + offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(W + chan, mask=m, other=0.0).to(tl.float32)
        b = tl.load(B + chan, mask=m, other=0.0).to(tl.float32)
        z = (x - tl.load(MEAN + pid)) * tl.load(RSTD + pid) * w + b
        if SILU:
            z = _silu_fwd(z)
        tl.store(Y + pid * L + offs, z.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _gn_dz(x, dy, mean, rstd, w, b, SILU: tl.constexpr):
        """x̂ and dL/dz for z = x̂·w + b, through SiLU'(z) = σ(z)(1 + z(1 − σ(z)))."""
        xhat = (x - mean) * rstd
        dz = dy
        if SILU:
            z = xhat * w + b
            sig = tl.sigmoid(z)
            dz = dy * sig * (1.0 + z * (1.0 - sig))
        return xhat, dz

    @triton.jit
    def _gn_bwd_reduce(X, DY, W, B, MEAN, RSTD, DW, DB, C1, C2, L, S, C, CG, G,
                       SILU: tl.constexpr, BLOCK: tl.constexpr):
        """Per (sample, group): per-channel Σdz·x̂, Σdz (→ dw, db) and the group means of dx̂ and dx̂·x̂."""
        pid = tl.program_id(0).to(tl.int64)
        n = pid // G
        g = pid % G
        mean = tl.load(MEAN + pid)
        rstd = tl.load(RSTD + pid)
        offs = tl.arange(0, BLOCK)
        sum_dxhat = 0.0
        sum_dxhat_xhat = 0.0
        for cl in range(0, CG):
            chan = g * CG + cl
            w = tl.load(W + chan).to(tl.float32)
            b = tl.load(B + chan).to(tl.float32)
            base = pid * L + cl * S
            acc_w = tl.zeros([BLOCK], tl.float32)
            acc_b = tl.zeros([BLOCK], tl.float32)
            for start in range(0, S, BLOCK):
                m = start + offs < S
                x = tl.load(X + base + start + offs, mask=m, other=0.0).to(tl.float32)
                dy = tl.load(DY + base + start + offs, mask=m, other=0.0).to(tl.float32)
                xhat, dz = _gn_dz(x, dy, mean, rstd, w, b, SILU)
                acc_w += dz * xhat
                acc_b += dz
            dw = tl.sum(acc_w, 0)
            db = tl.sum(acc_b, 0)
            tl.store(DW + n * C + chan, dw)
            tl.store(DB + n * C + chan, db)
            sum_dxhat += w * db
            sum_dxhat_xhat += w * dw
        tl.store(C1 + pid, sum_dxhat / L)
        tl.store(C2 + pid, sum_dxhat_xhat / L)

    @triton.jit
    def _gn_bwd_dx(X, DY, DX, W, B, MEAN, RSTD, C1, C2, L, S, CG, G, SILU: tl.constexpr, BLOCK: tl.constexpr):
        """dx = (dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))/σ for one BLOCK of one (sample, group)."""
        pid = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < L
        chan = (pid % G) * CG + offs // S
        x = tl.load(X + pid * L + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + pid * L + offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(W + chan, mask=m, other=0.0).to(tl.float32)
        b = tl.load(B + chan, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + pid)
        xhat, dz = _gn_dz(x, dy, tl.load(MEAN + pid), rstd, w, b, SILU)
        dx = (dz * w - tl.load(C1 + pid) - xhat * tl.load(C2 + pid)) * rstd
        tl.store(DX + pid * L + offs, dx.to(DX.dtype.element_ty), mask=m)


_BLOCK = 1024


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, silu):  # type: ignore[override]
        x = x.contiguous()
        n, c = x.shape[:2]
        s = x[0, 0].numel()
        cg = c // num_groups
        length = cg * s
        mean = torch.empty(n * num_groups, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        y = torch.empty_like(x)
        block = min(_BLOCK, triton.next_power_of_2(length))
        _gn_stats[(n * num_groups,)](x, mean, rstd, length, eps, BLOCK=block)
        _gn_apply[(n * num_groups, triton.cdiv(length, block))](
            x, y, weight, bias, mean, rstd, length, s, cg, num_groups, SILU=silu, BLOCK=block)
        CALLS["group_norm_fwd"] += 1
        if silu:
            CALLS["group_norm_silu_fwd"] += 1
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.silu = num_groups, silu
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        g = ctx.num_groups
        n, c = x.shape[:2]
        s = x[0, 0].numel()
        cg = c // g
        length = cg * s
        dw = torch.empty((n, c), device=x.device, dtype=torch.float32)
        db = torch.empty_like(dw)
        c1 = torch.empty_like(mean)
        c2 = torch.empty_like(mean)
        block_s = min(_BLOCK, triton.next_power_of_2(s))
        _gn_bwd_reduce[(n * g,)](x, dy, weight, bias, mean, rstd, dw, db, c1, c2, length, s, c, cg, g,
                                 SILU=ctx.silu, BLOCK=block_s)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            block = min(_BLOCK, triton.next_power_of_2(length))
            _gn_bwd_dx[(n * g, triton.cdiv(length, block))](x, dy, dx, weight, bias, mean, rstd, c1, c2,
                                                            length, s, cg, g, SILU=ctx.silu, BLOCK=block)
        CALLS["group_norm_bwd"] += 1
        if ctx.silu:
            CALLS["group_norm_silu_bwd"] += 1
        dweight = dw.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = db.sum(0).to(bias.dtype) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None


__all__ = ["group_norm", "group_norm_reference", "CALLS"]
