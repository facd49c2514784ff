"""The inputs of one training step: global sample k draws its image, flip, template, timestep, noise and latent
from a generator of its own, seeded from (SEED, k), so any split of the samples over steps, accumulation and
ranks draws the same inputs (see inversion/train.py)."""

from __future__ import annotations

import torch

from inversion import data as D
from inversion.config import TrainConfig
from inversion.embedding import LearnedWords
from inversion.templates import MIXING_PROB
from ldm.tokenizer import fit_ids


class Batches:
    """Builds the inputs of global samples k from their own generators (see the module docstring)."""

    def __init__(
        self,
        model,
        words: LearnedWords,
        images: D.ConceptImages,
        cache: D.LatentCache | None,
        templates: tuple[str, ...],
        duals: tuple[str, ...],
        config: TrainConfig,
        latent_shape: tuple[int, ...],
        device: torch.device,
    ) -> None:
        self.model, self.words, self.images, self.cache = model, words, images, cache
        self.templates, self.duals, self.config = templates, duals, config
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
            ids = fit_ids(
                [i for i in tok.encode(p) if i not in drop],
                tok.context_length - 2,
                {i: t for t, run in self.words.tokens.items() for i in run},
            )
            out[r, : len(ids) + 2] = torch.tensor([tok.bos_id, *ids, tok.eos_id])
        return out

    def __call__(self, ks: list[int], active: int) -> tuple[torch.Tensor, ...]:
        a, n = self.config, len(self.images)
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
        return (ids.to(dev), latents.to(dev, torch.float32), torch.tensor(ts, device=dev), torch.stack(noises).to(dev))
