"""UNet and VAE routed through the fused kernels: Triton equals the math path; keys and fp32 numerics unchanged.

On a machine without CUDA the Triton kernels run under TRITON_INTERPRET=1 (conftest.py), so the models are tiny
and the latents 8×8.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ldm.attention as attn_mod
from ldm.config import tiny
from ldm.kernels import _common
from ldm.layers import GroupNorm32, NormSiLUSequential
from ldm.precision import CudaGraphStep, check_precision_policy, maybe_compile, to_channels_last
from ldm.unet import GEGLU, CrossAttention, ResBlock, SpatialTransformer, UNetModel
from ldm.vae import AttnBlock, AutoencoderKL, ResnetBlock

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CALLS = _common.CALLS
TRITON_RUNS = _common.triton_available() and (CUDA or _common.interpreter_enabled())
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="needs triton and CUDA or TRITON_INTERPRET=1")


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # conftest.py


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|, in fp32."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def perturb(model: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """Add noise to every parameter so zero-initialised outputs and unit norms are exercised too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * scale)
    return model


def run_backends(monkeypatch: pytest.MonkeyPatch, fn) -> dict[str, tuple]:
    """fn() under math kernels + math attention, then Triton kernels + Triton attention; CALLS deltas too."""
    results = {}
    try:
        for name in ("math", "triton"):
            monkeypatch.setenv("ONEWORD_KERNELS", name)
            attn_mod.set_backend(name)
            before = CALLS.copy()
            out = fn()
            results[name] = (out, CALLS - before)
    finally:
        attn_mod.set_backend(None)
    return results


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@needs_triton
def test_unet_triton_matches_math_forward_and_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    params = dict(tiny().unet, channel_mult=[1], attention_resolutions=[1])  # one level: 5 ResBlocks, 4 STs
    torch.manual_seed(0)
    model = perturb(UNetModel(**params), seed=1).to(DEVICE).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=g).to(DEVICE)  # 64 + 16 tokens: the interpreter is slow
    ctx = torch.randn(1, 5, params["context_dim"], generator=g).to(DEVICE)
    t = torch.tensor([321], device=DEVICE)

    def step():
        model.zero_grad(set_to_none=True)
        c = ctx.clone().requires_grad_()
        eps = model(x, t, c)
        eps.square().mean().backward()
        return eps.detach(), c.grad, {n: p.grad for n, p in model.named_parameters()}

    res = run_backends(monkeypatch, step)
    (eps_m, gc_m, gp_m), calls_m = res["math"]
    (eps_t, gc_t, gp_t), calls_t = res["triton"]
    assert not calls_m  # the math run launched no Triton kernel
    n_res, n_st, n_ff = count(model, ResBlock), count(model, SpatialTransformer), count(model, GEGLU)
    assert calls_t["group_norm_silu_fwd"] == calls_t["group_norm_silu_bwd"] == 2 * n_res + 1  # + out.0
    assert calls_t["group_norm_fwd"] == 2 * n_res + 1 + n_st  # SpatialTransformer.norm: no SiLU
    assert calls_t["geglu_fwd"] == calls_t["geglu_bwd"] == n_ff > 0
    assert calls_t["attention_fwd"] == 2 * n_ff and calls_t["attention_bwd_dkdv"] == 2 * n_ff
    errs = {"eps": rel_err(eps_t, eps_m), "context grad": rel_err(gc_t, gc_m)}
    # biases added right before a one-channel-per-group GroupNorm have zero gradient up to rounding: skip those
    floor = 1e-5 * max(g.abs().max() for g in gp_m.values())
    errs.update({n: rel_err(gp_t[n], g) for n, g in gp_m.items() if g.abs().max() > floor})
    assert len(errs) > 0.8 * len(gp_m)
    print(
        f"UNet triton vs math: eps {errs['eps']:.2e}, context grad {errs['context grad']:.2e}, "
        f"worst parameter grad {max(errs.values()):.2e}"
    )
    assert max(errs.values()) <= 1e-5, max(errs, key=errs.get)


@needs_triton
def test_vae_triton_matches_math_forward_and_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny().vae
    config["ddconfig"] = dict(config["ddconfig"], ch_mult=[1], resolution=8)  # one level: 7 ResnetBlocks
    torch.manual_seed(0)
    model = perturb(AutoencoderKL(**config), seed=3, scale=0.05).to(DEVICE).eval()
    image = (torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1).to(DEVICE)

    def roundtrip():
        x = image.clone().requires_grad_()
        post = model.encode(x)
        rec = model.decode(post.mean)
        rec.square().mean().backward()
        return post.mean.detach(), rec.detach(), x.grad

    res = run_backends(monkeypatch, roundtrip)
    (mean_m, rec_m, gx_m), calls_m = res["math"]
    (mean_t, rec_t, gx_t), calls_t = res["triton"]
    assert not calls_m and mean_t.shape == (1, 4, 8, 8)
    n_res, n_attn = count(model, ResnetBlock), count(model, AttnBlock)
    assert calls_t["group_norm_silu_fwd"] == calls_t["group_norm_silu_bwd"] == 2 * n_res + 2  # + 2 norm_out
    assert calls_t["group_norm_fwd"] == 2 * n_res + 2 + n_attn  # the attention norms: no SiLU
    assert calls_t["attention_fwd"] == n_attn == 2 and calls_t["geglu_fwd"] == 0
    errs = {"mean": rel_err(mean_t, mean_m), "recon": rel_err(rec_t, rec_m), "x grad": rel_err(gx_t, gx_m)}
    print("VAE triton vs math: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= 1e-5, errs


def test_reference_path_is_the_original_formula() -> None:
    """fp32 math path: bit-for-bit the pre-fusion GroupNorm32 → SiLU and x·GELU(gate); float64 stays float64."""
    g = torch.Generator().manual_seed(5)
    gn = GroupNorm32(32, 64, eps=1e-5)
    with torch.no_grad():
        gn.weight.normal_(generator=g)
        gn.bias.normal_(generator=g)
    x = torch.randn(2, 64, 5, 3, generator=g) * 3 + 1
    plain = F.group_norm(x, 32, gn.weight, gn.bias, 1e-5)
    assert torch.equal(gn(x), plain)
    assert torch.equal(gn.forward_silu(x), F.silu(plain))
    seq = NormSiLUSequential(gn, nn.SiLU(), nn.Identity())
    assert torch.equal(seq(x), nn.Sequential(*seq)(x))
    x64 = x.double()
    want64 = F.group_norm(x64, 32, gn.weight.double(), gn.bias.double(), 1e-5)
    assert gn.double().forward_silu(x64).dtype == torch.float64
    assert torch.allclose(gn.forward_silu(x64), F.silu(want64), rtol=0, atol=1e-12)

    ff = GEGLU(16, 24)
    h = torch.randn(3, 7, 16, generator=g)
    a, gate = ff.proj(h).chunk(2, dim=-1)
    assert torch.equal(ff(h), a * F.gelu(gate))


def test_keys_and_layout_unchanged() -> None:
    """The fused Sequentials keep the original indices, so checkpoints load strictly."""
    model = UNetModel(**tiny().unet)
    res = model.input_blocks[1][0]
    assert isinstance(res.in_layers, NormSiLUSequential) and isinstance(model.out, NormSiLUSequential)
    assert [type(m).__name__ for m in res.out_layers] == ["GroupNorm32", "SiLU", "Dropout", "Conv2d"]
    keys = set(model.state_dict())
    assert {
        "out.0.weight",
        "out.2.weight",
        "input_blocks.1.0.in_layers.0.bias",
        "input_blocks.1.0.in_layers.2.weight",
        "input_blocks.1.0.out_layers.0.weight",
        "input_blocks.1.0.out_layers.3.weight",
    } <= keys
    assert not any(k.split(".")[-3:-1] in (["in_layers", "1"], ["out_layers", "1"], ["out", "1"]) for k in keys)
    vae = AutoencoderKL(**tiny().vae)
    assert {"encoder.norm_out.weight", "decoder.up.0.block.0.norm1.bias", "encoder.mid.attn_1.norm.weight"} <= set(
        vae.state_dict()
    )
    assert check_precision_policy(model) == [] and check_precision_policy(vae) == []
    assert check_precision_policy(nn.Sequential(nn.GroupNorm(2, 4))) == ["0"]


def test_half_precision_math_paths_keep_fp32_statistics() -> None:
    """fp16 activations: QKᵀ far beyond fp16's range and GroupNorm on a large offset stay accurate (math path)."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 12, 64, generator=g) * s for s in (300.0, 300.0, 1.0))
    q, k, v = q.half(), k.half(), v.half()
    assert not torch.isfinite(q @ k.transpose(-1, -2)).all()  # fp16 scores overflow
    want = torch.softmax(q.float() @ k.float().transpose(-1, -2) / 8.0, dim=-1) @ v.float()
    got = attn_mod.attention(q, k, v, backend="math")
    assert got.dtype == torch.float16 and rel_err(got, want) < 2e-3

    attn = CrossAttention(64, heads=1, dim_head=64)
    with torch.no_grad():
        attn.to_q.weight.mul_(300.0)
        attn.to_k.weight.mul_(300.0)
    attn_mod.set_backend("math")
    try:
        out = attn.half()(torch.randn(1, 12, 64, generator=g).half())  # the UNet's attention, fp16 weights
    finally:
        attn_mod.set_backend(None)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()

    gn = GroupNorm32(32, 64, eps=1e-6).half()
    big = (torch.randn(1, 64, 4, 4, generator=g) * 10 + 3000).half()  # fp16 spacing is 2 at 3000
    want = F.silu(F.group_norm(big.float(), 32, None, None, 1e-6))
    got = gn.forward_silu(big)
    assert got.dtype == torch.float16 and rel_err(got, want) < 2e-3


def test_channels_last_same_output() -> None:
    torch.manual_seed(0)
    model = perturb(UNetModel(**tiny().unet), seed=7).eval()
    g = torch.Generator().manual_seed(8)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        ref = model(x, 500, ctx)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        assert to_channels_last(model) is model
        conv = model.input_blocks[0][0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        out = model(x.contiguous(memory_format=torch.channels_last), 500, ctx)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert rel_err(out, ref) <= 1e-5


def test_maybe_compile_off_by_default_and_keeps_keys() -> None:
    torch.manual_seed(0)
    block = perturb(ResBlock(32, 64, out_channels=64), seed=9).eval()
    keys = list(block.state_dict())
    assert maybe_compile(block) is block and block._compiled_call_impl is None
    g = torch.Generator().manual_seed(10)
    x, emb = torch.randn(1, 32, 4, 4, generator=g), torch.randn(1, 64, generator=g)
    with torch.no_grad():
        ref = block(x, emb)
        assert maybe_compile(block, True, backend="eager") is block  # Dynamo capture only: fast on CPU
        assert block._compiled_call_impl is not None and list(block.state_dict()) == keys
        out = block(x, emb)
    assert rel_err(out, ref) <= 1e-6


def test_cuda_graph_step_cpu_fallback() -> None:
    """On the CPU the step is the plain model function: same outputs, nothing captured."""
    calls = []

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t.clone())
        return x * 2 + t.float()[:, None, None, None]

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    t = torch.tensor([981, 981])
    step = CudaGraphStep(model_fn, x, t)
    assert not step.captured and step.model_fn is model_fn
    for ti in (981, 961):
        tt = torch.full((2,), ti)
        assert torch.equal(step(x, tt), model_fn(x, tt))
    assert len(calls) == 4 and step.replays == 0
    assert not CudaGraphStep(model_fn, x, t, enabled=False).captured


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_cuda_graph_step_matches_eager_sampling() -> None:
    from ldm import samplers
    from ldm.schedule import Schedule

    torch.manual_seed(0)
    model = perturb(UNetModel(**tiny().unet), seed=12).to("cuda", torch.float16).eval()
    g = torch.Generator().manual_seed(13)
    ctx = torch.randn(2, 77, 32, generator=g).to("cuda", torch.float16)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t, ctx)

    x_T = torch.randn(2, 4, 16, 16, generator=g).cuda()
    schedule = Schedule.scaled_linear()
    with torch.no_grad():
        step = CudaGraphStep(model_fn, x_T, torch.tensor([1, 1], device="cuda"))
        assert step.captured
        ref = samplers.plms(model_fn, x_T, schedule, 6)
        got = samplers.plms(step, x_T, schedule, 6)
        assert step.replays > 6  # PLMS: two calls on the first step, one after
        assert rel_err(got, ref) <= 1e-3
        odd, t5 = torch.randn(1, 4, 16, 16, device="cuda"), torch.tensor([5], device="cuda")
        before = step.replays
        assert rel_err(step(odd, t5), model_fn(odd, t5)) <= 1e-6
        assert step.replays == before  # another shape runs eagerly


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_auto_uses_fused_kernels_in_half(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ref_model = perturb(UNetModel(**tiny().unet), seed=14).cuda().eval()
    model = copy.deepcopy(ref_model).to(dtype)
    g = torch.Generator().manual_seed(15)
    x, ctx = torch.randn(2, 4, 32, 32, generator=g).cuda(), torch.randn(2, 77, 32, generator=g).cuda()
    monkeypatch.setenv("ONEWORD_KERNELS", "math")
    with torch.no_grad():
        ref = ref_model(x, 700, ctx)
        monkeypatch.setenv("ONEWORD_KERNELS", "auto")
        before = CALLS.copy()
        out = model(x, 700, ctx)
    delta = CALLS - before
    from ldm.kernels import routing

    warmups = sum(1 for key, ok in routing._WARM.items() if ok and key[0] == "attention")
    assert delta["group_norm_silu_fwd"] > 0 and delta["geglu_fwd"] > 0
    if not routing.MEASURED:  # auto: attention on SDPA until a GPU measurement shows Triton faster
        assert delta["attention_fwd"] == warmups == 0
    assert out.dtype == torch.float32 and rel_err(out, ref) < (2e-2 if dtype == torch.float16 else 6e-2)
    assert math.isfinite(out.abs().max().item())
