"""FlashAttention-2 in Triton (Dao 2023): online softmax forward, recomputing backward, fp32 accumulation.

Contract
  * q (B, H, Nq, D), k/v (B, H, Nk, D); any strides with the head dim contiguous (a view whose last stride is not 1
    is copied once); fp16/bf16/fp32; D ≤ 256; non-causal or top-left causal (key j hidden from query i when j > i,
    as `ldm.attention.attention_math`). Sequence tails are masked, so 77-token cross-attention works.
  * The head dim is a compile-time constant split into at most two power-of-two chunks (40 → 32+16, 80 → 64+16,
    160 → 128+32), so at most 8 of every D columns are padding (SD1's 80/160 compute no padding at all).
  * Strides the host has checked to be multiples of 16 bytes are declared so (`tl.multiple_of`), which lets the
    compiler issue 128-bit and `cp.async`/TMA loads for any head dim; the compile-level evidence is in
    bench/RESULTS.md and tests/test_kernels_compile.py.
  * The output is allocated (B, Nq, H, D) contiguous and returned as its (B, H, Nq, D) view, the layout the UNet
    merges heads from without a copy; the gradients take the layout of their inputs.
  * Launches run on q's device, over a one-dimensional grid (no 65,535 limit on batch × heads).
  * fp32 inputs use IEEE fp32 dot products (no TF32): the reference-grade path. fp16/bf16 feed the tensor cores
    and accumulate in fp32 (QKᵀ never leaves fp32, as SD 2.1 in fp16 needs).

Which inputs "auto" sends here is decided in `ldm.kernels.routing` from recorded GPU measurements.
"""

from __future__ import annotations

import logging

import torch
import triton

from ldm.kernels._common import KERNEL_DTYPES, count, device_ok, interpreter_enabled, on_device
from ldm.kernels.flash import LOG2E, MAX_HEAD_DIM, attn_bwd_delta, attn_bwd_dkdv, attn_bwd_dq, attn_fwd

log = logging.getLogger(__name__)


def split_head_dim(d: int) -> tuple[int, int]:
    """(DA, DB): DA the largest power of two ≤ d (≥ 16), DB the power of two (≥ 16, or 0) covering the rest."""
    da = max(16, 1 << (d.bit_length() - 1))
    rest = d - da
    return da, (0 if rest <= 0 else max(16, triton.next_power_of_2(rest)))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by kernel, padded head-dim width class and architecture class, read off
# the sm_80/sm_90 compile figures (bench/RESULTS.md): fp16/bf16 tiles that never spill, two or more stages so the
# main loops load with cp.async, and on sm_90 64-row tiles in every dot so Hopper issues wgmma.
_TILES = {
    ("fwd", 64, 90): (128, 64, 4, 3),
    ("fwd", 128, 90): (128, 64, 8, 3),
    ("fwd", 256, 90): (128, 32, 8, 2),
    ("fwd", 64, 80): (128, 64, 8, 3),
    ("fwd", 128, 80): (128, 64, 8, 3),
    ("fwd", 256, 80): (128, 32, 8, 2),
    ("dkdv", 64, 90): (64, 64, 4, 3),
    ("dkdv", 128, 90): (64, 64, 4, 2),
    ("dkdv", 256, 90): (64, 64, 8, 2),
    ("dkdv", 64, 80): (64, 64, 8, 2),
    ("dkdv", 128, 80): (64, 32, 8, 2),
    ("dkdv", 256, 80): (16, 32, 8, 2),
    ("dq", 64, 90): (64, 64, 4, 3),
    ("dq", 128, 90): (64, 64, 4, 2),
    ("dq", 256, 90): (64, 64, 8, 2),
    ("dq", 64, 80): (64, 64, 4, 3),
    ("dq", 128, 80): (64, 64, 4, 2),
    ("dq", 256, 80): (64, 32, 8, 2),
}
# fp32 (IEEE products, no tensor cores): small tiles; shared memory ≤ 65 KB at head dim 160, under sm_86/89's 99 KB.
_TILES_FP32 = {
    ("fwd", 64): (64, 32, 4, 2),
    ("fwd", 128): (32, 32, 4, 1),
    ("fwd", 256): (32, 32, 4, 1),
    ("dkdv", 64): (32, 32, 4, 1),
    ("dkdv", 128): (32, 32, 4, 1),
    ("dkdv", 256): (32, 16, 4, 1),
    ("dq", 64): (32, 32, 4, 1),
    ("dq", 128): (32, 32, 4, 1),
    ("dq", 256): (32, 16, 4, 1),
}


def tiles(d: int, dtype: torch.dtype, kind: str, cc: int = 90) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for kernel `kind` ("fwd", "dkdv", "dq", "delta") at head dim d.

    cc: compute capability ×10 (90 for sm_90); below 90 the sm_80 tiles (they also fit sm_86/89's 99 KB).
    """
    if kind == "delta":
        return 64, 0, 4, 1
    da, db = split_head_dim(d)
    width = 64 if da + db <= 64 else 128 if da + db <= 128 else 256
    if dtype == torch.float32:
        return _TILES_FP32[(kind, width)]
    return _TILES[(kind, width, 90 if cc >= 90 else 80)]


def _cc(t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def _ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreter_enabled())


def _align(*tensors: torch.Tensor) -> int:
    """Elements per 16 bytes when every pointer and every non-unit stride is 16-byte aligned, else 1."""
    size = tensors[0].element_size()
    per = 16 // size
    for t in tensors:
        if t.data_ptr() % 16 or any(s % per for s in t.stride()[:-1]):
            return 1
    return per


def _heads(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, N, D) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _shape_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        return False
    b, h, nq, d = q.shape
    return (
        k.shape[0] == b
        and k.shape[1] == h
        and k.shape[3] == d
        and 0 < d <= MAX_HEAD_DIM
        and nq > 0
        and k.shape[2] > 0
        and q.dtype == k.dtype == v.dtype
        and q.dtype in KERNEL_DTYPES
        and q.device == k.device == v.device
    )


def supports(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, explicit: bool = False
) -> bool:
    """Whether the kernels can run these inputs here (shapes, dtypes, device); routing is `ldm.kernels.routing`."""
    del causal
    return _shape_ok(q, k, v) and device_ok(q, explicit)


def _launch_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, nq, d = q.shape
    nk = k.shape[2]
    da, db = split_head_dim(d)
    bm, bn, warps, stages = tiles(d, q.dtype, "fwd", _cc(q))
    o = torch.empty((b, nq, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((b * h, nq), dtype=torch.float32, device=q.device)
    with on_device(q):
        attn_fwd[(triton.cdiv(nq, bm) * b * h,)](
            q,
            k,
            v,
            o,
            lse,
            *_heads(q),
            *_heads(k),
            *_heads(v),
            *_heads(o),
            h,
            nq,
            nk,
            d**-0.5 * LOG2E,
            HEAD_DIM=d,
            DA=da,
            DB=db,
            ALIGN=_align(q, k, v, o),
            CAUSAL=causal,
            IEEE=_ieee(q.dtype),
            BLOCK_M=bm,
            BLOCK_N=bn,
            num_warps=warps,
            num_stages=stages,
        )
    return o, lse


def _launch_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    causal: bool,
    need_q: bool,
    need_kv: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    b, h, nq, d = q.shape
    nk = k.shape[2]
    da, db = split_head_dim(d)
    do = _unit_last(do)
    align = _align(q, k, v, o, do)
    dims = dict(HEAD_DIM=d, DA=da, DB=db, ALIGN=align)
    cc = _cc(q)
    delta = torch.empty((b * h, nq), dtype=torch.float32, device=q.device)
    dq = dk = dv = None
    with on_device(q):
        bm, _, warps, stages = tiles(d, q.dtype, "delta")
        attn_bwd_delta[(triton.cdiv(nq, bm) * b * h,)](
            o, do, delta, *_heads(o), *_heads(do), h, nq, **dims, BLOCK_M=bm, num_warps=warps, num_stages=stages
        )
        common = (*_heads(q), *_heads(k), *_heads(v), *_heads(do))
        scales = (d**-0.5 * LOG2E, d**-0.5)
        if need_kv:
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            bm, bn, warps, stages = tiles(d, q.dtype, "dkdv", cc)
            attn_bwd_dkdv[(triton.cdiv(nk, bn) * b * h,)](
                q,
                k,
                v,
                do,
                lse,
                delta,
                dk,
                dv,
                *common,
                *_heads(dk),
                *_heads(dv),
                h,
                nq,
                nk,
                *scales,
                **dims,
                CAUSAL=causal,
                IEEE=_ieee(q.dtype),
                BLOCK_M=bm,
                BLOCK_N=bn,
                num_warps=warps,
                num_stages=stages,
            )
        if need_q:
            dq = torch.empty_like(q)
            bm, bn, warps, stages = tiles(d, q.dtype, "dq", cc)
            attn_bwd_dq[(triton.cdiv(nq, bm) * b * h,)](
                q,
                k,
                v,
                do,
                lse,
                delta,
                dq,
                *common,
                *_heads(dq),
                h,
                nq,
                nk,
                *scales,
                **dims,
                CAUSAL=causal,
                IEEE=_ieee(q.dtype),
                BLOCK_M=bm,
                BLOCK_N=bn,
                num_warps=warps,
                num_stages=stages,
            )
    return dq, dk, dv


def _reference_grads(q, k, v, do, causal, need):
    """Gradients of the reference attention (the fallback when an "auto" backward launch fails)."""
    from ldm.attention import attention_math

    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), need)]
        out = attention_math(*leaves, causal=causal)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, do))
    return tuple(next(grads) if n else None for n in need)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, fallback):  # type: ignore[override]
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        o, lse = _launch_fwd(q, k, v, causal)
        count("attention_fwd")
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.fallback = causal, fallback
        return o

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        q, k, v, o, lse = ctx.saved_tensors
        need_q = ctx.needs_input_grad[0]
        need_kv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        if ctx.fallback is None:
            dq, dk, dv = _launch_bwd(q, k, v, o, lse, do, ctx.causal, need_q, need_kv)
        else:
            try:
                dq, dk, dv = _launch_bwd(q, k, v, o, lse, do, ctx.causal, need_q, need_kv)
            except Exception as err:  # "auto": a toolchain failure the warm-up missed; this step uses the reference
                from ldm.kernels import routing

                routing.failed(ctx.fallback, err, "SDPA")
                return (*_reference_grads(q, k, v, do, ctx.causal, ctx.needs_input_grad[:3]), None, None)
        if need_kv:
            count("attention_bwd_dkdv")
        if need_q:
            count("attention_bwd_dq")
        return (dq, (dk if ctx.needs_input_grad[1] else None), (dv if ctx.needs_input_grad[2] else None), None, None)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, fallback: tuple | None = None
) -> torch.Tensor:
    """softmax(QKᵀ/√D)V by FlashAttention-2 in Triton, differentiable in q, k and v; (B, H, Nq, D) out.

    `fallback`: the "auto" routing key; a backward launch failure then warns once, takes the key off Triton and
    returns the reference gradients instead of raising.
    """
    if not _shape_ok(q, k, v):
        raise ValueError(
            f"flash_attention: unsupported q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} "
            f"{k.dtype}, v {tuple(v.shape)} {v.dtype} (same dtype/device, D ≤ {MAX_HEAD_DIM})"
        )
    return _FlashAttention.apply(q, k, v, causal, fallback)


__all__ = ["flash_attention", "supports", "split_head_dim", "tiles", "MAX_HEAD_DIM"]
