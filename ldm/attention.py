"""The one attention entry point: softmax(QKᵀ/√d)V with a reference path and fast backends."""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from ldm.errors import SettingError

log = logging.getLogger(__name__)

BACKENDS = ("math", "sdpa", "triton", "auto")
_default_backend: str | None = None


def set_backend(name: str | None) -> None:
    """Choose the process-wide default backend (None: $ONEWORD_ATTENTION, else "auto")."""
    global _default_backend
    if name is not None and name not in BACKENDS:
        raise SettingError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _default_backend = name


def current_backend() -> str:
    name = _default_backend or os.environ.get("ONEWORD_ATTENTION", "auto")
    if name not in BACKENDS:
        raise SettingError(f"ONEWORD_ATTENTION={name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Reference: QKᵀ and softmax in fp32 (also under autocast), (B, H, Nq, D) x (B, H, Nk, D) -> (B, H, Nq, D)."""
    scale = q.shape[-1] ** -0.5
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        if causal:
            nq, nk = scores.shape[-2:]
            future = torch.ones(nq, nk, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1), v.float())
    return out.to(q.dtype)


def _triton_kernels():
    """The Triton kernel module, or None where triton is not installed."""
    try:
        from ldm.kernels import attention as tk
    except ImportError:
        return None
    return tk


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str | None = None, causal: bool = False
) -> torch.Tensor:
    """Scaled dot-product attention (Vaswani et al. 2017); q (B, H, Nq, D), k/v (B, H, Nk, D).

    Non-causal unless `causal=True` (the CLIP text towers' mask). "triton" runs the Triton kernels wherever they
    can run (errors reach the caller); "auto" runs them only where `ldm.kernels.routing` has a recorded GPU
    measurement showing them faster than SDPA and their warm-up passed, else SDPA.
    """
    name = backend or current_backend()
    if name == "math":
        return attention_math(q, k, v, causal)
    if name in ("triton", "auto"):
        tk = _triton_kernels()
        if tk is None and name == "triton":
            raise RuntimeError("attention backend 'triton' needs the triton package (pip install triton)")
        if tk is not None and name == "triton":
            if tk.supports(q, k, v, causal=causal, explicit=True):
                return tk.flash_attention(q, k, v, causal=causal)
            log.debug(
                "triton attention does not support %s/%s/%s causal=%s; using sdpa",
                tuple(q.shape),
                tuple(k.shape),
                q.dtype,
                causal,
            )
        elif tk is not None and tk.supports(q, k, v, causal=causal, explicit=True):
            from ldm.kernels import routing

            key = routing.attention_key(q, causal)
            if key is not None:
                try:
                    return tk.flash_attention(q, k, v, causal=causal, fallback=key)
                except Exception as err:  # a toolchain failure the warm-up missed: SDPA from now on
                    routing.failed(key, err, "SDPA")
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
