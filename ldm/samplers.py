"""Samplers as pure functions with one signature: DDIM, PLMS, DDPM ancestral, DPM-Solver++(2M).

Each is `sampler(model_fn, x_T, schedule, steps, *, eta=0.0, generator=None, callback=None, start=0, hook=None)
-> x_0` where `model_fn(x, t)` gets a LongTensor t of shape (B,) and returns the raw network output (ε or v, as
`schedule.prediction` says). Work stays in x_T's dtype; step coefficients are computed in float64 (Python
floats) and cast on use. `generator` is one torch.Generator or a list of them, one per batch row.

Image editing uses the last two: `start` skips the first `start` steps of the sampler's schedule (x_T is then the
latents entering step `start`, at timestep `sampler_timesteps(...)[start]`), and `hook(i, t, x, alpha_bar)` runs
after every step and returns the x to continue with, where `alpha_bar` is ᾱ of the noise level x is at after the
step (1.0 for clean). `i` counts from 0 over the steps run; `callback` sees the hook's x.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ldm.schedule import Schedule

__all__ = [
    "ddim",
    "plms",
    "ddpm",
    "dpmpp_2m",
    "timesteps",
    "dpm_timesteps",
    "sampler_timesteps",
    "noise_like",
    "SAMPLERS",
]

log = logging.getLogger(__name__)

ModelFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, int, Tensor], None]
Hook = Callable[[int, int, Tensor, float], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None

# Adams–Bashforth coefficients on the ε history, newest first (PLMS, Liu et al. 2022, eq. 12).
_AB = {1: (3.0, -1.0), 2: (23.0, -16.0, 5.0), 3: (55.0, -59.0, 37.0, -9.0)}
_AB_DEN = {1: 2.0, 2: 12.0, 3: 24.0}


def _check_steps(steps: int, num_timesteps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be an integer in [1, {num_timesteps}], got {steps!r}")


def timesteps(steps: int, num_timesteps: int = 1000, offset: int = 1) -> list[int]:
    """CompVis "uniform" DDIM timesteps, ascending: range(0, T, T // steps) + offset (S=50 → 1, 21, …, 981).

    Where T // steps divides T − 1 (S = 3, 9, 27, 37, 111, 250–333, > 500) the rule yields t = T, which the
    CompVis sampler indexes out of range; that one timestep is dropped here (S = 3 → 1, 334, 667).
    """
    _check_steps(steps, num_timesteps)
    ts = [t + offset for t in range(0, num_timesteps, num_timesteps // steps)]
    if ts[-1] >= num_timesteps:
        log.warning(
            "steps=%d: the CompVis 'uniform' rule reaches t=%d >= %d; dropping it (%d steps remain)",
            steps,
            ts[-1],
            num_timesteps,
            len(ts) - 1,
        )
        ts = [t for t in ts if t < num_timesteps]
    return ts


def dpm_timesteps(steps: int, num_timesteps: int = 1000) -> list[int]:
    """diffusers' default "linspace" spacing, descending: round(linspace(0, T−1, S+1))[::-1][:-1]."""
    _check_steps(steps, num_timesteps)
    step = (num_timesteps - 1) / steps  # numpy.linspace's k·step, last point exact, round half to even
    points = [round(k * step) for k in range(steps)] + [num_timesteps - 1]
    return points[::-1][:-1]


def sampler_timesteps(name: str, steps: int, num_timesteps: int = 1000) -> list[int]:
    """The timesteps a sampler visits, in the order it visits them (what `start` indexes)."""
    if name in ("ddim", "plms"):
        return timesteps(steps, num_timesteps)[::-1]
    if name == "ddpm":
        return timesteps(steps, num_timesteps, offset=0)[::-1]
    if name == "dpmpp_2m":
        return dpm_timesteps(steps, num_timesteps)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def _check_start(start: int, n: int) -> None:
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= n:
        raise ValueError(f"start must be an integer in [0, {n}] (the schedule's steps), got {start!r}")


def _after_step(i: int, t: int, x: Tensor, alpha_bar: float, hook: Hook | None, callback: Callback | None) -> Tensor:
    if hook is not None:
        x = hook(i, t, x, alpha_bar)
    if callback is not None:
        callback(i, t, x)
    return x


def noise_like(x: Tensor, generator: Generators) -> Tensor:
    """N(0, I) shaped like x, drawn only from `generator` (row i from generator[i] when a list)."""
    if generator is None:
        return torch.randn(x.shape, device=x.device, dtype=x.dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {x.shape[0]}; pass one per row")
    rows = [torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=x.dtype) for g in gens]
    return torch.cat([r.to(x.device) for r in rows])


def _tvec(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def _ddim_update(x0: Tensor, eps: Tensor, a_prev: float, sigma: float, generator: Generators) -> Tensor:
    """x_prev = √ᾱ_prev·x₀ + √(1−ᾱ_prev−σ²)·ε + σ·n (DDIM, Song et al. 2021, eq. 12)."""
    x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev - sigma**2) * eps
    if sigma > 0:
        x = x + sigma * noise_like(x, generator)
    return x


def _eps_update(x: Tensor, eps: Tensor, a_t: float, a_prev: float) -> Tensor:
    """The σ = 0 DDIM update from ε alone: x₀ = (x − √(1−ᾱ)·ε)/√ᾱ, then eq. 12."""
    x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    return _ddim_update(x0, eps, a_prev, 0.0, None)


def ddim(
    model_fn: ModelFn,
    x_T: Tensor,
    schedule: Schedule,
    steps: int,
    *,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
    hook: Hook | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12, 16) on the CompVis "uniform" timesteps; ᾱ_prev at the last step is ᾱ₀."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts = timesteps(steps, schedule.num_timesteps)
    _check_start(start, len(ts))
    ab = schedule.alphas_cumprod.tolist()
    pred = schedule.prediction
    x = x_T
    for i, idx in enumerate(reversed(range(len(ts) - start))):
        t = ts[idx]
        a_t, a_prev = ab[t], ab[ts[idx - 1]] if idx > 0 else ab[0]
        sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        out = model_fn(x, _tvec(t, x))
        x = _ddim_update(pred.to_x0(out, x, t), pred.to_eps(out, x, t), a_prev, sigma, generator)
        x = _after_step(i, t, x, a_prev, hook, callback)
    return x


def plms(
    model_fn: ModelFn,
    x_T: Tensor,
    schedule: Schedule,
    steps: int,
    *,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
    hook: Hook | None = None,
) -> Tensor:
    """PLMS (Liu et al. 2022) as CompVis runs it: pseudo improved Euler first, then AB2/AB3/AB4 on ε."""
    if eta != 0:
        raise ValueError(f"PLMS is deterministic and needs eta = 0, got {eta}")
    ts = timesteps(steps, schedule.num_timesteps)[::-1]
    _check_start(start, len(ts))
    ab = schedule.alphas_cumprod.tolist()
    pred = schedule.prediction
    old_eps: list[Tensor] = []
    x = x_T
    for i, k in enumerate(range(start, len(ts))):
        t = ts[k]
        t_next = ts[min(k + 1, len(ts) - 1)]
        a_t, a_prev = ab[t], ab[ts[k + 1]] if k + 1 < len(ts) else ab[0]
        e_t = pred.to_eps(model_fn(x, _tvec(t, x)), x, t)
        if not old_eps:
            x_mid = _eps_update(x, e_t, a_t, a_prev)
            e_next = pred.to_eps(model_fn(x_mid, _tvec(t_next, x)), x_mid, t_next)
            e_prime = (e_t + e_next) / 2
        else:
            order = min(len(old_eps), 3)
            coefs = _AB[order]
            e_prime = coefs[0] * e_t
            for c, e in zip(coefs[1:], reversed(old_eps)):
                e_prime = e_prime + c * e
            e_prime = e_prime / _AB_DEN[order]
        x = _eps_update(x, e_prime, a_t, a_prev)
        old_eps = (old_eps + [e_t])[-3:]
        x = _after_step(i, t, x, a_prev, hook, callback)
    return x


def ddpm(
    model_fn: ModelFn,
    x_T: Tensor,
    schedule: Schedule,
    steps: int,
    *,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
    hook: Hook | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 6–7) on the chain t = T−c, …, c, 0 with c = T // steps.

    Each step samples the posterior q(x_prev | x_t, x₀) of the (strided) chain with the "fixed_small" variance
    (1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev), ᾱ_prev = 1 after t = 0 and no noise at the last step. `eta` is not
    used: this chain is DDIM with η = 1; it is accepted so that every sampler shares one signature.
    """
    if eta not in (0.0, 1.0):
        log.debug("ddpm ignores eta=%s: ancestral DDPM is the η = 1 chain", eta)
    ts = timesteps(steps, schedule.num_timesteps, offset=0)[::-1]
    _check_start(start, len(ts))
    ab = schedule.alphas_cumprod.tolist()
    pred = schedule.prediction
    x = x_T
    for i, k in enumerate(range(start, len(ts))):
        t = ts[k]
        last = k + 1 == len(ts)
        a_t, a_prev = ab[t], 1.0 if last else ab[ts[k + 1]]
        alpha = a_t / a_prev
        beta = 1.0 - alpha
        c_x0 = math.sqrt(a_prev) * beta / (1.0 - a_t)
        c_xt = math.sqrt(alpha) * (1.0 - a_prev) / (1.0 - a_t)
        out = model_fn(x, _tvec(t, x))
        x_new = c_x0 * pred.to_x0(out, x, t) + c_xt * x
        if not last:
            var = max((1.0 - a_prev) / (1.0 - a_t) * beta, 1e-20)
            x_new = x_new + math.sqrt(var) * noise_like(x_new, generator)
        x = _after_step(i, t, x_new, a_prev, hook, callback)
    return x


def dpmpp_2m(
    model_fn: ModelFn,
    x_T: Tensor,
    schedule: Schedule,
    steps: int,
    *,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
    hook: Hook | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data-prediction form, on diffusers' "linspace" timesteps.

    Like diffusers' defaults (final_sigmas_type="zero", lower_order_final=True), the first step is first
    order and the last step goes to σ = 0 with a first-order update, which returns that step's x₀ exactly.
    """
    if eta != 0:
        raise ValueError(f"DPM-Solver++(2M) is deterministic and needs eta = 0, got {eta}")
    ts = dpm_timesteps(steps, schedule.num_timesteps)
    _check_start(start, len(ts))
    ab = schedule.alphas_cumprod.tolist()
    pred = schedule.prediction
    lam = [0.5 * (math.log(ab[t]) - math.log1p(-ab[t])) for t in ts]  # λ = log(α/σ), α = √ᾱ, σ = √(1−ᾱ)
    x = x_T
    x0_prev: Tensor | None = None
    for i, k in enumerate(range(start, len(ts))):
        t = ts[k]
        x0 = pred.to_x0(model_fn(x, _tvec(t, x)), x, t)
        if k + 1 == len(ts):
            x, a_next = x0, 1.0
        else:
            s = ts[k + 1]
            a_next = ab[s]
            h = lam[k + 1] - lam[k]
            ratio = math.sqrt((1.0 - ab[s]) / (1.0 - ab[t]))  # σ_next / σ_t
            c = -math.sqrt(ab[s]) * math.expm1(-h)  # −α_next·(e^{−h} − 1)
            d = x0
            if x0_prev is not None and h > 0 and lam[k] > lam[k - 1]:  # repeated t (S near T): first order
                r = (lam[k] - lam[k - 1]) / h
                d = x0 + (0.5 / r) * (x0 - x0_prev)
            x = ratio * x + c * d
        x0_prev = x0
        x = _after_step(i, t, x, a_next, hook, callback)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddim": ddim, "plms": plms, "ddpm": ddpm, "dpmpp_2m": dpmpp_2m}
