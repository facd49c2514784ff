"""ldm.checkpoint: round trips through every format, variant detection, and one-line errors for bad input."""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import meta_state_dict, module_prefixes, original_state_dict, pattern, write_diffusers_folder
from safetensors.torch import save_file

from ldm import config as configs
from ldm.checkpoint import (
    CONFIG_KEY,
    CheckpointError,
    LazyStateDict,
    config_from_tensor,
    config_to_tensor,
    detect_variant,
    load_model,
    read_state_dict,
)
from ldm.pipeline import build_modules, tiny_model

PROMPTS = ["a photo of a cat", ""]


def tiny_openclip() -> configs.ModelConfig:
    """A tiny SD2-layout config: open_clip text tower (penultimate), linear proj_in, fixed head width."""
    cfg = configs.tiny()
    unet = {k: v for k, v in cfg.unet.items() if k != "num_heads"}
    return cfg.with_(
        name="tiny-sd2",
        unet={**unet, "num_head_channels": 8, "use_linear_in_transformer": True},
        text=dict(
            kind="openclip", vocab_size=49408, width=32, layers=3, heads=4, context_length=77, output="penultimate"
        ),
        tokenizer="sd2",
    )


def random_model(config: configs.ModelConfig, seed: int = 0):
    """A LatentDiffusion of `config` with random weights everywhere (no zero-initialised layers)."""
    from ldm.pipeline import LatentDiffusion, build_tokenizer
    from ldm.schedule import Schedule

    torch.manual_seed(seed)
    unet, vae, text = build_modules(config)
    for module in (unet, vae, text):
        for p in module.parameters():
            p.data.normal_(0, 0.05 if p.ndim > 1 else 0.01).add_(1.0 if p.ndim == 1 else 0.0)
    return LatentDiffusion(config, unet, vae, text, build_tokenizer(config), Schedule.from_config(config)).eval()


@torch.no_grad()
def outputs(model) -> list[torch.Tensor]:
    """Context, UNet output and VAE round trip for fixed inputs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    ctx = model.encode_prompts(PROMPTS)
    return [ctx, model.unet(x, torch.tensor([10, 500]), ctx), model.vae.encode(image).mean, model.vae.decode(x)]


_REFERENCE: dict[int, list[torch.Tensor]] = {}


def assert_same_outputs(a, b, tol: float = 0.0) -> None:
    """a (loaded) computes the same as b (the reference, whose outputs are computed once)."""
    if id(b) not in _REFERENCE:
        _REFERENCE[id(b)] = outputs(b)
    for x, y in zip(outputs(a), _REFERENCE[id(b)]):
        err = ((x - y).abs().max() / y.abs().max().clamp(min=1e-12)).item()
        assert err <= tol, err


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(0)


@pytest.fixture(scope="module")
def tiny_sd(tiny):
    return original_state_dict(tiny.unet, tiny.vae, tiny.text_encoder, tiny.config)


def one_line_error(fn, *args, match: str, **kwargs) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- round trips -------------------------------------------------------------------------------------------


def test_config_marker_round_trip():
    for make in (configs.sd1, configs.sd2, configs.sd2_v, configs.tiny, tiny_openclip):
        cfg = make()
        t = config_to_tensor(cfg)
        assert t.dtype == torch.uint8 and t.ndim == 1
        assert config_from_tensor(t) == cfg


@pytest.mark.parametrize("marker", [True, False])
def test_safetensors_round_trip(tmp_path, tiny, tiny_sd, marker):
    sd = {**tiny_sd, CONFIG_KEY: config_to_tensor(tiny.config)} if marker else tiny_sd
    save_file(sd, str(tmp_path / "tiny.safetensors"))
    loaded = load_model(tmp_path / "tiny.safetensors")
    assert loaded.config == tiny.config  # without the marker: the shapes match the tiny preset
    assert_same_outputs(loaded, tiny)


def test_read_state_dict_is_lazy(tmp_path, tiny_sd):
    save_file(tiny_sd, str(tmp_path / "tiny.safetensors"))
    sd = read_state_dict(tmp_path / "tiny.safetensors")
    assert isinstance(sd, LazyStateDict) and set(sd) == set(tiny_sd)
    key = "model.diffusion_model.out.2.weight"
    assert sd.shapes[key].device.type == "meta"
    assert torch.equal(sd[key], tiny_sd[key])


def test_ckpt_round_trip_with_known_extras(tmp_path, tiny, tiny_sd):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0).float() * 0.999  # distinguishable from the recomputed schedule
    extras = {
        "betas": betas.float(),
        "alphas_cumprod": alphas,
        "lvlb_weights": torch.ones(1000),
        "model_ema.decay": torch.tensor(0.999),
        "model_ema.num_updates": torch.tensor(5),
        "model_ema.input_blocks00weight": torch.zeros(1),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "cond_stage_model.logit_scale": torch.tensor(4.6),
    }
    torch.save({"state_dict": {**tiny_sd, **extras}, "global_step": 470000, "epoch": 3}, tmp_path / "t.ckpt")
    loaded = load_model(tmp_path / "t.ckpt")
    assert loaded.config == tiny.config
    assert_same_outputs(loaded, tiny)
    assert torch.equal(loaded.schedule.alphas_cumprod, alphas.double())


def test_fp16_load_casts_tensor_by_tensor(tmp_path, tiny, tiny_sd):
    save_file(tiny_sd, str(tmp_path / "tiny.safetensors"))
    loaded = load_model(tmp_path / "tiny.safetensors", dtype=torch.float16)
    ref = tiny.unet.state_dict()
    for k, v in loaded.unet.state_dict().items():
        assert v.dtype == torch.float16 and torch.equal(v, ref[k].half()), k
    assert loaded.dtype == torch.float16 and not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("drop_text_prefix", [False, True])
def test_diffusers_folder_sd1_layout(tmp_path, tiny, tiny_sd, drop_text_prefix):
    folder = write_diffusers_folder(tiny_sd, tiny.config, tmp_path / "tiny-diffusers", drop_text_prefix)
    loaded = load_model(folder)
    assert loaded.config.unet == tiny.config.unet and loaded.config.text == tiny.config.text
    assert loaded.config.vae == tiny.config.vae
    assert_same_outputs(loaded, tiny)


def test_diffusers_layout_is_valid_for_diffusers(tmp_path, tiny, tiny_sd):
    """The folder the tests build loads strictly into diffusers' own classes (the layout is real)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = write_diffusers_folder(tiny_sd, tiny.config, tmp_path / "d")
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        model = cls.from_pretrained(folder / sub)
        assert model is not None


def test_sd2_layout_single_file_and_diffusers_23_layers(tmp_path):
    """open_clip layout: single file as is; a diffusers folder lacks the last text layer, so the tower is
    built one layer shorter with output="last" — the same context as "penultimate"."""
    cfg = tiny_openclip()
    model = random_model(cfg)
    sd = original_state_dict(model.unet, model.vae, model.text_encoder, cfg)
    save_file({**sd, CONFIG_KEY: config_to_tensor(cfg)}, str(tmp_path / "sd2.safetensors"))
    assert_same_outputs(load_model(tmp_path / "sd2.safetensors"), model)

    last = f"cond_stage_model.model.transformer.resblocks.{cfg.text['layers'] - 1}."
    folder = write_diffusers_folder(
        {k: v for k, v in sd.items() if not k.startswith(last)}, cfg, tmp_path / "sd2-diffusers"
    )
    loaded = load_model(folder)
    assert loaded.config.text["layers"] == cfg.text["layers"] - 1 and loaded.config.text["output"] == "last"
    shape_keys = ("model_channels", "channel_mult", "num_head_channels", "use_linear_in_transformer")
    assert all(loaded.config.unet[k] == cfg.unet[k] for k in shape_keys) and loaded.config.text["heads"] == 4
    assert loaded.text_encoder.text_projection.isnan().all()  # absent from diffusers, unused by SD
    assert_same_outputs(loaded, model, tol=1e-6)


def test_prediction_flag_sidecar_yaml_and_scheduler(tmp_path):
    cfg = tiny_openclip()
    model = random_model(cfg)
    sd = original_state_dict(model.unet, model.vae, model.text_encoder, cfg)
    save_file(sd, str(tmp_path / "m.safetensors"))
    assert load_model(tmp_path / "m.safetensors").schedule.parameterization == "eps"
    assert load_model(tmp_path / "m.safetensors", prediction="v").config.parameterization == "v"
    (tmp_path / "m.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.config.parameterization == "v" and loaded.schedule.parameterization == "v"
    folder = write_diffusers_folder(sd, cfg.with_(parameterization="v"), tmp_path / "d")
    assert load_model(folder).schedule.parameterization == "v"


def test_lightning_leftovers_load_without_lightning(tmp_path, tiny, tiny_sd):
    """Released SD 1.x .ckpt files carry a pickled Lightning ModelCheckpoint; it loads inert."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    fake = types.ModuleType(name)

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = 1.0

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = name, "ModelCheckpoint"
    fake.ModelCheckpoint = ModelCheckpoint
    parents = {
        "pytorch_lightning": types.ModuleType("pytorch_lightning"),
        "pytorch_lightning.callbacks": types.ModuleType("pytorch_lightning.callbacks"),
        name: fake,
    }
    assert not any(n in sys.modules for n in parents)
    sys.modules.update(parents)
    try:
        torch.save({"state_dict": tiny_sd, "callbacks": {"ModelCheckpoint": ModelCheckpoint()}}, tmp_path / "l.ckpt")
    finally:
        for n in parents:
            del sys.modules[n]
    assert_same_outputs(load_model(tmp_path / "l.ckpt"), tiny)


# -- full-size detection and the diffusers key map, on the meta device (nothing allocated) -----------------


@pytest.mark.parametrize("make", [configs.sd1, configs.sd2])
def test_detect_full_size_presets(make):
    cfg = make()
    sd = meta_state_dict(cfg)
    assert detect_variant(sd) == cfg
    if cfg.name == "sd2":
        assert detect_variant(sd, prediction="v") == configs.sd2_v()


@pytest.mark.parametrize("make", [configs.sd1, configs.sd2])
def test_diffusers_key_map_full_size(make):
    """diffusers' converters → our rule-based map back = the complete original key set and shapes."""
    from diffusers.loaders import single_file_utils as sfu
    from helpers import original_config

    from ldm import diffusers_keys as dk

    cfg = make()
    sd = meta_state_dict(cfg)
    orig = original_config(cfg)
    unet = sfu.convert_ldm_unet_checkpoint(sd, sfu.create_unet_diffusers_config_from_ldm(orig, sd))
    vae = sfu.convert_ldm_vae_checkpoint(sd, sfu.create_vae_diffusers_config_from_ldm(orig, sd))
    back = {**dk.convert(dk.unet_to_original(unet), unet), **dk.convert(dk.vae_to_original(vae), vae)}
    if cfg.text["kind"] == "clip":
        text = sfu.convert_ldm_clip_checkpoint(sd)
        back.update(dk.convert(dk.clip_to_original(text), text))
    else:
        stub = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=cfg.text["width"]))
        text = sfu.convert_open_clip_checkpoint(stub, sd)
        back.update(dk.convert(dk.openclip_from_hf(text), text))
    expected = {k: tuple(v.shape) for k, v in sd.items()}
    if cfg.text["kind"] == "openclip":  # diffusers stores 23 of 24 layers and no projection
        expected = {k: s for k, s in expected.items() if ".resblocks.23." not in k and "text_projection" not in k}
    assert {k: tuple(v.shape) for k, v in back.items()} == expected


def test_diffusers_qkv_order_and_conv_reshape():
    from ldm import diffusers_keys as dk

    hf = {
        f"text_model.encoder.layers.0.self_attn.{n}_proj.weight": pattern(i, (4, 4), torch.float32)
        for i, n in enumerate("qkv")
    }
    back = dk.convert(dk.openclip_from_hf(hf), hf)
    packed = back["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert torch.equal(packed, torch.cat([hf[f"text_model.encoder.layers.0.self_attn.{n}_proj.weight"] for n in "qkv"]))
    vae = {
        "decoder.mid_block.attentions.0.to_q.weight": torch.ones(8, 8),
        "decoder.up_blocks.0.resnets.0.norm1.weight": torch.ones(8),
        "decoder.up_blocks.1.resnets.0.norm1.weight": torch.ones(8),
    }
    back = dk.convert(dk.vae_to_original(vae), vae)
    assert back["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (8, 8, 1, 1)
    assert "first_stage_model.decoder.up.1.block.0.norm1.weight" in back  # up_blocks.0 runs first = up.1


# -- bad input: one-line CheckpointErrors --------------------------------------------------------------------


def test_missing_file(tmp_path):
    one_line_error(load_model, tmp_path / "nope.safetensors", match=r"nope\.safetensors does not exist")


def test_truncated_safetensors(tmp_path, tiny_sd):
    path = tmp_path / "t.safetensors"
    save_file(tiny_sd, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    one_line_error(load_model, path, match="not a readable .safetensors file.*truncated")
    path.write_bytes(b"hello, I am a text file\n" * 10)
    one_line_error(read_state_dict, path, match="not a readable .safetensors")


def test_text_file_renamed_ckpt_and_empty_file(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_text("this is not a checkpoint\n")
    one_line_error(load_model, path, match="is not a PyTorch checkpoint")
    path.write_bytes(b"")
    one_line_error(load_model, path, match="is empty")


def test_truncated_ckpt(tmp_path, tiny_sd):
    path = tmp_path / "t.ckpt"
    torch.save({"state_dict": tiny_sd}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    one_line_error(load_model, path, match="not a readable PyTorch checkpoint")


def test_folder_that_is_not_diffusers(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hi")
    one_line_error(load_model, tmp_path / "stuff", match="not a diffusers model folder")


class _Payload:
    """Unpickling this would create a marker file: proof that code from a checkpoint ran."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, how):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    path = tmp_path / "evil.ckpt"
    if how == "torch.save":
        torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": payload}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"state_dict": {"x": torch.zeros(1)}, "evil": payload}, f)
    assert not marker.exists()
    msg = one_line_error(load_model, path, match="nothing was executed")
    assert ".safetensors" in msg and "allow_pickle=True" in msg
    assert not marker.exists()


def test_missing_misshaped_and_unexpected_keys_are_named(tmp_path, tiny, tiny_sd):
    key = "model.diffusion_model.out.2.weight"
    marker = {CONFIG_KEY: config_to_tensor(tiny.config)}
    save_file({k: v for k, v in tiny_sd.items() if k != key}, str(tmp_path / "a.safetensors"))
    one_line_error(
        load_model,
        tmp_path / "a.safetensors",
        match=rf"a\.safetensors has no key {key} — is this a Stable Diffusion checkpoint\?",
    )
    save_file({**{k: v for k, v in tiny_sd.items() if k != key}, **marker}, str(tmp_path / "b.safetensors"))
    one_line_error(load_model, tmp_path / "b.safetensors", match=rf"has no key {key} — is this a tiny checkpoint")
    bad = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    save_file({**tiny_sd, bad: torch.zeros(32, 32, 1, 1), **marker}, str(tmp_path / "c.safetensors"))
    msg = one_line_error(load_model, tmp_path / "c.safetensors", match=rf"{bad} has shape \(32, 32, 1, 1\)")
    assert "tiny needs (32, 32, 3, 3)" in msg
    extra = "model.diffusion_model.input_blocks.1.0.surprise.weight"
    save_file({**tiny_sd, extra: torch.zeros(1)}, str(tmp_path / "d.safetensors"))
    one_line_error(load_model, tmp_path / "d.safetensors", match=rf"unexpected key {extra} for tiny")
    save_file({**tiny_sd, "embedding_manager.x": torch.zeros(1)}, str(tmp_path / "e.safetensors"))
    one_line_error(load_model, tmp_path / "e.safetensors", match="unexpected key embedding_manager.x")


def _telltale(tiny_sd: dict, **changes) -> dict:
    return {**tiny_sd, **changes}


@pytest.mark.parametrize(
    "case, match",
    [
        ("sdxl_conditioner", "Stable Diffusion XL.*not supported"),
        ("sdxl_label_emb", "Stable Diffusion XL.*not supported"),
        ("inpainting", "inpainting model.*not supported"),
        ("vae_only", "only a VAE"),
        ("bare_vae", "only a VAE"),
        ("no_text", "no text encoder"),
    ],
)
def test_unsupported_variants_say_so(tmp_path, tiny_sd, case, match):
    u = "model.diffusion_model."
    if case == "sdxl_conditioner":
        sd = {
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 2),
            u + "input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
        }
    elif case == "sdxl_label_emb":
        sd = _telltale(tiny_sd, **{u + "label_emb.0.0.weight": torch.zeros(8, 4)})
    elif case == "inpainting":
        sd = _telltale(tiny_sd, **{u + "input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)})
    elif case == "vae_only":
        sd = {k: v for k, v in tiny_sd.items() if k.startswith("first_stage_model.")}
    elif case == "bare_vae":
        sd = {k.removeprefix("first_stage_model."): v for k, v in tiny_sd.items() if k.startswith("first_stage")}
    else:
        sd = {k: v for k, v in tiny_sd.items() if not k.startswith("cond_stage_model.")}
    path = tmp_path / f"{case}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    one_line_error(load_model, path, match=match)


def test_module_prefixes_cover_the_checkpoint(tiny, tiny_sd):
    assert {k.split(".")[0] for k in tiny_sd} == {"model", "first_stage_model", "cond_stage_model"}
    assert module_prefixes(tiny.config)[2] == "cond_stage_model.transformer."


def test_prediction_from_manifest_name_size_or_hash(tmp_path):
    """eps/v of an SD2-layout file from the published files (weights/manifest.json's entries, as the MODEL= loader
    passes them): by file name and size, else by sha256."""
    import weights.download as wd

    cfg = tiny_openclip()
    model = random_model(cfg)
    path = tmp_path / "renamed.safetensors"
    save_file(original_state_dict(model.unet, model.vae, model.text_encoder, cfg), str(path))
    size, digest = path.stat().st_size, wd.sha256_of(path)
    entries = {
        "base": {"file": "base.safetensors", "size": size, "sha256": "0" * 64, "family": "sd2"},
        "v": {"file": "v.safetensors", "size": size, "sha256": digest, "prediction": "v"},
    }
    known = list(entries.values())
    assert load_model(path, known_files=known).config.parameterization == "v"  # same size as both: hashed
    entries["v"]["sha256"] = "f" * 64
    assert load_model(path, known_files=known).config.parameterization == "eps"  # unknown hash: eps, with a warning
    named = path.rename(tmp_path / "v.safetensors")
    assert load_model(named, known_files=known).config.parameterization == "v"  # known name and size: no hashing
