"""The paper's CLIP metrics: hand-computed cases, the official evaluator's definition, CLIP wiring, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from inversion import clip as CL
from inversion import evaluate as E
from inversion.clip import clip_text
from inversion.embedding import InversionError, save_safetensors

# --- metrics -------------------------------------------------------------------------------------------------


def test_image_similarity_hand_computed():
    a = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    b = torch.tensor([[3.0, 0, 0], [1.0, 1.0, 0]])  # unnormalised on purpose: cosines are 1, 1/√2; 0, 1/√2
    assert E.image_similarity(a, b) == pytest.approx((1 + math.sqrt(2)) / 4, abs=1e-12)
    assert E.image_similarity(b, a) == pytest.approx((1 + math.sqrt(2)) / 4, abs=1e-12)
    assert E.image_similarity(a, a) == pytest.approx(0.5, abs=1e-12)  # orthogonal pair counts too
    assert E.image_similarity(a, -a) == pytest.approx(-0.5, abs=1e-12)


def test_text_similarity_hand_computed():
    t = torch.tensor([0, 0, 2.0])
    images = torch.tensor([[0, 0, 1.0], [0, 1.0, 1.0], [5.0, 0, 0]])  # cosines 1, 1/√2, 0
    assert E.text_similarity(t, images) == pytest.approx((1 + 1 / math.sqrt(2)) / 3, abs=1e-12)
    assert E.text_similarity(t[None], images[:1]) == pytest.approx(1.0, abs=1e-12)


def _official(train, samples_per_prompt: list[torch.Tensor], texts: list[torch.Tensor]):
    """rinongal/textual_inversion evaluation/clip_eval.py, per prompt: features /= norm, (a @ b.T).mean()."""

    def norm(x):
        x = x.clone()
        x /= x.norm(dim=-1, keepdim=True)
        return x

    img, txt = [], []
    for samples, text in zip(samples_per_prompt, texts):
        img.append(float((norm(train) @ norm(samples).T).mean()))
        txt.append(float((norm(text[None]) @ norm(samples).T).mean()))
    return img, txt


def test_metrics_equal_the_official_definition_on_synthetic_features():
    g = torch.Generator().manual_seed(0)
    d = 512
    train = torch.randn(5, d, generator=g) + 0.5
    samples = [torch.randn(64, d, generator=g) + 0.3 * k for k in range(4)]  # recon + 3 editing prompts
    texts = [torch.randn(d, generator=g) for _ in range(4)]
    img, txt = _official(train, samples, texts)
    for k in range(4):
        assert E.image_similarity(train, samples[k]) == pytest.approx(img[k], abs=1e-6)
        assert E.text_similarity(texts[k], samples[k]) == pytest.approx(txt[k], abs=1e-6)
    image_score, text_score = E.paper_scores(train, samples[0], texts[1:], samples[1:])
    assert image_score == pytest.approx(img[0], abs=1e-6)
    assert text_score == pytest.approx(sum(txt[1:]) / 3, abs=1e-6)
    # the mean of cosines is what the code computes; the paper text's "cosine to the mean embedding" differs
    mean_emb = torch.nn.functional.normalize(samples[1], dim=1).mean(0)
    alt = float(torch.nn.functional.cosine_similarity(texts[1], mean_emb, dim=0))
    assert abs(alt - txt[1]) > 1e-3


def test_metrics_are_scale_and_order_invariant():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 16, generator=g), torch.randn(7, 16, generator=g)
    base = E.image_similarity(a, b)
    assert E.image_similarity(a * 10, b[torch.randperm(7, generator=g)] * 0.1) == pytest.approx(base, abs=1e-7)
    assert E.image_similarity(a.numpy(), b.numpy()) == pytest.approx(base, abs=1e-12)


@pytest.mark.parametrize(
    "a, b, message",
    [
        (torch.zeros(2, 4), torch.ones(3, 4), "zero vector"),
        (torch.ones(2, 4), torch.ones(3, 5), "4 dims but"),
        (torch.ones(0, 4), torch.ones(3, 4), "empty"),
        (torch.ones(2, 4, 1), torch.ones(3, 4), "must be"),
        (torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2), "NaN"),
    ],
)
def test_metric_bad_input_is_one_line(a, b, message):
    with pytest.raises(ValueError, match=message) as err:
        E.image_similarity(a, b)
    assert "\n" not in str(err.value)


def test_paper_scores_needs_one_text_per_sample_set():
    with pytest.raises(ValueError, match="one text feature and one sample set"):
        E.paper_scores(torch.ones(1, 2), torch.ones(1, 2), [torch.ones(2)], [])


def test_prompts_and_placeholder_removal():
    assert clip_text("A photo of S* on the moon") == "A photo of on the moon"
    assert clip_text("Elmo holding a <cat>", ["<cat>"]) == "Elmo holding a"
    assert E.parse_prompts(None) == list(E.EDITING_PROMPTS)
    assert E.parse_prompts(" a S* ; b S* ;") == ["a S*", "b S*"]
    with pytest.raises(InversionError, match="has no S\\*"):
        E.parse_prompts("a cat on the moon")
    with pytest.raises(InversionError, match="empty"):
        E.parse_prompts(" ; ")
    assert E.RECONSTRUCTION_PROMPT == "A photo of S*" and len(E.EDITING_PROMPTS) == 3
    assert (E.N_SAMPLES, E.STEPS, E.ETA, E.GUIDANCE) == (64, 50, 0.0, 5.0)


# --- CLIP ----------------------------------------------------------------------------------------------------


def test_clip_preprocess_matches_torchvision_tensor_path():
    tv = pytest.importorskip("torchvision.transforms")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 256, 300, generator=g) * 2 - 1
    ref = tv.Compose(
        [
            tv.Normalize([-1.0] * 3, [2.0] * 3),
            tv.Resize(224, interpolation=tv.InterpolationMode.BICUBIC, antialias=False),
            tv.CenterCrop(224),
            tv.Normalize(CL.CLIP_MEAN, CL.CLIP_STD),
        ]
    )(x)
    ours = CL.clip_preprocess(x)
    assert ours.shape == (2, 3, 224, 224)
    assert float((ours - ref).abs().max()) < 1e-5
    grey = CL.clip_preprocess(torch.zeros(1, 3, 224, 224))  # 0 in [-1, 1] is 0.5 in [0, 1]
    want = (0.5 - torch.tensor(CL.CLIP_MEAN)) / torch.tensor(CL.CLIP_STD)
    assert torch.allclose(grey[0, :, 0, 0], want, atol=1e-6)


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    """A random open_clip CLIP of the ViT-B-32 code path, shrunk (registered from a test-only config)."""
    open_clip = pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("clipcfg")
    (folder / "oneword-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    return CL.CLIPScorer.load(E.RANDOM, "cpu", arch="oneword-tiny-clip")


def test_clip_scorer_features_and_weight_file_round_trip(small_clip, tmp_path):
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    feats = small_clip.image_features(images)
    text = small_clip.text_features(["a photo of on the moon"])
    assert feats.shape == (2, 32) and text.shape == (1, 32) and torch.isfinite(feats).all()
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in small_clip.model.state_dict().items()}}, path)
    again = CL.CLIPScorer.load(path, "cpu", arch="oneword-tiny-clip")
    assert torch.equal(again.image_features(images), feats)
    assert again.weights == str(path)


def test_clip_torchscript_archive_is_read(tmp_path):
    """OpenAI ships ViT-B-32.pt as a TorchScript archive; its extra scalars are dropped."""
    lin = torch.jit.script(torch.nn.Linear(3, 2))
    path = tmp_path / "scripted.pt"
    torch.jit.save(lin, str(path))
    sd = CL.read_clip_state_dict(path)
    assert set(sd) == {"weight", "bias"} and torch.equal(sd["weight"], lin.weight)


def test_clip_weight_errors_are_one_line(tmp_path):
    with pytest.raises(
        InversionError,
        match="weights not found at .*clip-vit-b-32.pt; download OpenAI's ViT-B-32.pt from https://openaipublic",
    ) as err:
        CL.CLIPScorer.load(tmp_path / "clip-vit-b-32.pt")
    assert "\n" not in str(err.value)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InversionError, match="not readable") as err:
        CL.read_clip_state_dict(junk)
    assert "\n" not in str(err.value)


# --- runs and the CLI ----------------------------------------------------------------------------------------


class StubScorer:
    """Deterministic stand-in for CLIP: mean colour and brightness features; text features from its length."""

    weights = "stub"

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), torch.ones(len(x), 1)], dim=1)

    def text_features(self, texts):
        return torch.tensor([[len(t) % 3, 1.0, 0.5, 0.2, 0.1, 0.3, 1.0] for t in texts])


@pytest.fixture
def run_dir(tmp_path):
    concept = tmp_path / "concept"
    concept.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(concept / f"{i}.png")
    run = tmp_path / "run"
    run.mkdir()
    options = {"model": "tiny", "ckpt": None, "concept": str(concept), "token": "<cat>"}
    (run / "args.json").write_text(json.dumps({"options": options}))
    save_safetensors(
        {"<cat>": torch.randn(1, 32, generator=torch.Generator().manual_seed(0))}, run / "learned_embeds.safetensors"
    )
    return run


def test_cli_end_to_end_on_tiny_model(run_dir, capsys):
    argv = [
        "--run",
        str(run_dir),
        "--n",
        "2",
        "--steps",
        "1",
        "--batch",
        "2",
        "--prompts",
        "A photo of S* on the moon;Elmo holding a S*",
        "--save-samples",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert E.main(argv, scorer=StubScorer()) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith("<cat>: image similarity ") and "mean of 2 editing prompts" in line
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["token"] == "<cat>" and report["model"] == "tiny" and report["training_images"] == 2
    assert [p["prompt"] for p in report["prompts"]] == [
        "A photo of S*",
        "A photo of S* on the moon",
        "Elmo holding a S*",
    ]
    assert [p["text"] for p in report["prompts"]] == ["A photo of", "A photo of on the moon", "Elmo holding a"]
    edits = [p["text_similarity"] for p in report["prompts"][1:]]
    assert report["text_similarity"] == pytest.approx(sum(edits) / 2, abs=1e-12)
    assert report["image_similarity"] == report["prompts"][0]["image_similarity"]
    assert report["protocol"]["samples_per_prompt"] == 2 and report["protocol"]["size"] == 64
    assert report["protocol"]["guidance"] == 5.0 and report["protocol"]["sampler"] == "ddim"
    grids = sorted(p.name for p in (run_dir / "eval-samples").iterdir())
    assert len(grids) == 3 and Image.open(run_dir / "eval-samples" / grids[0]).size == (2 * 64, 64)


def _cli(argv, capsys):
    code = E.cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("error:")]


def test_cli_run_without_embeddings_is_one_line(tmp_path, capsys):
    (tmp_path / "args.json").write_text(json.dumps({"options": {"model": "tiny"}}))
    code, errors = _cli(["--run", str(tmp_path)], capsys)
    assert code == 2 and len(errors) == 1
    assert "holds no learned embedding (embeddings.pt or learned_embeds.safetensors)" in errors[0]
    assert "make train" in errors[0]


def test_cli_missing_run_and_missing_clip_weights_are_one_line(run_dir, tmp_path, capsys):
    code, errors = _cli(["--run", str(tmp_path / "nope")], capsys)
    assert code == 2 and errors == [f"error: RUN={tmp_path / 'nope'}: no such run directory"]
    code, errors = _cli(["--run", str(run_dir), "--clip-weights", str(tmp_path / "clip.pt")], capsys)
    assert code == 2 and len(errors) == 1 and "download OpenAI's ViT-B-32.pt from" in errors[0]
    code, errors = _cli(["--run", str(run_dir), "--n", "0"], capsys)
    assert code == 2 and errors == ["error: N=0 must be at least 1"]


@pytest.mark.slow
def test_cli_with_random_vit_b32_smoke(run_dir, capsys):
    """The full default path: open_clip ViT-B-32 (random weights), tiny model, one editing prompt."""
    argv = [
        "--run",
        str(run_dir),
        "--n",
        "2",
        "--steps",
        "1",
        "--clip-weights",
        E.RANDOM,
        "--no-progress",
        "--prompts",
        "An oil painting of S*",
        "--device",
        "cpu",
    ]
    assert E.cli_main(argv) == 0
    assert "RANDOM CLIP" in capsys.readouterr().out
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["protocol"]["clip"] == {"arch": "ViT-B-32", "weights": E.RANDOM}
    assert -1.0 <= report["image_similarity"] <= 1.0
