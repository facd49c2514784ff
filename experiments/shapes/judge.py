"""The judge: a small CNN that classifies shape and colour, trained on the world, used only for scoring."""

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

from experiments.shapes import world

log = logging.getLogger(__name__)

JUDGE_PATH = Path(__file__).resolve().parents[2] / "weights" / "shapes-judge.safetensors"
MARKER = "oneword.shapes-judge"


class Judge(nn.Module):
    """Conv net with two linear heads (shape, colour) over 32×32 RGB in [-1, 1]."""

    def __init__(
        self, n_shapes: int = len(world.SHAPES), n_colours: int = len(world.COLOUR_NAMES), width: int = 16
    ) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            *block(4 * w, 4 * w),
            nn.MaxPool2d(2),
        )
        self.hidden = nn.Linear(4 * w * 16, 128)
        self.shape_head = nn.Linear(128, n_shapes)
        self.colour_head = nn.Linear(128, n_colours)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.hidden(self.features(x).flatten(1)))
        return self.shape_head(h), self.colour_head(h)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise, contrast and a one-pixel shift: the kinds of error a small generator makes."""
    n = x.shape[0]
    rand = lambda *s: torch.rand(*s, generator=generator)  # noqa: E731
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = rand(n, 1, 1, 1) * 0.8
    x = x * (1 - mix) + blurred * mix
    x = x * (0.85 + 0.3 * rand(n, 1, 1, 1)) + (rand(n, 3, 1, 1) - 0.5) * 0.15
    x = x + torch.randn(x.shape, generator=generator) * rand(n, 1, 1, 1) * 0.12
    shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
    x = torch.roll(x, shifts=shift, dims=(2, 3))
    return x.clamp(-1, 1)


def train_judge(n_train: int = 16000, epochs: int = 3, seed: int = 0, batch_size: int = 128, lr: float = 2e-3) -> Judge:
    """Train on a fresh world (seeded); Adam with cosine decay; returns the model in eval mode."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = world.generate(n_train, seed=10_000 + seed)
    x = world.to_tensor(images)
    ys, yc = world.label_tensors(labels)
    model = Judge()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total = epochs * (n_train // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    model.train()
    bar = tqdm(total=total, desc="judge", leave=False)
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=g)
        for i in range(n_train // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            ls, lc = model(augment(x[idx], g))
            loss = F.cross_entropy(ls, ys[idx]) + F.cross_entropy(lc, yc[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


@torch.no_grad()
def accuracy(model: Judge, n: int = 2000, seed: int = 777) -> tuple[float, float]:
    """(shape accuracy, colour accuracy) on a fresh world drawn with another seed."""
    images, labels = world.generate(n, seed=seed)
    ys, yc = world.label_tensors(labels)
    ps, pc = predict(model, world.to_tensor(images))
    return (ps == ys).float().mean().item(), (pc == yc).float().mean().item()


def _as_tensor(images: torch.Tensor | np.ndarray | Sequence[Image.Image]) -> torch.Tensor:
    """PIL list, uint8 (n, H, W, 3) array, or float (n, 3, H, W) in [-1, 1] -> float 32×32 in [-1, 1]."""
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
def predict(
    model: Judge, images: torch.Tensor | np.ndarray | Sequence[Image.Image]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(shape ids, colour ids) argmax predictions."""
    x = _as_tensor(images).to(next(model.parameters()).device)
    out_s, out_c = [], []
    for chunk in x.split(256):
        ls, lc = model.eval()(chunk)
        out_s.append(ls.argmax(-1).cpu())
        out_c.append(lc.argmax(-1).cpu())
    return torch.cat(out_s), torch.cat(out_c)


def save_judge(model: Judge, path: str | Path = JUDGE_PATH, **info: object) -> None:
    """safetensors (fp32) with a config marker in the metadata; written atomically."""
    path = Path(path)
    meta = {
        "format": MARKER,
        "config": json.dumps(
            {"shapes": world.SHAPES, "colours": world.COLOUR_NAMES, "resolution": world.RESOLUTION, **info}
        ),
    }
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    path.chmod(0o644)


def load_judge(path: str | Path = JUDGE_PATH) -> Judge:
    """Load a saved judge (strict) and check its marker and label sets."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != MARKER:
        raise ValueError(f"{path} is not a shapes judge (metadata format={meta.get('format')!r})")
    cfg = json.loads(meta["config"])
    if tuple(cfg["shapes"]) != world.SHAPES or tuple(cfg["colours"]) != world.COLOUR_NAMES:
        raise ValueError(f"{path} was trained on other labels: {cfg['shapes']} / {cfg['colours']}")
    model = Judge()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


_CACHED: Judge | None = None


def score(images: torch.Tensor | np.ndarray | Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """Judge images with the shipped judge: (shape ids into world.SHAPES, colour ids into COLOUR_NAMES)."""
    global _CACHED
    if _CACHED is None:
        _CACHED = load_judge()
    return predict(_CACHED, images)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the shapes judge (shape + colour classifier).")
    parser.add_argument("--out", default=str(JUDGE_PATH))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=16000)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)  # deterministic, and much faster than two on a loaded 2-core machine
    t0 = time.time()
    model = train_judge(args.n_train, args.epochs, args.seed)
    acc_s, acc_c = accuracy(model)
    log.info("judge: shape acc %.4f, colour acc %.4f (%.0f s)", acc_s, acc_c, time.time() - t0)
    save_judge(model, args.out, seed=args.seed, shape_acc=acc_s, colour_acc=acc_c)
    log.info("saved %s", args.out)


if __name__ == "__main__":
    main()
