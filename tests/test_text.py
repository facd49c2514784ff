"""CLIP text towers: parity with transformers / open_clip on identical random weights, embeds hook, sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm import attention as attn_mod
from ldm.text import CLIPTextModel, OpenCLIPTextModel

WIDTH, LAYERS, HEADS, CTX, VOCAB = 64, 3, 4, 77, 49408


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (norm gains around 1), so no zero bias or unit gain hides a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_gain = (
                p.dim() == 1
                and ("norm" in name or ".ln_" in name or name.startswith("ln_"))
                and name.endswith("weight")
            )
            p.copy_(1 + 0.1 * noise if is_gain else 0.05 * noise)
    return model


def random_ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 2, (batch, CTX), generator=g)
    ids[:, 0] = 49406
    ids[:, 10] = 49407
    return ids


@pytest.fixture(params=["math", "sdpa"])
def backend(request):
    attn_mod.set_backend(request.param)
    yield request.param
    attn_mod.set_backend(None)


def hf_clip(width: int, layers: int, heads: int):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=CTX,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    cfg._attn_implementation = "eager"
    return transformers.CLIPTextModel(cfg).eval()


def to_hf_keys(ours: dict, hf_keys) -> dict:
    """Our keys carry `text_model.` (as SD1 checkpoints do); transformers 5.x's state_dict may not."""
    if any(k.startswith("text_model.") for k in hf_keys):
        return dict(ours)
    return {k.removeprefix("text_model."): v for k, v in ours.items()}


def oc_text(width: int, layers: int, heads: int):
    oc_transformer = pytest.importorskip("open_clip.transformer")
    return oc_transformer.TextTransformer(
        context_length=CTX,
        vocab_size=VOCAB,
        width=width,
        heads=heads,
        layers=layers,
        output_dim=width,
        act_layer=nn.GELU,
    ).eval()


def oc_reference(oc, ids: torch.Tensor, skip_last: bool) -> torch.Tensor:
    """Stable Diffusion 2's FrozenOpenCLIPEmbedder: blocks (all but the last for "penultimate"), ln_final."""
    x = oc.token_embedding(ids) + oc.positional_embedding
    blocks = oc.transformer.resblocks
    for block in blocks[: len(blocks) - 1] if skip_last else blocks:
        x = block(x, attn_mask=oc.attn_mask)
    return oc.ln_final(x)


def test_clip_matches_transformers(backend):
    ours = randomize_(CLIPTextModel(VOCAB, WIDTH, LAYERS, HEADS, CTX)).eval()
    ref = hf_clip(WIDTH, LAYERS, HEADS)
    ref.load_state_dict(to_hf_keys(ours.state_dict(), ref.state_dict().keys()), strict=True)
    ids = random_ids()
    with torch.no_grad():
        want = ref(input_ids=ids).last_hidden_state
        got = ours(ids)
    assert got.shape == (2, CTX, WIDTH)
    err = rel_err(got, want)
    print(f"CLIPTextModel vs transformers [{backend}]: rel max err {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("output", ["penultimate", "last"])
def test_openclip_matches_open_clip(backend, output):
    ours = randomize_(OpenCLIPTextModel(VOCAB, WIDTH, LAYERS, HEADS, CTX, output=output)).eval()
    ref = oc_text(WIDTH, LAYERS, HEADS)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ids = random_ids()
    with torch.no_grad():
        want = oc_reference(ref, ids, skip_last=output == "penultimate")
        got = ours(ids)
    assert got.shape == (2, CTX, WIDTH)
    err = rel_err(got, want)
    print(f"OpenCLIPTextModel[{output}] vs open_clip [{backend}]: rel max err {err:.2e}")
    assert err <= 1e-5


def test_penultimate_differs_from_last():
    pen = randomize_(OpenCLIPTextModel(VOCAB, WIDTH, LAYERS, HEADS, CTX, output="penultimate"))
    last = OpenCLIPTextModel(VOCAB, WIDTH, LAYERS, HEADS, CTX, output="last")
    last.load_state_dict(pen.state_dict(), strict=True)
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(pen(ids), last(ids)) > 1e-2


@pytest.mark.parametrize("cls", [CLIPTextModel, OpenCLIPTextModel])
def test_embeds_input_equals_ids_and_gradients_reach_it(cls):
    model = randomize_(cls(VOCAB, WIDTH, 2, HEADS, CTX)).eval().requires_grad_(False)
    ids = random_ids()
    embeds = model.token_embedding(ids).detach().requires_grad_(True)
    out = model(embeds)
    with torch.no_grad():
        assert torch.equal(out, model(ids))
    out.square().mean().backward()
    assert embeds.grad is not None and embeds.grad.shape == embeds.shape
    assert embeds.grad[:, :10].abs().sum() > 0
    # Causal: the last position influences nothing before it.
    assert embeds.grad is not None
    g2 = torch.autograd.grad(model(embeds)[:, 5].sum(), embeds)[0]
    assert g2[:, 6:].abs().max() == 0 and g2[:, :6].abs().max() > 0


@pytest.mark.parametrize("cls", [CLIPTextModel, OpenCLIPTextModel])
def test_interface_and_bad_inputs(cls):
    model = cls(VOCAB, 32, 2, 4, CTX)
    assert (model.width, model.vocab_size, model.context_length) == (32, VOCAB, CTX)
    assert isinstance(model.token_embedding, nn.Embedding) and model.token_embedding.weight.shape == (VOCAB, 32)
    assert not list(model.buffers())
    with pytest.raises(ValueError, match="token embeddings"):
        model(torch.zeros(1, CTX, 16))
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, CTX + 1, dtype=torch.long))
    assert model(torch.zeros(1, 10, dtype=torch.long)).shape == (1, 10, 32)


def test_openclip_rejects_unknown_output():
    with pytest.raises(ValueError, match="penultimate"):
        OpenCLIPTextModel(VOCAB, 32, 2, 4, CTX, output="pooled")


def test_sd1_full_size_on_meta_matches_transformers_layout():
    with torch.device("meta"):
        ours = CLIPTextModel()
        ref = hf_clip(768, 12, 12)
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480
    ref_sd = {k: v.shape for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    assert {k: v.shape for k, v in to_hf_keys(ours.state_dict(), ref_sd).items()} == ref_sd


def test_sd2_full_size_on_meta_matches_open_clip_layout():
    with torch.device("meta"):
        ours = OpenCLIPTextModel()
        ref = oc_text(1024, 24, 16)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters()) == 354_032_640
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.text_projection.shape == (1024, 1024) and ours.positional_embedding.shape == (77, 1024)


def test_meta_build_then_assign_load():
    src = randomize_(CLIPTextModel(VOCAB, 32, 2, 4, CTX))
    with torch.device("meta"):
        model = CLIPTextModel(VOCAB, 32, 2, 4, CTX)
    model.load_state_dict(src.state_dict(), strict=True, assign=True)
    ids = random_ids(1)
    with torch.no_grad():
        assert torch.equal(model(ids), src(ids))
