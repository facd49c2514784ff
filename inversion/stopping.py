"""STEPS=auto: a training run that stops by itself (after Voronov et al. 2023, "Is This Loss Informative?").

The training loss of textual inversion is too noisy to show convergence: each step draws new images, templates,
timesteps and noise. The same ε-MSE evaluated on a *fixed* set of inputs — every concept image unflipped at its
posterior mean, a fixed template, `TIMESTEPS` stratified timesteps and fixed noise — moves only when the vectors
move, so its curve shows when the word stops changing what the model predicts.

`DeterministicObjective` computes that value without gradients and without touching any random state of the
run (an auto run that stops at step S holds exactly the vectors of a `STEPS=S` run). `StopRule` applies the
published criterion to its history: stop when the variance of the last `window` values falls below
`threshold` × the variance of every value so far. Its state travels in `state.pt`, so RESUME continues the rule
where it was.

The rule's clock is the cap: it evaluates every `every(max_steps)` steps, so a 300-step run on a small model is
watched as closely, relative to its length, as a 6,100-step Stable Diffusion run, and the earliest possible stop
is `MIN_EVALUATIONS − 1` intervals in (70 of 300, 1,421 of 6,100).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inversion import data as D

TIMESTEPS = 4  # stratified timesteps per image in the fixed batch
EVALUATIONS = 30  # evaluations over a run's --max-steps cap: one every cap // 30 steps (6100 → 203, 300 → 10)
WINDOW = 5  # evaluations in the "recent" window
THRESHOLD = 0.1  # recent variance / overall variance below this stops the run
MIN_EVALUATIONS = 8  # never stop before this many evaluations (the first is at step 0)
EVAL_SEED = 0xE7A1  # mixed with SEED: the fixed noise of the objective


def every(max_steps: int) -> int:
    """Optimiser steps between two evaluations of the objective under a cap of `max_steps`."""
    return max(1, max_steps // EVALUATIONS)


class DeterministicObjective:
    """ε-MSE of the current vectors on one fixed batch (images × stratified timesteps), no gradients."""

    def __init__(
        self, loss_fn, batches, latents: torch.Tensor, seed: int, batch: int = 8, timesteps: int = TIMESTEPS
    ) -> None:
        self.loss_fn, self.batches, self.batch = loss_fn, batches, batch
        n = latents.shape[0]
        T = loss_fn.model.schedule.num_timesteps
        g = torch.Generator().manual_seed(D.mix_seed(seed, EVAL_SEED))
        templates = batches.templates
        self.latents = latents.repeat_interleave(timesteps, 0)  # (n·m, C, h, w)
        self.t = torch.tensor([int((j + 0.5) * T / timesteps) for _ in range(n) for j in range(timesteps)])
        self.noise = torch.randn(self.latents.shape, generator=g)
        self.prompts = [
            templates[(i * timesteps + j) % len(templates)].format(loss_fn.words.token)
            for i in range(n)
            for j in range(timesteps)
        ]

    @property
    def size(self) -> int:
        """UNet image-passes of one evaluation."""
        return len(self.prompts)

    def _chunks(self, active: int):
        """(loss, detached ε-MSE, share of the batch), chunk by chunk."""
        dev = self.batches.device
        for s in range(0, self.size, self.batch):
            e = min(self.size, s + self.batch)
            ids = self.batches.tokenize(self.prompts[s:e], active).to(dev)
            loss, mse = self.loss_fn(ids, self.latents[s:e].to(dev), self.t[s:e].to(dev), self.noise[s:e].to(dev))
            yield loss, mse, (e - s) / self.size

    @torch.no_grad()
    def __call__(self, active: int) -> float:
        return sum(float(mse) * share for _, mse, share in self._chunks(active))

    def gradient(self, active: int) -> torch.Tensor:
        """d(objective)/d(every learned row) where the rows are their initial values (there the regulariser's
        gradient is zero), without touching the rows' .grad; for inversion/initsearch.py."""
        vectors = self.loss_fn.words.vectors
        total = torch.zeros_like(vectors)
        for loss, _, share in self._chunks(active):
            total += torch.autograd.grad(loss * share, vectors)[0]
        return total


@dataclass
class StopRule:
    """Stop when var(last `window` values) < `threshold` · var(all values), after `min_evaluations`."""

    window: int = WINDOW
    threshold: float = THRESHOLD
    min_evaluations: int = MIN_EVALUATIONS
    history: list[tuple[int, float]] = field(default_factory=list)

    def update(self, step: int, value: float) -> str | None:
        """Record the objective at `step`; the reason to stop, or None to go on."""
        self.history.append((step, value))
        if len(self.history) < max(self.min_evaluations, self.window + 1):
            return None
        values = torch.tensor([v for _, v in self.history], dtype=torch.float64)
        overall = float(values.var())
        recent = float(values[-self.window :].var())
        if overall > 0 and recent < self.threshold * overall:
            return (
                f"the fixed-batch objective settled: variance of its last {self.window} values "
                f"{recent:.3g} < {self.threshold:g} × its overall variance {overall:.3g}"
            )
        return None

    def state_dict(self) -> dict:
        return {"steps": [s for s, _ in self.history], "values": [v for _, v in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(zip(state["steps"], state["values"], strict=True))
