"""Fused GroupNorm (+ SiLU) (Wu & He 2018) with fp32 statistics: Triton forward/backward and a reference twin.

Dispatch: `backend` argument, else $ONEWORD_KERNELS, else "auto" ("math" | "triton" | "auto"). "auto" uses
Triton on CUDA tensors when triton imports and the configuration passed its warm-up (`ldm.kernels.routing`: a
failure warns once and the reference is used from then on), the reference elsewhere; "triton" also runs on CPU
under TRITON_INTERPRET=1 (how the tests check it) and otherwise falls back to the reference with a debug log.

The statistics are split across programs: each reduces a chunk of at most 16,384 elements of one group (two
passes, fp32) and a second kernel merges the chunks (Chan et al.'s parallel variance), so a 512-px VAE decoder
group of ~1 M elements runs on 64 programs instead of one; the backward reduction is split per (channels, chunk),
each program reducing up to 16,384 elements of one or more channels of a group.
"""

from __future__ import annotations

import inspect
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


def group_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    silu: bool = False,
) -> torch.Tensor:
    """Reference: F.group_norm in fp32 (float64 stays float64), then SiLU, cast back to x's dtype."""
    ct = torch.promote_types(x.dtype, torch.float32)
    y = F.group_norm(
        x.to(ct), num_groups, None if weight is None else weight.to(ct), None if bias is None else bias.to(ct), eps
    )
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def group_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    silu: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """GroupNorm over (N, C, *) with per-channel affine, optionally followed by SiLU, in one pass."""
    if x.dim() < 2 or x.shape[1] % num_groups:
        raise ValueError(
            f"group_norm: {x.shape[1] if x.dim() > 1 else '?'} channels of x {tuple(x.shape)} "
            f"do not split into {num_groups} groups"
        )
    name = kernel_backend(backend)
    params = tuple(p for p in (weight, bias) if p is not None)
    if x.numel() == 0 or not use_triton(name, (x, *params), "group_norm"):
        return group_norm_reference(x, weight, bias, num_groups, eps, silu)
    c = x.shape[1]
    w = weight if weight is not None else torch.ones(c, device=x.device, dtype=torch.float32)
    b = bias if bias is not None else torch.zeros(c, device=x.device, dtype=torch.float32)
    if name == "triton":
        return _GroupNormSiLU.apply(x, w, b, num_groups, float(eps), bool(silu))
    from ldm.kernels import routing

    key = routing.group_norm_key(x, w, silu)
    if key is not None:
        try:
            return _GroupNormSiLU.apply(x, w, b, num_groups, float(eps), bool(silu))
        except Exception as err:  # a toolchain failure the warm-up missed: the reference from now on
            routing.failed(key, err, "the reference")
    return group_norm_reference(x, weight, bias, num_groups, eps, silu)


if triton is not None:

    def _jit(fn):
        """triton.jit without value specialisation of the sizes: alignment comes from the host-checked ALIGN."""
        sizes = {"L", "S", "C", "CG", "G", "CHUNK", "CPB"}
        return triton.jit(do_not_specialize=[n for n in inspect.signature(fn).parameters if n in sizes])(fn)

    @triton.jit
    def _silu_fwd(z):
        return z * tl.sigmoid(z)

    @triton.jit
    def _aligned(n, ALIGN: tl.constexpr):
        """A host-checked length, rewritten so the compiler can prove it a multiple of ALIGN (16-byte loads)."""
        if ALIGN > 1:
            n = (n // ALIGN) * ALIGN
        return n

    @_jit
    def _gn_stats(X, PMEAN, PM2, L, CHUNK, eps, ALIGN: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr):
        """Mean and Σ(x − mean)² of one CHUNK of one (sample, group), two passes in fp32 (the second hits cache).

        FINAL (the group is one chunk): mean and 1/σ of the group instead, so no merge kernel is needed.
        """
        L = _aligned(L, ALIGN)
        CHUNK = _aligned(CHUNK, ALIGN)
        pid = tl.program_id(0).to(tl.int64)
        split = tl.cdiv(L, CHUNK)
        grp = pid // split
        start = (pid % split) * CHUNK
        count = tl.minimum(L - start, CHUNK)
        base = X + grp * L + start
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(0, count, BLOCK):
            acc += tl.load(base + i + offs, mask=i + offs < count, other=0.0).to(tl.float32)
        mean = tl.sum(acc, 0) / count
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(0, count, BLOCK):
            m = i + offs < count
            d = tl.where(m, tl.load(base + i + offs, mask=m, other=0.0).to(tl.float32) - mean, 0.0)
            acc += d * d
        tl.store(PMEAN + pid, mean)
        if FINAL:
            tl.store(PM2 + pid, 1.0 / tl.sqrt(tl.sum(acc, 0) / count + eps))
        else:
            tl.store(PM2 + pid, tl.sum(acc, 0))

    @_jit
    def _gn_combine(PMEAN, PM2, MEAN, RSTD, L, CHUNK, eps, BLOCK: tl.constexpr):
        """Merge a group's chunk statistics (Chan et al. 1979): mean and 1/σ of the whole group."""
        pid = tl.program_id(0).to(tl.int64)
        split = tl.cdiv(L, CHUNK)
        offs = tl.arange(0, BLOCK)
        m = offs < split
        cnt = tl.where(m, tl.minimum(L - offs * CHUNK, CHUNK), 0).to(tl.float32)
        pmean = tl.load(PMEAN + pid * split + offs, mask=m, other=0.0)
        pm2 = tl.load(PM2 + pid * split + offs, mask=m, other=0.0)
        mean = tl.sum(cnt * pmean, 0) / L
        d = pmean - mean
        var = tl.sum(pm2 + cnt * d * d, 0) / L
        tl.store(MEAN + pid, mean)
        tl.store(RSTD + pid, 1.0 / tl.sqrt(var + eps))

    @_jit
    def _gn_apply(X, Y, W, B, MEAN, RSTD, L, S, CG, G, SILU: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
        """y = (x − μ)/σ·w + b (then SiLU) for one BLOCK of one (sample, group)."""
        L = _aligned(L, ALIGN)
        nblk = tl.cdiv(L, BLOCK)
        grp = (tl.program_id(0) // nblk).to(tl.int64)
        offs = (tl.program_id(0) % nblk) * BLOCK + tl.arange(0, BLOCK)
        m = offs < L
        chan = (grp % G) * CG + offs // S
        x = tl.load(X + grp * L + offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(W + chan, mask=m, other=0.0).to(tl.float32)
        b = tl.load(B + chan, mask=m, other=0.0).to(tl.float32)
        z = (x - tl.load(MEAN + grp)) * tl.load(RSTD + grp) * w + b
        if SILU:
            z = _silu_fwd(z)
        tl.store(Y + grp * L + offs, z.to(Y.dtype.element_ty), mask=m)

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

    @_jit
    def _gn_bwd_reduce(
        X,
        DY,
        W,
        B,
        MEAN,
        RSTD,
        PDW,
        PDB,
        S,
        C,
        CG,
        G,
        CHUNK,
        CPB,
        SILU: tl.constexpr,
        ALIGN: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Per CPB channels (of one group) × one CHUNK of their S positions: partial Σdz·x̂ and Σdz per channel."""
        S = _aligned(S, ALIGN)
        CHUNK = _aligned(CHUNK, ALIGN)
        pid = tl.program_id(0).to(tl.int64)
        split = tl.cdiv(S, CHUNK)
        part = pid % split
        nc0 = (pid // split) * CPB
        start = part * CHUNK
        count = tl.minimum(S - start, CHUNK)
        chan0 = nc0 % C
        grp = (nc0 // C) * G + chan0 // CG
        mean = tl.load(MEAN + grp)
        rstd = tl.load(RSTD + grp)
        offs = tl.arange(0, BLOCK)
        for cl in range(0, CPB):
            w = tl.load(W + chan0 + cl).to(tl.float32)
            b = tl.load(B + chan0 + cl).to(tl.float32)
            base = (nc0 + cl) * S + start
            acc_w = tl.zeros([BLOCK], tl.float32)
            acc_b = tl.zeros([BLOCK], tl.float32)
            for i in range(0, count, BLOCK):
                m = i + offs < count
                x = tl.load(X + base + i + offs, mask=m, other=0.0).to(tl.float32)
                dy = tl.load(DY + base + i + offs, mask=m, other=0.0).to(tl.float32)
                xhat, dz = _gn_dz(x, dy, mean, rstd, w, b, SILU)
                acc_w += dz * xhat
                acc_b += dz
            tl.store(PDW + (nc0 + cl) * split + part, tl.sum(acc_w, 0))
            tl.store(PDB + (nc0 + cl) * split + part, tl.sum(acc_b, 0))

    @_jit
    def _gn_bwd_dx(
        X, DY, DX, W, B, MEAN, RSTD, C1, C2, L, S, CG, G, SILU: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr
    ):
        """dx = (dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))/σ for one BLOCK of one (sample, group)."""
        L = _aligned(L, ALIGN)
        nblk = tl.cdiv(L, BLOCK)
        grp = (tl.program_id(0) // nblk).to(tl.int64)
        offs = (tl.program_id(0) % nblk) * BLOCK + tl.arange(0, BLOCK)
        m = offs < L
        chan = (grp % G) * CG + offs // S
        x = tl.load(X + grp * L + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + grp * L + offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(W + chan, mask=m, other=0.0).to(tl.float32)
        b = tl.load(B + chan, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + grp)
        xhat, dz = _gn_dz(x, dy, tl.load(MEAN + grp), rstd, w, b, SILU)
        dx = (dz * w - tl.load(C1 + grp) - xhat * tl.load(C2 + grp)) * rstd
        tl.store(DX + grp * L + offs, dx.to(DX.dtype.element_ty), mask=m)


_BLOCK = 1024
_CHUNK = 16384  # elements one statistics program reduces: a 512-px VAE decoder group (~1 M) spreads over 64


def launch_meta(kernel: str, split: int = 64, align: int = 8) -> dict:
    """Block size, alignment, warps and stages of each launch (`split`: chunks per group, for the combine)."""
    if kernel == "gn_combine":
        return {"BLOCK": max(16, triton.next_power_of_2(split)), "num_warps": 1, "num_stages": 1}
    meta = {
        "BLOCK": _BLOCK,
        "ALIGN": align,
        "num_warps": 4,
        "num_stages": 2 if kernel in ("gn_stats", "gn_bwd_reduce") else 1,
    }
    if kernel == "gn_stats":
        meta["FINAL"] = split == 1
    return meta


def _meta(kernel: str, length: int, split: int = 64, align: int = 1) -> dict:
    meta = launch_meta(kernel, split, align)
    if kernel != "gn_combine":
        meta["BLOCK"] = min(meta["BLOCK"], max(16, triton.next_power_of_2(length)))
    return meta


def _align(s: int, *tensors: torch.Tensor) -> int:
    """Elements per 16 bytes when every channel row (s elements) of every tensor starts 16-byte aligned, else 1."""
    per = 16 // tensors[0].element_size()
    return per if s % per == 0 and all(t.data_ptr() % 16 == 0 for t in tensors) else 1


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, silu):  # type: ignore[override]
        x = x.contiguous()
        n, c = x.shape[:2]
        s = x[0, 0].numel()
        cg = c // num_groups
        length = cg * s
        groups = n * num_groups
        split = triton.cdiv(length, _CHUNK)
        stats = torch.empty((2, groups), device=x.device, dtype=torch.float32)
        mean, rstd = stats
        part = torch.empty((2, groups * split), device=x.device, dtype=torch.float32) if split > 1 else stats
        y = torch.empty_like(x)
        align = _align(s, x, y)
        meta = _meta("gn_apply", length, align=align)
        with on_device(x):
            _gn_stats[(groups * split,)](
                x, part[0], part[1], length, _CHUNK, eps, **_meta("gn_stats", _CHUNK, split, align=align)
            )
            if split > 1:
                _gn_combine[(groups,)](
                    part[0], part[1], mean, rstd, length, _CHUNK, eps, **_meta("gn_combine", 0, split)
                )
            _gn_apply[(groups * triton.cdiv(length, meta["BLOCK"]),)](
                x, y, weight, bias, mean, rstd, length, s, cg, num_groups, SILU=silu, **meta
            )
        count("group_norm_fwd")
        if silu:
            count("group_norm_silu_fwd")
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
        chunk = min(_CHUNK, s)
        split = triton.cdiv(s, chunk)
        cpb = max(k for k in range(1, cg + 1) if cg % k == 0 and k * s <= max(_CHUNK, s))  # channels per program
        part = torch.empty((2, n * c * split), device=x.device, dtype=torch.float32)
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        align = _align(s, x, dy, *(() if dx is None else (dx,)))
        with on_device(x):
            _gn_bwd_reduce[(n * c // cpb * split,)](
                x,
                dy,
                weight,
                bias,
                mean,
                rstd,
                part[0],
                part[1],
                s,
                c,
                cg,
                g,
                chunk,
                cpb,
                SILU=ctx.silu,
                **_meta("gn_bwd_reduce", chunk, align=align),
            )
        dw, db = part.view(2, n, c, split).sum(-1)  # per (sample, channel) Σdz·x̂, Σdz
        wf = weight.float()
        c1 = (wf * db).view(n * g, cg).sum(-1) / length  # mean(dx̂) per group
        c2 = (wf * dw).view(n * g, cg).sum(-1) / length  # mean(dx̂·x̂) per group
        if dx is not None:
            meta = _meta("gn_bwd_dx", length, align=align)
            with on_device(x):
                _gn_bwd_dx[(n * g * triton.cdiv(length, meta["BLOCK"]),)](
                    x, dy, dx, weight, bias, mean, rstd, c1, c2, length, s, cg, g, SILU=ctx.silu, **meta
                )
        count("group_norm_bwd")
        if ctx.silu:
            count("group_norm_silu_bwd")
        dweight = dw.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = db.sum(0).to(bias.dtype) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None


__all__ = ["group_norm", "group_norm_reference", "launch_meta", "CALLS"]
