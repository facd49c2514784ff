"""Pretrain the shapes LDM from scratch on CPU: VAE first, then UNet + CLIP text tower jointly; then withhold
the held-out word (see world.py).

    python -m experiments.shapes.pretrain [--seed 0] [--out weights/shapes.safetensors]

Latent diffusion (Rombach et al. 2022) trained as the LDM text-to-image models were: a KL autoencoder
(L1 + L2 reconstruction, small KL weight), its latents cached once, then ε-prediction on the SD
scaled-linear schedule with the text tower trained jointly (as LDM-1.4B's) and 10% empty captions for
classifier-free guidance (Ho & Salimans 2022).

Reproducibility: with `--threads 1` a rerun is bit-identical (~35 min on a 2-core machine). The default two
threads take ~27 min, but there torch's CPU kernels round differently from one process to the next (the
loss logs part at the 6th digit after ~50 steps), so a rerun reproduces the shipped metrics within TOLERANCE,
not the bits.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from experiments.shapes import world
from experiments.shapes.config import shapes

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
MODEL_PATH = ROOT / "weights" / "shapes.safetensors"
LOG_PATH = ROOT / "weights" / "shapes-train-log.csv"
PLOT_PATH = Path(__file__).resolve().parent / "pretrain-loss.png"
METRICS_PATH = Path(__file__).resolve().parent / "pretrain-metrics.json"
# A rerun must land within this many points (absolute, on rates in [0, 1]) of the shipped metrics: the
# sampled evaluation has ~4 points of binomial noise, and other CPUs round differently.
TOLERANCE = 0.10
REPRODUCED = (
    "shape_acc",
    "colour_acc",
    "joint_acc",
    "generic_held_out_rate",
    "withheld_word_rate",
    "held_out_rate_before_withholding",
)
CAPTION_DROPOUT = 0.1
THREADS = 2  # ≤ 30 min; 1 gives bit-identical reruns (see the module docstring)


@dataclass
class Settings:
    """Everything a run depends on; the defaults are the shipped model's."""

    seed: int = 0
    n_images: int = 8000
    vae_steps: int = 600
    vae_batch: int = 16
    vae_lr: float = 3e-3
    kl_weight: float = 1e-5
    steps: int = 3000
    batch: int = 24
    lr: float = 1e-3
    warmup: int = 200
    ema: float = 0.995
    snr_gamma: float = 0.0  # 0: plain ε-MSE
    eval_per_prompt: int = 4
    snapshots: tuple[int, ...] = ()


class TrainLog:
    """Rows (phase, step, loss, lr, seconds) kept in memory and written as CSV."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, float, float, float]] = []
        self.t0 = time.time()

    def add(self, phase: str, step: int, loss: float, lr: float) -> None:
        self.rows.append((phase, step, loss, lr, time.time() - self.t0))

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["phase", "step", "loss", "lr", "seconds"])
            w.writerows([(p, s, f"{v:.6g}", f"{lr:.4g}", f"{t:.1f}") for p, s, v, lr, t in self.rows])
        os.replace(tmp, path)

    def plot(self, path: Path, diffusion_title: str = "UNet + text: ε-MSE") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), dpi=100)
        for ax, phase, title in zip(axes, ("vae", "diffusion"), ("VAE: L1 + L2 + KL", diffusion_title)):
            rows = [r for r in self.rows if r[0] == phase]
            if not rows:
                continue
            steps = np.array([r[1] for r in rows])
            loss = np.array([r[2] for r in rows])
            ax.plot(steps, loss, lw=0.5, alpha=0.4)
            w = max(5, len(loss) // 50)
            if len(loss) > w:
                ax.plot(steps[w - 1 :], np.convolve(loss, np.ones(w) / w, mode="valid"), lw=1.5)
            ax.set_yscale("log")
            ax.set_title(title)
            ax.set_xlabel("step")
        fig.tight_layout()
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, path)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# -- stage 1: the autoencoder ------------------------------------------------------------------------------


def train_vae(vae: nn.Module, images: torch.Tensor, s: Settings, tlog: TrainLog) -> nn.Module:
    """KL autoencoder: L1 + L2 reconstruction + kl_weight · KL per latent element (LDM's AutoencoderKL)."""
    g = torch.Generator().manual_seed(s.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    vae.train()
    bar = tqdm(range(s.vae_steps), desc="VAE", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s.vae_steps, s.vae_lr, 100)
        x = images[torch.randint(len(images), (s.vae_batch,), generator=g)]
        post = vae.encode(x)
        rec = vae.decode(post.sample(generator=g))
        kl = post.kl().mean() / post.mean[0].numel()
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + s.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        tlog.add("vae", step + 1, loss.item(), opt.param_groups[0]["lr"])
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.2f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of every image, unscaled, float32."""
    means, stds = [], []
    for chunk in tqdm(images.split(256), desc="encode", leave=False):
        post = vae.encode(chunk)
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


# -- stage 2: UNet + text tower ----------------------------------------------------------------------------


def shapes_words() -> set[str]:
    """Every word a shapes caption can contain."""
    words = set(" ".join(t.format("") for t in world.OBJECT_TEMPLATES).split())
    words |= set(world.SHAPES) | set(world.COLOUR_NAMES) | set(world.SIZE_NAMES) | set(world.BACKGROUND_NAMES)
    return words | {
        world.GENERIC_WORD,
        "a",
        "on",
        "background",
        "in",
        "the",
        "center",
        "left",
        "right",
        "at",
        "top",
        "bottom",
    }


def caption_vocabulary(tokenizer, words: set[str] | None = None) -> list[int]:
    """Every token id the caption language can produce (BOS, EOS/pad and the words of all parts)."""
    words = shapes_words() if words is None else words
    ids = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    for w in sorted(words):
        ids.update(tokenizer.encode(w))
    return sorted(ids)


class CaptionTokens:
    """Caption → (77,) ids with a cache (the caption language is small), and the same ids as rows of the
    caption vocabulary, so that training touches only those rows of the 49,408-row table."""

    def __init__(self, tokenizer, words: set[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab = caption_vocabulary(tokenizer, words)
        self.row = torch.full((tokenizer.vocab_size,), -1, dtype=torch.long)
        self.row[torch.tensor(self.vocab)] = torch.arange(len(self.vocab))
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            for c, ids in zip(missing, self.tokenizer(missing)):
                self.cache[c] = ids
        return torch.stack([self.cache[c] for c in captions])

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids → rows of the caption vocabulary (an id outside it is an error)."""
        r = self.row[ids]
        if bool((r < 0).any()):
            raise ValueError(f"token ids {sorted(set(ids[r < 0].tolist()))} are outside the caption vocabulary")
        return r


def loss_weights(schedule, gamma: float) -> torch.Tensor | None:
    """Min-SNR-γ (Hang et al. 2023) per timestep, or None for the plain MSE (γ = 0): the prediction's own weight on
    the x₀ error (`Prediction.x0_weight`: SNR for ε, SNR + 1 for v) capped at γ. For ε that is min(SNR, γ) / SNR;
    for v, min(SNR + 1, γ) / (SNR + 1) keeps weight 1 at high noise, where a caption decides colour and background."""
    if gamma <= 0:
        return None
    own = schedule.prediction.x0_weight(schedule.alphas_cumprod / (1 - schedule.alphas_cumprod))
    return (own.clamp(max=gamma) / own).float()


def train_diffusion(
    unet: nn.Module,
    text: nn.Module,
    schedule,
    tokens: CaptionTokens,
    means: torch.Tensor,
    stds: torch.Tensor,
    labels: list,
    scale_factor: float,
    s: Settings,
    tlog: TrainLog,
    snapshot=None,
    caption=world.caption,
    resume: Path | None = None,
    save_every: int = 0,
    train_text: bool = True,
) -> tuple[nn.Module, nn.Module]:
    """Joint ε-MSE training with EMA weights; returns the EMA copies.

    Only the caption vocabulary's rows of the token table are trained (as a small (n, width) table written
    back at the end); the other rows keep their initialisation, exactly as a full-table run would leave them.
    `caption(label, rng)` writes a label's caption. With `resume`, the whole training state (weights, EMA,
    optimiser, both random streams, the log) is saved there every `save_every` steps and training continues
    from it when the file exists. With `train_text` False the text tower and its rows stay as given (SD's frozen
    text encoder) and only the UNet learns.
    """
    g = torch.Generator().manual_seed(s.seed + 2)
    rng = np.random.default_rng(s.seed + 3)
    table = text.token_embedding.weight
    vocab = torch.tensor(tokens.vocab)
    words = nn.Parameter(table.detach()[vocab].clone(), requires_grad=train_text)
    table.requires_grad_(False)
    if not train_text:
        text.requires_grad_(False)
    text_names = [n for n, p in text.named_parameters() if p.requires_grad]
    params = (
        list(unet.parameters())
        + [dict(text.named_parameters())[n] for n in text_names]
        + ([words] if train_text else [])
    )
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    ema_words = words.detach().clone()
    ema_params = list(ema_unet.parameters()) + [dict(ema_text.named_parameters())[n] for n in text_names]
    ema_params += [ema_words] if train_text else []
    unet.train()
    text.train()
    T = schedule.num_timesteps
    weights = loss_weights(schedule, s.snr_gamma)
    start = 0
    if resume is not None and resume.is_file():
        start = _load_state(resume, unet, text, words, opt, ema_unet, ema_text, ema_words, g, rng, tlog)
        log.info("resumed %s at step %d", resume, start)
    bar = tqdm(
        range(start, s.steps),
        desc="UNet + text" if train_text else "UNet",
        dynamic_ncols=True,
        initial=start,
        total=s.steps,
    )
    for step in bar:
        lr = lr_at(step, s.steps, s.lr, s.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(labels), (s.batch,), generator=g)
        captions = ["" if rng.random() < CAPTION_DROPOUT else caption(labels[i], rng) for i in idx.tolist()]
        z = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)
        x0 = z * scale_factor
        t = torch.randint(T, (s.batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        with torch.set_grad_enabled(train_text):
            context = text(words[tokens.rows(tokens(captions))])
        out = unet(schedule.q_sample(x0, t, noise), t, context)
        target = schedule.prediction.target(x0, noise, t)
        if weights is None:
            loss = F.mse_loss(out, target)
        else:
            loss = ((out - target).pow(2).mean(dim=(1, 2, 3)) * weights[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(s.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        tlog.add("diffusion", step + 1, loss.item(), lr)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if snapshot is not None and (step + 1) in s.snapshots:
            snapshot(step + 1, _with_words(ema_unet, ema_text, vocab, ema_words))
        if resume is not None and save_every and ((step + 1) % save_every == 0 or step + 1 == s.steps):
            _save_state(resume, step + 1, unet, text, words, opt, ema_unet, ema_text, ema_words, g, rng, tlog)
    return ema_unet.eval(), _with_words(ema_unet, ema_text, vocab, ema_words)[1].eval()


def _save_state(path: Path, step: int, unet, text, words, opt, ema_unet, ema_text, ema_words, g, rng, tlog) -> None:
    """Everything train_diffusion needs to continue bit-for-bit (at one thread), written atomically."""
    state = {
        "step": step,
        "unet": unet.state_dict(),
        "text": text.state_dict(),
        "words": words.detach(),
        "opt": opt.state_dict(),
        "ema_unet": ema_unet.state_dict(),
        "ema_text": ema_text.state_dict(),
        "ema_words": ema_words,
        "g": g.get_state(),
        "rng": rng.bit_generator.state,
        "log": tlog.rows,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, unet, text, words, opt, ema_unet, ema_text, ema_words, g, rng, tlog) -> int:
    state = torch.load(path, weights_only=False)
    unet.load_state_dict(state["unet"])
    text.load_state_dict(state["text"])
    ema_unet.load_state_dict(state["ema_unet"])
    ema_text.load_state_dict(state["ema_text"])
    with torch.no_grad():
        words.copy_(state["words"])
        ema_words.copy_(state["ema_words"])
    opt.load_state_dict(state["opt"])
    g.set_state(state["g"])
    rng.bit_generator.state = state["rng"]
    tlog.rows = [r for r in state["log"]]
    return int(state["step"])


def _with_words(
    unet: nn.Module, text: nn.Module, vocab: torch.Tensor, words: torch.Tensor
) -> tuple[nn.Module, nn.Module]:
    """The text tower with the trained caption-vocabulary rows written into its token table."""
    with torch.no_grad():
        text.token_embedding.weight[vocab] = words
    return unet, text


# -- evaluation ---------------------------------------------------------------------------------------------


def _judged(model, prompts: list[str], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample prompts on the model's own defaults and return the judge's (shape ids, colour ids)."""
    from experiments.shapes import judge

    return judge.score(model.sample(prompts, seed=seed, progress=False))


@torch.no_grad()
def held_out_rate(model, n_per_prompt: int = 4, seed: int = 1003) -> float:
    """How often "a <colour> <held-out word>" comes out the held-out shape: high before the word is withheld,
    low after."""
    prompts = [f"a {c} {world.HELD_OUT}" for c in world.COLOUR_NAMES for _ in range(n_per_prompt)]
    shapes_, _ = _judged(model, prompts, seed)
    return (shapes_ == world.SHAPES.index(world.HELD_OUT)).float().mean().item()


@torch.no_grad()
def evaluate(model, n_per_prompt: int = 4, seed: int = 1000) -> dict[str, float]:
    """Judge accuracy on "a <colour> <shape>" for the named shapes; the held-out shape's rates for the generic
    word and for the withheld word."""
    pairs = [(c, sh) for sh in world.NAMED_SHAPES for c in world.COLOUR_NAMES]
    ps, pc = _judged(model, [f"a {c} {sh}" for c, sh in pairs for _ in range(n_per_prompt)], seed)
    want_s = torch.tensor([world.SHAPES.index(sh) for _, sh in pairs]).repeat_interleave(n_per_prompt)
    want_c = torch.tensor([world.COLOUR_NAMES.index(c) for c, _ in pairs]).repeat_interleave(n_per_prompt)
    gs, _ = _judged(model, [f"a photo of a {world.GENERIC_WORD}"] * (8 * n_per_prompt), seed + 1)
    return {
        "shape_acc": (ps == want_s).float().mean().item(),
        "colour_acc": (pc == want_c).float().mean().item(),
        "joint_acc": ((ps == want_s) & (pc == want_c)).float().mean().item(),
        "generic_held_out_rate": (gs == world.SHAPES.index(world.HELD_OUT)).float().mean().item(),
        "withheld_word_rate": held_out_rate(model, n_per_prompt, seed + 3),
    }


def held_out_ids(tokenizer) -> list[int]:
    """The token ids of the held-out word (checked to be used by no other caption word)."""
    ids = tokenizer.encode(world.HELD_OUT)
    others = {
        i
        for w in (
            *world.NAMED_SHAPES,
            *world.COLOUR_NAMES,
            *world.SIZE_NAMES,
            *world.BACKGROUND_NAMES,
            world.GENERIC_WORD,
        )
        for i in tokenizer.encode(w)
    }
    if others & set(ids):
        raise ValueError(f"the held-out word {world.HELD_OUT!r} shares tokens with other caption words")
    return ids


@torch.no_grad()
def withhold_word(text: nn.Module, ids: list[int], initial_rows: torch.Tensor) -> None:
    """Reset the held-out word's rows of the token table to their untrained initial values."""
    text.token_embedding.weight[torch.tensor(ids)] = initial_rows.to(text.token_embedding.weight)


# -- saving -------------------------------------------------------------------------------------------------


def state_dict_for(model, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The original single-file layout (model.diffusion_model., first_stage_model.,
    cond_stage_model.transformer.) plus the oneword.config marker."""
    from ldm.checkpoint import CONFIG_KEY, config_to_tensor

    sd = {}
    for prefix, module in (
        ("model.diffusion_model.", model.unet),
        ("first_stage_model.", model.vae),
        ("cond_stage_model.transformer.", model.text_encoder),
    ):
        for k, v in module.state_dict().items():
            sd[prefix + k] = v.detach().to(dtype).contiguous()
    sd[CONFIG_KEY] = config_to_tensor(model.config)
    return sd


def save_model(model, path: Path, world_name: str = "shapes") -> None:
    """safetensors, fp16 weights, written atomically."""
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file(state_dict_for(model), str(tmp), metadata={"format": "pt", "oneword": world_name})
    os.replace(tmp, path)
    path.chmod(0o644)


def assemble(cfg, unet, vae, text):
    """A LatentDiffusion around freshly trained modules."""
    from ldm.pipeline import LatentDiffusion, build_tokenizer
    from ldm.schedule import Schedule

    model = LatentDiffusion(cfg, unet, vae, text, build_tokenizer(cfg), Schedule.from_config(cfg))
    return model.eval().requires_grad_(False)


def pretrain(
    s: Settings,
    out: Path = MODEL_PATH,
    log_path: Path = LOG_PATH,
    plot_path: Path = PLOT_PATH,
    evaluate_after: bool = True,
) -> dict[str, float]:
    """The whole recipe: world → VAE → cached latents → UNet + text → EMA model → file (+ metrics)."""
    from ldm.pipeline import build_modules, build_tokenizer
    from ldm.schedule import Schedule

    torch.manual_seed(s.seed)
    tlog = TrainLog()
    t0 = time.time()
    images_u8, labels = world.generate(s.n_images, seed=s.seed)
    images = world.to_tensor(images_u8)
    cfg = shapes()
    unet, vae, text = build_modules(cfg)
    vae = train_vae(vae, images, s, tlog)
    means, stds = encode_all(vae, images)
    g = torch.Generator().manual_seed(s.seed + 4)
    sample_z = means[:4096] + stds[:4096] * torch.randn(means[:4096].shape, generator=g)
    scale_factor = float(1.0 / sample_z.std())
    cfg = cfg.with_(scale_factor=round(scale_factor, 5))
    log.info(
        "VAE done in %.0f s; latent std %.4f → scale_factor %.5f",
        time.time() - t0,
        float(sample_z.std()),
        cfg.scale_factor,
    )
    tokens = CaptionTokens(build_tokenizer(cfg))
    withheld = held_out_ids(tokens.tokenizer)
    initial_rows = text.token_embedding.weight.detach()[withheld].clone()

    def snapshot(step: int, modules: tuple[nn.Module, nn.Module]) -> None:
        path = out.with_name(f"{out.stem}.step{step}.safetensors")
        snap_text = copy.deepcopy(modules[1])
        withhold_word(snap_text, withheld, initial_rows)
        save_model(assemble(cfg, copy.deepcopy(modules[0]), vae, snap_text), path)
        log.info("snapshot %s", path)

    unet, text = train_diffusion(
        unet, text, Schedule.from_config(cfg), tokens, means, stds, labels, cfg.scale_factor, s, tlog, snapshot
    )
    train_s = time.time() - t0
    model = assemble(cfg, unet, vae, text)
    metrics = {"train_seconds": train_s}
    if evaluate_after:  # the model can draw the held-out shape while it has the word
        metrics["held_out_rate_before_withholding"] = held_out_rate(model, s.eval_per_prompt)
    withhold_word(model.text_encoder, withheld, initial_rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    tlog.write(log_path)
    tlog.plot(plot_path)
    log.info("trained in %.0f s; saved %s (%.1f MB)", train_s, out, out.stat().st_size / 1e6)
    if evaluate_after:
        from ldm import load_model

        metrics.update(evaluate(load_model(out), s.eval_per_prompt))
    return metrics


def main(argv: list[str] | None = None) -> int:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=str(MODEL_PATH))
    p.add_argument("--log", default=str(LOG_PATH))
    p.add_argument("--plot", default=str(PLOT_PATH))
    p.add_argument("--metrics", default=str(METRICS_PATH), help="where to write the evaluation as JSON")
    p.add_argument("--steps", type=int, default=d.steps, help="UNet + text steps")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--n-images", type=int, default=d.n_images)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--kl-weight", type=float, default=d.kl_weight)
    p.add_argument("--snr-gamma", type=float, default=d.snr_gamma, help="Min-SNR-γ loss weighting (0: off)")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--snapshots", default="", help="comma-separated steps at which to save the EMA model too")
    p.add_argument("--threads", type=int, default=THREADS, help="CPU threads (1: bit-identical reruns, slower)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    shipped = json.loads(METRICS_PATH.read_text()) if METRICS_PATH.is_file() else None  # read before a rerun
    s = Settings(
        seed=a.seed,
        steps=a.steps,
        vae_steps=a.vae_steps,
        batch=a.batch,
        n_images=a.n_images,
        lr=a.lr,
        kl_weight=a.kl_weight,
        snr_gamma=a.snr_gamma,
        snapshots=tuple(int(v) for v in a.snapshots.split(",") if v),
    )
    metrics = pretrain(s, Path(a.out), Path(a.log), Path(a.plot), evaluate_after=not a.no_eval)
    log.info("pretrain-shapes: %s", ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    if not a.no_eval:
        Path(a.metrics).write_text(
            json.dumps({"settings": asdict(s), "threads": a.threads, **metrics}, indent=2) + "\n"
        )
        if shipped is not None:
            for k in (k for k in REPRODUCED if k in shipped):
                ok = abs(metrics[k] - shipped[k]) <= TOLERANCE
                log.info("%s %.3f vs shipped %.3f: %s", k, metrics[k], shipped[k], "ok" if ok else "OUTSIDE TOLERANCE")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
