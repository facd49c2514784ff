"""Noise schedule of DDPM (Ho et al. 2020): betas, cumulative alphas, q_sample and eps/v/x0 conversions."""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.config import LINEAR_END, LINEAR_START, NUM_TIMESTEPS, ModelConfig

__all__ = ["Schedule", "EpsPrediction", "VPrediction", "PREDICTIONS"]


class Prediction:
    """What the network outputs, as conversions to ε and x₀ and the training target."""

    name = ""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def to_eps(self, out: Tensor, x_t: Tensor, t: int | Tensor) -> Tensor:
        raise NotImplementedError

    def to_x0(self, out: Tensor, x_t: Tensor, t: int | Tensor) -> Tensor:
        raise NotImplementedError

    def target(self, x0: Tensor, noise: Tensor, t: int | Tensor) -> Tensor:
        raise NotImplementedError

    def x0_weight(self, snr: Tensor) -> Tensor:
        """How the MSE of this prediction weighs an error of the clean latent at a signal-to-noise ratio."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EpsPrediction(Prediction):
    """ε-prediction (Ho et al. 2020): x₀ = (x_t − √(1−ᾱ)·ε)/√ᾱ."""

    name = "eps"

    def to_eps(self, out: Tensor, x_t: Tensor, t: int | Tensor) -> Tensor:
        return out

    def to_x0(self, out: Tensor, x_t: Tensor, t: int | Tensor) -> Tensor:
        a, s = self.schedule.coefficients(t, x_t)
        return (x_t - s * out) / a

    def target(self, x0: Tensor, noise: Tensor, t: int | Tensor) -> Tensor:
        return noise

    def x0_weight(self, snr: Tensor) -> Tensor:
        return snr  # ε-MSE = SNR · x₀-MSE


class VPrediction(Prediction):
    """v-prediction (Salimans & Ho 2022): v = √ᾱ·ε − √(1−ᾱ)·x₀."""

    name = "v"

    def to_eps(self, out: Tensor, x_t: Tensor, t: int | Tensor) -> Tensor:
        a, s = self.schedule.coefficients(t, x_t)
        return a * out + s * x_t

    def to_x0(self, out: Tensor, x_t: Tensor, t: int | Tensor) -> Tensor:
        a, s = self.schedule.coefficients(t, x_t)
        return a * x_t - s * out

    def target(self, x0: Tensor, noise: Tensor, t: int | Tensor) -> Tensor:
        a, s = self.schedule.coefficients(t, x0)
        return a * noise - s * x0

    def x0_weight(self, snr: Tensor) -> Tensor:
        return snr + 1  # v-MSE = (SNR + 1) · x₀-MSE


PREDICTIONS: dict[str, type[Prediction]] = {"eps": EpsPrediction, "v": VPrediction}


class Schedule:
    """Discrete forward process q(x_t | x₀) = N(√ᾱ_t·x₀, (1−ᾱ_t)·I), ᾱ held in float64."""

    def __init__(self, alphas_cumprod: Tensor, parameterization: str = "eps") -> None:
        ab = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).flatten()
        if ab.numel() < 1 or not bool(((ab > 0) & (ab <= 1)).all()):
            raise ValueError("alphas_cumprod must be a non-empty 1-D tensor with values in (0, 1]")
        if parameterization not in PREDICTIONS:
            raise ValueError(f"parameterization must be one of {sorted(PREDICTIONS)}, got {parameterization!r}")
        self.alphas_cumprod = ab
        self.parameterization = parameterization
        self.prediction: Prediction = PREDICTIONS[parameterization](self)
        self._tables: dict[torch.device, Tensor] = {torch.device("cpu"): ab}

    @classmethod
    def scaled_linear(
        cls,
        linear_start: float = LINEAR_START,
        linear_end: float = LINEAR_END,
        timesteps: int = NUM_TIMESTEPS,
        parameterization: str = "eps",
    ) -> Schedule:
        """LDM "scaled linear" betas: β = linspace(√start, √end, T)², ᾱ = cumprod(1 − β), all float64."""
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0), parameterization)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Schedule:
        """The schedule a ModelConfig describes (scaled linear betas, its parameterization)."""
        return cls.scaled_linear(cfg.linear_start, cfg.linear_end, cfg.timesteps, cfg.parameterization)

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def betas(self) -> Tensor:
        prev = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])
        return 1.0 - self.alphas_cumprod / prev

    def _table(self, device: torch.device) -> Tensor:
        if device not in self._tables:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._tables[device] = self.alphas_cumprod.to(device, dtype)
        return self._tables[device]

    def _gather(self, t: int | Tensor, x: Tensor) -> Tensor:
        """ᾱ_t in float64 (where the device allows), shaped (B, 1, …, 1) or (1, …, 1) to broadcast over x."""
        if isinstance(t, Tensor) and t.ndim > 0:
            ab = self._table(t.device)[t.long()]
            return ab.to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
        t = int(t)
        if not 0 <= t < self.num_timesteps:
            raise IndexError(f"timestep {t} is outside [0, {self.num_timesteps})")
        ab = self._table(x.device)[t]
        return ab.reshape([1] * x.ndim)

    def alpha_bar(self, t: int | Tensor, x: Tensor) -> Tensor:
        """ᾱ_t broadcastable to x, in x's dtype and device."""
        return self._gather(t, x).to(x.dtype)

    def coefficients(self, t: int | Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(√ᾱ_t, √(1−ᾱ_t)) computed in float64, cast to x's dtype, broadcastable to x."""
        ab = self._gather(t, x)
        return ab.sqrt().to(x.dtype), (1.0 - ab).sqrt().to(x.dtype)

    def q_sample(self, x0: Tensor, t: int | Tensor, noise: Tensor) -> Tensor:
        """Forward process sample x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε (DDPM eq. 4)."""
        a, s = self.coefficients(t, x0)
        return a * x0 + s * noise

    def __repr__(self) -> str:
        return f"Schedule(num_timesteps={self.num_timesteps}, parameterization={self.parameterization!r})"
