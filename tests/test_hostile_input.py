"""Hostile input, property-based: the tokenizers on arbitrary unicode, image files from
random bytes to decompression bombs, embedding files of any structure, checkpoints with random keys and shapes.
Every case either works or is refused with a one-line error of the tool's own class — never a traceback."""

from __future__ import annotations

import io
import re
import resource
import struct
import tempfile
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

import ldm
from inversion import data as D
from inversion.embedding import InversionError, load_embedding_file
from ldm.checkpoint import CONFIG_KEY, CheckpointError, config_to_tensor
from ldm.config import tiny
from ldm.tokenizer import Tokenizer
from ldm.wordpiece import WordPieceTokenizer

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
PLACEHOLDER = "<cat-toy>"
# all of unicode, plus lone surrogates (undecodable command-line bytes arrive as U+DC80…U+DCFF)
TEXT = st.lists(
    st.one_of(st.characters(), st.sampled_from(["\udcff", "\ud800", "\x00", "&lt;", "<", ">", "a "])), max_size=200
).map("".join)


# --- tokenizers --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_tok() -> Tokenizer:
    tok = Tokenizer("sd1")
    tok.add_placeholder(PLACEHOLDER, 3)
    return tok


def _check_row(row: list[int], tok, ph_ids: list[int]) -> None:
    assert len(row) == tok.context_length == 77 and row[0] == tok.bos_id
    assert all(0 <= i < len(tok) for i in row)
    first, n = ph_ids[0], len(ph_ids)
    starts = [j for j, i in enumerate(row) if i == first]
    for j in starts:  # every occurrence is whole: never split by truncation
        assert row[j : j + n] == ph_ids, row
    assert sum(i in ph_ids for i in row) == n * len(starts)


@SETTINGS
@given(parts=st.lists(TEXT, min_size=1, max_size=6), repeat=st.integers(0, 40))
def test_clip_tokenizer_on_any_unicode(clip_tok, parts, repeat):
    text = PLACEHOLDER.join(parts) + f" {PLACEHOLDER}" * repeat
    ids = clip_tok.encode(text)
    ph = clip_tok.placeholders[PLACEHOLDER]
    assert sum(1 for j in range(len(ids)) if ids[j : j + 3] == ph) == text.count(PLACEHOLDER)
    row = clip_tok([text])[0].tolist()
    _check_row(row, clip_tok, ph)
    assert clip_tok.eos_id in row
    clip_tok.decode(row)  # decoding never fails either


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory) -> WordPieceTokenizer:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "##s", "the", "!", "<", ">"]
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(words) + "\n")
    tok = WordPieceTokenizer(path)
    tok.add_placeholder(PLACEHOLDER, 3)
    return tok


@SETTINGS
@given(parts=st.lists(TEXT, min_size=1, max_size=6), repeat=st.integers(0, 40))
def test_wordpiece_tokenizer_on_any_unicode(bert_tok, parts, repeat):
    text = PLACEHOLDER.join(parts) + f" {PLACEHOLDER}" * repeat
    row = bert_tok([text])[0].tolist()
    _check_row(row, bert_tok, bert_tok.placeholders[PLACEHOLDER])
    bert_tok.decode(row)


def test_truncation_drops_a_placeholder_that_does_not_fit_whole(clip_tok):
    ph = clip_tok.placeholders[PLACEHOLDER]
    for filler in range(70, 76):  # the 3-vector word straddles the 75-token limit
        row = clip_tok(["a " * filler + PLACEHOLDER])[0].tolist()
        kept = filler + 3 <= 75
        assert row[1 + filler : 4 + filler] == ph if kept else not set(ph) & set(row), (filler, row[-6:])
        assert row[1 + filler if not kept else 4 + filler] == clip_tok.eos_id


# --- images ------------------------------------------------------------------------------------------------


def _png_bytes(size=(8, 8), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, "red").save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "blue").save(buf, format="JPEG")
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height pixels, with one tiny (wrong) data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(_jpeg_bytes())
    sof = data.index(b"\xff\xc0")  # baseline SOF0: length(2) precision(1) height(2) width(2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _load(tmp: Path, name: str, data: bytes):
    path = tmp / name
    path.write_bytes(data)
    try:
        im = D.load_image(path)
    except InversionError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return None
    assert im.mode == "RGB" and min(im.size) >= 1
    return im


@SETTINGS
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".png", ".jpg", ".webp"]))
def test_random_bytes_are_refused_in_one_line(data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        _load(Path(tmp), "x" + suffix, data)


@SETTINGS
@given(
    kind=st.sampled_from(["png", "jpeg"]),
    cut=st.floats(0, 1),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8),
)
def test_damaged_png_and_jpeg_load_or_are_refused(kind, cut, flips):
    data = bytearray(_png_bytes((24, 24)) if kind == "png" else _jpeg_bytes((24, 24)))
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    data = bytes(data[: max(1, int(cut * len(data)))]) if cut < 1 else bytes(data)
    with tempfile.TemporaryDirectory() as tmp:
        _load(Path(tmp), f"x.{kind}", data)


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_truncated_files_name_the_file(tmp_path, kind):
    data = _png_bytes((64, 64)) if kind == "png" else _jpeg_bytes((64, 64))
    for cut in (8, 33, len(data) // 2):  # header only, header + a little, half the data
        with pytest.raises(InversionError, match=r"x\.\w+: not a readable image"):
            (tmp_path / f"x.{kind}").write_bytes(data[:cut])
            D.load_image(tmp_path / f"x.{kind}")


def test_one_pixel_image_is_upscaled_with_a_warning(tmp_path, caplog):
    (tmp_path / "dot.png").write_bytes(_png_bytes((1, 1), "LA"))
    x = D.preprocess(D.load_image(tmp_path / "dot.png"), 32, name="dot.png")
    assert x.shape == (3, 32, 32) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert "dot.png is 1×1: upscaled to 32×32" in caplog.text


@pytest.mark.parametrize(
    "make, size", [(_png_header, (30000, 30000)), (_png_header, (10000, 9000)), (_jpeg_claiming, (65000, 65000))]
)
def test_decompression_bombs_are_refused_before_decoding(tmp_path, make, size):
    """10000×9000 is just over PIL's limit (PIL itself would only warn and allocate ~360 MB): refused too."""
    path = tmp_path / ("bomb.png" if make is _png_header else "bomb.jpg")
    path.write_bytes(make(*size))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InversionError, match=r"bomb\.\w+: .*(over the limit|decompression bomb).*downscale"):
        D.load_image(path)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert grown_mb < 64, f"peak memory grew {grown_mb:.0f} MB"
    (tmp_path / "folder").mkdir()
    path.rename(tmp_path / "folder" / path.name)
    with pytest.raises(InversionError, match="downscale"):
        D.ConceptImages(tmp_path / "folder", 32)


# --- embedding files ---------------------------------------------------------------------------------------

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
]


@st.composite
def tensors(draw):
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    t = torch.randn(shape).to(dtype) if dtype != torch.bool else torch.zeros(shape, dtype=torch.bool)
    if t.is_floating_point() and t.numel() and draw(st.booleans()):
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf")]))
    return t


KEYS = st.one_of(
    st.sampled_from(
        ["string_to_param", "string_to_token", "name", "emb_params", "*", "<t>", "<t>_1", "clip_l", "a b", ""]
    ),
    st.text(max_size=8),
    st.integers(-3, 3),
)
LEAVES = st.one_of(tensors(), st.none(), st.integers(), st.floats(), st.text(max_size=8), st.booleans())
STRUCTURES = st.recursive(
    LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)), max_leaves=8
)


def _check_words(words: dict) -> None:
    assert words and all(isinstance(k, str) and k for k in words)
    widths = {v.shape[1] for v in words.values()}
    assert len(widths) == 1
    for v in words.values():
        assert v.dtype == torch.float32 and v.ndim == 2 and v.shape[0] >= 1 and torch.isfinite(v).all()


@SETTINGS
@given(obj=STRUCTURES, token=st.sampled_from([None, "<mine>"]))
def test_embedding_files_of_any_structure_load_clean_or_are_refused(obj, token):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "emb.pt"
        torch.save(obj, path)
        try:
            _check_words(load_embedding_file(path, token=token))
        except InversionError as e:
            assert str(path) in str(e) and "\n" not in str(e)


@SETTINGS
@given(
    entries=st.dictionaries(st.sampled_from(["<t>", "<t>_1", "<t>_2", "emb_params", "x y", "*"]), tensors(), max_size=3)
)
def test_safetensors_embeddings_of_any_shape_dtype_and_values(entries):
    entries = {k: v for k, v in entries.items() if v.dtype != torch.complex64}  # safetensors has no complex
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "emb.safetensors"
        save_file({k: v.contiguous() for k, v in entries.items()}, str(path))
        try:
            _check_words(load_embedding_file(path))
        except InversionError as e:
            assert str(path) in str(e) and "\n" not in str(e)


@pytest.mark.parametrize(
    "value, message",
    [
        (torch.full((1, 32), float("nan")), "32 NaN/inf value"),
        (torch.tensor([[1.0, float("inf")] * 16]), "16 NaN/inf"),
        (torch.ones(1, 32, dtype=torch.int64), "int64 tensor, not a (vectors, width) float"),
        (torch.ones(1, 32, dtype=torch.bool), "bool tensor"),
        (torch.ones(2, 3, 32), "3-D float32 tensor"),
        (torch.ones(0, 32), "is empty"),
        (torch.ones(49408, 32), "49408 vectors"),
        ([torch.ones(1, 32)], "string_to_param is a list"),
    ],
)
def test_bad_embedding_values_are_refused_with_a_message(tmp_path, value, message):
    path = tmp_path / "bad.pt"
    obj = {"string_to_param": value} if isinstance(value, list) else {"string_to_param": {"<x>": value}}
    torch.save(obj, path)
    with pytest.raises(InversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_embedding_file(path)


@pytest.mark.parametrize("width, message", [(768, r"768 wide \(SD1.x"), (1024, r"1024 wide \(SD2.x")])
def test_wrong_width_in_the_sample_cli_is_one_line(tmp_path, capsys, width, message):
    from apps import sample as S
    from ldm import cli

    save_file({"<w>": torch.randn(1, width)}, str(tmp_path / "w.safetensors"))
    rc = cli.run(
        S.main,
        [
            "--model",
            "tiny",
            "--prompt",
            "a <w>",
            "--n",
            "1",
            "--steps",
            "1",
            "--H",
            "32",
            "--W",
            "32",
            "--out",
            str(tmp_path / "out"),
            "--embedding",
            str(tmp_path / "w.safetensors"),
            "--device",
            "cpu",
        ],
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and "Traceback" not in "".join(err)
    assert re.search(message + r".* but this model's text encoder is 32 wide", err[-1]), err[-1]
    assert not list((tmp_path / "out").glob("*.png"))


# --- checkpoints -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    m = ldm.tiny_model(0)
    prefixes = {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.transformer.",
    }
    sd = {}
    for part, prefix in prefixes.items():
        sd.update({prefix + k: v.detach().clone().contiguous() for k, v in getattr(m, part).state_dict().items()})
    return sd


def _mutate(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "flat":
        return t.reshape(-1).clone()
    if how == "transpose" and t.ndim >= 2:
        return t.transpose(0, 1).contiguous()
    if how == "grow":
        return torch.zeros(t.shape[0] + 1, *t.shape[1:], dtype=t.dtype) if t.ndim else torch.zeros(2)
    if how == "empty":
        return torch.zeros(0, dtype=t.dtype)
    if how == "int":
        return t.to(torch.int32)
    if how == "scalar":
        return torch.tensor(1.0)
    return torch.zeros(*t.shape, 1, dtype=t.dtype)  # one more dimension


U, V, C = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."
DETECTION_KEYS = [
    U + "input_blocks.0.0.weight",
    U + "out.2.weight",
    U + "middle_block.1.proj_in.weight",
    U + "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    U + "input_blocks.1.0.out_layers.3.weight",
    V + "encoder.conv_in.weight",
    V + "decoder.conv_in.weight",
    V + "encoder.conv_out.weight",
    V + "decoder.conv_out.weight",
    V + "encoder.down.0.block.0.conv2.weight",
    V + "post_quant_conv.weight",
    C + "embeddings.token_embedding.weight",
    C + "embeddings.position_embedding.weight",
]


@pytest.mark.parametrize(
    "key, value",
    [
        (U + "input_blocks.0.0.weight", torch.zeros(10)),
        (U + "input_blocks.0.0.weight", torch.zeros(0, 4, 3, 3)),
        (U + "out.2.weight", "int32"),
        (C + "embeddings.token_embedding.weight", torch.zeros(5)),
        (V + "encoder.conv_in.weight", torch.tensor(1.0)),
    ],
)
def test_shapes_that_used_to_crash_the_loader(tmp_path, tiny_sd, key, value):
    """Each of these raised IndexError / ZeroDivisionError / ValueError / a load_state_dict RuntimeError before."""
    sd = dict(tiny_sd, **{key: tiny_sd[key].to(torch.int32) if value == "int32" else value})
    save_file(sd, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match=r"m\.safetensors"):
        ldm.load_model(tmp_path / "m.safetensors")


@SETTINGS
@given(data=st.data(), marker=st.booleans())
def test_checkpoints_with_random_keys_and_shapes_are_a_checkpoint_error(tiny_sd, data, marker):
    keys = sorted(tiny_sd)
    some_key = st.one_of(st.sampled_from(DETECTION_KEYS), st.sampled_from(keys))  # the keys shapes are read from
    drop = data.draw(st.sets(some_key, max_size=4))
    changed = data.draw(
        st.dictionaries(
            some_key, st.sampled_from(["flat", "transpose", "grow", "empty", "int", "scalar", "extra-dim"]), max_size=3
        )
    )
    extra = data.draw(
        st.sets(st.sampled_from(["model.diffusion_model.bogus.weight", "junk", "alphas_cumprod"]), max_size=2)
    )
    sd = {k: (_mutate(v, changed[k]) if k in changed else v) for k, v in tiny_sd.items() if k not in drop}
    for k in extra:
        sd[k] = torch.rand(1000) if k == "alphas_cumprod" else torch.zeros(3)
    if marker:
        sd[CONFIG_KEY] = config_to_tensor(tiny())
    untouched = (
        not drop
        and all(tuple(sd[k].shape) == tuple(tiny_sd[k].shape) and sd[k].dtype == tiny_sd[k].dtype for k in changed)
        and not extra - {"alphas_cumprod"}
    )
    assume(not untouched)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file(sd, str(path))
        with pytest.raises(CheckpointError) as e:
            ldm.load_model(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_garbage_schedule_in_a_checkpoint_is_recomputed(tmp_path, tiny_sd, caplog):
    sd = dict(tiny_sd, alphas_cumprod=torch.rand(1000))
    save_file(sd, str(tmp_path / "m.safetensors"))
    model = ldm.load_model(tmp_path / "m.safetensors")
    assert "not a decreasing schedule" in caplog.text
    a = model.schedule.alphas_cumprod
    assert torch.isfinite(a).all() and (a[1:] <= a[:-1]).all()
