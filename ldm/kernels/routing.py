"""Which inputs backend "auto" gives the Triton kernels: recorded GPU measurements, then a warm-up that must pass.

Contract
  * Attention: "auto" runs Triton only for a (GPU architecture, dtype, head dim) with a row in `MEASURED` whose
    Triton times are no slower than torch SDPA's, forward and forward+backward, measured by `bench/attention.py`
    on that architecture and recorded in bench/RESULTS.md. Every other case goes to SDPA — all of them until a GPU
    run records rows. Causal attention (the CLIP towers: 77 tokens, launch-bound) and fp32 never route here.
  * GroupNorm(+SiLU) and GEGLU: "auto" runs Triton on CUDA (the alternative is the unfused reference, several
    passes over memory, not a vendor kernel), subject to the same warm-up.
  * The first "auto" use of a configuration in a process compiles and runs its forward and backward on a small
    input inside `except Exception` and checks them against the reference. Any failure — a Triton or MLIR compile
    error, a missing C compiler or Python.h, too little shared memory, a wrong result — logs one warning line, and
    the configuration uses the fallback for the rest of the process; so does a later launch failure (`failed`).
  * Inside a torch.compile trace nothing is warmed (an exception there could not be caught at run time): only
    configurations already warmed eagerly go to Triton.
  * Explicit backends ("triton") never come here: their errors reach the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)


class Measured(NamedTuple):
    """One `bench/attention.py` row: milliseconds per call, forward and forward+backward, at the UNet's shapes."""

    arch: str  # "sm_90"
    dtype: str  # "float16" / "bfloat16"
    head_dim: int
    triton_fwd_ms: float
    sdpa_fwd_ms: float
    triton_fwdbwd_ms: float
    sdpa_fwdbwd_ms: float
    gpu: str
    date: str


# Filled from a GPU run of bench/gpu.sh (`python -m bench.attention --routes` prints the rows); none recorded yet.
MEASURED: tuple[Measured, ...] = ()

# configuration key -> True (warmed, use Triton) / False (failed, use the fallback)
_WARM: dict[tuple, bool] = {}
_ARCH: dict[int, str] = {}


def arch(device: torch.device) -> str:
    """ "sm_XY" of a CUDA device, else the device type."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARCH:
        major, minor = torch.cuda.get_device_capability(index)
        _ARCH[index] = f"sm_{major}{minor}"
    return _ARCH[index]


def eligible(t: torch.Tensor) -> bool:
    """Devices "auto" may run Triton on: CUDA (the interpreter is for tests, never chosen automatically)."""
    return t.device.type == "cuda"


def measured_faster(arch_name: str, dtype: torch.dtype, head_dim: int) -> Measured | None:
    """The recorded row showing Triton attention no slower than SDPA for this configuration, or None."""
    name = str(dtype).removeprefix("torch.")
    for row in MEASURED:
        if (
            (row.arch, row.dtype, row.head_dim) == (arch_name, name, head_dim)
            and row.triton_fwd_ms <= row.sdpa_fwd_ms
            and row.triton_fwdbwd_ms <= row.sdpa_fwdbwd_ms
        ):
            return row
    return None


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


def warm(key: tuple, check: Callable[[], None], fallback: str) -> bool:
    """Whether configuration `key` may use Triton: runs `check` once per process, warning once if it raises."""
    state = _WARM.get(key)
    if state is not None:
        return state
    if torch.compiler.is_compiling():
        return False
    try:
        check()
    except Exception as err:  # any failure of a compiler toolchain we do not control: fall back, say so once
        _WARM[key] = False
        log.warning(
            "triton %s failed its warm-up (%s); using %s for it in this process",
            "/".join(map(str, key)),
            _one_line(err),
            fallback,
        )
        return False
    _WARM[key] = True
    return True


def failed(key: tuple, err: BaseException, fallback: str) -> None:
    """A launch of a warmed configuration failed: warn once and use the fallback from now on."""
    if _WARM.get(key) is not False:
        log.warning(
            "triton %s failed (%s); using %s for it in this process", "/".join(map(str, key)), _one_line(err), fallback
        )
    _WARM[key] = False


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    tol = {torch.float16: 1e-2, torch.bfloat16: 4e-2}.get(got.dtype, 1e-4)
    got, want = got.detach().float(), want.detach().float()
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    if not err <= tol:
        raise RuntimeError(f"{what} differs from the reference by {err:.2e} (limit {tol:.0e})")


def _small(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_()


def _check_attention(device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    from ldm.attention import attention_math
    from ldm.kernels.attention import flash_attention

    q, k, v = (_small((1, 2, n, head_dim), device, dtype, s) for s, n in ((0, 80), (1, 77), (2, 77)))
    do = _small((1, 2, 80, head_dim), device, dtype, 3).detach()
    out = flash_attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention_math(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, do.float())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        _close(got, want, f"attention {name}")


def attention_key(q: torch.Tensor, causal: bool) -> tuple | None:
    """The routing key when "auto" should run Triton attention on these inputs, else None (use SDPA)."""
    if causal or not eligible(q) or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    key = ("attention", arch(q.device), str(q.dtype).removeprefix("torch."), q.shape[-1])
    if measured_faster(key[1], q.dtype, q.shape[-1]) is None:
        return None
    return key if warm(key, lambda: _check_attention(q.device, q.dtype, q.shape[-1]), "SDPA") else None


def _check_group_norm(device: torch.device, dtype: torch.dtype, wdtype: torch.dtype, silu: bool) -> None:
    from ldm.kernels.norm import _GroupNormSiLU, group_norm_reference

    x = _small((2, 8, 5, 7), device, dtype, 0)
    w, b = _small((8,), device, wdtype, 1), _small((8,), device, wdtype, 2)
    dy = _small((2, 8, 5, 7), device, dtype, 3).detach()
    y = _GroupNormSiLU.apply(x, w, b, 4, 1e-5, silu)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    ref_in = [t.detach().float().requires_grad_() for t in (x, w, b)]
    ref = group_norm_reference(ref_in[0], ref_in[1], ref_in[2], 4, 1e-5, silu)
    ref_grads = torch.autograd.grad(ref, ref_in, dy.float())
    for name, got, want in zip(("y", "dx", "dw", "db"), (y, *grads), (ref, *ref_grads)):
        _close(got, want, f"group_norm {name}")


def group_norm_key(x: torch.Tensor, weight: torch.Tensor, silu: bool) -> tuple | None:
    """The routing key when "auto" should run the fused GroupNorm on x, else None (use the reference)."""
    if not eligible(x):
        return None
    key = (
        "group_norm",
        arch(x.device),
        str(x.dtype).removeprefix("torch."),
        str(weight.dtype).removeprefix("torch."),
        "silu" if silu else "plain",
    )
    ok = warm(key, lambda: _check_group_norm(x.device, x.dtype, weight.dtype, silu), "the reference")
    return key if ok else None


def _check_geglu(device: torch.device, dtype: torch.dtype) -> None:
    from ldm.kernels.geglu import _GEGLU, geglu_reference

    h = _small((3, 5, 2 * 40), device, dtype, 0)
    dy = _small((3, 5, 40), device, dtype, 1).detach()
    y = _GEGLU.apply(h)
    (gh,) = torch.autograd.grad(y, h, dy)
    h32 = h.detach().float().requires_grad_()
    ref = geglu_reference(h32)
    (rh,) = torch.autograd.grad(ref, h32, dy.float())
    _close(y, ref, "geglu y")
    _close(gh, rh, "geglu dh")


def geglu_key(h: torch.Tensor) -> tuple | None:
    """The routing key when "auto" should run the fused GEGLU on h, else None (use the reference)."""
    if not eligible(h):
        return None
    key = ("geglu", arch(h.device), str(h.dtype).removeprefix("torch."))
    return key if warm(key, lambda: _check_geglu(h.device, h.dtype), "the reference") else None


__all__ = [
    "MEASURED",
    "Measured",
    "arch",
    "attention_key",
    "group_norm_key",
    "geglu_key",
    "warm",
    "failed",
    "measured_faster",
]
