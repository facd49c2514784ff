"""One textual-inversion training step, SD1.5 full size, random weights, batch 1: oneword vs diffusers.

diffusers step = its train_textual_inversion.py example: VAE encode + sample, add_noise, CLIP text encoder with
the whole token table trainable, UNet forward/backward, AdamW over the table, restore the frozen rows.
oneword step   = latent-cache draw, text tower with the learned row spliced in, UNet forward/backward,
AdamW over the (1, 768) learned row. Same weights (the diffusers UNet/VAE share our tensors), same thread
count, steps interleaved so machine load hits both alike; median of the timed steps. Both draw their latent
from the same generator, so their losses agree step by step (printed).

    PYTHONPATH=. .venv/bin/python tests/bench_inversion_step.py SIZE [TIMED_STEPS] [THREADS]

Not collected by pytest. Needs ~12 GiB RAM at 512 px.
"""
from __future__ import annotations

import gc
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders import single_file_utils as S
from transformers import CLIPTextConfig, CLIPTextModel

import ldm.config as C
from inversion import data as D
from inversion.embedding import LearnedWords
from inversion.train import InversionLoss
from ldm.pipeline import LatentDiffusion, _randomise_zero_weights, build_modules, build_tokenizer
from ldm.schedule import Schedule


def diffusers_twins(cfg, unet, vae, text):
    """diffusers UNet/VAE holding our very tensors (assign=True), and a transformers CLIP text model copy."""
    ckpt = {**{"model.diffusion_model." + k: v for k, v in unet.state_dict().items()},
            **{"first_stage_model." + k: v for k, v in vae.state_dict().items()}}
    orig = {"model": {"params": {"scale_factor": 0.18215, "unet_config": {"params": cfg.unet},
                                 "first_stage_config": {"params": cfg.vae}}}}
    ucfg = S.create_unet_diffusers_config_from_ldm(orig, ckpt)
    with torch.device("meta"):
        dunet = UNet2DConditionModel(**ucfg)
    dunet.load_state_dict(S.convert_ldm_unet_checkpoint(ckpt, ucfg), strict=True, assign=True)
    vcfg = S.create_vae_diffusers_config_from_ldm(orig, ckpt)
    with torch.device("meta"):
        dvae = AutoencoderKL(**vcfg)
    dvae.load_state_dict(S.convert_ldm_vae_checkpoint(ckpt, vcfg), strict=True, assign=True)
    t = cfg.text
    dtext = CLIPTextModel(CLIPTextConfig(
        vocab_size=t["vocab_size"], hidden_size=t["width"], intermediate_size=4 * t["width"],
        num_hidden_layers=t["layers"], num_attention_heads=t["heads"], max_position_embeddings=77,
        hidden_act="quick_gelu"))
    dtext.load_state_dict({k.removeprefix("text_model."): v for k, v in text.state_dict().items()}, strict=True)
    return dunet, dvae, dtext


def main() -> None:
    size = int(sys.argv[1])
    timed = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = C.sd1()
    t0 = time.time()
    unet, vae, text = build_modules(cfg)
    _randomise_zero_weights(unet, torch.Generator().manual_seed(0))
    model = LatentDiffusion(cfg, unet, vae, text, build_tokenizer(cfg), Schedule.from_config(cfg))
    model.eval().requires_grad_(False)
    model.unet.set_gradient_checkpointing(False)
    print(f"built SD1.5 random weights in {time.time() - t0:.0f} s; threads {threads}; size {size}", flush=True)

    dunet, dvae, dtext = diffusers_twins(cfg, unet, vae, text)
    inner = getattr(dtext, "text_model", dtext)
    dunet.requires_grad_(False)
    dvae.requires_grad_(False)
    inner.encoder.requires_grad_(False)
    inner.final_layer_norm.requires_grad_(False)
    inner.embeddings.position_embedding.requires_grad_(False)
    dtext.train()
    dunet.train()
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000)
    placeholder = 49408
    dtext.resize_token_embeddings(49409, mean_resizing=False)
    table = dtext.get_input_embeddings().weight
    with torch.no_grad():
        table[placeholder] = table[model.tokenizer.encode("cat")[0]]
    orig_rows = table.data.clone()
    d_opt = torch.optim.AdamW(dtext.get_input_embeddings().parameters(), lr=5e-3, weight_decay=1e-2)
    keep = torch.ones(49409, dtype=torch.bool)
    keep[placeholder] = False
    print(f"diffusers twins ready ({time.time() - t0:.0f} s)", flush=True)

    one = tempfile.mkdtemp()
    shutil.copy(D.resolve_concept("cat") / "chelsea-1-square.jpg", one)
    images = D.ConceptImages(one, size)
    t1 = time.time()
    cache = D.LatentCache(model, images, None)
    cache_s = time.time() - t1
    print(f"latent cache: 1 image × 2 flips encoded once in {cache_s:.1f} s ({cache_s / 2:.1f} s per encode)",
          flush=True)
    words = LearnedWords(model, "<cat>", 1, ["cat"])
    loss_fn = InversionLoss(model, words)
    opt = torch.optim.AdamW([words.vectors], lr=5e-3, weight_decay=1e-2)
    ids = model.tokenizer(["a photo of a <cat>"])   # 49408 is the placeholder in both
    px = images.batch([0], [False])
    lat_shape = cache.latent_shape

    def ours_step(i: int) -> float:
        g = torch.Generator().manual_seed(i)
        latents = cache.draw([0], [False], torch.randn(1, *lat_shape, generator=g))
        noise = torch.randn(1, *lat_shape, generator=g)
        tt = torch.randint(0, 1000, (1,), generator=g)
        loss, _ = loss_fn(ids, latents, tt, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def diffusers_step(i: int) -> float:
        g = torch.Generator().manual_seed(i)
        latents = dvae.encode(px).latent_dist.sample(generator=g) * 0.18215
        noise = torch.randn(latents.shape, generator=g)
        tt = torch.randint(0, 1000, (1,), generator=g)
        noisy = sched.add_noise(latents, noise, tt)
        pred = dunet(noisy, tt, dtext(ids)[0]).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        d_opt.step()
        d_opt.zero_grad()
        with torch.no_grad():
            dtext.get_input_embeddings().weight[keep] = orig_rows[keep]
        return loss.item()

    with torch.no_grad():  # sanity: both UNets compute the same function
        x = torch.randn(1, *lat_shape, generator=torch.Generator().manual_seed(99))
        a = model.unet(x, torch.tensor([500]), model.text_encoder(model.token_embeddings(ids, words.vectors)))
        b = dunet(x, torch.tensor([500]), dtext(ids)[0]).sample
        print(f"UNet parity ours vs diffusers: rel max err {((a - b).abs().max() / a.abs().max()).item():.2e}")
        del a, b, x
    gc.collect()

    steps = {"ours": ours_step, "diffusers": diffusers_step}
    times: dict[str, list[float]] = {v: [] for v in steps}
    for i in range(timed + 1):
        for v, step in steps.items():
            t1 = time.time()
            loss = step(i)
            dt = time.time() - t1
            gc.collect()
            if i > 0:
                times[v].append(dt)
            print(f"step {i} {v:10s} {dt:7.2f} s  loss {loss:.4f}{'  (warm-up)' if i == 0 else ''}", flush=True)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    for v, ts in times.items():
        print(f"RESULT size {size} {v}: median {med[v]:.2f} s/step ({', '.join(f'{x:.2f}' for x in ts)})")
    print(f"RESULT size {size} ratio diffusers/ours = {med['diffusers'] / med['ours']:.2f}x")


if __name__ == "__main__":
    main()
