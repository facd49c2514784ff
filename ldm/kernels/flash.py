"""The FlashAttention-2 device code (Dao 2023): the forward kernel, the backward's Δ = rowsum(dO·O), and the two
recomputing backward kernels (dK/dV over key blocks, dQ over query blocks). The host side, tiles and dispatch are
in ldm/kernels/attention.py."""

from __future__ import annotations

import inspect

import triton
import triton.language as tl

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
# Integer arguments are never specialised by value (divisibility by 16, == 1): alignment comes from the host-checked
# ALIGN, so 77-token cross-attention and 4096-token self-attention, any layout, share one compiled kernel per
# configuration (a GPU run compiles 4 kernels per dtype and head dim, not one per shape), the variant
# tests/test_kernels_compile.py checks.
_INT_ARGS = {
    "sqb",
    "sqh",
    "sqm",
    "skb",
    "skh",
    "skn",
    "svb",
    "svh",
    "svn",
    "sob",
    "soh",
    "som",
    "sdob",
    "sdoh",
    "sdom",
    "sdkb",
    "sdkh",
    "sdkn",
    "sdvb",
    "sdvh",
    "sdvn",
    "sdqb",
    "sdqh",
    "sdqm",
    "H",
    "NQ",
    "NK",
}


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
def attn_fwd(
    Q,
    K,
    V,
    O,
    LSE,
    sqb,
    sqh,
    sqm,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sob,
    soh,
    som,
    H,
    NQ,
    NK,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    DA: tl.constexpr,
    DB: tl.constexpr,
    ALIGN: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
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
def attn_bwd_delta(
    O,
    DO,
    DELTA,
    sob,
    soh,
    som,
    sdob,
    sdoh,
    sdom,
    H,
    NQ,
    HEAD_DIM: tl.constexpr,
    DA: tl.constexpr,
    DB: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
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
def attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    sqb,
    sqh,
    sqm,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sdob,
    sdoh,
    sdom,
    sdkb,
    sdkh,
    sdkn,
    sdvb,
    sdvh,
    sdvn,
    H,
    NQ,
    NK,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    DA: tl.constexpr,
    DB: tl.constexpr,
    ALIGN: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
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
def attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    sqb,
    sqh,
    sqm,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sdob,
    sdoh,
    sdom,
    sdqb,
    sdqh,
    sdqm,
    H,
    NQ,
    NK,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    DA: tl.constexpr,
    DB: tl.constexpr,
    ALIGN: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
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
