"""AutoencoderKL: parity with diffusers through its own LDM converter, key layout, sampling, numerics."""

from __future__ import annotations

import copy

import pytest
import torch

import ldm.attention as attn_mod
import ldm.vae as vae_mod
from ldm.config import sd1
from ldm.vae import AutoencoderKL, DiagonalGaussian, GroupNorm32

SMALL = dict(
    double_z=True,
    z_channels=4,
    resolution=32,
    in_channels=3,
    out_ch=3,
    ch=32,
    ch_mult=[1, 2, 2],
    num_res_blocks=1,
    attn_resolutions=[],
    dropout=0.0,
)
SD_VAE_PARAMS = 83_653_863


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (norms and biases too) so parity covers all of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.add_(0.02 * noise)
    return model


def small_vae(seed: int = 0, **over) -> AutoencoderKL:
    torch.manual_seed(seed)
    return randomise(AutoencoderKL(ddconfig={**SMALL, **over}, embed_dim=4), seed).eval()


def to_diffusers(ours: AutoencoderKL, ddconfig: dict):
    """Our state dict → diffusers AutoencoderKL via diffusers' own single-file converter."""
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        create_vae_diffusers_config_from_ldm,
    )

    checkpoint = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    original_config = {
        "model": {
            "params": {
                "scale_factor": 0.18215,
                "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": ddconfig}},
            }
        }
    }
    config = create_vae_diffusers_config_from_ldm(original_config, checkpoint)
    converted = convert_ldm_vae_checkpoint(checkpoint, config)
    return DAutoencoderKL(**config), converted


@pytest.fixture(scope="module")
def pair():
    ours = small_vae()
    theirs, converted = to_diffusers(ours, SMALL)
    theirs.load_state_dict(converted, strict=True)
    return ours, theirs.eval(), converted


@pytest.mark.parametrize("backend", [None, "math"])
def test_parity_with_diffusers(pair, backend):
    ours, theirs, _ = pair
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    attn_mod.set_backend(backend)
    try:
        with torch.no_grad():
            post = ours.encode(x)
            ref = theirs.encode(x).latent_dist
            assert post.mean.shape == (2, 4, 8, 8)
            assert rel_err(post.mean, ref.mean) <= 1e-5
            assert rel_err(post.logvar, ref.logvar) <= 1e-5
            z = torch.randn(2, 4, 8, 8, generator=g)
            img = ours.decode(z)
            ref_img = theirs.decode(z).sample
    finally:
        attn_mod.set_backend(None)
    assert img.shape == (2, 3, 32, 32)
    assert rel_err(img, ref_img) <= 1e-5


def test_converter_uses_every_key(pair):
    ours, theirs, converted = pair
    assert len(converted) == len(ours.state_dict()) == len(theirs.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_full_size_sd_vae_on_meta():
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        create_vae_diffusers_config_from_ldm,
    )

    cfg = sd1().vae
    with torch.device("meta"):
        model = AutoencoderKL(**cfg)
    assert sum(p.numel() for p in model.parameters()) == SD_VAE_PARAMS
    assert list(model.buffers()) == []
    sd = model.state_dict()
    assert sd["decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)  # up.3 runs first
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert sd["decoder.up.0.block.2.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd["encoder.conv_out.weight"].shape == (8, 512, 3, 3)
    assert sd["quant_conv.weight"].shape == (8, 8, 1, 1)
    assert sd["post_quant_conv.weight"].shape == (4, 4, 1, 1)
    assert "encoder.down.3.downsample.conv.weight" not in sd and "decoder.up.0.upsample.conv.weight" not in sd
    checkpoint = {"first_stage_model." + k: v for k, v in sd.items()}
    original_config = {"model": {"params": {"scale_factor": 0.18215, "first_stage_config": {"params": cfg}}}}
    config = create_vae_diffusers_config_from_ldm(original_config, checkpoint)
    converted = convert_ldm_vae_checkpoint(checkpoint, config)
    with torch.device("meta"):
        theirs = DAutoencoderKL(**config)
    expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


def test_meta_build_then_assign_load():
    ref = small_vae(seed=3)
    with torch.device("meta"):
        model = AutoencoderKL(ddconfig=SMALL, embed_dim=4)
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.encode(x).mean, ref.encode(x).mean)


def test_ignores_original_yaml_kwargs():
    model = AutoencoderKL(
        ddconfig=SMALL,
        embed_dim=4,
        lossconfig={"target": "torch.nn.Identity"},
        ckpt_path=None,
        image_key="image",
        monitor="val/rec_loss",
    )
    assert set(dict(model.named_children())) == {"encoder", "decoder", "quant_conv", "post_quant_conv"}


def test_sample_reproducible_and_reparameterised():
    post = small_vae().encode(torch.zeros(1, 3, 32, 32))
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    c = post.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, post.mean + post.std * eps, rtol=0, atol=0)
    assert torch.equal(post.mode(), post.mean)
    torch.testing.assert_close(post.var, post.std**2)


def test_logvar_clamped():
    mean = torch.zeros(1, 2, 2, 2)
    logvar = torch.tensor([-100.0, -30.5, 0.0, 25.0]).reshape(1, 1, 2, 2).expand(1, 2, 2, 2)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert post.logvar.min().item() == -30.0 and post.logvar.max().item() == 20.0
    assert post.logvar[0, 0, 1, 0].item() == 0.0
    model = small_vae()
    with torch.no_grad():
        model.quant_conv.bias[4:] = 1e4  # logvar channels
    assert torch.all(model.encode(torch.zeros(1, 3, 32, 32)).logvar == 20.0)


def test_kl_and_deterministic():
    post = DiagonalGaussian(torch.zeros(2, 8, 3, 3))
    assert torch.equal(post.kl(), torch.zeros(2))
    moments = torch.cat([torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)], dim=1)
    assert DiagonalGaussian(moments).kl().item() == pytest.approx(0.5 * 16)
    det = DiagonalGaussian(moments, deterministic=True)
    assert torch.equal(det.sample(torch.Generator().manual_seed(0)), det.mean)


def _spy_attention(monkeypatch) -> list[tuple[int, ...]]:
    """Route the VAE's attention calls through the math reference, recording each q shape in the returned list."""
    calls = []

    def spy(q, k, v, **kw):
        calls.append(tuple(q.shape))
        return attn_mod.attention_math(q, k, v)

    monkeypatch.setattr(vae_mod, "attention", spy)
    return calls


def test_attention_entry_point_shapes(monkeypatch):
    calls = _spy_attention(monkeypatch)
    model = small_vae()
    with torch.no_grad():
        model.encode(torch.zeros(2, 3, 32, 32))
        model.decode(torch.zeros(2, 4, 8, 8))
    assert calls == [(2, 1, 64, 64), (2, 1, 64, 64)]  # encoder mid, decoder mid: (B, 1, H·W, C)


def test_attn_resolutions(monkeypatch):
    calls = _spy_attention(monkeypatch)
    model = small_vae(ch_mult=[1, 2], attn_resolutions=[16])
    keys = model.state_dict().keys()
    assert "encoder.down.1.attn.0.q.weight" in keys and "encoder.down.0.attn.0.q.weight" not in keys
    assert {f"decoder.up.1.attn.{i}.proj_out.weight" for i in range(2)} <= set(keys)
    assert not any(k.startswith("decoder.up.0.attn") for k in keys)
    with torch.no_grad():
        z = model.encode(torch.zeros(1, 3, 32, 32)).mean
        img = model.decode(z)
    assert img.shape == (1, 3, 32, 32)
    # encoder: down.1 (16², 64 ch), mid; decoder: mid, up.1 block 0 and 1
    assert calls == [(1, 1, 256, 64)] * 5


def test_gradients_flow():
    model = small_vae()
    x = (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_()
    rec, post = model(x, generator=torch.Generator().manual_seed(0))
    ((rec - x) ** 2).mean().add(1e-6 * post.kl().sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_groupnorm_in_fp32():
    gn = GroupNorm32(32, 64, eps=1e-6)
    with torch.no_grad():
        gn.weight.normal_()
    x = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(0)) * 100 + 1000
    ref = gn(x)
    out = copy.deepcopy(gn).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    expected = torch.nn.functional.group_norm(
        x.bfloat16().float(), 32, gn.weight.bfloat16().float(), gn.bias.bfloat16().float(), 1e-6
    ).bfloat16()
    assert torch.equal(out, expected)
    assert rel_err(out.float(), ref) < 2e-2


def test_bad_configs():
    with pytest.raises(ValueError, match="divisible by 32"):
        AutoencoderKL(ddconfig={**SMALL, "ch": 16}, embed_dim=4)
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(ddconfig={**SMALL, "double_z": False}, embed_dim=4)
    with pytest.raises(NotImplementedError, match="linear"):
        AutoencoderKL(ddconfig={**SMALL, "use_linear_attn": True}, embed_dim=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-2), (torch.bfloat16, 6e-2)])
def test_cuda_matches_cpu(dtype, tol):
    ref = small_vae()
    model = copy.deepcopy(ref).to("cuda", dtype)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean = model.encode(x.to("cuda", dtype)).mean
        img = model.decode(mean)
        ref_mean = ref.encode(x).mean
        ref_img = ref.decode(ref_mean)
    assert mean.dtype == dtype and img.dtype == dtype
    assert rel_err(mean.float().cpu(), ref_mean) <= tol
    assert rel_err(img.float().cpu(), ref_img) <= tol
