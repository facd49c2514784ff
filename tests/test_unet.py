"""UNetModel: diffusers parity through diffusers' own converter, full-size key sets, checkpointing, bad configs."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.config import ldm_1p4b, sd1, sd2, tiny
from ldm.layers import timestep_embedding
from ldm.unet import GEGLU, ResBlock, SpatialTransformer, UNetModel

PREFIX = "model.diffusion_model."

SD1_SMALL = dict(
    image_size=16,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 2, 2],
    num_heads=4,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=32,
    use_checkpoint=False,
    legacy=False,
)
SD2_SMALL = dict(
    image_size=16,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[2, 1],
    num_res_blocks=1,
    channel_mult=[1, 2, 2],
    num_head_channels=8,
    use_spatial_transformer=True,
    use_linear_in_transformer=True,
    transformer_depth=2,
    context_dim=48,
    use_checkpoint=True,
    use_fp16=True,
    legacy=False,
)


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # conftest.py


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter so zero-initialised output layers and unit norms are exercised too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.add_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(fan_in) if p.ndim > 1 else 0.1))
    return model


def _original_config(unet_params: dict) -> dict:
    return {
        "model": {
            "params": {
                "unet_config": {"params": unet_params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }


def _to_diffusers(unet_params: dict, state: dict):
    """Config and converted weights, made by diffusers' own single-file converter."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    ckpt = {PREFIX + k: v for k, v in state.items()}
    config = create_unet_diffusers_config_from_ldm(_original_config(unet_params), ckpt)
    return config, convert_ldm_unet_checkpoint(ckpt, config)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("params", [SD1_SMALL, SD2_SMALL], ids=["sd1-like", "sd2-like"])
def test_parity_with_diffusers(params):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ours = _randomize(UNetModel(**params), seed=1).eval()
    config, converted = _to_diffusers(params, ours.state_dict())
    theirs = UNet2DConditionModel(**config).eval()
    theirs.load_state_dict(converted, strict=True)

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([3, 917])
    ctx = torch.randn(2, 7, params["context_dim"], generator=g)
    with torch.no_grad():
        got = ours(x, t, ctx)
        want = theirs(x, t, encoder_hidden_states=ctx).sample
    assert got.shape == (2, 4, 16, 16)
    assert want.abs().max() > 0.1  # the randomised weights give a non-trivial output
    assert _rel_err(got, want) <= 1e-5


def test_parity_disable_self_attentions():
    """disable_self_attentions (attn1 attends to the context) matches diffusers' only_cross_attention."""
    from diffusers import UNet2DConditionModel

    params = dict(SD1_SMALL, num_res_blocks=1, disable_self_attentions=[True, False, True])
    torch.manual_seed(0)
    ours = _randomize(UNetModel(**params), seed=3).eval()
    assert ours.input_blocks[1][1].transformer_blocks[0].attn1.to_k.in_features == 32
    config, converted = _to_diffusers(params, ours.state_dict())
    theirs = UNet2DConditionModel(**config).eval()
    theirs.load_state_dict(converted, strict=True)
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        assert _rel_err(ours(x, 250, ctx), theirs(x, 250, encoder_hidden_states=ctx).sample) <= 1e-5


@pytest.mark.parametrize("preset, n_params", [(sd1, 859_520_964), (sd2, 865_910_724), (ldm_1p4b, 872_300_484)])
def test_full_size_keys_match_diffusers_converter(preset, n_params):
    """Full-size UNets on the meta device: parameter count, and diffusers accepts every key and shape."""
    from diffusers import UNet2DConditionModel

    params = preset().unet
    with torch.device("meta"):
        ours = UNetModel(**params)
    state = ours.state_dict()
    assert sum(p.numel() for p in ours.parameters()) == n_params
    assert len(state) == 686
    assert not list(ours.buffers())
    assert state["input_blocks.4.0.skip_connection.weight"].shape == (640, 320, 1, 1)
    assert state["output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert state["output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert state["middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"].shape == (10240, 1280)
    assert state["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, params["context_dim"])
    linear = params.get("use_linear_in_transformer", False)
    assert state["input_blocks.1.1.proj_in.weight"].ndim == (2 if linear else 4)
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias" not in state

    config, converted = _to_diffusers(params, state)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**config)
    expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert len(converted) == len(state)


def test_checkpointing_same_gradients_and_recomputes():
    params = dict(tiny().unet)
    torch.manual_seed(0)
    model = _randomize(UNetModel(**params), seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, 32, generator=g)
    calls = []
    model.input_blocks[1][0].in_layers.register_forward_hook(lambda *_: calls.append(1))

    def grads(enabled: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        model.set_gradient_checkpointing(enabled)
        model.zero_grad()
        c = ctx.clone().requires_grad_(True)
        calls.clear()
        model(x, torch.tensor([10, 700]), c).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()], c.grad.clone(), len(calls)

    plain, plain_ctx, plain_calls = grads(False)
    ckpt, ckpt_ctx, ckpt_calls = grads(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the checkpointed block is recomputed in backward
    assert max(_rel_err(a, b) for a, b in zip(ckpt, plain) if b.abs().max() > 0) <= 1e-5
    assert _rel_err(ckpt_ctx, plain_ctx) <= 1e-5
    calls.clear()
    with torch.no_grad():
        model(x, 10, ctx)
    assert len(calls) == 1  # inactive without grad


def test_timesteps_scalar_broadcast_and_embedding_order():
    torch.manual_seed(0)
    model = _randomize(UNetModel(**tiny().unet), seed=7).eval()
    g = torch.Generator().manual_seed(8)
    x, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 32, generator=g)
    with torch.no_grad():
        ref = model(x, torch.full((3,), 421), ctx)
        assert torch.equal(model(x, 421, ctx), ref)
        assert torch.equal(model(x, torch.tensor(421.0), ctx), ref)
        assert torch.equal(model(x, torch.tensor([421]), ctx), ref)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.tensor([1, 2]), ctx)
    emb = timestep_embedding(torch.tensor([0, 7]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos first, then sin
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([torch.cos(7 * freqs), torch.sin(7 * freqs)]))


def test_structure_for_kernels_and_head_rules():
    model = UNetModel(**sd1().unet | dict(model_channels=64, channel_mult=[1, 2], context_dim=16))
    res = model.input_blocks[1][0]
    assert isinstance(res, ResBlock)
    assert [type(m).__name__ for m in res.in_layers] == ["GroupNorm32", "SiLU", "Conv2d"]
    assert [type(m).__name__ for m in res.out_layers] == ["GroupNorm32", "SiLU", "Dropout", "Conv2d"]
    assert res.in_layers[0].eps == 1e-5 and model.out[0].eps == 1e-5
    st = model.input_blocks[1][1]
    assert isinstance(st, SpatialTransformer) and st.norm.eps == 1e-6
    assert isinstance(st.transformer_blocks[0].ff.net[0], GEGLU)
    assert st.transformer_blocks[0].attn1.heads == 8 and st.transformer_blocks[0].attn1.dim_head == 8
    # num_head_channels: heads = width // num_head_channels
    m2 = UNetModel(**dict(SD2_SMALL, num_res_blocks=1))
    attn = m2.middle_block[1].transformer_blocks[0].attn1
    assert (attn.heads, attn.dim_head) == (8, 8)
    # legacy=True with num_head_channels: dim_head = width // num_heads
    one_level = dict(SD2_SMALL, model_channels=96, channel_mult=[1], attention_resolutions=[1], num_head_channels=64)
    for legacy, dim_head in ((True, 96), (False, 64)):
        attn = UNetModel(**dict(one_level, legacy=legacy)).input_blocks[1][1].transformer_blocks[0].attn1
        assert (attn.heads, attn.dim_head) == (1, dim_head)


@pytest.mark.parametrize(
    "key, value",
    [
        ("num_classes", 10),
        ("use_scale_shift_norm", True),
        ("resblock_updown", True),
        ("dims", 3),
        ("n_embed", 8192),
        ("use_spatial_transformer", False),
        ("context_dim", None),
        ("transformer_depth", [1, 2]),
        ("channel_mult", [1, 0]),
        ("model_channels", 40),
        ("num_res_blocks", [1, 1, 1]),
        ("num_attention_blocks", [2, 1]),
        ("disable_self_attentions", [True]),
    ],
)
def test_bad_config_raises_naming_the_key(key, value):
    params = dict(tiny().unet, **{key: value})
    with pytest.raises(ValueError, match=key):
        UNetModel(**params)


def test_no_heads_raises():
    params = {k: v for k, v in tiny().unet.items() if k != "num_heads"}
    with pytest.raises(ValueError, match="num_head"):
        UNetModel(**params)


def test_meta_build_then_assign_load_and_bf16():
    """Built on meta and loaded with assign=True it equals the source; a bf16 copy runs on fp32 inputs."""
    torch.manual_seed(0)
    src = _randomize(UNetModel(**tiny().unet), seed=9).eval()
    with torch.device("meta"):
        dst = UNetModel(**tiny().unet)
    dst.load_state_dict(src.state_dict(), strict=True, assign=True)
    g = torch.Generator().manual_seed(10)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 32, generator=g)
    with torch.no_grad():
        ref = src(x, 99, ctx)
        assert torch.equal(dst.eval()(x, 99, ctx), ref)
        low = UNetModel(**tiny().unet)
        low.load_state_dict(src.state_dict())
        out = low.to(torch.bfloat16).eval()(x, 99, ctx)
    assert out.dtype == torch.float32
    assert _rel_err(out, ref) < 0.05
