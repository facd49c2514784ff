"""The instance judge: a metric-learned embedding of object identity plus context and attribute classifiers,
trained only on world renders (never on samples), used only for scoring.

    python -m experiments.instances.judge [--out weights/instances-judge.safetensors]

Embedding: a small CNN trained by instance classification with a cosine softmax (NormFace, Wang et al. 2017)
over `n_instances` objects, each rendered in `views` random scenes, flipped and degraded (blur, noise,
contrast, shift) like a small generator's samples — so that nearness means "the same object", whatever the
context. Heads on the same trunk classify the context a prompt can ask for (background, size, position,
companion) and the worded attributes (colour, pattern, body, top, legs).

Scores (all on world instances nobody trains on, ids ≥ world.JUDGE_EVAL_BASE):
- `reconstruction(samples, concept_views, lookalike_views)`: the fraction of (sample, lookalike) pairs in which
  the sample's embedding is nearer (cosine) the concept's centroid than the lookalike's. Lookalikes share
  every worded attribute with the concept (world.lookalike), so 0.5 is what a caption alone earns and 1.0
  means every sample is recognisably this object.
- `context_accuracy`: the classifier's accuracy per context field.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from experiments.instances import world
from experiments.shapes.judge import augment as degrade

log = logging.getLogger(__name__)

JUDGE_PATH = Path(__file__).resolve().parents[2] / "weights" / "instances-judge.safetensors"
MARKER = "oneword.instances-judge"
CONTEXT = {
    "background": len(world.BACKGROUND_NAMES),
    "size": len(world.SIZE_NAMES),
    "position": len(world.POSITIONS),
    "companion": len(world.COMPANIONS),
}
ATTRIBUTES = {
    "colour": len(world.COLOUR_NAMES),
    "pattern": len(world.PATTERNS),
    "body": len(world.BODIES),
    "top": len(world.TOPS),
    "legs": 2,
}
HEADS = {**CONTEXT, **ATTRIBUTES}
EMBED_DIM = 64
COSINE_SCALE = 16.0


class InstanceJudge(nn.Module):
    """Conv trunk → 256-d features → a unit embedding (identity) and one linear head per label."""

    def __init__(self, n_instances: int, width: int = 24) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            *block(4 * w, 4 * w),
            nn.MaxPool2d(2),
        )
        self.hidden = nn.Linear(4 * w * 16, 256)
        self.embed = nn.Linear(256, EMBED_DIM)
        self.centres = nn.Parameter(torch.randn(n_instances, EMBED_DIM) * 0.1)
        self.heads = nn.ModuleDict({k: nn.Linear(256, n) for k, n in HEADS.items()})

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.hidden(self.features(x).flatten(1)))

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(self.trunk(x)), dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = self.trunk(x)
        e = F.normalize(self.embed(h), dim=-1)
        return e, {k: head(h) for k, head in self.heads.items()}


def targets(labels: list[world.Labels]) -> dict[str, torch.Tensor]:
    """Every head's class index per render."""
    ctx = world.context_targets(labels)
    out = {k: ctx[:, i] for i, k in enumerate(CONTEXT)}
    out.update(
        {
            "colour": torch.tensor([lab.instance.colour for lab in labels]),
            "pattern": torch.tensor([lab.instance.pattern for lab in labels]),
            "body": torch.tensor([lab.instance.body for lab in labels]),
            "top": torch.tensor([lab.instance.top for lab in labels]),
            "legs": torch.tensor([int(lab.instance.legs > 0) for lab in labels]),
        }
    )
    return out


def _flip(x: torch.Tensor, y: dict[str, torch.Tensor], flip: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mirror the chosen images; their position labels swap left and right."""
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pos = y["position"].clone()
    left, right = world.POSITIONS.index("left"), world.POSITIONS.index("right")
    swapped = torch.where(pos == left, right, torch.where(pos == right, left, pos))
    return x, {**y, "position": torch.where(flip, swapped, pos)}


def train_judge(
    n_instances: int = 1000, views: int = 8, epochs: int = 12, seed: int = 0, batch_size: int = 128, lr: float = 2e-3
) -> InstanceJudge:
    """Instance classification (cosine softmax) + label heads on a fresh world; Adam, one-cycle."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = world.generate(n_instances, views, base=world.JUDGE_BASE)
    x = world.to_tensor(images)
    ids = torch.arange(n_instances).repeat_interleave(views)
    y = targets(labels)
    model = InstanceJudge(n_instances)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    per_epoch = len(x) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch)
    model.train()
    bar = tqdm(total=epochs * per_epoch, desc="judge", leave=False)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb, yb = _flip(x[idx], {k: v[idx] for k, v in y.items()}, torch.rand(len(idx), generator=g) < 0.5)
            e, logits = model(degrade(xb, g))
            loss = F.cross_entropy(COSINE_SCALE * e @ F.normalize(model.centres, dim=-1).T, ids[idx])
            loss = loss + sum(F.cross_entropy(logits[k], yb[k]) for k in HEADS) / len(HEADS)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def as_tensor(images: torch.Tensor | np.ndarray | Sequence[Image.Image]) -> torch.Tensor:
    """PIL list, uint8 (n, H, W, 3) array, or float (n, 3, H, W) in [-1, 1] → float 32×32 in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.float()
    elif isinstance(images, np.ndarray):
        x = world.to_tensor(images)
    else:
        x = world.to_tensor(np.stack([np.asarray(im.convert("RGB")) for im in images]))
    if x.shape[-2:] != (world.RESOLUTION, world.RESOLUTION):
        x = F.interpolate(x, size=(world.RESOLUTION, world.RESOLUTION), mode="area")
    return x


@torch.no_grad()
def embed(model: InstanceJudge, images) -> torch.Tensor:
    """Unit embeddings, averaged with the mirrored image's (the identity of an object does not flip)."""
    x = as_tensor(images)
    out = [F.normalize(model.embedding(c) + model.embedding(c.flip(-1)), dim=-1) for c in x.split(256)]
    return torch.cat(out)


@torch.no_grad()
def classify(model: InstanceJudge, images) -> dict[str, torch.Tensor]:
    """Argmax class index per head."""
    x = as_tensor(images)
    outs = [model(c)[1] for c in x.split(256)]
    return {k: torch.cat([o[k] for o in outs]).argmax(-1) for k in HEADS}


def centroid(e: torch.Tensor) -> torch.Tensor:
    return F.normalize(e.mean(0), dim=-1)


def reconstruction(model: InstanceJudge, samples, concept_views, lookalike_views: Sequence) -> float:
    """P(a sample is nearer the concept's centroid than a lookalike's), over all (sample, lookalike) pairs."""
    e = embed(model, samples)
    c = centroid(embed(model, concept_views))
    others = torch.stack([centroid(embed(model, v)) for v in lookalike_views])
    return (e @ c[:, None] > e @ others.T).float().mean().item()


def lookalike_views(instance: world.Instance, n: int, views: int, seed: int) -> list[list[world.Labels]]:
    """Labels of n lookalike instances (ids from seed's own range) in `views` large centred scenes each."""
    base = world.JUDGE_EVAL_BASE + 100_000 + 1000 * seed
    return [
        world.views(base + k, views, instance=world.lookalike(instance, base + k), size=world.SIZE_NAMES.index("large"))
        for k in range(n)
    ]


def render_all(labels: list[world.Labels]) -> np.ndarray:
    return np.stack([np.asarray(world.render(lab)) for lab in labels])


def _identity_sets(i: int) -> tuple[list[world.Labels], np.ndarray, list[np.ndarray]]:
    """Held-out instance i of the identity measurements: its 6 large-view labels and renders, and 3 views of
    each of its 8 lookalikes."""
    labs = world.views(world.JUDGE_EVAL_BASE + 50_000 + i, 6, size=world.SIZE_NAMES.index("large"))
    return labs, render_all(labs), [render_all(v) for v in lookalike_views(labs[0].instance, 8, 3, seed=500 + i)]


@torch.no_grad()
def autoencoder_reconstruction(model: InstanceJudge, vae: nn.Module, n_eval: int = 16) -> tuple[float, float]:
    """How much identity an autoencoder keeps: the mean reconstruction score of its decoded held-out renders
    (3 views of each of n_eval large instances nobody trains on, against 3 other views and 8 lookalikes), and
    the same score of the renders themselves (the ceiling)."""
    was_training = vae.training
    vae.eval()
    dec, orig = [], []
    dtype = next(vae.parameters()).dtype
    for i in range(n_eval):
        _, own, others = _identity_sets(i)
        decoded = vae.decode(vae.encode(world.to_tensor(own[3:]).to(dtype)).mean).float().clamp(-1, 1)
        dec.append(reconstruction(model, decoded, own[:3], others))
        orig.append(reconstruction(model, own[3:], own[:3], others))
    vae.train(was_training)
    return float(np.mean(dec)), float(np.mean(orig))


@torch.no_grad()
def denoise_reconstruction(model: InstanceJudge, ldm_model, strength: float, n_eval: int = 16, seed: int = 0) -> float:
    """How much identity the diffusion model keeps when it denoises: the renders of autoencoder_reconstruction,
    encoded, noised to `strength` of the model's own sampling steps and denoised (SDEdit, the model's own
    guidance) with their long human caption — words a lookalike shares — then scored the same way. The
    autoencoder's score is the ceiling; near 0.5 the UNet redraws the object from the caption alone, so no word
    can hold more of an instance than it can draw back from that noise level."""
    sets = [_identity_sets(i) for i in range(n_eval)]
    images = world.to_tensor(np.concatenate([own[3:] for _, own, _ in sets]))
    prompts = [world.human_captions(labs[0].instance)[1] for labs, _, _ in sets for _ in range(3)]
    dev = ldm_model.device
    latents = ldm_model.encode_images(images.to(dev, ldm_model.vae_dtype), sample=False)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    steps, scale = ldm_model.config.steps, ldm_model.config.guidance
    out = ldm_model.edit_latents(
        latents, prompts, noise=noise, strength=strength, steps=steps, scale=scale, progress=False
    )
    decoded = ldm_model.decode_latents(out).float().clamp(-1, 1).cpu()
    return float(
        np.mean(
            [
                reconstruction(model, decoded[3 * i : 3 * i + 3], own[:3], others)
                for i, (_, own, others) in enumerate(sets)
            ]
        )
    )


@torch.no_grad()
def accuracy(model: InstanceJudge, n_instances: int = 100, views: int = 6, n_lookalike: int = 40) -> dict[str, float]:
    """Held-out renders: identification top-1 among n_instances (centroid of 3 views vs 3 others), the
    reconstruction score of held-out views against lookalikes (the metric's ceiling), head accuracies."""
    images, labels = world.generate(n_instances, views, base=world.JUDGE_EVAL_BASE)
    e = embed(model, images).view(n_instances, views, -1)
    gallery = F.normalize(e[:, : views // 2].mean(1), dim=-1)
    queries = e[:, views // 2 :].reshape(-1, e.shape[-1])
    truth = torch.arange(n_instances).repeat_interleave(views - views // 2)
    out = {"identification_top1": ((queries @ gallery.T).argmax(-1) == truth).float().mean().item()}
    pred, want = classify(model, images), targets(labels)
    out.update({f"{k}_acc": (pred[k] == want[k]).float().mean().item() for k in HEADS})
    recs = []
    for i in range(n_lookalike):
        inst = labels[i * views].instance
        own = images[i * views : (i + 1) * views]
        others = [render_all(v) for v in lookalike_views(inst, 8, 3, seed=i)]
        recs.append(reconstruction(model, own[views // 2 :], own[: views // 2], others))
    out["heldout_reconstruction"] = float(np.mean(recs))
    return out


def save_judge(model: InstanceJudge, path: str | Path = JUDGE_PATH, **info: object) -> None:
    """safetensors (fp16 trunk, the class centres dropped) with a config marker; written atomically."""
    path = Path(path)
    meta = {"format": MARKER, "config": json.dumps({"heads": HEADS, "resolution": world.RESOLUTION, **info})}
    sd = {
        k: (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in model.state_dict().items()
        if k != "centres"
    }
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata=meta)
    os.replace(tmp, path)
    path.chmod(0o644)


def load_judge(path: str | Path = JUDGE_PATH) -> InstanceJudge:
    """Load a saved judge (strict, bar the training-only class centres) and check its marker and heads."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != MARKER:
        raise ValueError(f"{path} is not an instances judge (metadata format={meta.get('format')!r})")
    cfg = json.loads(meta["config"])
    if cfg["heads"] != HEADS:
        raise ValueError(f"{path} was trained with other heads: {cfg['heads']}")
    model = InstanceJudge(1)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or set(missing) != {"centres"}:
        raise ValueError(f"{path}: missing {missing}, unexpected {unexpected}")
    return model.eval()


_CACHED: InstanceJudge | None = None


def shipped() -> InstanceJudge:
    """The shipped judge (loaded once)."""
    global _CACHED
    if _CACHED is None:
        _CACHED = load_judge()
    return _CACHED


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train the instances judge (identity embedding + label heads).")
    p.add_argument("--out", default=str(JUDGE_PATH))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-instances", type=int, default=1000)
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    t0 = time.time()
    model = train_judge(a.n_instances, a.views, a.epochs, a.seed)
    acc = accuracy(model)
    log.info("judge (%.0f s): %s", time.time() - t0, json.dumps({k: round(v, 4) for k, v in acc.items()}))
    save_judge(model, a.out, seed=a.seed, n_instances=a.n_instances, views=a.views, epochs=a.epochs, **acc)
    log.info("saved %s", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
