"""LDMBertTextModel: original key layout, parity with diffusers' LDMBertModel through its own converter."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import ldm.bert as bert
from ldm.bert import UNUSED_KEYS, LDMBertTextModel

SMALL = dict(vocab_size=1000, width=64, layers=2, heads=4, dim_head=16, max_seq_len=77)


def _randomise(module: nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorms near 1/0) so that no term of the forward pass is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_gain = p.ndim == 1 and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_norm_gain else 0.2 * noise)


def _small(seed: int = 0) -> LDMBertTextModel:
    model = LDMBertTextModel(**SMALL).eval()
    _randomise(model, seed)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _diffusers_twin(model: LDMBertTextModel, seed: int = 1):
    """diffusers' LDMBertModel filled by diffusers' convert_ldm_bert_checkpoint from an original-layout object."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_bert_checkpoint

    c = SMALL
    config = LDMBertConfig(
        vocab_size=c["vocab_size"],
        max_position_embeddings=c["max_seq_len"],
        encoder_layers=c["layers"],
        encoder_ffn_dim=4 * c["width"],
        encoder_attention_heads=c["heads"],
        head_dim=c["dim_head"],
        d_model=c["width"],
    )
    to_logits = nn.Linear(c["width"], c["vocab_size"])
    _randomise(to_logits, seed)
    # the converter reads `checkpoint.transformer.<original attribute path>`: give it our modules under those paths
    original = SimpleNamespace(
        transformer=SimpleNamespace(
            token_emb=model.token_emb,
            pos_emb=model.pos_emb,
            norm=model.norm,
            attn_layers=model.attn_layers,
            to_logits=to_logits,
        )
    )
    return convert_ldm_bert_checkpoint(original, config).eval()


def _ids(batch: int = 3, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SMALL["vocab_size"], (batch, 77), generator=g)
    ids[:, 0], ids[:, 9], ids[:, 10:] = 101, 102, 0  # [CLS] … [SEP] [PAD]…, as the BERT tokenizer pads
    return ids


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_parity_with_diffusers_ldmbert(backend):
    from ldm.attention import set_backend

    model = _small()
    twin = _diffusers_twin(model)
    ids = _ids()
    set_backend(backend)
    try:
        with torch.no_grad():
            ours = model(ids)
            ref = twin(ids)[0]
    finally:
        set_backend(None)
    assert ours.shape == ref.shape == (3, 77, SMALL["width"])
    err = _rel(ours, ref)
    assert err <= 1e-5, f"relative max error {err:.2e}"


def test_token_embedding_hook_matches_ids():
    """The textual-inversion path: precomputed (B, 77, width) token vectors give the same context as ids."""
    model = _small()
    ids = _ids()
    with torch.no_grad():
        a = model(ids)
        b = model(model.token_embedding(ids))
    assert torch.equal(a, b)
    assert model.token_embedding is model.token_emb
    assert (model.width, model.vocab_size, model.context_length) == (64, 1000, 77)


def test_gradient_reaches_token_vectors_only_through_hook():
    model = _small().requires_grad_(False)
    vec = torch.zeros(1, 77, SMALL["width"], requires_grad=True)
    model(vec).square().sum().backward()
    assert vec.grad is not None and float(vec.grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.parameters())


def test_every_attention_goes_through_the_entry_point(monkeypatch):
    calls = []
    real = bert.attention

    def spy(q, k, v, **kw):
        calls.append((tuple(q.shape), kw.get("causal", False)))
        return real(q, k, v, **kw)

    monkeypatch.setattr(bert, "attention", spy)
    with torch.no_grad():
        _small()(_ids(batch=2))
    assert calls == [((2, 4, 77, 16), False)] * SMALL["layers"]


def test_keys_and_full_size_shapes_match_the_original():
    """The LDM-1.4B (txt2img-f8-large) cond_stage_model.transformer.* keys, built on meta (no memory)."""
    with torch.device("meta"):
        model = LDMBertTextModel()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["token_emb.weight"] == (30522, 1280)
    assert shapes["pos_emb.emb.weight"] == (77, 1280)
    for i in (0, 31):
        a, f = f"attn_layers.layers.{2 * i}", f"attn_layers.layers.{2 * i + 1}"
        assert shapes[f"{a}.0.weight"] == shapes[f"{a}.0.bias"] == (1280,)
        for p in ("to_q", "to_k", "to_v"):
            assert shapes[f"{a}.1.{p}.weight"] == (512, 1280)
            assert f"{a}.1.{p}.bias" not in shapes
        assert shapes[f"{a}.1.to_out.weight"] == (1280, 512)
        assert shapes[f"{a}.1.to_out.bias"] == (1280,)
        assert shapes[f"{f}.0.weight"] == (1280,)
        assert shapes[f"{f}.1.net.0.0.weight"] == (5120, 1280)
        assert shapes[f"{f}.1.net.2.weight"] == (1280, 5120)
    assert shapes["norm.weight"] == (1280,)
    assert "attn_layers.layers.64.0.weight" not in shapes
    assert len(shapes) == 2 + 32 * (2 + 5 + 2 + 4) + 2
    assert not any(k.startswith("to_logits") for k in shapes)
    assert not list(model.buffers())  # nothing non-persistent to miss on a meta build


def test_strict_meta_load_ignores_to_logits_only():
    src = _small()
    sd = dict(src.state_dict())
    sd.update({UNUSED_KEYS[0]: torch.zeros(1000, 64), UNUSED_KEYS[1]: torch.zeros(1000)})
    with torch.device("meta"):
        model = LDMBertTextModel(**SMALL)
    model.load_state_dict(sd, strict=True, assign=True)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), src(ids))
    del sd["norm.bias"]
    with pytest.raises(RuntimeError, match="norm.bias"):
        LDMBertTextModel(**SMALL).load_state_dict(sd, strict=True)
    sd["norm.bias"] = torch.zeros(64)
    sd["attn_layers.layers.0.1.to_q.bias"] = torch.zeros(64)
    with pytest.raises(RuntimeError, match="to_q.bias"):
        LDMBertTextModel(**SMALL).load_state_dict(sd, strict=True)


def test_bad_inputs_say_what_is_wrong():
    model = _small()
    with pytest.raises(ValueError, match=r"\(B, N, 64\)"):
        model(torch.zeros(1, 77, 32))
    with pytest.raises(ValueError, match="context length 77"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        model(torch.zeros(77, dtype=torch.long))
