"""The text tower's own pretraining: CLIP's contrastive objective on world renders and their captions.

Stable Diffusion trains its UNet against a text tower that CLIP had already trained and that stays frozen; the
instances model trained its tower from scratch together with the UNet, and the tower learned only what the
diffusion loss made worth learning first — the background — while colour and body words moved nothing
(README: § "v-prediction: the background follows its word"). This stage gives the tower CLIP's training
first: a small image tower and the text tower learn, by the symmetric InfoNCE loss of Radford et al. 2021,
to pick each render's caption out of the batch; the text tower's summary row (the first EOS, CLIP's pooled
output) must then carry every attribute that tells one caption from another.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from experiments.shapes import pretrain as base
from ldm.tokenizer import EOS_ID


class ImageTower(nn.Module):
    """32 px render → (width,) embedding: a convolution, three stride-2 ones (group norm, SiLU), a linear head."""

    def __init__(self, width: int, channels: int = 32) -> None:
        super().__init__()
        c = channels
        layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
        for c_in, c_out in ((c, 2 * c), (2 * c, 4 * c), (4 * c, 4 * c)):  # 32 → 16 → 8 → 4
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(4 * c * 16, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


def pooled(context: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """CLIP's pooled output: each caption's row at its first EOS."""
    first = (ids == EOS_ID).int().argmax(dim=1)
    return context[torch.arange(len(ids)), first]


def train_text(
    text: nn.Module,
    words: torch.Tensor,
    tokens: base.CaptionTokens,
    images: torch.Tensor,
    labels: list,
    caption,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    tlog: base.TrainLog,
) -> float:
    """Train `text` and the caption-vocabulary rows `words` (in place) contrastively against a fresh image
    tower; returns the last 50 steps' mean caption-retrieval accuracy within a batch (chance 1/batch)."""
    g = torch.Generator().manual_seed(seed + 5)
    rng = np.random.default_rng(seed + 6)
    width = words.shape[1]
    with torch.random.fork_rng():  # its own initialisation, leaving the global stream as it was
        torch.manual_seed(seed + 7)
        image_tower = ImageTower(width)
        text_proj = nn.Linear(width, width, bias=False)
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    words.requires_grad_(True)
    tower = [p for n, p in text.named_parameters() if p.requires_grad and "token_embedding" not in n]
    params = [words, log_scale, *tower, *image_tower.parameters(), *text_proj.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    text.train()
    accuracy: list[float] = []
    bar = tqdm(range(steps), desc="text tower (CLIP)", dynamic_ncols=True)
    for step in bar:
        lr_now = base.lr_at(step, steps, lr, min(100, steps // 10))
        for group in opt.param_groups:
            group["lr"] = lr_now
        idx = torch.randperm(len(labels), generator=g)[:batch]
        ids = tokens([caption(labels[i], rng) for i in idx.tolist()])
        ids = ids[:, : int((ids == EOS_ID).int().argmax(1).max()) + 1]  # causal: the rows up to EOS need no more
        t = F.normalize(text_proj(pooled(text(words[tokens.rows(ids)]), ids)), dim=-1)
        v = F.normalize(image_tower(images[idx]), dim=-1)
        logits = log_scale.exp().clamp(max=100) * t @ v.T
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        accuracy.append(float((logits.argmax(1) == target).float().mean()))
        tlog.add("text", step + 1, loss.item(), lr_now)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{np.mean(accuracy[-50:]):.2f}")
    words.requires_grad_(False)
    return float(np.mean(accuracy[-50:]))
