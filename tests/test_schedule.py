"""Schedule: scaled-linear constants, q_sample, eps/v conversions, diffusers' betas as an oracle."""

import math

import pytest
import torch

from ldm.config import sd1, sd2_v, tiny
from ldm.schedule import EpsPrediction, Schedule, VPrediction


def test_scaled_linear_constants():
    s = Schedule.scaled_linear()
    assert s.num_timesteps == 1000
    assert s.alphas_cumprod.dtype == torch.float64
    assert s.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-12)
    assert s.alphas_cumprod[999].item() == pytest.approx(0.0046601, rel=1e-4)
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2
    assert torch.allclose(s.betas, betas, rtol=1e-10, atol=0)
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())


def test_matches_diffusers_betas():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    ours = Schedule.scaled_linear().alphas_cumprod
    # diffusers accumulates the product in float32; ours is float64
    assert ((ours - ref.double()).abs() / ref.double()).max().item() < 2e-5


def test_from_config_and_buffers():
    assert Schedule.from_config(sd1()).prediction.name == "eps"
    assert isinstance(Schedule.from_config(sd2_v()).prediction, VPrediction)
    assert Schedule.from_config(tiny()).num_timesteps == 1000
    buf = Schedule.scaled_linear().alphas_cumprod.float()  # a checkpoint's float32 buffer
    s = Schedule(buf)
    assert s.alphas_cumprod.dtype == torch.float64
    assert torch.equal(s.alphas_cumprod, buf.double())
    assert isinstance(s.prediction, EpsPrediction)


def test_bad_input():
    with pytest.raises(ValueError, match="parameterization"):
        Schedule(torch.tensor([0.9, 0.5]), "x0")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        Schedule(torch.tensor([0.9, 1.5]))
    s = Schedule.scaled_linear()
    with pytest.raises(IndexError):
        s.alpha_bar(1000, torch.zeros(1, 4))


def test_alpha_bar_broadcast_and_q_sample():
    s = Schedule.scaled_linear()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, 5, generator=g)
    noise = torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0, 500, 999])
    ab = s.alpha_bar(t, x0)
    assert ab.shape == (3, 1, 1, 1) and ab.dtype == torch.float32
    assert s.alpha_bar(7, x0.half()).shape == (1, 1, 1, 1) and s.alpha_bar(7, x0.half()).dtype == torch.float16
    xt = s.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        a = s.alphas_cumprod[ti].item()
        expect = math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i]
        assert torch.allclose(xt[i], expect, rtol=1e-6, atol=1e-6)
    assert torch.allclose(s.q_sample(x0, 500, noise)[1], xt[1])


@pytest.mark.parametrize("param", ["eps", "v"])
def test_prediction_roundtrip(param):
    s = Schedule.scaled_linear(parameterization=param)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 250, 600, 999])
    xt = s.q_sample(x0, t, noise)
    out = s.prediction.target(x0, noise, t)  # the perfect network output
    assert torch.allclose(s.prediction.to_eps(out, xt, t), noise, rtol=0, atol=1e-10)
    assert torch.allclose(s.prediction.to_x0(out, xt, t), x0, rtol=0, atol=1e-9)
    if param == "v":
        a = s.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        assert torch.allclose(out, a * noise - (1 - a**2).sqrt() * x0, atol=1e-12)
    else:
        assert torch.equal(out, noise)


def test_v_matches_diffusers_velocity():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s = Schedule(ref.alphas_cumprod, "v")
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    t = torch.tensor([10, 900])
    expect = ref.get_velocity(x0, noise, t)
    assert (s.prediction.target(x0, noise, t) - expect).abs().max().item() < 1e-6
    assert (s.q_sample(x0, t, noise) - ref.add_noise(x0, noise, t)).abs().max().item() < 1e-6
