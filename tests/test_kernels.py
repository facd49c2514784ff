"""Triton kernels against their reference twins: attention (fwd+bwd), GroupNorm+SiLU, GEGLU; dispatch rules.

On a machine without CUDA these run under TRITON_INTERPRET=1 (set in conftest.py), so shapes stay small.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from ldm import attention as attn_mod  # noqa: E402
from ldm.attention import attention, attention_math  # noqa: E402
from ldm.kernels import _common  # noqa: E402
from ldm.kernels.attention import flash_attention, supports  # noqa: E402
from ldm.kernels.geglu import geglu, geglu_reference  # noqa: E402
from ldm.kernels.norm import group_norm, group_norm_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not _common.interpreter_enabled():
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: Triton kernels cannot run here", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
CALLS = _common.CALLS


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|, in fp32."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def _attention_case(d: int, nq: int, nk: int, heads: int, dtype: torch.dtype, causal: bool = False) -> dict:
    """Triton and fp32-math outputs and gradients for one random case."""
    g = torch.Generator().manual_seed(d * 1000 + nq + nk)
    q, k, v = (randn(1, heads, n, d, gen=g, dtype=dtype).requires_grad_() for n in (nq, nk, nk))
    do = randn(1, heads, nq, d, gen=g, dtype=dtype)
    before = CALLS["attention_fwd"]
    out = flash_attention(q, k, v, causal=causal)
    assert CALLS["attention_fwd"] == before + 1
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention_math(*ref_in, causal=causal)
    ref_grads = torch.autograd.grad(ref, ref_in, do.float())
    return {"out": (out, ref), **{n: (a, b) for n, a, b in zip("qkv", grads, ref_grads)}}


@pytest.mark.parametrize("nq,nk", [(130, 130), (96, 77)], ids=["self130", "cross96x77"])
@pytest.mark.parametrize("d", [40, 64, 80, 160])
def test_attention_fp32_matches_math(d: int, nq: int, nk: int) -> None:
    case = _attention_case(d, nq, nk, heads=2, dtype=torch.float32)
    for name, (got, want) in case.items():
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert rel_err(got, want) <= TOL[torch.float32], name


@pytest.mark.parametrize("nq,nk", [(130, 130), (96, 77)], ids=["self130", "cross96x77"])
@pytest.mark.parametrize("d", [40, 64, 80, 160])
def test_attention_bf16_matches_math(d: int, nq: int, nk: int) -> None:
    case = _attention_case(d, nq, nk, heads=1, dtype=torch.bfloat16)
    for name, (got, want) in case.items():
        assert got.dtype == torch.bfloat16
        assert rel_err(got, want) <= TOL[torch.bfloat16], name


def test_attention_fp16_and_causal() -> None:
    for dtype in (torch.float16, torch.float32):
        case = _attention_case(64, 70, 70, heads=1, dtype=dtype, causal=True)
        for name, (got, want) in case.items():
            assert rel_err(got, want) <= TOL[dtype], (dtype, name)


def test_attention_strided_inputs_and_kv_only_grad() -> None:
    """(B, N, H, D) views transposed to (B, H, N, D), as the UNet passes them; dQ skipped when not needed."""
    g = torch.Generator().manual_seed(7)
    b, h, nq, nk, d = 2, 2, 33, 77, 40
    q = randn(b, nq, h, d, gen=g).transpose(1, 2)
    kv = randn(b, nk, 2 * h * d, gen=g).requires_grad_()
    k = kv[..., : h * d].view(b, nk, h, d).transpose(1, 2)
    v = kv[..., h * d :].view(b, nk, h, d).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    do = randn(b, h, nq, d, gen=g)
    dq_before = CALLS["attention_bwd_dq"]
    dkdv_before = CALLS["attention_bwd_dkdv"]
    out = attention(q, k, v, backend="triton")
    (gkv,) = torch.autograd.grad(out, kv, do)
    assert CALLS["attention_bwd_dkdv"] == dkdv_before + 1
    assert CALLS["attention_bwd_dq"] == dq_before  # q needs no gradient (textual inversion's cross-attn)
    kv32 = kv.detach().clone().requires_grad_()
    k32 = kv32[..., : h * d].view(b, nk, h, d).transpose(1, 2)
    v32 = kv32[..., h * d :].view(b, nk, h, d).transpose(1, 2)
    ref = attention_math(q, k32, v32)
    (rkv,) = torch.autograd.grad(ref, kv32, do)
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(gkv, rkv) <= 1e-5
    assert out.transpose(1, 2).is_contiguous()  # written as (B, N, H, D): the UNet merges heads without a copy


def test_attention_unaligned_pointers_and_strides() -> None:
    """Alignment is only declared when the host checked it: an odd pointer offset and a head dim of 18 still match."""
    from ldm.kernels.attention import _align

    g = torch.Generator().manual_seed(9)
    flat = randn(1 + 2 * 3 * 24 * 16, gen=g)
    q = flat[1:].view(2, 3, 24, 16)  # 4-byte offset: not 16-byte aligned
    k, v = (randn(2, 3, 30, 18, gen=g)[..., :16] for _ in range(2))  # row stride 18 elements
    assert _align(q) == 1 and _align(k) == 1 and _align(randn(2, 3, 30, 16, gen=g)) == 4
    for qq, kk, vv in ((q, q, q), (q, k, v)):
        leaves = [t.detach().clone().requires_grad_() for t in (qq, kk, vv)]
        out = flash_attention(*leaves)
        ref_in = [t.detach().clone().requires_grad_() for t in (qq, kk, vv)]
        ref = attention_math(*ref_in)
        do = torch.ones_like(ref)
        for got, want in zip(torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, ref_in, do)):
            assert rel_err(got, want) <= 1e-5
        assert rel_err(out, ref) <= 1e-5


def test_dispatcher_really_runs_triton() -> None:
    """backend="triton" launches the kernel (counter moves); "math" and CPU "auto" do not."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (randn(1, 2, 20, 16, gen=g) for _ in range(3))
    before = CALLS["attention_fwd"]
    out = attention(q, k, v, backend="triton")
    assert CALLS["attention_fwd"] == before + 1
    assert rel_err(out, attention_math(q, k, v)) <= 1e-5
    attention(q, k, v, backend="math")
    attention(q, k, v, backend="sdpa")
    if not CUDA:
        attention(q, k, v, backend="auto")  # CPU auto is SDPA, never the interpreter
    assert CALLS["attention_fwd"] == before + 1
    try:
        attn_mod.set_backend("triton")
        attention(q, k, v)
        assert CALLS["attention_fwd"] == before + 2
    finally:
        attn_mod.set_backend(None)


def test_supports_rules() -> None:
    def qkv(d: int, dtype: torch.dtype = torch.float16, nk: int = 77, heads: int = 8) -> tuple[torch.Tensor, ...]:
        return (
            torch.zeros(1, heads, 64, d, dtype=dtype, device=DEVICE),
            torch.zeros(1, heads, nk, d, dtype=dtype, device=DEVICE),
            torch.zeros(1, heads, nk, d, dtype=dtype, device=DEVICE),
        )

    for d in (40, 64, 80, 160, 256):
        assert supports(*qkv(d), explicit=True)
    assert not supports(*qkv(512, heads=1), explicit=True)  # the VAE's single head goes to SDPA
    assert not supports(*qkv(64, dtype=torch.float64), explicit=True)
    assert not supports(*qkv(64, nk=0), explicit=True)
    q, k, v = qkv(64)
    assert not supports(q, k.float(), v, explicit=True)  # mixed dtypes
    assert not supports(q, k[..., :32], v[..., :32], explicit=True)  # head dims differ
    assert supports(q, k, v, causal=True, explicit=True)
    if not CUDA:
        assert not supports(q, k, v)  # auto on CPU: never the interpreter


def test_head_dim_split_and_tiles() -> None:
    """Head dims split into ≤ 2 power-of-two chunks; SD's 80/160 carry no padding, 40 only 8 columns."""
    from ldm.kernels.attention import split_head_dim, tiles

    assert {d: split_head_dim(d) for d in (40, 64, 80, 160, 256, 8, 100)} == {
        40: (32, 16),
        64: (64, 0),
        80: (64, 16),
        160: (128, 32),
        256: (256, 0),
        8: (16, 0),
        100: (64, 64),
    }
    for d in (40, 64, 80, 160):
        for cc in (80, 90):
            for kind in ("fwd", "dkdv", "dq"):
                bm, bn, warps, stages = tiles(d, torch.float16, kind, cc)
                assert stages >= 2  # cp.async pipelining needs two or more stages
                if cc == 90:
                    assert bm >= 64 and (kind == "fwd" or bn >= 64)  # wgmma: 64-row tiles in every dot


def _measured(arch: str, d: int, triton_ms: float, sdpa_ms: float):
    from ldm.kernels import routing

    return routing.Measured(arch, "float16", d, triton_ms, sdpa_ms, 2 * triton_ms, 2 * sdpa_ms, "test GPU", "today")


def test_auto_routing_follows_recorded_measurements(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "auto" picks Triton attention only for a recorded row where it beat SDPA (and never causal or fp32)."""
    from ldm.kernels import routing

    q = torch.zeros(1, 2, 16, 40, dtype=torch.float16)
    assert routing.MEASURED == ()  # nothing measured on a GPU yet: auto is SDPA everywhere
    assert routing.attention_key(q, causal=False) is None  # CPU is never eligible
    monkeypatch.setattr(routing, "eligible", lambda t: True)
    monkeypatch.setattr(routing, "_WARM", {})
    monkeypatch.setattr(routing, "warm", lambda key, check, fallback: True)
    assert routing.attention_key(q, causal=False) is None  # eligible, but no measurement
    monkeypatch.setattr(routing, "MEASURED", (_measured("cpu", 40, 1.0, 2.0), _measured("cpu", 64, 2.0, 1.0)))
    assert routing.attention_key(q, causal=False) == ("attention", "cpu", "float16", 40)
    assert routing.attention_key(q, causal=True) is None
    assert routing.attention_key(q.float(), causal=False) is None
    assert routing.attention_key(torch.zeros(1, 2, 16, 64, dtype=torch.float16), causal=False) is None  # slower
    assert routing.attention_key(torch.zeros(1, 2, 16, 80, dtype=torch.float16), causal=False) is None


@pytest.mark.parametrize("broken", ["_launch_fwd", "_launch_bwd"])
def test_auto_falls_back_once_when_a_kernel_fails_to_compile(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, broken: str
) -> None:
    """A forward or backward compile failure under "auto": one warning line, SDPA results, no retry; "triton" raises."""
    from ldm.kernels import attention as tk
    from ldm.kernels import routing

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("PassManager::run failed\n(a second line the warning leaves out)")

    monkeypatch.setattr(tk, broken, fail)
    monkeypatch.setattr(routing, "_WARM", {})
    monkeypatch.setattr(routing, "eligible", lambda t: True)
    monkeypatch.setattr(routing, "MEASURED", (_measured("cpu", 24, 1.0, 2.0),))
    g = torch.Generator().manual_seed(2)
    q, k, v = (randn(1, 2, 20, 24, gen=g, dtype=torch.float16) for _ in range(3))
    before = CALLS.copy()
    with caplog.at_level("WARNING", logger="ldm.kernels.routing"):
        out = attention(q, k, v, backend="auto")
        again = attention(q, k, v, backend="auto")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "warm-up" in warnings[0] and "PassManager::run failed" in warnings[0]
    assert "\n" not in warnings[0] and "SDPA" in warnings[0]
    assert routing._WARM == {("attention", "cpu", "float16", 24): False}
    assert CALLS["attention_fwd"] - before["attention_fwd"] <= 1  # the warm-up's own launch at most
    assert rel_err(out, attention_math(q, k, v)) <= 5e-3 and torch.equal(out, again)
    with pytest.raises(RuntimeError, match="PassManager"):  # explicit: the error reaches the user
        attention(q.requires_grad_(), k, v, backend="triton").float().sum().backward()


def test_auto_backward_failure_after_warm_up_uses_reference_gradients(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from ldm.kernels import attention as tk
    from ldm.kernels import routing

    monkeypatch.setattr(routing, "_WARM", {})
    monkeypatch.setattr(routing, "eligible", lambda t: True)
    monkeypatch.setattr(routing, "MEASURED", (_measured("cpu", 16, 1.0, 2.0),))
    g = torch.Generator().manual_seed(4)
    q, k, v = (randn(1, 2, 20, 16, gen=g, dtype=torch.float16).requires_grad_() for _ in range(3))
    before = CALLS["attention_fwd"]
    out = attention(q, k, v, backend="auto")
    assert CALLS["attention_fwd"] == before + 2  # warm-up + this call: Triton chosen

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(tk, "_launch_bwd", fail)
    do = randn(1, 2, 20, 16, gen=g, dtype=torch.float16)
    with caplog.at_level("WARNING", logger="ldm.kernels.routing"):
        grads = torch.autograd.grad(out, (q, k, v), do)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(attention_math(*ref_in), ref_in, do.float())
    assert all(rel_err(a, b) <= 5e-3 for a, b in zip(grads, ref_grads))
    assert "shared memory" in caplog.text and routing._WARM[("attention", "cpu", "float16", 16)] is False


def test_auto_norm_and_geglu_fall_back_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from ldm.kernels import geglu as geglu_mod
    from ldm.kernels import norm as norm_mod
    from ldm.kernels import routing

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot find Python.h")

    monkeypatch.setattr(routing, "_WARM", {})
    monkeypatch.setattr(routing, "eligible", lambda t: True)
    monkeypatch.setattr(_common, "device_ok", lambda t, explicit: True)
    monkeypatch.setattr(norm_mod._GroupNormSiLU, "backward", staticmethod(fail))
    monkeypatch.setattr(geglu_mod, "_geglu_fwd", None)  # indexing None fails like a missing kernel
    g = torch.Generator().manual_seed(8)
    x, h = randn(2, 8, 4, 4, gen=g), randn(3, 2 * 24, gen=g)
    with caplog.at_level("WARNING", logger="ldm.kernels.routing"):
        for _ in range(2):
            y = group_norm(x, None, None, 4, 1e-5, silu=True, backend="auto")
            z = geglu(h, backend="auto")
    assert torch.equal(y, group_norm_reference(x, None, None, 4, 1e-5, True))
    assert torch.equal(z, geglu_reference(h))
    assert len(caplog.records) == 2 and "Python.h" in caplog.records[0].getMessage()
    assert set(routing._WARM.values()) == {False} and len(routing._WARM) == 2


def test_autograd_function_compiles_without_graph_breaks_or_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile(fullgraph=True) traces the autograd.Function (launches stubbed with torch ops: Dynamo cannot
    trace the CPU interpreter); the launch counters record nothing inside the compiled graph, and do eagerly."""
    from ldm.kernels import attention as tk

    def fwd(q, k, v, causal):
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v, q.new_zeros(q.shape[0] * q.shape[1], q.shape[2])

    def bwd(q, k, v, o, lse, do, causal, need_q, need_kv):
        return do * 2, k * 0, v * 0

    monkeypatch.setattr(tk, "_launch_fwd", fwd)
    monkeypatch.setattr(tk, "_launch_bwd", bwd)
    q, k, v = (torch.randn(1, 2, 8, 16).requires_grad_() for _ in range(3))
    before = CALLS.copy()
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda q, k, v: tk._FlashAttention.apply(q, k, v, False, None), backend="eager", fullgraph=True
    )
    out = compiled(q, k, v)
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(dq, torch.full_like(q, 2.0))
    assert CALLS["attention_fwd"] == before["attention_fwd"]
    torch._dynamo.reset()
    tk._FlashAttention.apply(q, k, v, False, None)
    assert CALLS["attention_fwd"] == before["attention_fwd"] + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "shape,groups,silu",
    [((2, 16, 9, 7), 4, True), ((1, 8, 20), 2, False), ((1, 64, 3, 3), 32, True)],
    ids=["4d_silu", "3d", "g32"],
)
@pytest.mark.parametrize("chunk", [16384, 48], ids=["one_chunk", "split"])
def test_group_norm_matches_reference(
    dtype: torch.dtype, shape: tuple[int, ...], groups: int, silu: bool, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chunk 48: every group's statistics and every channel's backward sums are split over several programs."""
    from ldm.kernels import norm as norm_mod

    monkeypatch.setattr(norm_mod, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(sum(shape))
    x = randn(*shape, gen=g, dtype=dtype, scale=3.0).add(1.0).requires_grad_()
    w = randn(shape[1], gen=g).requires_grad_()  # fp32 affine on bf16 activations, as GroupNorm32 runs
    b = randn(shape[1], gen=g).requires_grad_()
    dy = randn(*shape, gen=g, dtype=dtype)
    before = (CALLS["group_norm_fwd"], CALLS["group_norm_bwd"])
    y = group_norm(x, w, b, groups, 1e-5, silu=silu, backend="triton")
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    assert (CALLS["group_norm_fwd"], CALLS["group_norm_bwd"]) == (before[0] + 1, before[1] + 1)
    ref_in = [t.detach().float().requires_grad_() for t in (x, w, b)]
    ref = group_norm_reference(*ref_in[:1], ref_in[1], ref_in[2], groups, 1e-5, silu)
    rx, rw, rb = torch.autograd.grad(ref, ref_in, dy.float())
    assert y.dtype == dtype and gx.dtype == dtype and gw.dtype == torch.float32
    tol = TOL[dtype]
    for name, got, want in (("y", y, ref), ("dx", gx, rx), ("dw", gw, rw), ("db", gb, rb)):
        assert rel_err(got, want) <= tol, name


def test_group_norm_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    x = randn(1, 8, 4, 4, gen=g)
    before = CALLS["group_norm_fwd"]
    want = group_norm_reference(x, None, None, 4, 1e-6, silu=True)
    assert torch.equal(group_norm(x, None, None, 4, 1e-6, silu=True, backend="math"), want)
    monkeypatch.setenv("ONEWORD_KERNELS", "math")
    group_norm(x, None, None, 4, 1e-6)
    assert CALLS["group_norm_fwd"] == before
    monkeypatch.setenv("ONEWORD_KERNELS", "triton")
    got = group_norm(x, None, None, 4, 1e-6, silu=True)  # no affine: unit weight, zero bias
    assert CALLS["group_norm_fwd"] == before + 1
    assert rel_err(got, want) <= 1e-5
    monkeypatch.setenv("ONEWORD_KERNELS", "fast")
    with pytest.raises(ValueError, match="ONEWORD_KERNELS"):
        group_norm(x, None, None, 4, 1e-6)
    with pytest.raises(ValueError, match="groups"):
        group_norm(x, None, None, 3, 1e-6, backend="math")
    if not CUDA:
        monkeypatch.setenv("ONEWORD_KERNELS", "auto")
        group_norm(x, None, None, 4, 1e-6)  # CPU auto: the reference
        assert CALLS["group_norm_fwd"] == before + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_geglu_matches_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    h = randn(2, 37, 2 * 80, gen=g, dtype=dtype, scale=2.0).requires_grad_()
    dy = randn(2, 37, 80, gen=g, dtype=dtype)
    before = (CALLS["geglu_fwd"], CALLS["geglu_bwd"])
    y = geglu(h, backend="triton")
    (gh,) = torch.autograd.grad(y, h, dy)
    assert (CALLS["geglu_fwd"], CALLS["geglu_bwd"]) == (before[0] + 1, before[1] + 1)
    h32 = h.detach().float().requires_grad_()
    ref = geglu_reference(h32)
    (rh,) = torch.autograd.grad(ref, h32, dy.float())
    assert y.shape == (2, 37, 80) and y.dtype == dtype
    assert rel_err(y, ref) <= TOL[dtype] and rel_err(gh, rh) <= TOL[dtype]
    a, gate = h32.detach().chunk(2, -1)  # the twin is the SD formula: a · GELU_erf(gate)
    assert torch.allclose(ref, a * 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2))), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="even"):
        geglu(h[..., :-1], backend="math")


def test_tiny_unet_triton_matches_math() -> None:
    """A tiny random UNet gives the same ε and the same context gradient with Triton and math attention."""
    unet_mod = pytest.importorskip("ldm.unet", reason="ldm/unet.py not written yet")
    from ldm.config import tiny

    params = tiny().unet
    torch.manual_seed(0)
    model = unet_mod.UNetModel(**params).to(DEVICE).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # perturb zero-initialised proj_out/out layers so attention reaches the output
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(DEVICE) * 0.1)
    model.requires_grad_(False)
    x = randn(1, params["in_channels"], 8, 8, gen=g)  # 64 + 16 tokens: the interpreter is slow
    t = torch.tensor([500], device=DEVICE)
    ctx = randn(1, 77, params["context_dim"], gen=g)
    results = {}
    try:
        for name in ("math", "triton"):
            attn_mod.set_backend(name)
            c = ctx.clone().requires_grad_()
            before = CALLS["attention_fwd"]
            eps = model(x, t, c)
            (gc,) = torch.autograd.grad(eps.square().mean(), c)
            results[name] = (eps, gc, CALLS["attention_fwd"] - before)
    finally:
        attn_mod.set_backend(None)
    assert results["math"][2] == 0 and results["triton"][2] > 0
    assert rel_err(results["triton"][0], results["math"][0]) <= 1e-5
    assert rel_err(results["triton"][1], results["math"][1]) <= 1e-5
