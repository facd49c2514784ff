"""Concept folders, the official preprocessing, templates, sample order, and the latent cache."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from inversion import data as D
from inversion.embedding import InversionError
from inversion.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES, TemplateError, load_templates

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _write(folder, name, mode="RGB", size=(40, 30), color=(200, 30, 10), **save):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(folder / name, **save)
    return folder / name


def test_templates():
    assert len(OBJECT_TEMPLATES) == 81 and len(STYLE_TEMPLATES) == 19
    assert OBJECT_TEMPLATES[0] == "a photo of a {}" and STYLE_TEMPLATES[0] == "a painting in the style of {}"
    assert load_templates("style") is STYLE_TEMPLATES


def test_template_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# mine\nan origami {}\n\n{} on a shelf\n")
    assert load_templates(str(f)) == ("an origami {}", "{} on a shelf")
    f.write_text("no slot here\n")
    with pytest.raises(TemplateError, match="must contain"):
        load_templates(str(f))
    with pytest.raises(TemplateError, match="neither"):
        load_templates(str(tmp_path / "missing.txt"))


def test_folder_rules(tmp_path, caplog):
    folder = tmp_path / "c"
    _write(folder, "a.png")
    _write(folder, "b.JPG")
    (folder / "notes.txt").write_text("hi")
    (folder / "LICENSE").write_text("CC0")
    with caplog.at_level(logging.WARNING):
        found = D.find_images(folder)
    assert [p.name for p in found] == ["a.png", "b.JPG"]
    assert "notes.txt" in caplog.text and "LICENSE" not in caplog.text
    (tmp_path / "empty").mkdir()
    with pytest.raises(InversionError, match="holds no images"):
        D.find_images(tmp_path / "empty")
    with pytest.raises(InversionError, match="no such folder"):
        D.resolve_concept(tmp_path / "nope")
    assert D.resolve_concept("cat") == D.CONCEPTS_DIR / "cat"


def test_image_modes(tmp_path, caplog):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black → white
    rgba.save(tmp_path / "alpha.png")
    assert D.load_image(tmp_path / "alpha.png").getpixel((0, 0)) == (255, 255, 255)
    assert D.load_image(tmp_path / "alpha.png").getpixel((1, 1)) == (255, 0, 0)
    _write(tmp_path, "gray.png", "L", color=128)
    assert D.load_image(tmp_path / "gray.png").mode == "RGB"
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "g16.png")
    assert D.load_image(tmp_path / "g16.png").getpixel((0, 0)) == (255, 255, 255)
    # EXIF orientation 6 (rotate 90° clockwise to display): a 40×30 file shows as 30×40
    exif = Image.Exif()
    exif[0x0112] = 6
    _write(tmp_path, "rot.jpg", size=(40, 30), exif=exif.tobytes())
    assert D.load_image(tmp_path / "rot.jpg").size == (30, 40)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(InversionError, match=r"bad.jpg: not a readable image") as e:
        D.load_image(tmp_path / "bad.jpg")
    assert "\n" not in str(e.value)
    # a 1×1 image is upscaled like any other, with a warning naming it
    _write(tmp_path, "dot.png", size=(1, 1))
    with caplog.at_level(logging.WARNING):
        x = D.preprocess(D.load_image(tmp_path / "dot.png"), 32, name="dot.png")
    assert "dot.png is 1×1: upscaled to 32×32" in caplog.text
    assert x.shape == (3, 32, 32) and torch.allclose(x[0], torch.full((32, 32), 200 / 127.5 - 1))


def test_preprocess_is_the_official_one():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    x = D.preprocess(im, 16)
    want = np.asarray(im.resize((16, 16), Image.BICUBIC), np.float32) / 127.5 - 1
    assert torch.equal(x, torch.from_numpy(want).permute(2, 0, 1))
    assert torch.equal(D.preprocess(im, 16, flip=True), x.flip(-1))
    crop = D.preprocess(im, 16, center_crop=True)
    assert torch.equal(crop, D.preprocess(im.crop((10, 0, 40, 30)), 16))
    assert float(x.min()) >= -1 and float(x.max()) <= 1


def test_sample_order_covers_each_epoch_and_is_reproducible():
    n, repeats = 5, 3
    epoch0 = [D.dataset_item(23, k, n, repeats) for k in range(n * repeats)]
    assert Counter(epoch0) == {i: repeats for i in range(n)}
    assert epoch0 == [D.dataset_item(23, k, n, repeats) for k in range(n * repeats)]
    assert epoch0 != [D.dataset_item(23, k, n, repeats) for k in range(n * repeats, 2 * n * repeats)]
    a = torch.randn(4, generator=D.sample_generator(23, 7))
    assert torch.equal(a, torch.randn(4, generator=D.sample_generator(23, 7)))
    assert not torch.equal(a, torch.randn(4, generator=D.sample_generator(23, 8)))


class EncoderCalls:
    """Counts forward calls of the VAE encoder."""

    def __init__(self, model):
        self.n = 0
        model.vae.encoder.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))


def test_latent_cache_skips_the_encoder_and_lives_on_disk(tmp_path):
    model = ldm.tiny_model(0)
    calls = EncoderCalls(model)
    images = D.ConceptImages(D.resolve_concept("cat"), 32)
    cache = D.LatentCache(model, images, tmp_path, batch_size=4)
    assert cache.encoded == 10 and calls.n == 3  # 5 images × 2 flips in batches of 4
    assert cache.mean.shape == (5, 2, 4, 16, 16) and bool((cache.std > 0).all())
    assert len(list(tmp_path.rglob("*.safetensors"))) == 10
    again = D.LatentCache(model, images, tmp_path)
    assert again.encoded == 0 and calls.n == 3 and torch.equal(again.mean, cache.mean)
    z = cache.draw([0, 3], [False, True], torch.randn(2, 4, 16, 16))
    assert z.shape == (2, 4, 16, 16) and calls.n == 3
    # the key includes the VAE: other weights → other entries
    other = ldm.tiny_model(1)
    assert D.LatentCache(other, images, tmp_path).encoded == 10
    # and the flip: the flipped entry is the encoding of the flipped image
    with torch.no_grad():
        post = model.posterior(images.pixels(2, True)[None])
    assert torch.allclose(cache.mean[2, 1], post.mean[0], atol=1e-6)


def test_cached_draws_match_per_step_encoding_in_distribution(tmp_path):
    """z = s·(μ + σ·n) from the cache vs z = s·posterior.sample() from a fresh VAE encoding every step, N draws:
    per-element means agree within 5 standard errors of their difference; per-element std ratios within
    5·SE (SE of a ratio of two sample stds ≈ 1/√N), and their average over all elements within 5·SE/√elements."""
    model = ldm.tiny_model(0)
    images = D.ConceptImages(D.resolve_concept("cat"), 16)
    cache = D.LatentCache(model, images, None)
    n = 1000
    g = torch.Generator().manual_seed(1)
    cached = cache.draw([1] * n, [False] * n, torch.randn(n, *cache.latent_shape, generator=g)).flatten(1)
    g2 = torch.Generator().manual_seed(2)
    x = images.pixels(1, False)[None]
    with torch.no_grad():
        encoded = torch.cat([model.encode_images(x, generator=g2) for _ in range(n)]).flatten(1)
    se_diff = ((cached.var(0) + encoded.var(0)) / n).sqrt()
    z_mean = ((cached.mean(0) - encoded.mean(0)).abs() / se_diff).max().item()
    ratio = cached.std(0) / encoded.std(0)
    worst, avg = (ratio - 1).abs().max().item(), (ratio.mean() - 1).abs().item()
    se_ratio, elements = 1 / n**0.5, ratio.numel()
    print(
        f"latent cache vs per-step encoding over {n} draws × {elements} elements: max |Δmean|/SE {z_mean:.2f} "
        f"(< 5), max |σ ratio − 1| {worst:.3f} (< {5 * se_ratio:.3f}), mean σ ratio − 1 {avg:.4f} "
        f"(< {5 * se_ratio / elements**0.5:.4f})"
    )
    assert z_mean < 5.0
    assert worst < 5 * se_ratio and avg < 5 * se_ratio / elements**0.5
