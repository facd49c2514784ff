"""Textual inversion training (Gal et al. 2022, §4.1): learn one word's vectors, every other weight frozen.

    python -m inversion.train --concept cat [--model sd15|sd21|tiny|…] [--ckpt PATH] [--steps auto|N]
                              [--recipe fast|official] …
    torchrun --nproc_per_node=N -m inversion.train …          (DDP: NCCL on GPUs, gloo on CPU)

A run is a `TrainConfig` (inversion/config.py), a step function (`train_step`) and a run folder (`RunDir`,
inversion/rundir.py, which lists its files); `train` is the loop that joins them.

Loss: ε-MSE (v-MSE for v-models) at t ~ U{0, …, T−1} on z drawn from the cached VAE posterior, with a
prompt from the templates holding the placeholder; AdamW on the placeholder rows only; effective LR =
base LR × batch × accumulation × world size (the official `scale_lr`).

Randomness: global sample k (counted over steps, accumulation micro-batches, ranks and batch rows) owns a
generator seeded from (seed, k) that draws its flip, template, timestep, noise and latent, and the image
comes from a per-epoch shuffle keyed by (seed, epoch); so N processes × batch B equal one process × batch
N·B, and a resumed run repeats exactly what the uninterrupted one would have done.

Stopping: Ctrl-C finishes the current step, saves and exits 0 (a second Ctrl-C quits at once, keeping the last
save); a kill -9 or a full disk loses at most the steps since the last save, and RESUME=OUT continues from it
bit-identically. NaN/inf steps are skipped and counted; MAX_BAD_STEPS in a row stop the run with advice.
STEPS=auto stops when the fixed-batch objective settles (inversion/stopping.py). --deterministic: see
ldm/determinism.py for what it guarantees on each device.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from inversion import data as D
from inversion import initsearch, models, stopping
from inversion.batches import Batches
from inversion.config import TrainConfig
from inversion.distributed import Dist, GracefulStop, any_rank, barrier, init_distributed
from inversion.embedding import InversionError, LearnedWords
from inversion.models import model_hash
from inversion.rundir import RunDir, load_state, plot_loss, read_loss_csv, rng_state, set_rng_state
from inversion.templates import TemplateError, dual_templates, load_templates
from ldm import cli, determinism
from ldm.precision import DTYPES

log = logging.getLogger("inversion.train")

# --- the loss ----------------------------------------------------------------------------------------------


class InversionLoss(nn.Module):
    """ε-MSE of the frozen UNet given a context from the frozen text tower with the learned rows spliced in."""

    def __init__(self, model, words: LearnedWords, reg_weight: float = 0.0) -> None:
        super().__init__()
        self.words = words  # the only submodule: DDP syncs just the learned rows
        self._frozen = [model]  # hidden from nn.Module so DDP neither broadcasts nor wraps it
        self.reg_weight = reg_weight

    @property
    def model(self):
        return self._frozen[0]

    def forward(
        self, ids: torch.Tensor, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        context = m.text_encoder(m.token_embeddings(ids, extra=self.words.vectors))
        x_t = m.schedule.q_sample(latents, t, noise)
        out = m.unet(x_t, t, context)
        target = m.schedule.prediction.target(latents, noise, t)
        dtype = torch.promote_types(out.dtype, torch.float32)  # fp32 at least (fp64 in gradient checks)
        mse = F.mse_loss(out.to(dtype), target.to(dtype))
        loss = mse + self.reg_weight * self.words.reg_loss() if self.reg_weight > 0 else mse
        return loss, mse.detach()


# --- one optimiser step ------------------------------------------------------------------------------------


def train_step(
    runner: nn.Module,
    batches: Batches,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: TrainConfig,
    d: Dist,
    step: int,
    active: int,
    autocast,
) -> tuple[float, bool]:
    """One optimiser step over ACCUM micro-batches on every rank → (mean ε-MSE, whether the update was applied:
    a NaN/inf loss or gradient skips it and leaves the vectors as they were)."""
    words = batches.words
    device = words.vectors.device
    per_step = config.batch * d.world * config.accum
    mse_sum = torch.zeros((), device=device)
    for a in range(config.accum):
        first = step * per_step + (a * d.world + d.rank) * config.batch
        inputs = batches(list(range(first, first + config.batch)), active)
        sync = runner.no_sync() if d.world > 1 and a < config.accum - 1 else nullcontext()
        with sync:
            with autocast:
                loss, mse = runner(*inputs)
            scaler.scale(loss / config.accum).backward()
        mse_sum += mse
    scaler.unscale_(optimizer)
    grad = words.vectors.grad
    finite = grad is not None and bool(torch.isfinite(grad).all()) and bool(torch.isfinite(mse_sum))
    if finite:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if d.world > 1:
        dist.all_reduce(mse_sum)
        mse_sum /= d.world
    return float(mse_sum) / config.accum, finite


# --- setting a run up --------------------------------------------------------------------------------------


def fixed_latents(model, images: D.ConceptImages, cache: D.LatentCache | None) -> torch.Tensor:
    """Every concept image, unflipped, at its posterior mean (scaled): the latents of the fixed batch."""
    if cache is not None:
        return cache.mean[:, 0].float() * cache.scale
    with torch.no_grad():
        post = model.posterior(images.batch(list(range(len(images))), [False] * len(images)))
    return post.mean.float().cpu() * model.config.scale_factor


def checkpoint_identity(config: TrainConfig) -> tuple[str | None, str | None]:
    """(short hash, name) of the base checkpoint for the A1111 file."""
    try:
        h, name = model_hash(config.model, config.ckpt)
        return h or None, name or None
    except Exception as e:  # the hash is informational only
        log.debug("no checkpoint hash: %s", e)
        return None, config.model


def latent_cache(config: TrainConfig, model, images: D.ConceptImages, d: Dist) -> D.LatentCache | None:
    """Rank 0 fills the on-disk cache first, the others then read it (None: encode every step)."""
    if config.no_latent_cache:
        return None
    cache_dir = config.latent_cache or None
    cache = D.LatentCache(model, images, cache_dir) if d.main else None
    barrier(d)
    return cache if d.main else D.LatentCache(model, images, cache_dir)


def freeze(model, config: TrainConfig) -> None:
    """Every weight frozen; the UNet and text tower in half precision if asked (the learned rows stay fp32)."""
    model.requires_grad_(False).eval()
    dtype = DTYPES[config.precision]
    if dtype != torch.float32:
        model.unet.to(dtype)
        model.text_encoder.to(dtype)
    if hasattr(model.unet, "set_gradient_checkpointing"):
        model.unet.set_gradient_checkpointing(bool(config.checkpointing))
    elif config.checkpointing:
        raise InversionError("this UNet has no gradient checkpointing switch")


@dataclass
class Result:
    """How a run ended: its folder, the last step saved, and why it stopped."""

    run: RunDir
    config: TrainConfig
    step: int
    interrupted: bool = False
    stop_reason: str | None = None


@dataclass
class Session:
    """Everything the loop touches, built once by `setup` (and restored from state.pt on RESUME)."""

    config: TrainConfig
    d: Dist
    out: RunDir
    model: object
    words: LearnedWords
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    runner: nn.Module
    batches: Batches
    lr: float
    autocast: object
    checkpoint: tuple[str | None, str | None]
    rule: stopping.StopRule | None = None
    objective: stopping.DeterministicObjective | None = None
    start: int = 0
    skipped: int = 0
    bad_in_row: int = 0
    rows: list = field(default_factory=list)

    def save(self, step: int) -> None:
        """The embedding files and the RESUME state (rank 0 only)."""
        if self.d.main:
            state = {
                "vectors": self.words.vectors.detach().cpu().clone(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "step": step,
                "skipped": self.skipped,
                "bad_in_row": self.bad_in_row,
                "rng": rng_state(),
                "token_ids": self.words.tokens,
                **({"stop_rule": self.rule.state_dict()} if self.rule else {}),
            }
            self.out.save(self.words, step, state, self.checkpoint)

    def restore(self) -> None:
        """RESUME: vectors, optimiser, scaler, counters, every RNG and the stop rule from state.pt."""
        if not self.out.state_path.is_file():
            log.warning(
                "RESUME=%s: no state.pt yet (stopped before its first save); starting from step 0", self.out.path
            )
            return
        st = load_state(self.out.state_path)
        if tuple(st["vectors"].shape) != tuple(self.words.vectors.shape):
            raise InversionError(
                f"RESUME={self.out.path}: state.pt holds vectors {tuple(st['vectors'].shape)} but "
                f"this run needs {tuple(self.words.vectors.shape)}; was args.json edited?"
            )
        with torch.no_grad():
            self.words.vectors.copy_(st["vectors"].to(self.words.vectors.device))
        self.optimizer.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        self.start, self.skipped, self.bad_in_row = st["step"], st["skipped"], st["bad_in_row"]
        set_rng_state(st["rng"])
        if self.rule is not None and "stop_rule" in st:
            self.rule.load_state_dict(st["stop_rule"])
        if self.start >= self.config.steps:
            log.info("run %s already has %d steps (STEPS=%d)", self.out.path, self.start, self.config.steps)
        self.rows = read_loss_csv(self.out.loss_path, self.start)

    def active(self, step: int) -> int:
        """Vectors in use at `step`: all of them, or one more every --progressive steps."""
        n, every = self.words.num_vectors, self.config.progressive
        return min(n, 1 + step // every) if every else n

    def settled(self, step: int, active: int) -> str | None:
        """STEPS=auto: the fixed-batch objective at multiples of --stop-every; rank 0's reason to stop, if any."""
        rule = self.rule
        if rule is None or step % self.config.stop_every or (rule.history and rule.history[-1][0] >= step):
            return None
        with self.autocast:
            reason = rule.update(step, self.objective(active))
        return (reason or "rank 0's stop rule") if any_rank(reason is not None and self.d.main, self.d) else None


# --- setting a run up --------------------------------------------------------------------------------------


def setup(config: TrainConfig, model=None) -> Session:
    """The run folder, the frozen model, the learned words, optimiser, batches and stop rule, as `config` says."""
    d, device = init_distributed(config.device)
    if config.deterministic:
        determinism.enable(device, config.seed)
    concept = D.resolve_concept(config.concept)
    try:
        templates, duals = load_templates(config.templates), dual_templates(config.templates)
    except TemplateError as e:
        raise InversionError(str(e)) from None
    out = RunDir.create(config.out, concept, bool(config.resume), config.overwrite) if d.main else None
    if d.world > 1:  # every rank uses rank 0's run folder
        holder = [str(out.path) if out else None]
        dist.broadcast_object_list(holder, src=0)
        out = RunDir(holder[0])
    config = config.replace(out=str(out.path))
    if model is None:
        model = models.load(config.model, config.ckpt, device, torch.float32)
    config = config.resolve(model, concept, cpu=device.type == "cpu")
    cli.check([cli.steps_rule("--val-steps", config.val_steps, model)], InversionError)
    freeze(model, config)
    config.check_context(model.tokenizer, templates, duals)
    if config.progressive and (config.vectors - 1) * config.progressive >= config.steps:
        log.warning(
            "--progressive %d adds vector %d at step %d, not before STEPS=%d: the last vectors never train",
            config.progressive,
            config.vectors,
            (config.vectors - 1) * config.progressive,
            config.steps,
        )
    images = D.ConceptImages(concept, config.size, config.center_crop)
    if config.per_image_tokens and len(images) > 64:
        raise InversionError(f"--per-image-tokens with {len(images)} images; use at most 64")
    words = LearnedWords(
        model,
        config.token,
        config.vectors,
        config.init_word_list(),
        per_image=len(images) if config.per_image_tokens else 0,
        generator=torch.Generator().manual_seed(D.mix_seed(config.seed, 0x1417)),
    ).to(device)
    lr = config.scaled_lr(d.world)
    loss_fn = InversionLoss(model, words, config.reg_weight)
    runner: nn.Module = loss_fn
    if d.world > 1:
        runner = DDP(loss_fn, device_ids=[device.index] if device.type == "cuda" else None)
    cache = latent_cache(config, model, images, d)
    vf = model.config.vae_factor
    latent_shape = (
        cache.latent_shape if cache else (model.config.unet["in_channels"], config.size // vf, config.size // vf)
    )
    batches = Batches(model, words, images, cache, templates, duals, config, latent_shape, device)
    autocast = (
        torch.autocast(device.type, dtype=DTYPES[config.precision]) if config.precision != "fp32" else nullcontext()
    )
    objective = None
    if config.auto or config.init_search:
        objective = stopping.DeterministicObjective(
            loss_fn, batches, fixed_latents(model, images, cache), config.seed, batch=config.batch
        )
    if config.init_search:
        searched = out.path / initsearch.FILE
        if config.resume and searched.is_file():
            initsearch.resume(model, words, json.loads(searched.read_text()))
        else:
            with autocast:
                record = initsearch.search(model, words, objective, config.init, config.init_search)
            if d.main:
                out.write_json(initsearch.FILE, record)
    optimizer = torch.optim.AdamW([words.vectors], lr=lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    s = Session(
        config,
        d,
        out,
        model,
        words,
        optimizer,
        scaler,
        runner,
        batches,
        lr,
        autocast,
        checkpoint_identity(config) if d.main else (None, None),
        objective=objective,
    )
    if config.auto:
        s.rule = stopping.StopRule(config.stop_window, config.stop_threshold)
    if config.resume:
        s.restore()
    if d.main:
        out.write_json(
            "args.json",
            {
                "options": config.options(),
                "lr": lr,
                "world_size": d.world,
                "model": model.config.name,
                "token_ids": words.tokens,
                "width": int(words.vectors.shape[1]),
                "images": [p.name for p in images.paths],
                "latent_cache": cache is not None,
            },
        )
        log.info(
            "learning rate %.3e (%s)",
            lr,
            "as given"
            if config.no_scale_lr
            else f"base {config.lr:.3e} × batch {config.batch} × accumulation {config.accum} × {d.world} process(es)",
        )
        log.info(
            "training %s (%d vectors) on %d images of %s, %d px, batch %d × accum %d × %d, %s → %s",
            config.token,
            config.vectors,
            len(images),
            concept,
            config.size,
            config.batch,
            config.accum,
            d.world,
            f"at most {config.steps} steps (auto)" if config.auto else f"{config.steps} steps",
            out.path,
        )
    return s


# --- the loop ----------------------------------------------------------------------------------------------


def run(config: TrainConfig, model=None) -> Result:
    """Run (or resume) textual inversion as `config` says."""
    s = setup(config, model)
    config, d, out = s.config, s.d, s.out
    loss_log = out.open_loss_log(s.rows) if d.main else None
    bar = tqdm(
        total=config.steps,
        initial=s.start,
        desc=f"learning {config.token}",
        unit="step",
        dynamic_ncols=True,
        disable=not d.main or config.no_progress,
    )
    result = Result(out, config, s.start)
    with GracefulStop(d) as stop:
        try:
            if s.start == 0:
                s.settled(0, s.active(0))
            for step in range(s.start, config.steps):
                active = s.active(step)
                value, applied = train_step(
                    s.runner, s.batches, s.optimizer, s.scaler, config, d, step, active, s.autocast
                )
                s.skipped, s.bad_in_row = s.skipped + (not applied), 0 if applied else s.bad_in_row + 1
                done = result.step = step + 1
                s.rows.append((done, value, s.lr, s.skipped))
                if loss_log is not None:
                    loss_log.write(f"{done},{value:.6g},{s.lr:.6g},{s.skipped}\n")
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", skipped=s.skipped, refresh=False)
                if s.bad_in_row >= config.max_bad_steps:  # skipped steps left the vectors as they were: keep them
                    s.save(done)
                    raise InversionError(
                        f"{s.bad_in_row} steps in a row gave NaN/inf loss or gradients (last at "
                        f"step {done}; the vectors from before them are saved in {out.path}); "
                        "lower LR, use PRECISION=bf16 or fp32, or check the checkpoint"
                    )
                result.stop_reason = s.settled(done, active)
                last = done == config.steps or result.stop_reason is not None
                saved = done % config.save_every == 0 or last
                if saved:
                    s.save(done)
                    every = config.validation_every
                    if d.main and every and (done % every == 0 or last):
                        out.validation_grid(
                            s.model,
                            s.words,
                            config.validation_prompts,
                            config.val_n,
                            config.val_steps or s.model.config.steps,
                            config.size,
                            config.seed,
                            done,
                        )
                    barrier(d)
                if stop.requested() and done < config.steps:  # Ctrl-C: this step is complete, keep it and leave
                    if not saved:
                        s.save(done)
                    result.interrupted = True
                    log.warning(
                        "interrupted at step %d of %d: saved %s; continue with RESUME=%s",
                        done,
                        config.steps,
                        out / "learned_embeds.safetensors",
                        out.path,
                    )
                    break
                if result.stop_reason is not None:
                    break
        finally:
            bar.close()
            if loss_log is not None:
                loss_log.close()
    if d.main:
        finish(s, result)
    barrier(d)
    return result


def finish(s: Session, result: Result) -> None:
    """After the loop (rank 0): a resumed, already finished run saves again; stop.json; the loss plot."""
    config, out, rule = s.config, s.out, s.rule
    if s.start >= config.steps:
        s.save(s.start)
    if rule is not None and not result.interrupted:
        result.stop_reason = result.stop_reason or f"reached --max-steps {config.max_steps} first"
        out.write_json(
            "stop.json",
            {
                "stopped_at": result.step,
                "reason": result.stop_reason,
                "max_steps": config.max_steps,
                "rule": {"every": config.stop_every, "window": rule.window, "threshold": rule.threshold},
                "objective": [{"step": t, "value": v} for t, v in rule.history],
            },
        )
        log.info("STEPS=auto stopped at step %d: %s", result.step, result.stop_reason)
    if s.rows:
        plot_loss(
            s.rows,
            out / "loss.png",
            f"{config.token}: {config.steps} steps, batch {config.batch}×{config.accum}×{s.d.world}",
        )
    if s.skipped:
        log.warning("%d step(s) skipped for NaN/inf loss or gradients", s.skipped)


def train(config: TrainConfig, model=None) -> Path:
    """Run (or resume) textual inversion as `config` says; returns the run folder."""
    return run(config, model).run.path


def main(argv: list[str] | None = None) -> int:
    config = TrainConfig.from_argv(argv)
    started = time.time()
    result = run(config)
    if int(os.environ.get("RANK", "0")) == 0:
        rows = read_loss_csv(result.run.loss_path, result.step)
        last = f", loss {rows[-1][1]:.4f}" if rows else ""
        files = result.run / "learned_embeds.safetensors"
        if result.interrupted:
            print(
                f"stopped by Ctrl-C at step {result.step} of {config.steps}{last}; saved {files}; "
                f"continue with RESUME={result.run.path}"
            )
        else:
            why = f" (STEPS=auto stopped at step {result.step}: {result.stop_reason})" if result.stop_reason else ""
            print(f"learned {result.config.token} in {time.time() - started:.0f} s{last}: {files}{why}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def cli_main(argv: list[str] | None = None) -> int:
    return cli.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli_main())
