"""LatentDiffusion: guidance, per-image seeds, placeholder rows, bad input."""

from __future__ import annotations

import pytest
import torch

import ldm


@pytest.fixture(scope="module")
def model():
    return ldm.tiny_model(seed=0)


def test_tiny_model_is_deterministic_and_frozen(model):
    other = ldm.tiny_model(seed=0)
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config.name == "tiny" and model.schedule.num_timesteps == 1000


@pytest.mark.parametrize("scale, branch", [(1.0, "cond"), (0.0, "uncond")])
def test_guidance_scale_one_and_zero_select_one_branch(model, scale, branch):
    cond = model.encode_prompts(["a photo of a cat"])
    uncond = model.encode_prompts([""])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    guided = model.guided_model_fn(cond, uncond, scale)(x, t)
    alone = model.unet(x, t, cond if branch == "cond" else uncond)
    torch.testing.assert_close(guided, alone, rtol=1e-5, atol=1e-6)


def test_image_k_of_a_batch_equals_a_single_run_with_seed_plus_k(model):
    kw = dict(steps=4, scale=3.0, height=32, width=32, progress=False)
    batch = model.sample_latents(["a red star", "a red star", "a red star"], seed=7, **kw)
    single = model.sample_latents(["a red star"], seed=9, **kw)
    torch.testing.assert_close(batch[2:3], single, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_same_seed_same_image(model):
    a = model.sample("a cat", steps=3, seed=3, height=32, width=32, progress=False)[0]
    b = model.sample("a cat", steps=3, seed=3, height=32, width=32, progress=False)[0]
    assert a.tobytes() == b.tobytes() and a.size == (32, 32)


def test_placeholder_rows_come_from_extra_and_the_table_is_untouched(model):
    table = model.text_encoder.token_embedding.weight.clone()
    m = ldm.tiny_model(seed=0)
    vec = torch.randn(2, table.shape[1])
    ids = m.add_embedding("<thing>", vec)
    assert ids == [table.shape[0], table.shape[0] + 1]
    tokens = m.tokenizer(["a photo of <thing>"])
    emb = m.token_embeddings(tokens, m.extra_embeddings)
    where = [i for i, t in enumerate(tokens[0].tolist()) if t >= table.shape[0]]
    assert len(where) == 2
    torch.testing.assert_close(emb[0, where], vec)
    assert torch.equal(m.text_encoder.token_embedding.weight, table)
    # the learned word changes the context; without it the prompt reads differently
    assert not torch.allclose(m.encode_prompts(["a photo of <thing>"]), model.encode_prompts(["a photo of thing"]))


def test_gradient_reaches_only_the_extra_rows(model):
    extra = torch.zeros(1, model.text_encoder.width, requires_grad=True)
    m = ldm.tiny_model(seed=0)
    m.tokenizer.add_placeholder("<g>")
    m.encode_prompts(["a <g>"], extra=extra).square().sum().backward()
    assert extra.grad is not None and extra.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(height=34), "multiples of"),
        (dict(steps=0), "positive"),
        (dict(sampler="euler_z"), "unknown sampler"),
    ],
)
def test_bad_sampling_arguments(model, kw, match):
    args = dict(steps=2, height=32, width=32, progress=False) | kw
    with pytest.raises(ValueError, match=match):
        model.sample("a cat", **args)


def test_wrong_width_embedding_is_refused(model):
    m = ldm.tiny_model(seed=0)
    with pytest.raises(ValueError, match=r"\(n, 32\)"):
        m.add_embedding("<x>", torch.zeros(1, 768))


def test_math_attention_keeps_fp32_scores_under_autocast():
    from ldm.attention import attention_math

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g) * s for s in (1.0, 100.0, 1.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention_math(q, k, v)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, attention_math(q, k, v), rtol=0, atol=0)
