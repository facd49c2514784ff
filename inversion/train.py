"""Textual inversion training (Gal et al. 2022, §4.1): learn one word's vectors, every other weight frozen.

    python -m inversion.train --concept cat [--model sd15|sd21|tiny|…] [--ckpt PATH] [--steps 6100] …
    torchrun --nproc_per_node=N -m inversion.train …          (DDP: NCCL on GPUs, gloo on CPU)

Loss: ε-MSE (v-MSE for v-models) at t ~ U{0, …, T−1} on z drawn from the cached VAE posterior, with a
prompt from the templates holding the placeholder; AdamW on the placeholder rows only; effective LR =
base LR × batch × accumulation × world size (the official `scale_lr`).

Randomness: global sample k (counted over steps, accumulation micro-batches, ranks and batch rows) owns a
generator seeded from (seed, k) that draws its flip, template, timestep, noise and latent, and the image
comes from a per-epoch shuffle keyed by (seed, epoch); so N processes × batch B equal one process × batch
N·B, and a resumed run repeats exactly what the uninterrupted one would have done.

Run directory (OUT; only rank 0 writes; every file is written atomically):
    args.json                   the resolved options (model, LR, world size, token ids …)
    embeddings.pt               official textual_inversion file (latest save)
    learned_embeds.safetensors  diffusers file (latest save)
    <token>.pt                  AUTOMATIC1111 file, e.g. cat.pt for <cat> (latest save)
    steps/…-step<N>.*           the three files every SAVE_EVERY steps
    samples/val-step<N>.png     validation grid: rows "a photo of <token>" + VAL_PROMPTS, VAL_N seeds each
    loss.csv, loss.png          per-step loss log, and its plot at the end
    state.pt                    RESUME state: vectors, optimiser, scaler, step, counters, every RNG state

Stopping: Ctrl-C finishes the current step, saves and exits 0 (a second Ctrl-C quits at once, keeping the last
save); a kill -9 or a full disk loses at most the steps since the last save, and RESUME=OUT continues from it
bit-identically. NaN/inf steps are skipped and counted; MAX_BAD_STEPS in a row stop the run with advice.
--deterministic: see ldm/determinism.py for what it guarantees on each device.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import random
import re
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from inversion import data as D
from inversion import embedding as E
from inversion import stopping
from inversion.embedding import InversionError, LearnedWords, atomic_write, save_embedding_files, save_torch
from inversion.templates import MIXING_PROB, TemplateError, dual_templates, load_templates, max_vectors
from ldm import cli
from ldm.tokenizer import fit_ids

log = logging.getLogger("inversion.train")

BASE_LR = 5e-3
STEPS = 6100
SEED = 23
SAVE_EVERY = 500
PROGRESSIVE_EVERY = 2000          # official PROGRESSIVE_SCALE
FAMILY_DEFAULTS = {"ldmbert": {"batch": 4, "size": 256}}   # the paper's LDM-1.4B config
SD_DEFAULTS = {"batch": 2}                                 # v1-finetune.yaml; size: the model's own
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- arguments ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m inversion.train", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--concept", help="folder under experiments/concepts/ or a path (CONCEPT=)")
    a("--model", default=None, help="sd15 | sd21 | sd21-v | shapes | tiny (MODEL=, default sd15)")
    a("--ckpt", default=None, help="checkpoint file or diffusers folder, overrides --model (CKPT=)")
    a("--steps", default=None, help=f"optimiser steps, or 'auto' to stop by itself (STEPS=, default {STEPS})")
    a("--max-steps", type=int, default=STEPS, help=f"cap of a STEPS=auto run (MAX_STEPS=, default {STEPS})")
    a("--stop-every", type=int, default=stopping.EVERY,
      help=f"STEPS=auto: evaluate the fixed-batch objective every N steps (default {stopping.EVERY})")
    a("--stop-window", type=int, default=stopping.WINDOW,
      help=f"STEPS=auto: evaluations in the recent window (default {stopping.WINDOW})")
    a("--stop-threshold", type=float, default=stopping.THRESHOLD,
      help=f"STEPS=auto: stop when recent/overall variance < this (default {stopping.THRESHOLD})")
    a("--batch", type=int, default=None, help="images per step per process (BATCH=; SD 2, LDM 4)")
    a("--accum", type=int, default=1, help="gradient accumulation micro-batches (ACCUM=)")
    a("--lr", type=float, default=BASE_LR, help=f"base learning rate (LR=, default {BASE_LR})")
    a("--no-scale-lr", action="store_true", help="use LR as is instead of LR × batch × accum × world")
    a("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (official: torch default 1e-2)")
    a("--init", default="sculpture", help="one-token init word (INIT=, official default 'sculpture')")
    a("--init-words", default=None, help="comma-separated one-token words spread over the vectors")
    a("--random-init", action="store_true", help="random init scaled to the token table's mean norm")
    a("--token", default=None, help="the new word (TOKEN=, default '<concept>')")
    a("--vectors", type=int, default=1, help="vectors per token (VECTORS=)")
    a("--progressive", type=int, nargs="?", const=PROGRESSIVE_EVERY, default=0,
      help=f"add a vector every N steps (paper ablation; bare flag: {PROGRESSIVE_EVERY})")
    a("--per-image-tokens", action="store_true", help="also learn one token per image (official option)")
    a("--reg-weight", type=float, default=0.0, help="embedding regularisation toward the init (official)")
    a("--templates", default="object", help="object | style | file.txt with '{}' (TEMPLATES=)")
    a("--size", type=int, default=None, help="training resolution in pixels (SIZE=; default the model's)")
    a("--center-crop", action="store_true", help="centre square crop before resizing")
    a("--repeats", type=int, default=100, help="dataset repeats per epoch (official 100)")
    a("--flip-p", type=float, default=0.5, help="horizontal flip probability")
    a("--seed", type=int, default=SEED, help=f"SEED= (default {SEED})")
    a("--out", default=None, help="run directory (OUT=, default runs/<concept>-<time>)")
    a("--overwrite", action="store_true", help="allow an OUT that already holds files")
    a("--save-every", type=int, default=SAVE_EVERY, help="save files + validation every N steps (SAVE_EVERY=)")
    a("--val-every", type=int, default=None, help="validation grid every N steps (0: never; default SAVE_EVERY)")
    a("--val-prompts", default="", help="';'-separated extra validation prompts; S* is the word (VAL_PROMPTS=)")
    a("--val-n", type=int, default=2, help="validation images per prompt")
    a("--val-steps", type=int, default=None, help="validation sampling steps (default the model's)")
    a("--precision", default="fp32", choices=sorted(PRECISIONS), help="fp32 | bf16 | fp16 (PRECISION=)")
    a("--checkpointing", type=int, default=0, choices=(0, 1), help="gradient checkpointing (CHECKPOINTING=1)")
    a("--resume", default=None, help="continue the run in this directory (RESUME=)")
    a("--latent-cache", default=str(D.DEFAULT_CACHE), help="latent cache folder ('' keeps it in memory)")
    a("--no-latent-cache", action="store_true", help="encode with the VAE every step (as the official code)")
    a("--device", default="auto", help="auto | cpu | cuda | mps (DEVICE=)")
    a("--max-bad-steps", type=int, default=25, help="stop after this many NaN/inf steps in a row")
    a("--deterministic", action="store_true",
      help="deterministic algorithms and reference kernels (see ldm/determinism.py for what each device promises)")
    a("--no-progress", action="store_true", help="no tqdm bar")
    return p


RESUMABLE_OVERRIDES = ("steps", "max_steps", "save_every", "val_every", "device", "no_progress", "max_bad_steps",
                       "deterministic")


def resolve_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse, merge with a resumed run's args.json, and check every value before anything loads."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        run = Path(args.resume)
        saved_path = run / "args.json"
        if not saved_path.is_file():
            raise InversionError(f"RESUME={run}: no args.json there; is it a training run directory?")
        saved = json.loads(saved_path.read_text())["options"]
        given = {k: v for k, v in vars(args).items() if v != parser.get_default(k)}
        args = argparse.Namespace(**{**vars(parser.parse_args([])), **saved})
        for k in RESUMABLE_OVERRIDES:
            if k in given:
                setattr(args, k, given[k])
        args.resume, args.out = str(run), str(run)
    if not args.concept:
        raise InversionError("give CONCEPT= (a folder under experiments/concepts/ or a path)")
    parse_steps(args)
    init_words = [w.strip() for w in args.init_words.split(",")] if args.init_words else None
    cli.check([
        cli.at_least("--max-steps", args.max_steps), cli.at_least("--stop-every", args.stop_every),
        cli.at_least("--stop-window", args.stop_window, 2),
        (0 < args.stop_threshold < 1, f"--stop-threshold {args.stop_threshold} must be between 0 and 1"),
        cli.at_least("STEPS", args.steps), cli.at_least("ACCUM", args.accum), cli.at_least("BATCH", args.batch),
        cli.at_least("VECTORS", args.vectors),
        (args.lr > 0 and math.isfinite(args.lr), f"LR={args.lr} must be a positive number"),
        cli.finite("--weight-decay", args.weight_decay, 0.0),
        cli.at_least("SAVE_EVERY", args.save_every), cli.at_least("--val-every", args.val_every, 0),
        cli.at_least("--val-n", args.val_n), cli.at_least("--val-steps", args.val_steps),
        (args.progressive >= 0, f"--progressive {args.progressive} must be ≥ 0"),
        (args.repeats >= 1, f"--repeats {args.repeats} must be at least 1"),
        (0.0 <= args.flip_p <= 1.0, f"--flip-p {args.flip_p} must be in [0, 1]"),
        (args.size is None or args.size >= 8, f"SIZE={args.size} is too small (at least 8)"),
        (args.reg_weight >= 0 and math.isfinite(args.reg_weight), f"--reg-weight {args.reg_weight} must be ≥ 0"),
        cli.at_least("--max-bad-steps", args.max_bad_steps), cli.seed_rule("SEED", args.seed),
        (args.ckpt is None or Path(args.ckpt).exists(), f"CKPT={args.ckpt}: no such file or folder"),
        (args.ckpt is not None or args.model is None or args.model in cli.MODEL_CHOICES,
         f"unknown MODEL={args.model!r}; choose one of {', '.join(cli.MODEL_CHOICES)} or give CKPT=path"),
        (bool(args.init.strip()), f"INIT={args.init!r} must be a word"),
        (init_words is None or all(init_words), f"--init-words {args.init_words!r} has an empty word"),
        (init_words is None or len(init_words) <= args.vectors,
         f"--init-words gives {len(init_words or [])} words for VECTORS={args.vectors}; give at most one word per "
         f"vector (or raise VECTORS to {len(init_words or [])})"),
        (not Path(args.latent_cache).exists() or Path(args.latent_cache).is_dir(),
         f"--latent-cache {args.latent_cache} is a file, not a folder"),
        (not (args.random_init and args.init_words), "--random-init and --init-words exclude each other; give one"),
        (args.token is None or (args.token.strip() and not any(c.isspace() for c in args.token)),
         f"TOKEN={args.token!r} must be one word without spaces, e.g. '<my-concept>'"),
    ], InversionError)
    if args.progressive and (args.vectors - 1) * args.progressive >= args.steps:
        log.warning("--progressive %d adds vector %d at step %d, not before STEPS=%d: the last vectors never train",
                    args.progressive, args.vectors, (args.vectors - 1) * args.progressive, args.steps)
    if args.val_every is None:
        args.val_every = args.save_every
    return args


def parse_steps(args: argparse.Namespace) -> None:
    """STEPS: a whole number (exactly that many steps), 'auto' (stop by itself, at most MAX_STEPS), or unset."""
    value = args.steps
    if value is None:
        args.auto, args.steps = getattr(args, "auto", False), STEPS
    elif isinstance(value, str) and value.strip().lower() == "auto":
        args.auto = True
    elif isinstance(value, str):
        try:
            args.auto, args.steps = False, int(value)
        except ValueError:
            raise InversionError(f"STEPS={value!r} must be a whole number or auto") from None
    if getattr(args, "auto", False):
        args.steps = args.max_steps


def check_context(tokenizer, args: argparse.Namespace, templates: tuple[str, ...], duals: tuple[str, ...]) -> None:
    """VECTORS (with per-image tokens) must fit the text context in every template and validation prompt."""
    val = ("a photo of {}", *(p.strip().replace("S*", "{}") for p in args.val_prompts.split(";") if p.strip()))
    fits = max_vectors(tokenizer, templates, duals if args.per_image_tokens else ())
    fits_val = max_vectors(tokenizer, val)
    what = f"TEMPLATES={args.templates}{' with --per-image-tokens' if args.per_image_tokens else ''}"
    if fits_val < min(fits, args.vectors):
        fits, what = fits_val, "VAL_PROMPTS"
    if args.vectors > fits:
        limit = f"the largest VECTORS that fits is {fits}" if fits >= 1 else f"no vector fits: shorten {what}"
        raise InversionError(f"VECTORS={args.vectors} does not fit the {tokenizer.context_length}-token text context "
                             f"with {what}; {limit}")


# --- distributed -------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """torchrun's env → a process group (NCCL on CUDA, gloo on CPU) and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), cli.pick_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = cli.pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


# --- the loss ----------------------------------------------------------------------------------------------

class InversionLoss(nn.Module):
    """ε-MSE of the frozen UNet given a context from the frozen text tower with the learned rows spliced in."""

    def __init__(self, model, words: LearnedWords, reg_weight: float = 0.0) -> None:
        super().__init__()
        self.words = words               # the only submodule: DDP syncs just the learned rows
        self._frozen = [model]            # hidden from nn.Module so DDP neither broadcasts nor wraps it
        self.reg_weight = reg_weight

    @property
    def model(self):
        return self._frozen[0]

    def forward(self, ids: torch.Tensor, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        context = m.text_encoder(m.token_embeddings(ids, extra=self.words.vectors))
        x_t = m.schedule.q_sample(latents, t, noise)
        out = m.unet(x_t, t, context)
        target = m.schedule.prediction.target(latents, noise, t)
        dtype = torch.promote_types(out.dtype, torch.float32)   # fp32 at least (fp64 in gradient checks)
        mse = F.mse_loss(out.to(dtype), target.to(dtype))
        loss = mse + self.reg_weight * self.words.reg_loss() if self.reg_weight > 0 else mse
        return loss, mse.detach()


# --- one batch of samples ----------------------------------------------------------------------------------

class Batches:
    """Builds the inputs of global samples k from their own generators (see the module docstring)."""

    def __init__(self, model, words: LearnedWords, images: D.ConceptImages, cache: D.LatentCache | None,
                 templates: tuple[str, ...], duals: tuple[str, ...], args: argparse.Namespace,
                 latent_shape: tuple[int, ...], device: torch.device) -> None:
        self.model, self.words, self.images, self.cache = model, words, images, cache
        self.templates, self.duals, self.args = templates, duals, args
        self.latent_shape, self.device = latent_shape, device
        self.vae_calls = 0

    def prompt(self, g: torch.Generator, image: int) -> str:
        w = self.words
        if w.image_tokens and float(torch.rand((), generator=g)) < MIXING_PROB:
            template = self.duals[int(torch.randint(len(self.duals), (), generator=g))]
            return template.format(w.token, w.image_tokens[image])
        return self.templates[int(torch.randint(len(self.templates), (), generator=g))].format(w.token)

    def tokenize(self, prompts: list[str], active: int) -> torch.Tensor:
        """Ids (B, 77); progressive words keep only the first `active` vectors of the placeholder."""
        tok = self.model.tokenizer
        drop = self.words.unused_ids(active)
        if not drop:
            return tok(prompts)
        out = torch.full((len(prompts), tok.context_length), tok.pad_id, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids = fit_ids([i for i in tok.encode(p) if i not in drop], tok.context_length - 2,
                          {i: t for t, run in self.words.tokens.items() for i in run})
            out[r, : len(ids) + 2] = torch.tensor([tok.bos_id, *ids, tok.eos_id])
        return out

    def __call__(self, ks: list[int], active: int) -> tuple[torch.Tensor, ...]:
        a, n = self.args, len(self.images)
        T = self.model.schedule.num_timesteps
        prompts, idx, flips, ts, noises, normals = [], [], [], [], [], []
        for k in ks:
            g = D.sample_generator(a.seed, k)
            image = D.dataset_item(a.seed, k, n, a.repeats)
            flip = bool(float(torch.rand((), generator=g)) < a.flip_p)
            prompts.append(self.prompt(g, image))
            ts.append(int(torch.randint(T, (), generator=g)))
            noises.append(torch.randn(self.latent_shape, generator=g))
            normals.append(torch.randn(self.latent_shape, generator=g))
            idx.append(image)
            flips.append(flip)
        normals_t = torch.stack(normals)
        if self.cache is not None:
            latents = self.cache.draw(idx, flips, normals_t)
        else:  # the official way: encode every step (same distribution, a VAE pass per step)
            with torch.no_grad():
                post = self.model.posterior(self.images.batch(idx, flips))
                self.vae_calls += 1
                z = post.mean.float() + post.std.float() * normals_t.to(post.mean.device)
            latents = z * self.model.config.scale_factor
        ids = self.tokenize(prompts, active)
        dev = self.device
        return (ids.to(dev), latents.to(dev, torch.float32), torch.tensor(ts, device=dev),
                torch.stack(noises).to(dev))


# --- files -------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """Every global RNG as plain tensors and numbers, so state.pt loads with weights_only (no pickled code)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# what older state.pt files hold besides tensors: NumPy's RNG key array (rebuilt as data, no code runs)
_NUMPY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                  (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct]


def load_state(path: Path) -> dict:
    """The RESUME state, read with weights_only: a state.pt crafted to run code is refused, not executed."""
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InversionError(f"{path}: unreadable resume state ({E.load_failure(e)}); start a new run") from None
    need = {"vectors", "optimizer", "scaler", "step", "skipped", "bad_in_row", "rng"}
    have = set(st) if isinstance(st, dict) else set()
    if need - have or not isinstance(st["vectors"], torch.Tensor) or not isinstance(st["step"], int):
        raise InversionError(f"{path}: not a resume state of this tool (missing or wrong {sorted(need - have)})")
    return st


def write_loss_csv(path: Path, rows: list[tuple[int, float, float, int]]) -> None:
    def write(f):
        f.write(b"step,loss,lr,skipped\n")
        f.write("".join(f"{s},{v:.6g},{lr:.6g},{sk}\n" for s, v, lr, sk in rows).encode())

    atomic_write(path, write)


def read_loss_csv(path: Path, upto: int) -> list[tuple[int, float, float, int]]:
    """Rows with step ≤ upto; a line cut short by a kill is ignored."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                rows.append((int(r["step"]), float(r["loss"]), float(r["lr"]), int(r["skipped"])))
            except (TypeError, ValueError):
                continue
    return [r for r in rows if r[0] <= upto]


def plot_loss(rows: list[tuple[int, float, float, int]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r[0] for r in rows])
    loss = np.array([r[1] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.6, alpha=0.5, label="loss")
    if len(loss) >= 10:
        w = max(5, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=1.5, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def validation_grid(model, words: LearnedWords, args: argparse.Namespace, size: int, step: int,
                    out: Path) -> Path:
    """Rows of VAL_N samples for "a photo of S*" and every VAL_PROMPTS entry, with the current vectors."""
    from PIL import Image

    prompts = [f"a photo of {words.token}"] + [p.strip().replace("S*", words.token)
                                               for p in args.val_prompts.split(";") if p.strip()]
    steps = args.val_steps or model.config.steps
    model.extra_embeddings = words.vectors.detach().to(model.dtype)
    try:
        rows = [model.sample([p] * args.val_n, steps=steps, scale=model.config.guidance, seed=args.seed,
                             height=size, width=size, progress=False) for p in prompts]
    finally:
        model.extra_embeddings = None
    grid = Image.new("RGB", (size * args.val_n, size * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im, (c * size, r * size))
    path = out / "samples" / f"val-step{step}.png"
    atomic_write(path, lambda f: grid.save(f, format="PNG"))
    return path


# --- training ----------------------------------------------------------------------------------------------

class GracefulStop:
    """First Ctrl-C (SIGINT): finish the current step, save and exit 0; a second Ctrl-C stops at once
    (KeyboardInterrupt, exit 130) with the files of the last save. Under DDP every rank stops at the same step."""

    def __init__(self, d: Dist) -> None:
        self.d, self._flag, self._previous = d, False, None

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self._flag:
            raise KeyboardInterrupt
        self._flag = True
        os.write(2, b"\nCtrl-C: finishing this step and saving (press Ctrl-C again to quit without saving)\n")

    def requested(self) -> bool:
        if self.d.world > 1:   # one rank's Ctrl-C stops them all, at the same step
            flag = torch.tensor(float(self._flag), device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())
        return self._flag


def remove_stale_temp_files(out: Path) -> None:
    """Delete the temp files of saves that a kill interrupted (atomic_write's `.<name>.<random>.tmp`)."""
    for folder in (out, out / "steps", out / "samples"):
        for f in folder.glob(".*.tmp") if folder.is_dir() else []:
            if f.is_file() and re.fullmatch(r"\..+\.[A-Za-z0-9_]+\.tmp", f.name):
                f.unlink(missing_ok=True)
                log.debug("removed %s, left by an interrupted save", f)


def prepare_out(args: argparse.Namespace, concept: Path) -> Path:
    if args.out is None:
        args.out = str(Path("runs") / f"{concept.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out = Path(args.out)
    if not args.resume and out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise InversionError(f"OUT={out} already holds files; choose another OUT, pass --overwrite, "
                             f"or continue it with RESUME={out}")
    cli.check_writable(out)
    return out


def fixed_latents(model, images: D.ConceptImages, cache: D.LatentCache | None) -> torch.Tensor:
    """Every concept image, unflipped, at its posterior mean (scaled): the latents of the fixed batch."""
    if cache is not None:
        return cache.mean[:, 0].float() * cache.scale
    with torch.no_grad():
        post = model.posterior(images.batch(list(range(len(images))), [False] * len(images)))
    return post.mean.float().cpu() * model.config.scale_factor


def record_stop(out: Path, args: argparse.Namespace, rule: stopping.StopRule, reason: str | None, step: int) -> None:
    """stop.json: where and why a STEPS=auto run ended, with the objective's history."""
    args.auto_stopped_at = step
    args.stop_reason = reason or f"reached --max-steps {args.max_steps} before the objective settled"
    info = {"stopped_at": step, "reason": args.stop_reason, "max_steps": args.max_steps,
            "rule": {"every": args.stop_every, "window": rule.window, "threshold": rule.threshold},
            "objective": [{"step": s, "value": v} for s, v in rule.history]}
    atomic_write(out / "stop.json", lambda f: f.write(json.dumps(info, indent=2).encode()))
    log.info("STEPS=auto stopped at step %d: %s", step, args.stop_reason)


def checkpoint_identity(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(short hash, name) of the base checkpoint for the A1111 file."""
    try:
        from ldm.sample import model_hash

        h, name = model_hash(argparse.Namespace(model=args.model, ckpt=args.ckpt))
        return h or None, name or None
    except Exception as e:  # the hash is informational only
        log.debug("no checkpoint hash: %s", e)
        return None, args.model


def train(args: argparse.Namespace, model=None) -> Path:
    """Run (or resume) textual inversion as `args` says; returns the run directory."""
    d, device = init_distributed(args.device)
    if getattr(args, "deterministic", False):
        from ldm import determinism

        determinism.enable(device, args.seed)
    concept = D.resolve_concept(args.concept)
    try:
        templates = load_templates(args.templates)
        duals = dual_templates(args.templates)
    except TemplateError as e:
        raise InversionError(str(e)) from None
    out = prepare_out(args, concept) if d.main else Path(args.out or ".")
    if d.world > 1:  # every rank uses rank 0's run directory name
        holder = [str(out)]
        dist.broadcast_object_list(holder, src=0)
        out, args.out = Path(holder[0]), holder[0]
    dtype = PRECISIONS[args.precision]
    if args.precision == "fp16" and device.type == "cpu":
        log.warning("PRECISION=fp16 is not supported on the CPU; using fp32")
        dtype, args.precision = torch.float32, "fp32"
    if model is None:
        model = cli.load(args.model, args.ckpt, device, torch.float32)
    model.requires_grad_(False).eval()
    if dtype != torch.float32:  # frozen weights in half precision; the learned rows stay fp32
        model.unet.to(dtype)
        model.text_encoder.to(dtype)
    if hasattr(model.unet, "set_gradient_checkpointing"):
        model.unet.set_gradient_checkpointing(bool(args.checkpointing))
    elif args.checkpointing:
        raise InversionError("this UNet has no gradient checkpointing switch")
    family = model.config.text.get("kind")
    defaults = FAMILY_DEFAULTS.get(family, SD_DEFAULTS)
    args.batch = args.batch or defaults["batch"]
    args.size = args.size or defaults.get("size", model.config.image_size)
    cli.check([cli.multiple_rule("SIZE", args.size, model.latent_factor)], InversionError)
    token = args.token or f"<{concept.name}>"
    args.token = token
    init_words = None
    if not args.random_init:
        init_words = [w.strip() for w in args.init_words.split(",") if w.strip()] if args.init_words else [args.init]
    images = D.ConceptImages(concept, args.size, args.center_crop)
    check_context(model.tokenizer, args, templates, duals)
    words = LearnedWords(model, token, args.vectors, init_words,
                         per_image=len(images) if args.per_image_tokens else 0,
                         generator=torch.Generator().manual_seed(D.mix_seed(args.seed, 0x1417)))
    if args.per_image_tokens and len(images) > 64:
        raise InversionError(f"--per-image-tokens with {len(images)} images; use at most 64")
    words.to(device)

    lr = args.lr if args.no_scale_lr else args.lr * args.batch * args.accum * d.world
    if d.main:
        how = "as given" if args.no_scale_lr else (f"base {args.lr:.3e} × batch {args.batch} × accumulation "
                                                   f"{args.accum} × {d.world} process(es)")
        log.info("learning rate %.3e (%s)", lr, how)
    optimizer = torch.optim.AdamW([words.vectors], lr=lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    loss_fn = InversionLoss(model, words, args.reg_weight)
    runner: nn.Module = loss_fn
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        runner = DDP(loss_fn, device_ids=[device.index] if device.type == "cuda" else None)

    # latents: rank 0 fills the on-disk cache first, the others then read it
    cache = None
    vf = model.config.vae_factor
    latent_shape = (model.config.unet["in_channels"], args.size // vf, args.size // vf)
    if not args.no_latent_cache:
        cache_dir = args.latent_cache or None
        if d.main:
            cache = D.LatentCache(model, images, cache_dir)
        barrier(d)
        if not d.main:
            cache = D.LatentCache(model, images, cache_dir)
        latent_shape = cache.latent_shape
    batches = Batches(model, words, images, cache, templates, duals, args, latent_shape, device)
    objective, rule, stop_reason = None, None, None
    if args.auto:
        objective = stopping.DeterministicObjective(loss_fn, batches, fixed_latents(model, images, cache),
                                                    args.seed, batch=max(args.batch, 1))
        rule = stopping.StopRule(args.stop_window, args.stop_threshold)

    start, skipped_total, bad_in_row = 0, 0, 0
    state_path = out / "state.pt"
    if args.resume and d.main:
        remove_stale_temp_files(out)
    if args.resume and not state_path.is_file():
        log.warning("RESUME=%s: no state.pt yet (stopped before its first save); starting from step 0", out)
    elif args.resume:
        st = load_state(state_path)
        if tuple(st["vectors"].shape) != tuple(words.vectors.shape):
            raise InversionError(f"RESUME={out}: state.pt holds vectors {tuple(st['vectors'].shape)} but this "
                                 f"run needs {tuple(words.vectors.shape)}; was args.json edited?")
        with torch.no_grad():
            words.vectors.copy_(st["vectors"].to(device))
        optimizer.load_state_dict(st["optimizer"])
        scaler.load_state_dict(st["scaler"])
        start, skipped_total, bad_in_row = st["step"], st["skipped"], st["bad_in_row"]
        set_rng_state(st["rng"])
        if rule is not None and "stop_rule" in st:
            rule.load_state_dict(st["stop_rule"])
        if start >= args.steps:
            log.info("run %s already has %d steps (STEPS=%d)", out, start, args.steps)
    rows = read_loss_csv(out / "loss.csv", start) if args.resume and start else []
    ckpt_hash, ckpt_name = checkpoint_identity(args) if d.main else (None, None)

    if d.main:
        options = {k: v for k, v in vars(args).items()}
        info = {"options": options, "lr": lr, "world_size": d.world, "model": model.config.name,
                "token_ids": words.tokens, "width": int(words.vectors.shape[1]),
                "images": [p.name for p in images.paths], "latent_cache": cache is not None}
        atomic_write(out / "args.json", lambda f: f.write(json.dumps(info, indent=2, default=str).encode()))
        log.info("training %s (%d vectors) on %d images of %s, %d px, batch %d × accum %d × %d, %d steps → %s",
                 token, args.vectors, len(images), concept, args.size, args.batch, args.accum, d.world,
                 args.steps, out)

    def save(step: int, final: bool = False) -> None:
        if not d.main:
            return
        save_embedding_files(out / "steps", words, step, ckpt_hash, ckpt_name, suffix=f"-step{step}")
        save_embedding_files(out, words, step, ckpt_hash, ckpt_name)
        save_torch({"vectors": words.vectors.detach().cpu().clone(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "step": step, "skipped": skipped_total,
                    "bad_in_row": bad_in_row, "rng": rng_state(), "token_ids": words.tokens,
                    **({"stop_rule": rule.state_dict()} if rule is not None else {})}, state_path)

    def settled(step: int, active: int) -> str | None:
        """STEPS=auto: evaluate the fixed-batch objective at multiples of --stop-every; the reason to stop."""
        if rule is None or step % args.stop_every or (rule.history and rule.history[-1][0] >= step):
            return None
        with autocast:
            value = objective(active)
        reason = rule.update(step, value)
        log.debug("fixed-batch objective at step %d: %.6f", step, value)
        if d.world > 1:   # rank 0 decides for all, so every rank stops at the same step
            flag = torch.tensor(float(reason is not None and d.main),
                                device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            reason = reason or ("rank 0's stop rule" if bool(flag.item()) else None)
        return reason

    loss_log = None
    if d.main:
        write_loss_csv(out / "loss.csv", rows)  # a resumed run drops rows after its state
        loss_log = open(out / "loss.csv", "a", buffering=1)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    bar = tqdm(total=args.steps, initial=start, desc=f"learning {token}", unit="step", dynamic_ncols=True,
               disable=not d.main or args.no_progress)
    per_step = args.batch * d.world * args.accum
    with GracefulStop(d) as stop:
        try:
            if start == 0:
                settled(0, words.num_vectors if not args.progressive else 1)
            for step in range(start, args.steps):
                active = words.num_vectors if not args.progressive else min(words.num_vectors,
                                                                           1 + step // args.progressive)
                mse_sum = torch.zeros((), device=device)
                for a in range(args.accum):
                    first = step * per_step + (a * d.world + d.rank) * args.batch
                    inputs = batches(list(range(first, first + args.batch)), active)
                    sync = runner.no_sync() if d.world > 1 and a < args.accum - 1 else nullcontext()
                    with sync:
                        with autocast:
                            loss, mse = runner(*inputs)
                        scaler.scale(loss / args.accum).backward()
                    mse_sum += mse
                scaler.unscale_(optimizer)
                grad = words.vectors.grad
                finite = grad is not None and bool(torch.isfinite(grad).all()) and bool(torch.isfinite(mse_sum))
                if finite:
                    scaler.step(optimizer)
                    bad_in_row = 0
                else:
                    skipped_total += 1
                    bad_in_row += 1
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if d.world > 1:
                    dist.all_reduce(mse_sum)
                    mse_sum /= d.world
                value = float(mse_sum) / args.accum
                rows.append((step + 1, value, lr, skipped_total))
                if loss_log is not None:
                    loss_log.write(f"{step + 1},{value:.6g},{lr:.6g},{skipped_total}\n")
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", skipped=skipped_total, refresh=False)
                done = step + 1
                if bad_in_row >= args.max_bad_steps:  # skipped steps left the vectors as they were: keep them
                    save(done)
                    raise InversionError(f"{bad_in_row} steps in a row gave NaN/inf loss or gradients (last at step "
                                         f"{done}; the vectors from before them are saved in {out}); lower LR, use "
                                         "PRECISION=bf16 or fp32, or check the checkpoint")
                stop_reason = settled(done, active)
                last = done == args.steps or stop_reason is not None
                saved = done % args.save_every == 0 or last
                if saved:
                    save(done)
                    if d.main and args.val_every and (done % args.val_every == 0 or last):
                        path = validation_grid(model, words, args, args.size, done, out)
                        log.debug("validation grid %s", path)
                    barrier(d)
                if stop.requested() and done < args.steps:  # Ctrl-C: this step is complete, keep it and leave
                    if not saved:
                        save(done)
                    args.stopped_at = done
                    log.warning("interrupted at step %d of %d: saved %s; continue with RESUME=%s", done, args.steps,
                                out / "learned_embeds.safetensors", out)
                    break
                if stop_reason is not None:
                    break
        finally:
            bar.close()
            if loss_log is not None:
                loss_log.close()
    if d.main:
        if start >= args.steps:
            save(start)
        if rule is not None and not getattr(args, "stopped_at", None):
            record_stop(out, args, rule, stop_reason, rule.history[-1][0] if stop_reason else args.steps)
        if rows:
            plot_loss(rows, out / "loss.png", f"{token}: {args.steps} steps, batch {args.batch}×{args.accum}×{d.world}")
        if skipped_total:
            log.warning("%d step(s) skipped for NaN/inf loss or gradients", skipped_total)
    barrier(d)
    return out


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(argv)
    started = time.time()
    out = train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        rows = read_loss_csv(out / "loss.csv", args.steps)
        last = f", loss {rows[-1][1]:.4f}" if rows else ""
        if getattr(args, "stopped_at", None):
            print(f"stopped by Ctrl-C at step {args.stopped_at} of {args.steps}{last}; saved "
                  f"{out / 'learned_embeds.safetensors'}; continue with RESUME={out}")
        else:
            when = (f" (STEPS=auto stopped at step {args.auto_stopped_at}: {args.stop_reason})"
                    if getattr(args, "auto_stopped_at", None) else "")
            print(f"learned {args.token} in {time.time() - started:.0f} s{last}: "
                  f"{out / 'learned_embeds.safetensors'}{when}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def cli_main(argv: list[str] | None = None) -> int:
    return cli.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli_main())
