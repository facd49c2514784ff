"""The two textual-inversion trainers `make bench` times on the same weights: oneword's own `train_step`, and
diffusers' examples/textual_inversion step without accelerate."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import Setup, place
from ldm.precision import DTYPES

ROOT = Path(__file__).resolve().parents[1]
CONCEPT = ROOT / "experiments" / "concepts" / "cat"
TOKEN, INIT_WORD = "<cat>", "sculpture"
BASE_LR = 5e-3
SEED = 23


class OnewordTrainer:
    """inversion.train's own `train_step` on its InversionLoss, Batches, LearnedWords, AdamW and GradScaler."""

    def __init__(self, s: Setup, device: torch.device) -> None:
        from inversion.embedding import LearnedWords

        self.s = s
        g = torch.Generator().manual_seed(SEED)
        self.words = LearnedWords(s.ours, TOKEN, 1, [INIT_WORD], generator=g)

    def configure(self, size: int, batch: int, device: torch.device, precision: str) -> None:
        from inversion import data as D
        from inversion.batches import Batches
        from inversion.config import TrainConfig
        from inversion.templates import dual_templates, load_templates
        from inversion.train import InversionLoss

        m, dtype = self.s.ours, DTYPES[precision]
        place([m], device, torch.float32)
        if dtype != torch.float32:  # as train(): frozen UNet and text tower in half, learned rows fp32
            m.unet.to(dtype)
            m.text_encoder.to(dtype)
        if hasattr(m.unet, "set_gradient_checkpointing"):
            m.unet.set_gradient_checkpointing(False)  # train.py's default CHECKPOINTING=0
        self.words.to(device)
        images = D.ConceptImages(CONCEPT, size)
        cache = D.LatentCache(m, images, None)  # in memory: filled once before training, as train() does
        self.config = TrainConfig(concept=str(CONCEPT), seed=SEED, batch=batch, precision=precision)
        self.batches = Batches(
            m,
            self.words,
            images,
            cache,
            load_templates("object"),
            dual_templates("object"),
            self.config,
            cache.latent_shape,
            device,
        )
        self.optimizer = torch.optim.AdamW([self.words.vectors], lr=BASE_LR * batch, weight_decay=1e-2)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.loss_fn = InversionLoss(m, self.words)
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        self.k = 0

    def step(self) -> float:
        from inversion.distributed import Dist
        from inversion.train import train_step

        value, _ = train_step(
            self.loss_fn, self.batches, self.optimizer, self.scaler, self.config, Dist(), self.k, 1, self.autocast
        )
        self.k += 1
        return value


class DiffusersTrainer:
    """diffusers examples/textual_inversion/textual_inversion.py's step, without accelerate."""

    def __init__(self, s: Setup, device: torch.device) -> None:
        self.s = s
        tok, text = s.tokenizer, s.text
        tok.add_tokens([TOKEN])
        self.placeholder = tok.convert_tokens_to_ids([TOKEN])
        init = tok.encode(INIT_WORD, add_special_tokens=False)
        if len(init) != 1:
            raise RuntimeError(f"init word {INIT_WORD!r} is not one token")
        text.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            table = text.get_input_embeddings().weight
            table[self.placeholder] = table[init[0]].clone()
        text.requires_grad_(False)
        text.get_input_embeddings().requires_grad_(True)  # the example: whole table trainable, masked back

    def configure(self, size: int, batch: int, device: torch.device, precision: str) -> None:
        from diffusers import DDPMScheduler

        from inversion import data as D
        from inversion.templates import load_templates

        s, cfg = self.s, self.s.config
        self.weight_dtype = DTYPES[precision]
        place([s.text], device, torch.float32)  # trainable: fp32, forward under autocast
        place([s.unet, s.vae], device, self.weight_dtype)  # frozen: weight_dtype
        s.text.train()
        emb = s.text.get_input_embeddings()
        self.orig = emb.weight.data.clone()
        self.keep = torch.ones(len(s.tokenizer), dtype=torch.bool)
        self.keep[min(self.placeholder) : max(self.placeholder) + 1] = False
        self.optimizer = torch.optim.AdamW(
            emb.parameters(), lr=BASE_LR * batch, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
        )
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=cfg.timesteps,
            beta_start=cfg.linear_start,
            beta_end=cfg.linear_end,
            beta_schedule="scaled_linear",
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.autocast = (
            torch.autocast(device.type, dtype=self.weight_dtype)
            if self.weight_dtype != torch.float32
            else nullcontext()
        )
        self.scale = cfg.scale_factor
        # the example's dataset (its DataLoader, not the step): PIL bicubic resize, flip, template, tokens
        images = D.ConceptImages(CONCEPT, size)
        templates = load_templates("object")
        g = torch.Generator().manual_seed(SEED)
        self.batches = []
        for _ in range(16):
            idx = [int(torch.randint(len(images), (), generator=g)) for _ in range(batch)]
            flips = [bool(torch.rand((), generator=g) < 0.5) for _ in range(batch)]
            prompts = [
                templates[int(torch.randint(len(templates), (), generator=g))].format(TOKEN) for _ in range(batch)
            ]
            ids = s.tokenizer(
                prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
            ).input_ids
            self.batches.append((images.batch(idx, flips), ids))
        self.k, self.device = 0, device

    def step(self) -> float:
        s, dev = self.s, self.device
        pixels, ids = self.batches[self.k % len(self.batches)]
        self.k += 1
        pixels, ids = pixels.to(dev), ids.to(dev)
        latents = s.vae.encode(pixels.to(dtype=self.weight_dtype)).latent_dist.sample().detach()
        latents = latents * self.scale
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=dev
        ).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with self.autocast:  # accelerate wraps only the prepared (text) model's forward
            hidden = s.text(ids)[0].to(dtype=self.weight_dtype)
        pred = s.unet(noisy, timesteps, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        with torch.no_grad():
            s.text.get_input_embeddings().weight[self.keep] = self.orig[self.keep]
        return float(loss.detach())
