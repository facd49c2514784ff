"""Pretrain the instances LDM on CPU, resumably: VAE, cached latents, a CLIP-trained text tower, then the UNet.

    python -m experiments.instances.pretrain [--seed 0] [--steps N] [--work .cache/pretrain-instances]

The shapes recipe (experiments/shapes/pretrain.py: same losses, schedule, EMA, caption-vocabulary rows) on the
instances world: `n_instances` unique objects (ids 0…n-1, below world.HELD_OUT_BASE) in `views` random scenes
each. Resumable: the trained VAE and the diffusion state (every `--save-every` steps) are kept in the work
folder; rerunning the same command continues where it stopped. A work folder from other settings is refused.
Writes weights/instances.safetensors (fp16, the original single-file layout with the config marker),
weights/instances-train-log.csv, experiments/instances/pretrain-loss.png and, with the judge present,
experiments/instances/pretrain-metrics.json.

The shipped model (README § "The 8×8×12 model ships"): an f=4 autoencoder (8×8×12 latents; 2,000 steps), a text
tower CLIP-trained on the renders and their captions and then frozen (textclip.py), and a 64-wide two-level UNet
with v-prediction (config.py), 8,000 steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from experiments.instances import world
from experiments.instances.config import NAME, instances
from experiments.shapes import pretrain as base

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
MODEL_PATH = ROOT / "weights" / "instances.safetensors"
LOG_PATH = ROOT / "weights" / "instances-train-log.csv"
PLOT_PATH = Path(__file__).resolve().parent / "pretrain-loss.png"
METRICS_PATH = Path(__file__).resolve().parent / "pretrain-metrics.json"
WORK = ROOT / ".cache" / "pretrain-instances"
THREADS = 2
EVAL_PER_PROMPT = 8  # samples per asked prompt in the judged evaluation (28 prompts)
DENOISE_STRENGTHS = (0.2, 0.4, 0.6)  # judge.denoise_reconstruction: identity kept when denoising from there
TOLERANCE = 0.05  # a re-measure of the shipped metrics on another machine (BLAS order, fp16 weights)


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on; the defaults are the shipped model's."""

    seed: int = 0
    n_instances: int = 4000
    views: int = 3
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 3e-3
    kl_weight: float = 1e-5
    steps: int = 8000
    batch: int = 24
    lr: float = 1e-3
    warmup: int = 200
    ema: float = 0.995
    snr_gamma: float = 0.0
    clip_steps: int = 1000  # 0: the text tower learns with the UNet; else CLIP-trained first, then frozen
    clip_batch: int = 128
    clip_lr: float = 1e-3


class WorkFolderError(ValueError):
    """The work folder holds a run with other settings."""


VAE_FIELDS = ("seed", "n_instances", "views", "vae_steps", "vae_batch", "vae_lr", "kl_weight")
TEXT_FIELDS = ("seed", "n_instances", "views", "clip_steps", "clip_batch", "clip_lr")


def _check_work(work: Path, s: Settings) -> None:
    """The work folder belongs to these settings, or is new, or holds only stages trained with these settings: a
    VAE and a CLIP-trained text tower are reused when their own fields agree, and the diffusion stage starts
    fresh with the new ones."""
    work.mkdir(parents=True, exist_ok=True)
    marker = work / "settings.json"
    want = asdict(s)
    if marker.is_file():
        have = json.loads(marker.read_text())
        stale = [
            name
            for name, fields in (("vae.pt", VAE_FIELDS), ("text.pt", TEXT_FIELDS), ("diffusion.pt", tuple(want)))
            if (work / name).is_file() and any(have.get(k) != want[k] for k in fields)
        ]
        if stale:
            raise WorkFolderError(
                f"--work {work} holds {', '.join(stale)} of a run with other settings ({marker.read_text()}); "
                "give another --work or delete it"
            )
    marker.write_text(json.dumps(want, sort_keys=True))


def pretrain(
    s: Settings,
    work: Path = WORK,
    out: Path = MODEL_PATH,
    log_path: Path = LOG_PATH,
    plot_path: Path = PLOT_PATH,
    save_every: int = 250,
    snapshots: tuple[int, ...] = (),
):
    """World → VAE (kept in `work`) → cached latents → text tower (CLIP, kept) → UNet (resumable) → EMA model
    → file; the EMA model also at each step of `snapshots`, next to `out` as <stem>.step<N>.safetensors."""
    from ldm.pipeline import build_modules, build_tokenizer
    from ldm.schedule import Schedule

    _check_work(work, s)
    torch.manual_seed(s.seed)
    tlog = base.TrainLog()
    t0 = time.time()
    images_u8, labels = world.generate(s.n_instances, s.views)
    images = world.to_tensor(images_u8)
    log.info("world: %d images of %d instances in %.0f s", len(images), s.n_instances, time.time() - t0)
    cfg = instances()
    unet, vae, text = build_modules(cfg)
    vae_file = work / "vae.pt"
    if vae_file.is_file():
        saved = torch.load(vae_file, weights_only=False)
        vae.load_state_dict(saved["vae"])
        tlog.rows = saved["log"]
        vae = vae.eval().requires_grad_(False)
        log.info("VAE resumed from %s", vae_file)
    else:
        vae = base.train_vae(
            vae,
            images,
            base.Settings(
                seed=s.seed, vae_steps=s.vae_steps, vae_batch=s.vae_batch, vae_lr=s.vae_lr, kl_weight=s.kl_weight
            ),
            tlog,
        )
        torch.save({"vae": vae.state_dict(), "log": tlog.rows}, vae_file.with_suffix(".tmp"))
        vae_file.with_suffix(".tmp").replace(vae_file)
    means, stds = base.encode_all(vae, images)
    g = torch.Generator().manual_seed(s.seed + 4)
    sample_z = means[:4096] + stds[:4096] * torch.randn(means[:4096].shape, generator=g)
    cfg = cfg.with_(scale_factor=round(float(1.0 / sample_z.std()), 5))
    log.info("latent std %.4f → scale_factor %.5f", float(sample_z.std()), cfg.scale_factor)
    tokens = base.CaptionTokens(build_tokenizer(cfg), world.caption_words())
    if s.clip_steps:
        _text_stage(text, tokens, images, labels, s, tlog, work / "text.pt")
    diff = base.Settings(
        seed=s.seed,
        steps=s.steps,
        batch=s.batch,
        lr=s.lr,
        warmup=s.warmup,
        ema=s.ema,
        snr_gamma=s.snr_gamma,
        snapshots=snapshots,
    )

    def snapshot(step: int, modules) -> None:
        path = out.with_name(f"{out.stem}.step{step}.safetensors")
        base.save_model(base.assemble(cfg, copy.deepcopy(modules[0]), vae, copy.deepcopy(modules[1])), path, NAME)
        log.info("snapshot %s", path)

    unet, text = base.train_diffusion(
        unet,
        text,
        Schedule.from_config(cfg),
        tokens,
        means,
        stds,
        labels,
        cfg.scale_factor,
        diff,
        tlog,
        snapshot=snapshot,
        caption=world.caption,
        resume=work / "diffusion.pt",
        save_every=save_every,
        train_text=not s.clip_steps,
    )
    model = base.assemble(cfg, unet, vae, text)
    out.parent.mkdir(parents=True, exist_ok=True)
    base.save_model(model, out, NAME)
    tlog.write(log_path)
    tlog.plot(plot_path, f"UNet: {cfg.parameterization}-MSE (text tower {'frozen' if s.clip_steps else 'trained'})")
    seconds = tlog.rows[-1][4] if tlog.rows else time.time() - t0
    log.info("saved %s (%.1f MB); %.0f s of logged training in this process", out, out.stat().st_size / 1e6, seconds)
    return model


def _text_stage(text, tokens, images, labels, s: Settings, tlog, path: Path) -> None:
    """The text tower CLIP-trained on the renders and their captions (textclip.py), kept in the work folder."""
    from experiments.instances import textclip

    if path.is_file():
        saved = torch.load(path, weights_only=False)
        text.load_state_dict(saved["text"])
        tlog.rows += saved["log"]
        log.info("text tower resumed from %s", path)
        return
    vocab = torch.tensor(tokens.vocab)
    words = text.token_embedding.weight.detach()[vocab].clone()
    start = len(tlog.rows)
    acc = textclip.train_text(
        text, words, tokens, images, labels, world.caption, s.clip_steps, s.clip_batch, s.clip_lr, s.seed, tlog
    )
    with torch.no_grad():
        text.token_embedding.weight[vocab] = words
    log.info(
        "text tower: caption retrieval within a batch of %d %.0f %% (chance %.1f %%)",
        s.clip_batch,
        100 * acc,
        100 / s.clip_batch,
    )
    torch.save({"text": text.state_dict(), "log": tlog.rows[start:]}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


@torch.no_grad()
def evaluate(model, n_per_prompt: int = EVAL_PER_PROMPT, seed: int = 1000, n_vae: int = 24) -> dict[str, float]:
    """The shipped judge on samples of prompts that ask for one attribute or context each (accuracy per asked
    field), on the autoencoder's reconstructions of held-out renders (reconstruction vs lookalikes: what
    the latent space can keep of an object's identity), and on the same renders noised and denoised by the
    model (what its UNet can draw back of an identity, at each of DENOISE_STRENGTHS)."""
    from experiments.instances import judge

    j = judge.shipped()
    asks: list[tuple[str, str, int]] = []  # (prompt, head, wanted class)
    for c, name in enumerate(world.COLOUR_NAMES):
        asks.append((f"a photo of a {name} {world.NOUN}", "colour", c))
    for k, name in enumerate(world.PATTERNS):
        asks.append((f"a photo of a {name} {world.NOUN}", "pattern", k))
    for k, name in enumerate(world.BODIES):
        asks.append((f"a photo of a {name} {world.NOUN}", "body", k))
    for k, name in enumerate(world.TOPS[1:], 1):
        asks.append((f"a photo of a {world.NOUN} with {name}", "top", k))
    asks.append((f"a photo of a {world.NOUN} with legs", "legs", 1))
    for k, name in enumerate(world.BACKGROUND_NAMES):
        asks.append((f"a photo of a {world.NOUN} on a {name} background", "background", k))
    for k, name in enumerate(world.SIZE_NAMES):
        asks.append((f"a photo of a {name} {world.NOUN}", "size", k))
    for k, name in enumerate(world.COMPANIONS[1:], 1):
        asks.append((f"a photo of a small {world.NOUN} next to a {name}", "companion", k))
    for k, name in enumerate(world.POSITIONS):
        asks.append((f"a photo of a small {world.NOUN} {world.POSITION_PHRASES[name]}", "position", k))
    prompts = [p for p, _, _ in asks for _ in range(n_per_prompt)]
    pred = judge.classify(j, model.sample(prompts, seed=seed, progress=False))
    hits: dict[str, list[bool]] = {}
    for i, (_, head, want) in enumerate(a for a in asks for _ in range(n_per_prompt)):
        hits.setdefault(head, []).append(bool(pred[head][i] == want))
    out = {f"asked_{head}_acc": float(np.mean(v)) for head, v in hits.items()}
    out["asked_mean_acc"] = float(np.mean([out[f"asked_{h}_acc"] for h in hits]))
    out["vae_reconstruction"], out["renders_reconstruction"] = judge.autoencoder_reconstruction(j, model.vae, n_vae)
    for strength in DENOISE_STRENGTHS:
        out[f"denoise_reconstruction_{strength}"] = judge.denoise_reconstruction(j, model, strength)
    return out


def main(argv: list[str] | None = None) -> int:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps, help="UNet + text steps")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--snr-gamma", type=float, default=d.snr_gamma, help="Min-SNR-γ loss weighting (0: off)")
    p.add_argument("--n-instances", type=int, default=d.n_instances)
    p.add_argument("--views", type=int, default=d.views)
    p.add_argument("--work", default=str(WORK), help="resumable state (VAE, diffusion checkpoints)")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--snapshots", default="", help="comma-separated steps at which to save the EMA model too")
    p.add_argument("--out", default=str(MODEL_PATH))
    p.add_argument("--log", default=str(LOG_PATH))
    p.add_argument("--plot", default=str(PLOT_PATH))
    p.add_argument("--metrics", default=str(METRICS_PATH))
    p.add_argument("--no-eval", action="store_true", help="skip the judged evaluation")
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--eval-only", action="store_true", help="judge the model at --out and write --metrics")
    a = p.parse_args(argv)
    for name, value, lo in (
        ("--steps", a.steps, 1),
        ("--vae-steps", a.vae_steps, 1),
        ("--batch", a.batch, 1),
        ("--n-instances", a.n_instances, 1),
        ("--views", a.views, 1),
        ("--threads", a.threads, 1),
        ("--save-every", a.save_every, 1),
        ("--snr-gamma", a.snr_gamma, 0),
    ):
        if value < lo:
            print(f"error: {name}={value} must be ≥ {lo}", file=sys.stderr)
            return 2
    try:
        snapshots = tuple(sorted({int(v) for v in a.snapshots.split(",") if v.strip()}))
    except ValueError:
        print(f"error: --snapshots {a.snapshots!r} must be comma-separated step numbers", file=sys.stderr)
        return 2
    if any(not 1 <= v <= a.steps for v in snapshots):
        print(f"error: --snapshots {a.snapshots!r}: each step must lie in 1…--steps ({a.steps})", file=sys.stderr)
        return 2
    if a.n_instances > world.HELD_OUT_BASE:
        print(
            f"error: --n-instances={a.n_instances} must be ≤ {world.HELD_OUT_BASE} (held-out ids start there)",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    s = Settings(
        seed=a.seed,
        steps=a.steps,
        vae_steps=a.vae_steps,
        batch=a.batch,
        n_instances=a.n_instances,
        views=a.views,
        snr_gamma=a.snr_gamma,
    )
    t0 = time.time()
    if a.eval_only:
        if not Path(a.out).is_file():
            print(f"error: --out {a.out} does not exist; nothing to evaluate", file=sys.stderr)
            return 2
        metrics = json.loads(Path(a.metrics).read_text()) if Path(a.metrics).is_file() else {}
    else:
        try:
            pretrain(s, Path(a.work), Path(a.out), Path(a.log), Path(a.plot), a.save_every, snapshots)
        except WorkFolderError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        metrics = {"settings": asdict(s), "threads": a.threads, "wall_seconds_this_process": round(time.time() - t0, 1)}
    if not a.no_eval:
        from experiments.instances import judge
        from ldm import load_model

        if not judge.JUDGE_PATH.is_file():
            log.warning("no judge at %s: skipping the judged evaluation", judge.JUDGE_PATH)
        else:  # the file as written (fp16 weights): what the committed metrics and their test describe
            metrics.update(evaluate(load_model(a.out)), eval_per_prompt=EVAL_PER_PROMPT)
    tmp = Path(a.metrics).with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    tmp.replace(a.metrics)
    log.info("pretrain-instances: %s", json.dumps(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
