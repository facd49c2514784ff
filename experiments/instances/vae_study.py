"""How much of an object's identity an autoencoder keeps: train one VAE design on the pretraining world and
measure, every few steps, the judge's reconstruction score of its decoded held-out renders.

    python -m experiments.instances.vae_study --ch-mult 1,1,1 --z 4 --res-blocks 1 --steps 2000 --out DIR

Each evaluation appends one JSON line to DIR/study.jsonl: step, loss (mean of the last 50 steps),
`vae_reconstruction` (judge.reconstruction of decoded held-out views against 8 lookalikes, over n_eval
instances nobody trains on) and, for reference, the same score of the undecoded renders. 0.5 is chance: a
decoder whose outputs keep only what the caption says. The VAE is saved as DIR/vae-step<N>.pt.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from experiments.instances import judge, world
from experiments.instances.config import instances
from experiments.instances.pretrain import Settings
from experiments.shapes.pretrain import lr_at

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    from ldm.vae import AutoencoderKL

    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ch-mult", default="1,1,1", help="VAE channel multipliers (f = 2^(levels-1))")
    p.add_argument("--z", type=int, default=4, help="latent channels")
    p.add_argument("--res-blocks", type=int, default=1)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=d.vae_lr)
    p.add_argument("--batch", type=int, default=d.vae_batch)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--n-instances", type=int, default=d.n_instances)
    p.add_argument("--judge", default=str(judge.JUDGE_PATH))
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    try:
        ch_mult = [int(v) for v in a.ch_mult.split(",")]
    except ValueError:
        ch_mult = []
    if not ch_mult or min(ch_mult) < 1:
        print(f"error: --ch-mult={a.ch_mult!r} must be comma-separated integers ≥ 1, e.g. 1,1,1", file=sys.stderr)
        return 2
    for name, value in (
        ("--z", a.z),
        ("--steps", a.steps),
        ("--batch", a.batch),
        ("--eval-every", a.eval_every),
        ("--n-instances", a.n_instances),
        ("--threads", a.threads),
    ):
        if value < 1:
            print(f"error: {name}={value} must be ≥ 1", file=sys.stderr)
            return 2
    if a.res_blocks < 0:
        print(f"error: --res-blocks={a.res_blocks} must be ≥ 0", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dd = {**instances().vae["ddconfig"], "ch_mult": ch_mult, "z_channels": a.z, "num_res_blocks": a.res_blocks}
    vae = AutoencoderKL(ddconfig=dd, embed_dim=a.z)
    j = judge.load_judge(a.judge)
    images = world.to_tensor(world.generate(a.n_instances, d.views)[0])
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(vae.parameters(), lr=a.lr, weight_decay=0.0)
    losses: list[float] = []
    t0 = time.time()
    for step in tqdm(range(a.steps), desc="VAE", dynamic_ncols=True):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a.steps, a.lr, 100)
        x = images[torch.randint(len(images), (a.batch,), generator=g)]
        post = vae.encode(x)
        rec = vae.decode(post.sample(generator=g))
        kl = post.kl().mean() / post.mean[0].numel()
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + d.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            with torch.no_grad():
                kept, ceiling = judge.autoencoder_reconstruction(j, vae)
            row = {
                "step": step + 1,
                "loss": float(np.mean(losses[-50:])),
                "vae_reconstruction": kept,
                "renders_reconstruction": ceiling,
                "seconds": round(time.time() - t0),
                "ddconfig": dd,
            }
            with open(out / "study.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            torch.save(vae.state_dict(), out / f"vae-step{step + 1}.pt")
            log.info("%s", json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
