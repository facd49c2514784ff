"""FlashAttention-2 in Triton (Dao 2023): online softmax forward, recomputing backward, fp32 accumulation.

q (B, H, Nq, D), k/v (B, H, Nk, D), any strides; fp16/bf16/fp32; D ≤ 256, padded to BLOCK_D =
next_power_of_2(D) by masked loads (never by copying). Sequence tails are masked, so 77-token
cross-attention and lengths that are not a multiple of the block work. `causal=True` is the top-left
aligned mask of `ldm.attention.attention_math` (key j is hidden from query i when j > i).

fp32 inputs use IEEE fp32 dot products (no TF32), so this path matches the reference to ~1e-6; fp16/bf16
inputs feed the tensor cores and accumulate in fp32 (QKᵀ never leaves fp32, as SD 2.1 in fp16 needs).

"auto" rule (`supports(..., explicit=False)`), on CUDA only — everything else goes to torch SDPA:
  * fp16/bf16 and D ≤ 256, non-causal: Triton. These are the UNet's self/cross attentions (SD1 D 40/80/160,
    SD2 D 64), where one fused pass with the padded head dim is at least on par with SDPA's kernels.
  * fp32 → SDPA: our fp32 path is a reference-grade IEEE kernel; SDPA's memory-efficient kernel wins.
  * D > 256 → SDPA: the VAE's single-head D=512 attention; SDPA's flash/memory-efficient backends never
    materialise the fp32 N×N matrix and handle D=512, which our register-resident tiles cannot.
  * causal → SDPA: the CLIP text towers (77 tokens, launch-bound; nothing to gain).
  `bench/attention.py` measures the rule; rerun it on a new GPU before changing it.
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from triton.errors import TritonError

from ldm.kernels._common import CALLS, KERNEL_DTYPES, device_ok, interpreter_enabled

log = logging.getLogger(__name__)

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


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
def _attn_fwd(Q, K, V, O, LSE,
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
              H, NQ, NK, D, qk_scale,
              CAUSAL: tl.constexpr, IEEE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One BLOCK_M tile of queries against all keys: online softmax in the log2 domain (FA-2, alg. 1)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < NQ
    mask_d = offs_d < D

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < NK
        kt = tl.load(k_base + cols[None, :] * skn + offs_d[:, None] * skd,
                     mask=mask_n[None, :] & mask_d[:, None], other=0.0)  # (BLOCK_D, BLOCK_N) = Kᵀ
        s = _dot(q, kt, IEEE) * qk_scale
        valid = mask_n[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :] * svd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new

    o = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             o.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * NQ + offs_m, m_i + tl.math.log2(l_i), mask=mask_m)


@triton.jit
def _bwd_p_ds(q, kt, vt, do, lse, delta, offs_m, offs_n, mask_m, mask_n, qk_scale,
              CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of P, recomputed from the saved log-sum-exp, and dS = P ∘ (dP − Δ) (FA-2, alg. 2)."""
    s = _dot(q, kt, IEEE) * qk_scale
    valid = mask_m[:, None] & mask_n[None, :]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
    dp = _dot(do, vt, IEEE)
    return p, p * (dp - delta[:, None])


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   sdob, sdoh, sdom, sdod,
                   H, NQ, NK, D, qk_scale, sm_scale,
                   CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK, dV for one BLOCK_N tile of keys, recomputing P from the saved log-sum-exp (FA-2, alg. 2)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < NK
    mask_d = offs_d < D
    mask_nd = mask_n[:, None] & mask_d[None, :]

    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=mask_nd, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=mask_nd, other=0.0)
    kt = tl.trans(k)
    vt = tl.trans(v)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    row_base = pid_bh.to(tl.int64) * NQ

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
    for start_m in range(lo, NQ, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < NQ
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=mask_md, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdom + offs_d[None, :] * sdod, mask=mask_md, other=0.0)
        lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
        p, ds = _bwd_p_ds(q, kt, vt, do, lse, delta, offs_m, offs_n, mask_m, mask_n, qk_scale, CAUSAL, IEEE)
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)

    dk = dk * sm_scale
    dk_ptr = DK + pid_bh.to(tl.int64) * NK * D + offs_n[:, None] * D + offs_d[None, :]
    dv_ptr = DV + pid_bh.to(tl.int64) * NK * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(dk_ptr, dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(dv_ptr, dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 sdob, sdoh, sdom, sdod,
                 H, NQ, NK, D, qk_scale, sm_scale,
                 CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ for one BLOCK_M tile of queries (FA-2, alg. 2, the dQ loop as its own kernel: no atomics)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < NQ
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=mask_md, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
                 mask=mask_md, other=0.0)
    row_base = pid_bh.to(tl.int64) * NQ
    lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < NK
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=mask_nd, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=mask_nd, other=0.0)
        _, ds = _bwd_p_ds(q, tl.trans(k), tl.trans(v), do, lse, delta, offs_m, offs_n, mask_m, mask_n, qk_scale,
                          CAUSAL, IEEE)
        dq += _dot(ds.to(k.dtype), k, IEEE)

    dq = dq * sm_scale
    tl.store(DQ + pid_bh.to(tl.int64) * NQ * D + offs_m[:, None] * D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask_md)


def _blocks(block_d: int, dtype: torch.dtype, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): tiles that keep q/k/v and the fp32 accumulators on chip."""
    wide = dtype == torch.float32
    if backward:
        if block_d <= 64:
            return (64, 64, 4, 2) if not wide else (32, 32, 4, 1)
        if block_d <= 128:
            return (64, 32, 8, 2) if not wide else (32, 32, 4, 1)
        return (32, 16, 8, 1)
    if block_d <= 64:
        return (128, 64, 4, 3) if not wide else (64, 32, 4, 2)
    if block_d <= 128:
        return (128, 32, 8, 2) if not wide else (64, 32, 4, 1)
    return (64, 32, 8, 1) if not wide else (32, 16, 4, 1)


def _ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreter_enabled())


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def _shape_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        return False
    b, h, nq, d = q.shape
    return (k.shape[0] == b and k.shape[1] == h and k.shape[3] == d and 0 < d <= MAX_HEAD_DIM
            and nq > 0 and k.shape[2] > 0 and q.dtype == k.dtype == v.dtype and q.dtype in KERNEL_DTYPES
            and q.device == k.device == v.device)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
             explicit: bool = False) -> bool:
    """Whether `flash_attention` should run these inputs (explicit: backend "triton"; else the "auto" rule)."""
    if not _shape_ok(q, k, v) or not device_ok(q, explicit):
        return False
    if explicit:
        return True
    return q.dtype != torch.float32 and not causal and (q.device.type, q.shape[-1]) not in _BROKEN


# (device type, head dim) whose first launch failed to compile on this GPU; "auto" then uses SDPA.
_BROKEN: set[tuple[str, int]] = set()


def mark_broken(q: torch.Tensor, err: Exception) -> None:
    """Record a compile/resource failure so "auto" stops choosing Triton for this head dim (logged once)."""
    key = (q.device.type, q.shape[-1])
    if key not in _BROKEN:
        _BROKEN.add(key)
        log.warning("triton attention failed for head dim %d (%s); auto now uses SDPA for it", key[1], err)


def _launch_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, nq, d = q.shape
    nk = k.shape[2]
    block_d = max(16, triton.next_power_of_2(d))
    bm, bn, warps, stages = _blocks(block_d, q.dtype, backward=False)
    o = torch.empty((b, h, nq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b * h, nq), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(nq, bm), b * h)
    _attn_fwd[grid](q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                    h, nq, nk, d, d ** -0.5 * LOG2E,
                    CAUSAL=causal, IEEE=_ieee(q.dtype),
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    CALLS["attention_fwd"] += 1
    return o, lse


def _launch_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                do: torch.Tensor, causal: bool, need_q: bool, need_kv: bool
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    b, h, nq, d = q.shape
    nk = k.shape[2]
    block_d = max(16, triton.next_power_of_2(d))
    bm, bn, warps, stages = _blocks(block_d, q.dtype, backward=True)
    delta = (do.float() * o.float()).sum(-1).reshape(b * h, nq)  # rowsum(dO ∘ O), FA-2 eq. for D_i
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), h, nq, nk, d,
              d ** -0.5 * LOG2E, d ** -0.5)
    meta = dict(CAUSAL=causal, IEEE=_ieee(q.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
                num_warps=warps, num_stages=stages)
    dq = dk = dv = None
    if need_kv:
        dk = torch.empty((b, h, nk, d), dtype=k.dtype, device=k.device)
        dv = torch.empty((b, h, nk, d), dtype=v.dtype, device=v.device)
        _attn_bwd_dkdv[(triton.cdiv(nk, bn), b * h)](q, k, v, do, lse, delta, dk, dv, *common, **meta)
        CALLS["attention_bwd_dkdv"] += 1
    if need_q:
        dq = torch.empty((b, h, nq, d), dtype=q.dtype, device=q.device)
        _attn_bwd_dq[(triton.cdiv(nq, bm), b * h)](q, k, v, do, lse, delta, dq, *common, **meta)
        CALLS["attention_bwd_dq"] += 1
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal):  # type: ignore[override]
        o, lse = _launch_fwd(q, k, v, causal)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        q, k, v, o, lse = ctx.saved_tensors
        need_q = ctx.needs_input_grad[0]
        need_kv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dq, dk, dv = _launch_bwd(q, k, v, o, lse, do, ctx.causal, need_q, need_kv)
        return dq, (dk if ctx.needs_input_grad[1] else None), (dv if ctx.needs_input_grad[2] else None), None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(QKᵀ/√D)V by FlashAttention-2 in Triton, differentiable in q, k and v; (B, H, Nq, D) out."""
    if not _shape_ok(q, k, v):
        raise ValueError(f"flash_attention: unsupported q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} "
                         f"{k.dtype}, v {tuple(v.shape)} {v.dtype} (same dtype/device, D ≤ {MAX_HEAD_DIM})")
    return _FlashAttention.apply(q, k, v, causal)


__all__ = ["flash_attention", "supports", "mark_broken", "MAX_HEAD_DIM", "TritonError"]
