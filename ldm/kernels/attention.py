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

import inspect
import logging

import torch
import triton
import triton.language as tl

from ldm.kernels._common import KERNEL_DTYPES, count, device_ok, interpreter_enabled, on_device

log = logging.getLogger(__name__)

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
# Integer arguments are never specialised by value (divisibility by 16, == 1): alignment comes from the host-checked
# ALIGN, so 77-token cross-attention and 4096-token self-attention, any layout, share one compiled kernel per
# configuration (a GPU run compiles 4 kernels per dtype and head dim, not one per shape), the variant
# tests/test_kernels_compile.py checks.
_INT_ARGS = {"sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn", "sob", "soh", "som", "sdob", "sdoh",
             "sdom", "sdkb", "sdkh", "sdkn", "sdvb", "sdvh", "sdvn", "sdqb", "sdqh", "sdqm", "H", "NQ", "NK"}


def _jit(fn):
    """triton.jit without value specialisation of the integer arguments in _INT_ARGS."""
    return triton.jit(do_not_specialize=[n for n in inspect.signature(fn).parameters if n in _INT_ARGS])(fn)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE fp32 products for fp32 operands.

    IEEE is also set for bf16 under TRITON_INTERPRET: the interpreter multiplies bf16 as raw uint16, so the
    operands are widened first — exact, since a bf16×bf16 product is representable in fp32.
    """
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _hint(stride, ALIGN: tl.constexpr):
    """A host-checked stride, rewritten so the compiler can prove it a multiple of ALIGN elements (16 bytes).

    `tl.multiple_of` does not reach a kernel argument, so the stride is rounded down to the multiple it already is:
    one shift on a scalar, and 128-bit loads instead of 16-bit ones for head dims such as 40.
    """
    if ALIGN > 1:
        stride = (stride // ALIGN) * ALIGN
    return stride


@triton.jit
def _ld(base, rows, mask_r, stride_r, cols, HEAD_DIM: tl.constexpr, COL_MASK: tl.constexpr):
    """A (rows, cols) tile of a row-major matrix with unit column stride; masked rows (and padded columns) read 0."""
    ptrs = base + rows[:, None] * stride_r + cols[None, :]
    if COL_MASK:
        return tl.load(ptrs, mask=mask_r[:, None] & (cols[None, :] < HEAD_DIM), other=0.0)
    else:
        return tl.load(ptrs, mask=mask_r[:, None], other=0.0)


@triton.jit
def _st(base, rows, mask_r, stride_r, cols, val, HEAD_DIM: tl.constexpr, COL_MASK: tl.constexpr):
    ptrs = base + rows[:, None] * stride_r + cols[None, :]
    if COL_MASK:
        tl.store(ptrs, val.to(base.dtype.element_ty), mask=mask_r[:, None] & (cols[None, :] < HEAD_DIM))
    else:
        tl.store(ptrs, val.to(base.dtype.element_ty), mask=mask_r[:, None])


@triton.jit
def _bh(pid_bh, H, ALIGN: tl.constexpr, sb, sh):
    """Offset of head (b, h) for a tensor with batch/head strides sb, sh."""
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    return b * _hint(sb, ALIGN) + h * _hint(sh, ALIGN)


@_jit
def _attn_fwd(Q, K, V, O, LSE,
              sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
              H, NQ, NK, qk_scale,
              HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, ALIGN: tl.constexpr,
              CAUSAL: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One BLOCK_M tile of queries against all keys: online softmax in the log2 domain (FA-2, alg. 1)."""
    num_m = tl.cdiv(NQ, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    pid_bh = tl.program_id(0) // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_a = tl.arange(0, DA)
    mask_m = offs_m < NQ
    sqm, skn, svn, som = _hint(sqm, ALIGN), _hint(skn, ALIGN), _hint(svn, ALIGN), _hint(som, ALIGN)
    q_base = Q + _bh(pid_bh, H, ALIGN, sqb, sqh)
    k_base = K + _bh(pid_bh, H, ALIGN, skb, skh)
    v_base = V + _bh(pid_bh, H, ALIGN, svb, svh)

    qa = _ld(q_base, offs_m, mask_m, sqm, offs_a, HEAD_DIM, DA > HEAD_DIM)
    acc_a = tl.zeros([BLOCK_M, DA], tl.float32)
    if DB > 0:
        offs_b = DA + tl.arange(0, DB)
        qb = _ld(q_base, offs_m, mask_m, sqm, offs_b, HEAD_DIM, DA + DB > HEAD_DIM)
        acc_b = tl.zeros([BLOCK_M, DB], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < NK
        ka = _ld(k_base, cols, mask_n, skn, offs_a, HEAD_DIM, DA > HEAD_DIM)
        s = _dot(qa, tl.trans(ka), IEEE)
        if DB > 0:
            kb = _ld(k_base, cols, mask_n, skn, offs_b, HEAD_DIM, DA + DB > HEAD_DIM)
            s += _dot(qb, tl.trans(kb), IEEE)
        s = s * qk_scale
        valid = mask_n[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        va = _ld(v_base, cols, mask_n, svn, offs_a, HEAD_DIM, DA > HEAD_DIM)
        acc_a = acc_a * alpha[:, None] + _dot(p.to(va.dtype), va, IEEE)
        if DB > 0:
            vb = _ld(v_base, cols, mask_n, svn, offs_b, HEAD_DIM, DA + DB > HEAD_DIM)
            acc_b = acc_b * alpha[:, None] + _dot(p.to(vb.dtype), vb, IEEE)
        m_i = m_new

    o_base = O + _bh(pid_bh, H, ALIGN, sob, soh)
    _st(o_base, offs_m, mask_m, som, offs_a, acc_a / l_i[:, None], HEAD_DIM, DA > HEAD_DIM)
    if DB > 0:
        _st(o_base, offs_m, mask_m, som, offs_b, acc_b / l_i[:, None], HEAD_DIM, DA + DB > HEAD_DIM)
    tl.store(LSE + pid_bh.to(tl.int64) * NQ + offs_m, m_i + tl.math.log2(l_i), mask=mask_m)


@_jit
def _attn_bwd_delta(O, DO, DELTA, sob, soh, som, sdob, sdoh, sdom, H, NQ,
                    HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, ALIGN: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """Δ_i = rowsum(dO ∘ O) in fp32 for one BLOCK_M tile of rows (FA-2, alg. 2, line 4)."""
    num_m = tl.cdiv(NQ, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    pid_bh = tl.program_id(0) // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < NQ
    som, sdom = _hint(som, ALIGN), _hint(sdom, ALIGN)
    o_base = O + _bh(pid_bh, H, ALIGN, sob, soh)
    do_base = DO + _bh(pid_bh, H, ALIGN, sdob, sdoh)
    offs_a = tl.arange(0, DA)
    o = _ld(o_base, offs_m, mask_m, som, offs_a, HEAD_DIM, DA > HEAD_DIM).to(tl.float32)
    do = _ld(do_base, offs_m, mask_m, sdom, offs_a, HEAD_DIM, DA > HEAD_DIM).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if DB > 0:
        offs_b = DA + tl.arange(0, DB)
        o = _ld(o_base, offs_m, mask_m, som, offs_b, HEAD_DIM, DA + DB > HEAD_DIM).to(tl.float32)
        do = _ld(do_base, offs_m, mask_m, sdom, offs_b, HEAD_DIM, DA + DB > HEAD_DIM).to(tl.float32)
        delta += tl.sum(o * do, 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * NQ + offs_m, delta, mask=mask_m)


@triton.jit
def _bwd_p_ds(s, dp, lse, delta, offs_m, offs_n, mask_m, mask_n, CAUSAL: tl.constexpr):
    """P recomputed from the saved log-sum-exp (s already in the log2 domain) and dS = P ∘ (dP − Δ) (FA-2, alg. 2)."""
    valid = mask_m[:, None] & mask_n[None, :]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
    return p, p * (dp - delta[:, None])


@_jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                   sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                   H, NQ, NK, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, ALIGN: tl.constexpr,
                   CAUSAL: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV for one BLOCK_N tile of keys, recomputing P from the saved log-sum-exp (FA-2, alg. 2)."""
    num_n = tl.cdiv(NK, BLOCK_N)
    pid_n = tl.program_id(0) % num_n
    pid_bh = tl.program_id(0) // num_n
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, DA)
    mask_n = offs_n < NK
    sqm, skn, svn, sdom = _hint(sqm, ALIGN), _hint(skn, ALIGN), _hint(svn, ALIGN), _hint(sdom, ALIGN)
    q_base = Q + _bh(pid_bh, H, ALIGN, sqb, sqh)
    do_base = DO + _bh(pid_bh, H, ALIGN, sdob, sdoh)
    k_base = K + _bh(pid_bh, H, ALIGN, skb, skh)
    v_base = V + _bh(pid_bh, H, ALIGN, svb, svh)
    row_base = pid_bh.to(tl.int64) * NQ

    ka = _ld(k_base, offs_n, mask_n, skn, offs_a, HEAD_DIM, DA > HEAD_DIM)
    va = _ld(v_base, offs_n, mask_n, svn, offs_a, HEAD_DIM, DA > HEAD_DIM)
    dk_a = tl.zeros([BLOCK_N, DA], tl.float32)
    dv_a = tl.zeros([BLOCK_N, DA], tl.float32)
    if DB > 0:
        offs_b = DA + tl.arange(0, DB)
        kb = _ld(k_base, offs_n, mask_n, skn, offs_b, HEAD_DIM, DA + DB > HEAD_DIM)
        vb = _ld(v_base, offs_n, mask_n, svn, offs_b, HEAD_DIM, DA + DB > HEAD_DIM)
        dk_b = tl.zeros([BLOCK_N, DB], tl.float32)
        dv_b = tl.zeros([BLOCK_N, DB], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
    for start_m in range(lo, NQ, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < NQ
        qa = _ld(q_base, offs_m, mask_m, sqm, offs_a, HEAD_DIM, DA > HEAD_DIM)
        doa = _ld(do_base, offs_m, mask_m, sdom, offs_a, HEAD_DIM, DA > HEAD_DIM)
        s = _dot(qa, tl.trans(ka), IEEE)
        dp = _dot(doa, tl.trans(va), IEEE)
        if DB > 0:
            qb = _ld(q_base, offs_m, mask_m, sqm, offs_b, HEAD_DIM, DA + DB > HEAD_DIM)
            dob = _ld(do_base, offs_m, mask_m, sdom, offs_b, HEAD_DIM, DA + DB > HEAD_DIM)
            s += _dot(qb, tl.trans(kb), IEEE)
            dp += _dot(dob, tl.trans(vb), IEEE)
        lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
        p, ds = _bwd_p_ds(s * qk_scale, dp, lse, delta, offs_m, offs_n, mask_m, mask_n, CAUSAL)
        pt = tl.trans(p.to(doa.dtype))
        dst = tl.trans(ds.to(qa.dtype))
        dv_a += _dot(pt, doa, IEEE)
        dk_a += _dot(dst, qa, IEEE)
        if DB > 0:
            dv_b += _dot(pt, dob, IEEE)
            dk_b += _dot(dst, qb, IEEE)

    dk_base = DK + _bh(pid_bh, H, ALIGN, sdkb, sdkh)
    dv_base = DV + _bh(pid_bh, H, ALIGN, sdvb, sdvh)
    sdkn, sdvn = _hint(sdkn, ALIGN), _hint(sdvn, ALIGN)
    _st(dk_base, offs_n, mask_n, sdkn, offs_a, dk_a * sm_scale, HEAD_DIM, DA > HEAD_DIM)
    _st(dv_base, offs_n, mask_n, sdvn, offs_a, dv_a, HEAD_DIM, DA > HEAD_DIM)
    if DB > 0:
        _st(dk_base, offs_n, mask_n, sdkn, offs_b, dk_b * sm_scale, HEAD_DIM, DA + DB > HEAD_DIM)
        _st(dv_base, offs_n, mask_n, sdvn, offs_b, dv_b, HEAD_DIM, DA + DB > HEAD_DIM)


@_jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
                 H, NQ, NK, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, ALIGN: tl.constexpr,
                 CAUSAL: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ for one BLOCK_M tile of queries (FA-2, alg. 2, the dQ loop as its own kernel: no atomics)."""
    num_m = tl.cdiv(NQ, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    pid_bh = tl.program_id(0) // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_a = tl.arange(0, DA)
    mask_m = offs_m < NQ
    sqm, skn, svn, sdom = _hint(sqm, ALIGN), _hint(skn, ALIGN), _hint(svn, ALIGN), _hint(sdom, ALIGN)
    q_base = Q + _bh(pid_bh, H, ALIGN, sqb, sqh)
    do_base = DO + _bh(pid_bh, H, ALIGN, sdob, sdoh)
    k_base = K + _bh(pid_bh, H, ALIGN, skb, skh)
    v_base = V + _bh(pid_bh, H, ALIGN, svb, svh)
    row_base = pid_bh.to(tl.int64) * NQ

    qa = _ld(q_base, offs_m, mask_m, sqm, offs_a, HEAD_DIM, DA > HEAD_DIM)
    doa = _ld(do_base, offs_m, mask_m, sdom, offs_a, HEAD_DIM, DA > HEAD_DIM)
    dq_a = tl.zeros([BLOCK_M, DA], tl.float32)
    if DB > 0:
        offs_b = DA + tl.arange(0, DB)
        qb = _ld(q_base, offs_m, mask_m, sqm, offs_b, HEAD_DIM, DA + DB > HEAD_DIM)
        dob = _ld(do_base, offs_m, mask_m, sdom, offs_b, HEAD_DIM, DA + DB > HEAD_DIM)
        dq_b = tl.zeros([BLOCK_M, DB], tl.float32)
    lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < NK
        ka = _ld(k_base, offs_n, mask_n, skn, offs_a, HEAD_DIM, DA > HEAD_DIM)
        va = _ld(v_base, offs_n, mask_n, svn, offs_a, HEAD_DIM, DA > HEAD_DIM)
        s = _dot(qa, tl.trans(ka), IEEE)
        dp = _dot(doa, tl.trans(va), IEEE)
        if DB > 0:
            kb = _ld(k_base, offs_n, mask_n, skn, offs_b, HEAD_DIM, DA + DB > HEAD_DIM)
            vb = _ld(v_base, offs_n, mask_n, svn, offs_b, HEAD_DIM, DA + DB > HEAD_DIM)
            s += _dot(qb, tl.trans(kb), IEEE)
            dp += _dot(dob, tl.trans(vb), IEEE)
        _, ds = _bwd_p_ds(s * qk_scale, dp, lse, delta, offs_m, offs_n, mask_m, mask_n, CAUSAL)
        ds = ds.to(ka.dtype)
        dq_a += _dot(ds, ka, IEEE)
        if DB > 0:
            dq_b += _dot(ds, kb, IEEE)

    dq_base = DQ + _bh(pid_bh, H, ALIGN, sdqb, sdqh)
    sdqm = _hint(sdqm, ALIGN)
    _st(dq_base, offs_m, mask_m, sdqm, offs_a, dq_a * sm_scale, HEAD_DIM, DA > HEAD_DIM)
    if DB > 0:
        _st(dq_base, offs_m, mask_m, sdqm, offs_b, dq_b * sm_scale, HEAD_DIM, DA + DB > HEAD_DIM)


def split_head_dim(d: int) -> tuple[int, int]:
    """(DA, DB): DA the largest power of two ≤ d (≥ 16), DB the power of two (≥ 16, or 0) covering the rest."""
    da = max(16, 1 << (d.bit_length() - 1))
    rest = d - da
    return da, (0 if rest <= 0 else max(16, triton.next_power_of_2(rest)))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by kernel, padded head-dim width class and architecture class, read off
# the sm_80/sm_90 compile figures (bench/RESULTS.md): fp16/bf16 tiles that never spill, two or more stages so the
# main loops load with cp.async, and on sm_90 64-row tiles in every dot so Hopper issues wgmma.
_TILES = {
    ("fwd", 64, 90): (128, 64, 4, 3), ("fwd", 128, 90): (128, 64, 8, 3), ("fwd", 256, 90): (128, 32, 8, 2),
    ("fwd", 64, 80): (128, 64, 8, 3), ("fwd", 128, 80): (128, 64, 8, 3), ("fwd", 256, 80): (128, 32, 8, 2),
    ("dkdv", 64, 90): (64, 64, 4, 3), ("dkdv", 128, 90): (64, 64, 4, 2), ("dkdv", 256, 90): (64, 64, 8, 2),
    ("dkdv", 64, 80): (64, 64, 8, 2), ("dkdv", 128, 80): (64, 32, 8, 2), ("dkdv", 256, 80): (16, 32, 8, 2),
    ("dq", 64, 90): (64, 64, 4, 3), ("dq", 128, 90): (64, 64, 4, 2), ("dq", 256, 90): (64, 64, 8, 2),
    ("dq", 64, 80): (64, 64, 4, 3), ("dq", 128, 80): (64, 64, 4, 2), ("dq", 256, 80): (64, 32, 8, 2),
}
# fp32 (IEEE products, no tensor cores): small tiles; shared memory ≤ 65 KB at head dim 160, under sm_86/89's 99 KB.
_TILES_FP32 = {("fwd", 64): (64, 32, 4, 2), ("fwd", 128): (32, 32, 4, 1), ("fwd", 256): (32, 32, 4, 1),
               ("dkdv", 64): (32, 32, 4, 1), ("dkdv", 128): (32, 32, 4, 1), ("dkdv", 256): (32, 16, 4, 1),
               ("dq", 64): (32, 32, 4, 1), ("dq", 128): (32, 32, 4, 1), ("dq", 256): (32, 16, 4, 1)}


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
    return (k.shape[0] == b and k.shape[1] == h and k.shape[3] == d and 0 < d <= MAX_HEAD_DIM
            and nq > 0 and k.shape[2] > 0 and q.dtype == k.dtype == v.dtype and q.dtype in KERNEL_DTYPES
            and q.device == k.device == v.device)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
             explicit: bool = False) -> bool:
    """Whether the kernels can run these inputs here (shapes, dtypes, device); routing is `ldm.kernels.routing`."""
    del causal
    return _shape_ok(q, k, v) and device_ok(q, explicit)


def _launch_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, nq, d = q.shape
    nk = k.shape[2]
    da, db = split_head_dim(d)
    bm, bn, warps, stages = tiles(d, q.dtype, "fwd", _cc(q))
    o = torch.empty((b, nq, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((b * h, nq), dtype=torch.float32, device=q.device)
    with on_device(q):
        _attn_fwd[(triton.cdiv(nq, bm) * b * h,)](
            q, k, v, o, lse, *_heads(q), *_heads(k), *_heads(v), *_heads(o), h, nq, nk, d ** -0.5 * LOG2E,
            HEAD_DIM=d, DA=da, DB=db, ALIGN=_align(q, k, v, o), CAUSAL=causal, IEEE=_ieee(q.dtype),
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return o, lse


def _launch_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                do: torch.Tensor, causal: bool, need_q: bool, need_kv: bool
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
        _attn_bwd_delta[(triton.cdiv(nq, bm) * b * h,)](o, do, delta, *_heads(o), *_heads(do), h, nq, **dims,
                                                        BLOCK_M=bm, num_warps=warps, num_stages=stages)
        common = (*_heads(q), *_heads(k), *_heads(v), *_heads(do))
        scales = (d ** -0.5 * LOG2E, d ** -0.5)
        if need_kv:
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            bm, bn, warps, stages = tiles(d, q.dtype, "dkdv", cc)
            _attn_bwd_dkdv[(triton.cdiv(nk, bn) * b * h,)](
                q, k, v, do, lse, delta, dk, dv, *common, *_heads(dk), *_heads(dv), h, nq, nk, *scales,
                **dims, CAUSAL=causal, IEEE=_ieee(q.dtype), BLOCK_M=bm, BLOCK_N=bn,
                num_warps=warps, num_stages=stages)
        if need_q:
            dq = torch.empty_like(q)
            bm, bn, warps, stages = tiles(d, q.dtype, "dq", cc)
            _attn_bwd_dq[(triton.cdiv(nq, bm) * b * h,)](
                q, k, v, do, lse, delta, dq, *common, *_heads(dq), h, nq, nk, *scales,
                **dims, CAUSAL=causal, IEEE=_ieee(q.dtype), BLOCK_M=bm, BLOCK_N=bn,
                num_warps=warps, num_stages=stages)
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
        return (dq, (dk if ctx.needs_input_grad[1] else None), (dv if ctx.needs_input_grad[2] else None),
                None, None)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    fallback: tuple | None = None) -> torch.Tensor:
    """softmax(QKᵀ/√D)V by FlashAttention-2 in Triton, differentiable in q, k and v; (B, H, Nq, D) out.

    `fallback`: the "auto" routing key; a backward launch failure then warns once, takes the key off Triton and
    returns the reference gradients instead of raising.
    """
    if not _shape_ok(q, k, v):
        raise ValueError(f"flash_attention: unsupported q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} "
                         f"{k.dtype}, v {tuple(v.shape)} {v.dtype} (same dtype/device, D ≤ {MAX_HEAD_DIM})")
    return _FlashAttention.apply(q, k, v, causal, fallback)


__all__ = ["flash_attention", "supports", "split_head_dim", "tiles", "MAX_HEAD_DIM"]
