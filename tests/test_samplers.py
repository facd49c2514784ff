"""Samplers against diffusers' schedulers on a cheap deterministic toy model, plus the CompVis quirks."""

import math

import numpy as np
import pytest
import torch

from ldm.samplers import SAMPLERS, ddim, ddpm, dpm_timesteps, dpmpp_2m, plms, timesteps
from ldm.schedule import Schedule

BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 6, 6)


class Toy:
    """A fixed random channel-mixing linear map of x plus a t-dependent bias; counts its calls."""

    def __init__(self, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w = (torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.2 + 0.6 * torch.eye(4)).to(dtype)
        self.b = torch.randn(1, 4, 6, 6, generator=g, dtype=torch.float64).to(dtype)
        self.calls = []

    def __call__(self, x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        self.calls.append(int(t[0]))
        phase = (t.to(x.dtype) / 1000.0 * math.pi).view(-1, 1, 1, 1)
        return torch.einsum("oc,bchw->bohw", self.w, x) + 0.3 * torch.sin(phase) * self.b


def x_T(dtype=torch.float32, seed=42):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def trajectory(sampler, schedule, steps, dtype=torch.float32, **kw):
    traj = []
    out = sampler(Toy(dtype), x_T(dtype), schedule, steps, callback=lambda i, t, x: traj.append((t, x)), **kw)
    assert torch.equal(out, traj[-1][1])
    return traj


def run_diffusers(sch, steps, dtype=torch.float32, **step_kw):
    sch.set_timesteps(steps)
    model, x, traj = Toy(dtype), x_T(dtype), []
    for t in sch.timesteps:
        x = sch.step(model(x, t.repeat(x.shape[0])), t, x, **step_kw).prev_sample
        traj.append((int(t), x))
    return traj


def compare(ours, ref, tol=1e-5):
    assert [t for t, _ in ours] == [t for t, _ in ref]
    err = max(rel(a, b) for (_, a), (_, b) in zip(ours, ref))
    assert err <= tol, err
    return err


# --- timesteps: the CompVis "uniform" rule and its quirks -------------------------------------------------


def test_uniform_timesteps_quirks():
    assert timesteps(50) == list(range(1, 1000, 20)) and timesteps(50)[-1] == 981
    assert len(timesteps(30)) == 31 and timesteps(30)[:2] == [1, 34] and timesteps(30)[-1] == 991
    assert len(timesteps(7)) == 8 and timesteps(7)[-1] == 995
    assert timesteps(1) == [1] and timesteps(500)[-1] == 999
    assert timesteps(1000, offset=0) == list(range(1000))
    for s in range(1, 1001):
        ref = np.arange(0, 1000, 1000 // s) + 1  # make_ddim_timesteps("uniform")
        assert timesteps(s) == [t for t in ref.tolist() if t < 1000], s  # CompVis would index ᾱ[1000]


def test_uniform_timesteps_out_of_range_dropped():
    assert timesteps(3) == [1, 334, 667]
    assert timesteps(9)[-1] == 889 and len(timesteps(9)) == 9
    assert timesteps(1000) == list(range(1, 1000))


def test_dpm_timesteps_match_numpy_linspace():
    for s in list(range(1, 200)) + [250, 333, 500, 999]:
        ref = np.linspace(0, 999, s + 1).round()[::-1][:-1].astype(np.int64).tolist()
        assert dpm_timesteps(s) == ref, s


@pytest.mark.parametrize("sampler", list(SAMPLERS.values()))
@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True])
def test_bad_steps(sampler, steps):
    with pytest.raises(ValueError, match="steps"):
        sampler(Toy(), x_T(), Schedule.scaled_linear(), steps)


def test_ddim_steps_and_last_alpha_prev():
    """S=30 runs 31 model calls on 991, 958, …, 1; the last update uses ᾱ_prev = ᾱ₀ (checked by hand)."""
    s = Schedule.scaled_linear()
    model = Toy(torch.float64)
    traj = []
    ddim(model, x_T(torch.float64), s, 30, callback=lambda i, t, x: traj.append((i, t, x)))
    assert model.calls == timesteps(30)[::-1] and len(traj) == 31
    assert [i for i, _, _ in traj] == list(range(31)) and traj[-1][1] == 1
    x, ab = traj[-2][2], s.alphas_cumprod
    eps = Toy(torch.float64)(x, torch.full((2,), 1))
    x0 = (x - (1 - ab[1]).sqrt() * eps) / ab[1].sqrt()
    expect = ab[0].sqrt() * x0 + (1 - ab[0]).sqrt() * eps
    assert rel(traj[-1][2], expect) < 1e-12


def test_ddim_eta_sigma_uses_alpha0_at_last_step():
    """With η=1 the last step's σ is √((1−ᾱ₀)/(1−ᾱ₁)·(1−ᾱ₁/ᾱ₀)) (CompVis make_ddim_sampling_parameters)."""
    s = Schedule.scaled_linear()
    ab = s.alphas_cumprod.tolist()
    g = torch.Generator().manual_seed(3)
    traj = []
    ddim(Toy(torch.float64), x_T(torch.float64), s, 7, eta=1.0, generator=g, callback=lambda i, t, x: traj.append(x))
    g.manual_seed(3)
    for _ in range(8):  # one noise draw per step; the last step's is the eighth
        noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    x = traj[-2]
    eps = Toy(torch.float64)(x, torch.full((2,), 1))
    sigma = math.sqrt((1 - ab[0]) / (1 - ab[1]) * (1 - ab[1] / ab[0]))
    x0 = (x - math.sqrt(1 - ab[1]) * eps) / math.sqrt(ab[1])
    expect = math.sqrt(ab[0]) * x0 + math.sqrt(1 - ab[0] - sigma**2) * eps + sigma * noise
    assert rel(traj[-1], expect) < 1e-12


def test_plms_call_pattern_and_first_step():
    """PLMS: two model calls at the first step (t, then t_next on the Euler guess), one per step after."""
    s = Schedule.scaled_linear()
    model = Toy(torch.float64)
    plms(model, x_T(torch.float64), s, 7)
    ts = timesteps(7)[::-1]
    assert model.calls == [ts[0], ts[1]] + ts[1:]
    with pytest.raises(ValueError, match="eta"):
        plms(Toy(), x_T(), s, 10, eta=0.5)


# --- parity against diffusers ----------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_vs_diffusers(steps, eta):
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    s = Schedule(sch.alphas_cumprod)
    ours = trajectory(ddim, s, steps, eta=eta, generator=torch.Generator().manual_seed(5))
    ref = run_diffusers(sch, steps, eta=eta, generator=torch.Generator().manual_seed(5))
    compare(ours, ref)
    # and with our own float64 scaled-linear ᾱ (diffusers accumulates ᾱ in float32)
    ours64 = trajectory(ddim, Schedule.scaled_linear(), steps, eta=eta, generator=torch.Generator().manual_seed(5))
    compare(ours64, ref, tol=2e-5)


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_v_prediction_vs_diffusers(steps):
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(
        **BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction"
    )
    ours = trajectory(ddim, Schedule(sch.alphas_cumprod, "v"), steps)
    compare(ours, run_diffusers(sch, steps))


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_plms_vs_diffusers(steps):
    from diffusers import PNDMScheduler

    sch = PNDMScheduler(**BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    ours = trajectory(plms, Schedule(sch.alphas_cumprod), steps)
    ref = run_diffusers(sch, steps)
    ts = [t for t, _ in ours]
    # diffusers' timesteps repeat the second one: its step 0 is the Euler guess, step 1 the averaged-ε update
    assert [t for t, _ in ref] == [ts[0], ts[1]] + ts[1:]
    compare(ours, [(t, x) for t, (_, x) in zip(ts, ref[1:])])


@pytest.mark.parametrize("steps", [5, 10, 20, 25])
@pytest.mark.parametrize("param", ["eps", "v"])
def test_dpmpp_2m_vs_diffusers(steps, param):
    from diffusers import DPMSolverMultistepScheduler

    sch = DPMSolverMultistepScheduler(
        **BETAS,
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type={"eps": "epsilon", "v": "v_prediction"}[param],
    )
    assert sch.config.final_sigmas_type == "zero" and sch.config.lower_order_final
    ours = trajectory(dpmpp_2m, Schedule(sch.alphas_cumprod, param), steps)
    compare(ours, run_diffusers(sch, steps))


@pytest.mark.parametrize("steps", [1000, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ddpm_vs_diffusers(steps, dtype):
    """Same seed on both sides: each step draws one x-shaped N(0, I) from the generator, after the model call.

    Stock DDPMScheduler forms β_t = 1 − ᾱ_t/ᾱ_prev in float32 (≈1e-5 relative error per step); with its own
    ᾱ buffer promoted to float64 it agrees with ours to rounding, so that is the 1e-5 comparison.
    """
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(**BETAS, clip_sample=False, variance_type="fixed_small")
    s = Schedule(sch.alphas_cumprod)
    ours = trajectory(ddpm, s, steps, dtype, generator=torch.Generator().manual_seed(9))
    stock = run_diffusers(sch, steps, dtype, generator=torch.Generator().manual_seed(9))
    assert stock[0][0] == 1000 - 1000 // steps and stock[-1][0] == 0
    compare(ours, stock, tol=5e-5)
    sch.alphas_cumprod, sch.one = sch.alphas_cumprod.double(), torch.tensor(1.0, dtype=torch.float64)
    compare(ours, run_diffusers(sch, steps, dtype, generator=torch.Generator().manual_seed(9)), tol=1e-5)


# --- randomness ------------------------------------------------------------------------------------------

STOCHASTIC = [(ddim, dict(eta=1.0)), (ddpm, {})]


@pytest.mark.parametrize("sampler,kw", STOCHASTIC)
def test_same_generator_same_result(sampler, kw):
    s = Schedule.scaled_linear()
    a = sampler(Toy(), x_T(), s, 10, generator=torch.Generator().manual_seed(1), **kw)
    b = sampler(Toy(), x_T(), s, 10, generator=torch.Generator().manual_seed(1), **kw)
    c = sampler(Toy(), x_T(), s, 10, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("sampler,kw", STOCHASTIC)
def test_generator_list_rows_are_independent(sampler, kw):
    s = Schedule.scaled_linear()
    seed = 100
    x = torch.cat([torch.randn(1, *SHAPE[1:], generator=torch.Generator().manual_seed(seed + k)) for k in range(3)])
    gens = [torch.Generator().manual_seed(seed + k) for k in range(3)]
    for g in gens:  # x_T of row k came from generator k, as a pipeline would draw it
        torch.randn(1, *SHAPE[1:], generator=g)
    batch = sampler(Toy(), x, s, 10, generator=gens, **kw)
    for k in range(3):
        g = torch.Generator().manual_seed(seed + k)
        xk = torch.randn(1, *SHAPE[1:], generator=g)
        single = sampler(Toy(), xk, s, 10, generator=g, **kw)
        assert torch.allclose(batch[k : k + 1], single, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="generators"):
        sampler(Toy(), x, s, 10, generator=gens[:2], **kw)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_dtype_preserved_and_callback_can_stop(name):
    s = Schedule.scaled_linear()
    g = torch.Generator().manual_seed(0)
    out = SAMPLERS[name](Toy(torch.float64), x_T(torch.float64), s, 10, generator=g)
    assert out.dtype == torch.float64 and out.shape == SHAPE and torch.isfinite(out).all()

    class Stop(Exception):
        pass

    def cb(i, t, x):
        assert isinstance(i, int) and isinstance(t, int) and x.shape == SHAPE
        if i == 2:
            raise Stop

    with pytest.raises(Stop):
        SAMPLERS[name](Toy(), x_T(), s, 10, generator=g, callback=cb)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_cuda_latents_with_cpu_generator_match_cpu(name):
    """A CPU generator drives CUDA latents: noise is drawn on the generator's device, so results match CPU."""
    s = Schedule.scaled_linear()
    kw = dict(eta=1.0) if name == "ddim" else {}
    cpu = SAMPLERS[name](
        Toy(torch.float64), x_T(torch.float64), s, 10, generator=torch.Generator().manual_seed(4), **kw
    )
    toy = Toy(torch.float64)
    toy.w, toy.b = toy.w.cuda(), toy.b.cuda()
    gpu = SAMPLERS[name](toy, x_T(torch.float64).cuda(), s, 10, generator=torch.Generator().manual_seed(4), **kw)
    assert gpu.device.type == "cuda" and rel(gpu.cpu(), cpu) < 1e-10
