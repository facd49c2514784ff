"""The instances world: determinism, unique instances, captions blind to unworded properties, held-out ids,
the concept tool, resumable pretraining, and the shipped judge's accuracy."""

from __future__ import annotations

import json
import shutil
import types
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from experiments.instances import concept, judge, world
from experiments.instances import pretrain as ipretrain


def test_world_is_deterministic_per_seed():
    a_img, a_lab = world.generate(6, 2, base=17)
    b_img, b_lab = world.generate(6, 2, base=17)
    assert a_lab == b_lab
    assert np.array_equal(a_img, b_img)
    c_img, _ = world.generate(6, 2, base=18)
    assert not np.array_equal(a_img, c_img)


def test_instances_are_unique():
    params = [tuple(asdict(world.sample_instance(i)).items()) for i in range(400)]
    assert len(set(map(str, params))) == 400
    images, _ = world.generate(40, 1)
    flat = images.reshape(40, -1)
    assert len({row.tobytes() for row in flat}) == 40


def test_captions_never_name_unworded_properties():
    """A caption reads only the worded and fine attributes: an instance and a twin that differs in every unworded
    property (geometry of the pattern, parts, legs and eyes) get the same captions from the same random stream."""
    vocab = world.caption_words()
    for i in range(60):
        inst = world.sample_instance(i)
        r = np.random.default_rng(i)
        twin = replace(
            inst,
            pattern_angle=float(r.uniform(-1.5, 1.5)),
            pattern_period=inst.pattern_period * 1.1,
            pattern_phase=float(r.uniform()),
            spots=tuple((float(u), float(v)) for u, v in r.uniform(-0.6, 0.6, size=(3, 2))),
            top_spread=float(r.uniform(0.3, 0.75)),
            top_length=float(r.uniform(0.35, 0.6)),
            leg_length=float(r.uniform(0.3, 0.5)),
            leg_spread=float(r.uniform(0.4, 0.75)),
            eye_radius=float(r.uniform(0.17, 0.26)),
            eye_height=float(r.uniform(-0.45, 0.0)),
        )
        assert twin.worded() == inst.worded() and twin.fine() == inst.fine() and twin != inst
        scene = world.sample_scene(np.random.default_rng(i))
        for k in range(5):
            cap = world.caption(world.Labels(i, inst, scene), np.random.default_rng(k))
            assert cap == world.caption(world.Labels(i, twin, scene), np.random.default_rng(k))
            assert set(cap.split()) <= vocab, cap


def test_human_captions_use_only_the_coarse_words():
    """The short and long human captions of an instance and of its lookalike (same worded attributes, other fine
    ones) are identical: the fine words are pretraining vocabulary a person does not write."""
    differ = 0
    for i in range(40):
        inst = world.sample_instance(i)
        twin = world.lookalike(inst, 10_000 + i)
        assert world.human_captions(inst) == world.human_captions(twin)
        assert not set(" ".join(world.human_captions(inst)).split()) & (world.FINE_WORDS | set(world.NUMBERS.values()))
        differ += twin.fine() != inst.fine()
    assert differ >= 30  # lookalikes mostly differ in what the fine words say


def test_captions_name_each_worded_attribute_sometimes():
    inst = next(
        world.sample_instance(i)
        for i in range(100)
        if world.sample_instance(i).legs and world.TOPS[world.sample_instance(i).top] == "horns"
    )
    caps = [
        world.caption(world.Labels(0, inst, world.sample_scene(np.random.default_rng(k))), np.random.default_rng(k))
        for k in range(200)
    ]
    for word in (*inst.worded().values(),):
        rate = np.mean([word in c.split() for c in caps])
        assert 0.2 < rate < 0.95, (word, rate)


def test_held_out_ids_are_disjoint_from_pretraining(capsys):
    pretrain_ids = set(range(ipretrain.Settings().n_instances)) | set(range(world.JUDGE_BASE, world.JUDGE_BASE + 600))
    concept_ids = {world.concept_id(n) for n in range(1000)}
    assert not pretrain_ids & concept_ids
    assert min(concept_ids) == world.HELD_OUT_BASE and max(pretrain_ids) < world.HELD_OUT_BASE
    assert ipretrain.main(["--n-instances", str(world.HELD_OUT_BASE + 1)]) == 2
    assert "--n-instances" in capsys.readouterr().err
    with pytest.raises(ValueError):
        world.concept_id(-1)


def test_concept_tool(tmp_path, capsys):
    from inversion.data import find_images, resolve_concept

    out = tmp_path / "c3"
    assert concept.main(["--seed", "3", "--out", str(out)]) == 0
    info = json.loads((out / "concept.json").read_text())
    assert info["instance_id"] == world.concept_id(3) and info["init_word"] == world.NOUN
    assert info["caption_short"] == f"a {world.COLOUR_NAMES[info['instance']['colour']]} {world.NOUN}"
    assert info["caption_long"].startswith(info["caption_short"][: -len(world.NOUN)])
    assert world.instance_from_dict(info["instance"]) == world.sample_instance(world.concept_id(3))
    large, none = world.SIZE_NAMES.index("large"), world.COMPANIONS.index("none")
    assert all(e["scene"]["size"] == large and e["scene"]["companion"] == none for e in info["train"] + info["heldout"])
    train = find_images(resolve_concept(str(out)))
    assert [p.name for p in train] == [f"train-{i}.png" for i in range(1, 6)]
    assert len(list((out / "heldout").glob("*.png"))) == concept.HELD_OUT
    again = tmp_path / "again"
    assert concept.main(["--seed", "3", "--out", str(again)]) == 0
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in ("train-1.png", "heldout/heldout-8.png"))
    assert concept.main(["--seed", "3", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert concept.main(["--seed", "-1", "--out", str(tmp_path / "x")]) == 2
    assert concept.main(["--seed", "4", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "concept.json").read_text())["seed"] == 4


def test_model_name_resolves():
    from inversion import models

    assert "instances" in models.MODEL_CHOICES
    assert models.model_path("instances") == models.WEIGHTS_DIR / "instances.safetensors"


# a pretraining run small enough for a test: every stage (VAE, CLIP text tower, UNet) runs a few steps
TINY = dict(n_instances=6, views=2, vae_steps=2, vae_batch=4, clip_steps=2, clip_batch=4, steps=2, batch=2)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny instances model pretrained for two steps at one thread (file path)."""
    tmp = tmp_path_factory.mktemp("tiny-instances")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    s = ipretrain.Settings(**TINY)
    ipretrain.pretrain(s, tmp / "work", tmp / "tiny.safetensors", tmp / "log.csv", tmp / "loss.png", snapshots=(1,))
    torch.set_num_threads(threads)
    return tmp / "tiny.safetensors"


def test_pretrain_resumes_bit_identically(tmp_path, monkeypatch, one_thread):
    """A run stopped after a saved step and started again ends in the same file as an uninterrupted one."""
    from experiments.shapes import pretrain as base

    s = ipretrain.Settings(**{**TINY, "steps": 4})
    saved = []
    real_save = base._save_state

    def save_and_keep(path, step, *args):
        real_save(path, step, *args)
        if step == 2:
            shutil.copy(path, tmp_path / "step2.pt")
        saved.append(step)

    monkeypatch.setattr(base, "_save_state", save_and_keep)
    kw = dict(log_path=tmp_path / "log.csv", plot_path=tmp_path / "loss.png", save_every=2)
    ipretrain.pretrain(s, tmp_path / "work", tmp_path / "a.safetensors", **kw)
    assert saved == [2, 4]
    shutil.copy(tmp_path / "step2.pt", tmp_path / "work" / "diffusion.pt")
    ipretrain.pretrain(s, tmp_path / "work", tmp_path / "b.safetensors", **kw)
    assert saved == [2, 4, 4]
    from safetensors import safe_open
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as fa, safe_open(str(tmp_path / "b.safetensors"), "pt") as fb:
        assert fa.metadata() == fb.metadata()  # the header's key order is not stable from one save to the next
    with pytest.raises(ipretrain.WorkFolderError, match="other settings"):
        ipretrain.pretrain(replace(s, steps=5), tmp_path / "work", tmp_path / "c.safetensors", **kw)
    (tmp_path / "work" / "diffusion.pt").unlink()  # the VAE alone is reused by a run with other diffusion settings
    ipretrain.pretrain(replace(s, steps=3), tmp_path / "work", tmp_path / "c.safetensors", **kw)
    with pytest.raises(ipretrain.WorkFolderError, match="holds vae.pt, diffusion.pt of a run with other settings"):
        ipretrain.pretrain(replace(s, vae_steps=3), tmp_path / "work", tmp_path / "d.safetensors", **kw)
    with pytest.raises(ipretrain.WorkFolderError, match="holds text.pt, diffusion.pt of a run with other settings"):
        ipretrain.pretrain(replace(s, steps=3, clip_lr=1e-4), tmp_path / "work", tmp_path / "d.safetensors", **kw)


def test_text_tower_is_clip_trained_then_frozen(tiny_model, one_thread):
    """The UNet trains against the text tower the CLIP stage left (SD's frozen encoder): the model file holds
    exactly the text tower of the work folder's text.pt, and the contrastive stage moved it from its start."""
    from experiments.instances import textclip
    from experiments.instances.config import instances
    from experiments.shapes import pretrain as base
    from ldm.checkpoint import load_model
    from ldm.pipeline import build_modules, build_tokenizer

    saved = torch.load(tiny_model.parent / "work" / "text.pt", weights_only=False)["text"]
    for path in (tiny_model, tiny_model.with_name("tiny.step1.safetensors")):  # the model and its snapshot
        text = load_model(path).text_encoder.state_dict()
        assert saved.keys() == text.keys()
        assert all(torch.equal(saved[k].half(), text[k].half()) for k in saved)

    # 100 steps of the contrastive loss on 16 renders learn to pick each one's caption out of the 16 (chance 1/16)
    torch.manual_seed(0)
    cfg = instances()
    _, _, tower = build_modules(cfg)
    tokens = base.CaptionTokens(build_tokenizer(cfg), world.caption_words())
    images_u8, labels = world.generate(16, 1)
    words = tower.token_embedding.weight.detach()[torch.tensor(tokens.vocab)].clone()
    before = words.clone()
    acc = textclip.train_text(
        tower, words, tokens, world.to_tensor(images_u8), labels, world.caption, 100, 16, 3e-3, 0, base.TrainLog()
    )
    assert acc > 0.5 and not torch.equal(words, before)


@pytest.mark.parametrize(
    "argv", [["--snapshots", "x"], ["--steps", "10", "--snapshots", "5,20"], ["--snr-gamma", "-1"]]
)
def test_pretrain_refuses_bad_settings_in_one_line(argv, capsys):
    assert ipretrain.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {argv[-2]}"), err


def test_pooled_is_the_first_eos_row():
    from experiments.instances import textclip
    from ldm.tokenizer import BOS_ID, EOS_ID

    ids = torch.tensor([[BOS_ID, 5, EOS_ID, EOS_ID], [BOS_ID, 5, 6, EOS_ID]])
    context = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    assert torch.equal(textclip.pooled(context, ids), torch.stack([context[0, 2], context[1, 3]]))


@pytest.mark.skipif(not judge.JUDGE_PATH.is_file(), reason="the instances judge is not shipped in this checkout")
def test_shipped_judge_accuracy_reproduces():
    """The judge's held-out accuracy recorded in its file (100 instances, 40 lookalike sets) holds on the first
    50 instances and 10 lookalike sets, within 0.05 (subset noise, fp16 weights)."""
    from safetensors import safe_open

    with safe_open(str(judge.JUDGE_PATH), "pt") as f:
        shipped = json.loads(f.metadata()["config"])
    torch.set_num_threads(1)
    now = judge.accuracy(judge.shipped(), n_instances=50, n_lookalike=10)
    for key in ("identification_top1", "heldout_reconstruction", "background_acc", "position_acc", "companion_acc"):
        assert now[key] >= shipped[key] - 0.05, (key, now[key], shipped[key])
    assert now["identification_top1"] > 0.5 and now["heldout_reconstruction"] > 0.8
    assert now["background_acc"] > 0.9


needs_shipped_model = pytest.mark.skipif(
    not (ipretrain.MODEL_PATH.is_file() and judge.JUDGE_PATH.is_file()),
    reason="weights/instances.safetensors or its judge is not in this checkout (make pretrain-instances builds it)",
)


@needs_shipped_model
def test_the_shipped_metrics_describe_the_shipped_weights(one_thread):
    """pretrain-metrics.json (`make pretrain-instances`, judged on the file it wrote) is re-measured on the
    committed file within pretrain.TOLERANCE."""
    import ldm

    shipped = json.loads(ipretrain.METRICS_PATH.read_text())
    assert shipped["settings"] == asdict(ipretrain.Settings())  # the recipe's defaults built the shipped file
    now = ipretrain.evaluate(ldm.load_model(ipretrain.MODEL_PATH), shipped["eval_per_prompt"])
    for key, value in now.items():
        assert abs(value - shipped[key]) <= ipretrain.TOLERANCE, (key, value, shipped[key])


# Issue 13, item 6: concept 2 (a green plain round toy with ears and legs) is one whose word the shipped model
# learns; the study measured its one-word reconstruction at 0.947 / 0.867 (seeds 0 / 1) against 0.539 for its
# init word and 0.551 for its short caption. The margin is half the smaller measured lead (0.867 − 0.551).
# Over all 8 concepts the lead is not a clear difference (README § "The 8×8×12 model ships").
CI_CONCEPT, CI_MARGIN = 2, 0.15


@needs_shipped_model
def test_a_learned_word_beats_its_init_word_and_short_caption(tmp_path, one_thread):
    """The study's unit on the shipped weights (the paper's recipe, 300 steps, seed 0; 32 samples per prompt,
    fixed seeds): the learned word's reconstruction leads the init word's and the short caption's by CI_MARGIN."""
    from experiments.instances import score, study
    from inversion.train import train

    cdir = study.concept_dir(tmp_path, CI_CONCEPT)
    a = {"model": str(ipretrain.MODEL_PATH), "steps": study.STEPS, "batch": study.BATCH, "lr": study.LR}
    train(study.train_config(cdir, tmp_path / "run", 0, a, study.STEPS))
    r = score.score(cdir, tmp_path / "run", 32, seed=0)
    lead = {k: r["reconstruction"] - r[k] for k in ("init_reconstruction", "caption_short")}
    assert min(lead.values()) >= CI_MARGIN, (r, lead)


# Issue 14, item 5: concept 6 (seed 0) is one where the paper's recipe is slow on the shipped model and the fast
# recipe is not: `make bench-concepts` measured their crossings of the bar at step 115 and 15 (RESULTS.md §
# instances-speed). Within SPEED_EARLY steps the fast recipe's curve holds above the bar and the official one's
# does not; the fast recipe's auto run (capped at the bench's 150 steps) stops by itself with a word above it.
SPEED_CONCEPT, SPEED_EARLY, SPEED_SAMPLES = 6, 30, 16


@needs_shipped_model
def test_the_fast_recipe_reaches_the_bar_first_and_its_auto_run_stops_above_it(tmp_path, one_thread):
    """The bench's unit, trimmed: the official recipe's final reconstruction (150 steps) sets the bar; the fast
    recipe's curve crosses it by SPEED_EARLY steps, the official recipe's does not; the fast auto run stops by
    itself (the rule settled, before its cap) and its last word is at or above the bar."""
    from experiments.instances import score, speed, study
    from inversion.train import train

    cdir = study.concept_dir(tmp_path, SPEED_CONCEPT)
    a = {"model": str(ipretrain.MODEL_PATH), "steps": speed.STEPS, "batch": study.BATCH, "lr": study.LR}
    train(study.train_config(cdir, tmp_path / "official", 0, a, speed.STEPS))
    ends = score.curve(cdir, tmp_path / "official", 2 * SPEED_SAMPLES, seed=0)
    bar = speed.BAR * ends[str(speed.STEPS)]
    early = {**a, "steps": SPEED_EARLY}
    train(study.train_config(cdir, tmp_path / "official-early", 0, early, speed.CURVE_EVERY))
    official = score.curve(cdir, tmp_path / "official-early", SPEED_SAMPLES, seed=0)
    fast = study.train_config(cdir, tmp_path / "fast", 0, a, speed.CURVE_EVERY, **speed.RECIPES["fast"])
    train(fast.replace(auto=True, max_steps=speed.STEPS))
    stop = json.loads((tmp_path / "fast" / "stop.json").read_text())
    curve = score.curve(cdir, tmp_path / "fast", SPEED_SAMPLES, seed=0)
    crossed = speed.first_crossing(curve, bar)
    assert crossed is not None and crossed <= SPEED_EARLY, (bar, curve)
    assert speed.first_crossing(official, bar) is None, (bar, official)  # official: more image-passes to the bar
    assert "settled" in stop["reason"] and stop["stopped_at"] < speed.STEPS, stop
    assert speed.final(curve) >= bar, (bar, curve)


class _IdentityVAE(torch.nn.Module):
    """encode(x).mean = x, decode(z) = z."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        return types.SimpleNamespace(mean=x)

    def decode(self, z):
        return z


@pytest.mark.skipif(not judge.JUDGE_PATH.is_file(), reason="the instances judge is not shipped in this checkout")
def test_autoencoder_reconstruction_of_an_identity_autoencoder():
    """An identity autoencoder keeps everything: its score is the renders' own."""
    j = judge.shipped()
    kept, ceiling = judge.autoencoder_reconstruction(j, _IdentityVAE(), n_eval=4)
    assert kept == ceiling > 0.8


@pytest.mark.skipif(not judge.JUDGE_PATH.is_file(), reason="the instances judge is not shipped in this checkout")
def test_denoise_reconstruction_of_a_denoiser_that_gives_back_its_input():
    """A model that hands the noised renders back unchanged (identity autoencoder and denoiser) keeps every
    instance: the score is the renders' own; it is asked with the long human caption at the given strength."""
    calls = []

    class Model:
        device, vae_dtype = torch.device("cpu"), torch.float32
        config = types.SimpleNamespace(steps=25, guidance=3.0)

        def encode_images(self, x, sample=True):
            return x

        def decode_latents(self, z):
            return z

        def edit_latents(self, latents, prompts, *, noise, strength, steps, scale, progress):
            calls.append((prompts, strength, steps, scale))
            return latents

    j = judge.shipped()
    kept = judge.denoise_reconstruction(j, Model(), 0.4, n_eval=4)
    assert kept == judge.autoencoder_reconstruction(j, _IdentityVAE(), n_eval=4)[1] > 0.8
    ((prompts, strength, steps, scale),) = calls
    assert (strength, steps, scale) == (0.4, 25, 3.0) and len(prompts) == 12  # 3 views of 4 instances
    assert prompts[0] == prompts[1] == prompts[2] and all(p.startswith("a ") and world.NOUN in p for p in prompts)


def test_score_prints_the_contract_fields(tmp_path, tiny_model, one_thread, capsys):
    """On a tiny pretrained model: concept → inversion.train → score prints one JSON line with every field."""
    from experiments.instances import score
    from inversion import train as trainer

    model = tiny_model
    concept.write_concept(0, tmp_path / "c0")
    run = tmp_path / "run"
    trainer.train(
        trainer.TrainConfig.from_argv(
            [
                "--concept",
                str(tmp_path / "c0"),
                "--ckpt",
                str(model),
                "--init",
                world.NOUN,
                "--token",
                "<c0>",
                "--steps",
                "2",
                "--batch",
                "1",
                "--out",
                str(run),
                "--save-every",
                "2",
                "--val-every",
                "0",
                "--latent-cache",
                "",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
    )
    capsys.readouterr()
    assert (
        score.main(
            ["--concept", str(tmp_path / "c0"), "--run", str(run), "--samples", "2", "--steps", "2", "--threads", "1"]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    for key in ("reconstruction", "editability", "init_reconstruction", "caption_short", "caption_long"):
        assert 0.0 <= out[key] <= 1.0, (key, out)
    # the word reaches the model as its learned rows, not as the literal characters of "<c0>"
    model, token, vecs = score._run_model(run, None)
    vocab = model.text_encoder.token_embedding.weight.shape[0]
    assert model.tokenizer.encode(token) == list(range(vocab, vocab + vecs.shape[0]))
    assert torch.equal(model.extra_embeddings, vecs.to(model.dtype))
    assert out["samples"] == 2 and out["steps"] == 2 and out["token"] == "<c0>"
    for key in ("loss", "init_loss", "caption_short_loss", "caption_long_loss", "word_norm"):
        assert out[key] > 0, (key, out)
    assert score.main(["--concept", str(tmp_path / "c0"), "--run", str(run), "--samples", "0"]) == 2


def test_heldout_loss_is_the_trainers_objective_with_shared_draws(tmp_path, tiny_model, one_thread):
    """score.heldout_loss of "a photo of S*" is inversion.train's loss for that prompt at loss_draws' timesteps and
    noise; every prompt gets the same draws (a prompt named twice scores the same), and another seed moves them."""
    from experiments.instances import score
    from inversion import models
    from inversion.embedding import LearnedWords
    from inversion.train import InversionLoss

    def load():  # two training steps leave the zero-initialised output layers near 0: make the context count
        m = models.load(None, str(tiny_model), torch.device("cpu"), torch.float32)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in m.unet.parameters():
                if p.ndim > 1 and float(p.abs().max()) < 1e-2:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        return m

    trainer_model = load()
    words = LearnedWords(trainer_model, "<c0>", init_words=[world.NOUN])
    with torch.no_grad():
        words.vectors += 0.05 * torch.randn(words.vectors.shape, generator=torch.Generator().manual_seed(3))
    model = load()
    model.add_embedding("<c0>", words.vectors.detach())
    images = judge.render_all(concept.concept_views(0)[1][:3])
    prompts = {"word": "a photo of <c0>", "again": "a photo of <c0>", "init": f"a photo of a {world.NOUN}"}
    got = score.heldout_loss(model, images, prompts, seed=5)
    x0 = model.encode_images(judge.as_tensor(images), sample=False)
    t, noise = score.loss_draws(len(x0), tuple(x0.shape[1:]), model.schedule.num_timesteps, seed=5)
    x0 = x0.repeat_interleave(score.LOSS_STRATA * score.LOSS_DRAWS, 0)
    assert sorted(set((t // (model.schedule.num_timesteps // score.LOSS_STRATA)).tolist())) == list(range(10))
    ids = trainer_model.tokenizer([prompts["word"]] * len(x0))
    with torch.no_grad():
        _, mse = InversionLoss(trainer_model, words)(ids, x0, t, noise)
    assert got["word"] == pytest.approx(mse.item(), rel=1e-5)
    assert got["again"] == got["word"] and got["init"] != got["word"]
    assert score.heldout_loss(model, images, {"word": prompts["word"]}, seed=6)["word"] != got["word"]


def test_study_interval_is_students_t():
    """mean ± t(0.975, n−1)·sd/√n, with the table's quantiles (scipy's to 3 decimals)."""
    from experiments.instances import study

    mean, half = study.interval([0.5, 0.6, 0.7, 0.8])
    assert mean == pytest.approx(0.65)
    assert half == pytest.approx(3.182 * 0.1290994 / 2, rel=1e-5)
    assert study.t95(16) == 2.131 and study.t95(2) == 12.706 and study.t95(100) == 1.96


def test_study_summarises_paired_units():
    """Comparisons pair each unit with the same concept and seed of the one-word variant."""
    from experiments.instances import study

    results = []
    for c in range(3):
        for seed in (0, 1):
            for k, key in enumerate(study.VARIANTS):
                results.append(
                    dict(
                        concept=str(c),
                        seed=seed,
                        variant=key,
                        reconstruction=0.6 + 0.1 * c - 0.01 * k,
                        editability=0.5 + 0.02 * k,
                        init_reconstruction=0.5,
                        caption_short=0.55,
                        caption_long=0.5 + 0.1 * c,
                        curve={"0": 0.5, "25": 0.6 + 0.1 * c},
                        loss=0.20 + 0.01 * k + 0.01 * seed,
                        init_loss=0.25 + 0.01 * seed,
                        caption_short_loss=0.21 + 0.01 * seed,
                        caption_long_loss=0.20 + 0.01 * c,
                    )
                )
    s = study.summarise(results)
    assert s["n"] == 6
    assert s["pairs"]["one-word − init word"][0] == pytest.approx(0.2)
    assert s["pairs"]["one-word − long caption"] == pytest.approx((0.1, 0.0))  # the same gap in every unit
    assert s["pairs"]["three-words − one-word (reconstruction)"] == pytest.approx((-0.02, 0.0))
    assert s["curve"][25][0] == pytest.approx(0.7) and list(s["curve"]) == [0, 25]
    assert s["pairs"]["one-word − init word (held-out loss)"] == pytest.approx((-0.05, 0.0))
    assert s["pairs"]["three-words − one-word (held-out loss)"] == pytest.approx((0.02, 0.0))
    assert s["rows"]["caption-long"]["loss"][0] == pytest.approx(0.21)
    said = study.verdicts(s)
    assert said[0].endswith(": shown")  # one-word leads the init word, the short and the long caption in every unit
    # in the held-out loss it is below the init word and the short caption in every unit, not below the long caption
    assert "init word: shown; below the short caption: shown; below the long caption: **not shown**" in said[1]
    assert all(line.endswith("**not shown**") for line in said[2:4])  # more vectors: lower reconstruction here
    assert said[4].endswith(": shown")  # regularised: lower reconstruction, higher editability in every unit
    assert "**not shown**" in said[5] and "step 25" in said[5]  # the whole rise by step 25 (< 100)


def test_study_verdicts_need_intervals_that_exclude_zero():
    """A lead whose interval contains 0 is not shown; a curve shown rises clearly and reaches 90 % late."""
    from experiments.instances import study

    pairs = {"one-word − init word": (0.05, 0.16), "one-word − short caption": (0.1, 0.05)}
    pairs["one-word − long caption"] = (0.1, 0.05)
    for name, gap in (("init word", (-0.03, 0.01)), ("short caption", (-0.02, 0.03)), ("long caption", (0.01, 0.005))):
        pairs[f"one-word − {name} (held-out loss)"] = gap
    pairs["curve: step 300 − step 0"] = (0.2, 0.1)
    curve = {k: (0.5 + 0.2 * min(k, 200) / 200, 0.05) for k in range(0, 301, 25)}
    said = study.verdicts({"pairs": pairs, "curve": curve})
    assert said[0].endswith("**not shown**") and len(said) == 3
    assert said[1].endswith(
        "init word: shown; below the short caption: **not shown**; below the long caption: **not shown**"
    )
    assert said[2].startswith("- (c)") and ": shown" in said[2] and "step 200" in said[2]


def test_study_runs_end_to_end_on_a_tiny_model(tmp_path, tiny_model, one_thread, capsys, monkeypatch):
    """Concept → every variant trained and scored → RESULTS section, plot and the curve, then resumed from --work."""
    from experiments import results as results_md
    from experiments.instances import study

    model = tiny_model
    results = tmp_path / "RESULTS.md"
    argv = ["--concepts", "1", "--seeds", "0", "--steps", "2", "--batch", "1", "--samples", "1", "--curve-every", "1"]
    argv += ["--curve-samples", "1", "--model", str(model), "--work", str(tmp_path / "study"), "--jobs", "1"]
    argv += ["--results", str(results), "--plot", str(tmp_path / "plot.png")]
    assert study.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 1 and set(out["rows"]) >= set(study.VARIANTS) | {"init-word", "caption-short"}
    text = results.read_text()
    assert text.count(results_md.markers(study.SECTION)[0]) == 1 and "| step | 0 | 1 | 2 |" in text
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert len(list((tmp_path / "study" / "results").glob("*.json"))) == len(study.VARIANTS)
    monkeypatch.setattr(study, "_unit", lambda job: pytest.fail(f"retrained {job[2]}"))
    assert study.main(argv) == 0  # every unit is read back from --work, none trained again


@pytest.mark.parametrize(
    "argv",
    [["--variants", "two-words"], ["--variants", "one-word,four-words"], ["--concepts", "0"], ["--seeds", "a"]],
    ids=["no-one-word", "unknown-variant", "no-concepts", "bad-seed"],
)
def test_study_refuses_bad_settings_in_one_line(argv, capsys):
    from experiments.instances import study

    assert study.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and argv[0] in err[0], err


def _speed_unit(concept, recipe, curve, stopped_at, passes=4, seconds=10.0):
    return {
        "concept": concept,
        "seed": 0,
        "recipe": recipe,
        "curve": {str(k): v for k, v in curve.items()},
        "stopped_at": stopped_at,
        "passes_per_step": passes,
        "search_passes": 0,
        "train_seconds": seconds,
        "reconstruction": max(curve.values()),
        "editability": 0.5,
        "auto_reconstruction": curve[stopped_at],
        "auto_editability": 0.6,
    }


def test_speed_bar_crossings_and_auto_stop():
    """The bar is 90 % of official's final value (mean of its last HOLD curve points); a recipe reaches it at the first
    point at or above it from which the mean of HOLD points holds; passes = crossing step × batch; auto ÷ crossing."""
    from experiments.instances import speed

    assert speed.HOLD == 3
    results = [
        _speed_unit("0", "official", {0: 0.5, 25: 0.6, 50: 1.0, 75: 1.0, 100: 1.0}, 100),  # bar 0.9: step 50
        _speed_unit("0", "fast", {0: 0.5, 25: 0.95, 50: 1.0, 75: 1.0, 100: 1.0}, 50),  # step 25
        _speed_unit("1", "official", {0: 0.5, 25: 0.55, 50: 0.7, 75: 0.7, 100: 0.7}, 50),  # bar 0.63: step 50
        _speed_unit("1", "fast", {0: 0.5, 25: 0.7, 50: 0.5, 75: 0.6, 100: 0.6}, 100),  # brushes it once: never
    ]
    s = speed.summarise(results)
    units = {(u["concept"], u["recipe"]): u for u in s["units"]}
    assert units["0", "official"]["bar"] == pytest.approx(0.9) and units["0", "official"]["crossing_step"] == 50
    assert units["1", "official"]["bar"] == pytest.approx(0.63) and units["1", "official"]["crossing_step"] == 50
    assert units["0", "fast"]["passes_to_bar"] == 100 and units["0", "fast"]["seconds_to_bar"] == 2.5
    assert units["0", "fast"]["auto_over_crossing"] == 2.0
    assert units["1", "fast"]["crossing_step"] is None and units["1", "fast"]["passes_to_bar"] is None
    fast, official = s["recipes"]["fast"], s["recipes"]["official"]
    assert fast["median_official_over_recipe_passes"] == 2.0 and fast["reached_bar"] == 1
    assert official["median_official_over_recipe_passes"] == 1.0 and official["auto_in_goal"] == 1
    # paired with official at full length, same concept and seed: mean of 1.0 − 1.0 and 0.6 − 0.7; 0.6 − 0.5
    assert fast["auto_minus_official_reconstruction"][0] == pytest.approx(-0.05)
    assert fast["auto_minus_official_editability"][0] == pytest.approx(0.1)
    assert speed.first_crossing({"0": 0.9, "25": 0.8, "50": 0.7}, 0.5) == 0
    assert speed.first_crossing({"0": 0.4, "25": 0.9, "50": 0.1, "75": 0.1}, 0.5) is None


def test_speed_runs_end_to_end_on_a_tiny_model(tmp_path, tiny_model, one_thread, capsys, monkeypatch):
    """Concept → each recipe's fixed and auto runs → curve, bar, auto-stop → RESULTS section and plot; resumable."""
    from experiments import results as results_md
    from experiments.instances import speed, study

    model = tiny_model
    results = tmp_path / "RESULTS.md"
    argv = ["--concepts", "1", "--steps", "2", "--batch", "1", "--samples", "1", "--curve-every", "1"]
    argv += ["--curve-samples", "1", "--model", str(model), "--work", str(tmp_path / "speed"), "--jobs", "1"]
    argv += ["--results", str(results), "--plot", str(tmp_path / "plot.png"), "--recipes", "official,fast,init-search"]
    assert speed.main(argv) == 0  # the lr-x… ablations run the same code as official with another --lr
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"official", "fast", "init-search"} and all(r["units"] == 1 for r in out.values())
    fast = json.loads((tmp_path / "speed" / "runs" / "0-0-fast" / "fixed" / "args.json").read_text())
    assert fast["options"]["recipe"] == "fast" and fast["options"]["lr"] == 4 * study.LR
    saved = json.loads((tmp_path / "speed" / "results" / "0-0-official.json").read_text())
    assert saved["stopped_at"] == 2 and "max-steps" in saved["stop_reason"] and set(saved["curve"]) == {"0", "1", "2"}
    assert (tmp_path / "speed" / "runs" / "0-0-official" / "auto" / "stop.json").is_file()
    searched = json.loads((tmp_path / "speed" / "results" / "0-0-init-search.json").read_text())
    assert searched["search_passes"] > 0 and searched["init_chosen"]
    assert not (tmp_path / "speed" / "runs" / "0-0-init-search" / "auto" / "init_search.json").exists()  # searched once
    text = results.read_text()
    assert text.count(results_md.markers(speed.SECTION)[0]) == 1 and "| init-search | init_search=8 |" in text
    assert "| fast | recipe=fast |" in text
    assert (tmp_path / "plot.png").stat().st_size > 0
    monkeypatch.setattr(speed, "_unit", lambda job: pytest.fail(f"retrained {job[2]}"))
    assert speed.main(argv) == 0  # every unit is read back from --work


@pytest.mark.parametrize(
    "argv",
    [["--recipes", "fast"], ["--recipes", "official,turbo"], ["--curve-every", "30"], ["--jobs", "0"]],
    ids=["no-official", "unknown-recipe", "curve-every", "jobs"],
)
def test_speed_refuses_bad_settings_in_one_line(argv, capsys, tmp_path):
    from experiments.instances import speed

    (tmp_path / "m.safetensors").write_bytes(b"x")
    assert speed.main([*argv, "--model", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and argv[0] in err[0], err


class _WienerUNet(torch.nn.Module):
    """Answers in v with the per-channel Wiener filter's clean latent (diagnose.wiener_x0)."""

    def __init__(self, schedule, mean, var):
        super().__init__()
        self.schedule = schedule
        self.mean, self.var = (torch.nn.Parameter(v, requires_grad=False) for v in (mean, var))  # the model's device

    def forward(self, x, t, context):
        from experiments.instances.diagnose import wiener_x0

        a, s = self.schedule.coefficients(t, x)
        return (a * x - wiener_x0(x, a, s, self.mean, self.var)) / s  # v, whose x₀ is a·x_t − s·v


class _Blind(torch.nn.Module):
    """A UNet that never sees its context (it is given zeros)."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context):
        return self.unet(x, t, torch.zeros_like(context))


def test_diagnose_tells_a_model_that_reads_its_context_from_one_that_does_not(tiny_model, one_thread, capsys):
    from experiments.instances import diagnose
    from ldm.checkpoint import load_model

    assert diagnose.main(["--model", str(tiny_model), "--renders", "4", "--draws", "2", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert set(out["caption_ratio"]) == {"300", "600", "900"} and set(out["swap_ratio"]) == set(diagnose.SWAPS)
    rows = out["context_rows"]["600"]
    assert list(rows)[:2] == ["0:<bos>", "1:a"] and "5:red" in rows and list(rows)[-1] == "padding"

    # two steps leave the zero-initialised output layers near zero: give the UNet's cross-attention and output
    # random weights so that what it predicts depends on its context, then blind a copy of it
    model = load_model(tiny_model)
    torch.manual_seed(0)
    for name, p in model.unet.named_parameters():
        if "proj_out" in name or name.startswith("out."):
            p.data.normal_(0, 0.3)
    seeing = diagnose.diagnose(model, renders=4, draws=2)
    assert all(r != 1.0 for t in seeing["swap_ratio"].values() for r in t.values())
    assert all(v > 0 for t in seeing["context_rows"].values() for k, v in t.items() if k != "0:<bos>")
    model.unet = _Blind(model.unet)
    blind = diagnose.diagnose(model, renders=4, draws=2)
    assert all(r == 1.0 for t in blind["swap_ratio"].values() for r in t.values())
    assert set(blind["caption_ratio"].values()) == {1.0}
    assert all(v == 0.0 for t in blind["context_rows"].values() for v in t.values())
    assert all(v > 0 for v in blind["text_swap"].values())  # the tower still tells the words apart

    # a text tower whose colour words share one row cannot tell them apart, whatever the UNet does
    table = model.text_encoder.token_embedding.weight
    colours = [model.tokenizer.encode(c) for c in world.COLOUR_NAMES]
    assert all(len(ids) == 1 for ids in colours)
    table.data[[ids[0] for ids in colours]] = table.data[colours[0][0]].clone()
    deaf = diagnose.diagnose(model, renders=4, draws=2)
    assert deaf["text_swap"]["colour"] == 0.0 and deaf["text_swap"]["body"] > 0

    # denoise_error: a UNet that answers with the Wiener filter's clean latent scores exactly the filter's error
    errors = seeing["denoise_error"]
    assert list(errors) == [str(t) for t in diagnose.DENOISE_TIMESTEPS]
    snrs = [e["snr"] for e in errors.values()]
    assert snrs == sorted(snrs, reverse=True) and all(0 < e["wiener"] < 1 for e in errors.values())
    images, _ = world.generate(4, 1, base=diagnose.RENDER_BASE)
    z = model.encode_images(world.to_tensor(images), sample=False)
    assert model.config.parameterization == "v"  # _WienerUNet answers in v
    model.unet = _WienerUNet(model.schedule, z.mean(dim=(0, 2, 3), keepdim=True), z.var(dim=(0, 2, 3), keepdim=True))
    filtered = diagnose.diagnose(model, renders=4, draws=2)["denoise_error"]
    assert all(abs(e["unet"] - e["wiener"]) < 1e-3 for e in filtered.values()), filtered
    assert filtered["20"]["unet"] < filtered["800"]["unet"]


def test_diagnose_refuses_bad_settings_in_one_line(tmp_path, capsys):
    from experiments.instances import diagnose

    for argv in (["--renders", "1"], ["--draws", "0"], ["--model", str(tmp_path / "none.safetensors")]):
        assert diagnose.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and argv[0] in err[0], err
