"""The web app's parts without a browser (and without gradio): the path guard, the upload guards, the one-job
manager (against a stand-in trainer that behaves like inversion.train on SIGINT), generation and editing and their
PNG metadata, and the page's one-line refusals."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apps import workspace as W
from apps.generate import EditRequest, Generator, Request, read_words
from apps.jobs import Busy, JobManager, check_options, read_progress
from apps.sample import infotext
from apps.ui import App, duration, number, status_text
from apps.workspace import PathRefused, UIError, Workspace
from inversion.embedding import diffusers_dict, save_safetensors

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "weights" / "shapes.safetensors"
RINGS = sorted((ROOT / "experiments" / "concepts" / "shapes-ring").glob("*.png"))


@pytest.fixture
def ws(tmp_path) -> Workspace:
    root = tmp_path / "ws"
    for name in ("weights", "experiments/concepts/rings", "runs", "outputs"):
        (root / name).mkdir(parents=True)
    return Workspace(root)


# --- the path guard ----------------------------------------------------------------------------------------


def test_paths_inside_the_allowed_folders_resolve(ws):
    assert ws.resolve("weights/x.safetensors", "model") == ws.root / "weights" / "x.safetensors"
    assert ws.resolve(str(ws.root / "runs" / "a"), "run") == ws.root / "runs" / "a"
    assert ws.resolve("runs/a/../b", "run", ("runs",)) == ws.root / "runs" / "b"


@pytest.mark.parametrize(
    "text", ["../secret", "weights/../../secret", "/etc/passwd", "runs/../apps/ui.py", ".", "experiments/other"]
)
def test_paths_leaving_the_allowed_folders_are_refused(ws, text):
    with pytest.raises(PathRefused, match="outside the allowed folders"):
        ws.resolve(text, "model path")


def test_a_link_inside_an_allowed_folder_that_points_out_is_refused(ws, tmp_path):
    (tmp_path / "secret").mkdir()
    (ws.root / "runs" / "escape").symlink_to(tmp_path / "secret")
    with pytest.raises(PathRefused):
        ws.resolve("runs/escape/anything", "run folder")


def test_an_allowed_folder_that_is_a_link_is_followed(tmp_path):
    real = tmp_path / "elsewhere" / "weights"
    real.mkdir(parents=True)
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "weights").symlink_to(real)
    ws = Workspace(tmp_path / "ws")
    assert ws.resolve("weights/m.safetensors", "model") == real / "m.safetensors"
    assert ws.show(real / "m.safetensors") == "weights/m.safetensors"


def test_a_use_limits_the_folders(ws):
    with pytest.raises(PathRefused, match=r"\(runs/\)"):
        ws.resolve("weights/x", "run folder", ("runs",))
    with pytest.raises(PathRefused, match="NUL"):
        ws.resolve("runs/a\x00b", "run folder")
    with pytest.raises(UIError, match="empty"):
        ws.resolve("  ", "model path")


def test_listings(ws):
    (ws.root / "weights" / "shapes.safetensors").write_bytes(b"")
    (ws.root / "weights" / "a.ckpt").write_bytes(b"")
    (ws.root / "weights" / "shapes-judge.safetensors").write_bytes(b"")
    (ws.root / "weights" / "instances-judge.safetensors").write_bytes(b"")
    (ws.root / "weights" / "notes.txt").write_text("")
    (ws.root / "weights" / "sd-diffusers").mkdir()
    (ws.root / "weights" / "sd-diffusers" / "model_index.json").write_text("{}")
    assert [v for _, v in ws.models()] == ["weights/shapes.safetensors", "weights/a.ckpt", "weights/sd-diffusers"]
    assert ws.concepts() == ["experiments/concepts/rings"]


# --- uploads -----------------------------------------------------------------------------------------------


def test_a_non_image_upload_is_named_in_one_line(tmp_path):
    fake = tmp_path / "upload-tmp-123" / "notes.png"
    fake.parent.mkdir()
    fake.write_text("not pixels")
    with pytest.raises(UIError) as e:
        W.check_images([str(fake), *map(str, RINGS[:3])])
    assert str(e.value).startswith("notes.png: not a readable image") and "upload-tmp-123" not in str(e.value)


def test_image_count_size_and_pixel_limits(tmp_path, monkeypatch):
    with pytest.raises(UIError, match="2 image.*give 3 to 20"):
        W.check_images([str(p) for p in RINGS[:2]])
    with pytest.raises(UIError, match="21 image.*give 3 to 20"):
        W.check_images([str(RINGS[0])] * 21)
    monkeypatch.setattr(W, "MAX_IMAGE_BYTES", 500)
    with pytest.raises(UIError, match=r"ring-1-red-on-white\.png: 0\.0 MiB is over the limit"):
        W.check_images([str(p) for p in RINGS])
    monkeypatch.setattr(W, "MAX_IMAGE_BYTES", 2**20)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32 - 1)  # every ring is 32×32: a "bomb" now
    with pytest.raises(UIError, match=r"^ring-1-red-on-white\.png: .*decompression bomb.*; downscale it first"):
        W.check_images([str(p) for p in RINGS])


def test_kept_images_are_renamed_copies_and_gifs_become_png(ws, tmp_path):
    odd = tmp_path / "my photo <1>.gif"
    Image.open(RINGS[0]).convert("RGB").save(odd, format="GIF")
    folder = ws.keep_images([str(odd), *map(str, RINGS[1:3])], ws.root / "runs" / "S-1")
    names = sorted(p.name for p in folder.iterdir())
    assert folder == ws.root / "runs" / "uploads" / "S-1"
    assert names == ["01-my-photo-1.png", "02-ring-2-blue-on-black.png", "03-ring-3-green-on-gray.png"]
    assert (folder / names[1]).read_bytes() == RINGS[1].read_bytes()
    assert ws.keep_images([str(p) for p in RINGS[:3]], ws.root / "runs" / "S-1").name == "S-1-2"


class Payload:
    """Pickled by reference: loading it would run code, which weights_only refuses."""

    def __reduce__(self):
        return (print, ("this ran",))


def test_embedding_uploads_refuse_pickled_code_wrong_names_and_size(ws, tmp_path, monkeypatch):
    evil = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": Payload()}, "name": "x"}, evil)
    with pytest.raises(UIError, match=r"^evil\.pt: not a readable embedding file \(.*pickled Python code"):
        W.read_embedding(evil)
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(UIError, match=r"ends in \.pt, \.safetensors, \.bin"):
        W.read_embedding(other)
    good = tmp_path / "word.safetensors"
    save_safetensors(diffusers_dict("<w>", torch.randn(2, 64)), good)
    path, words = ws.keep_embedding(str(good))
    assert path == ws.root / "outputs" / "embeddings" / "word.safetensors" and list(words) == ["<w>"]
    assert ws.keep_embedding(str(good))[0].name == "word-2.safetensors"  # never over another file
    monkeypatch.setattr(W, "MAX_EMBEDDING_BYTES", 10)
    with pytest.raises(UIError, match="over the limit"):
        W.read_embedding(good)


# --- the job manager ---------------------------------------------------------------------------------------

FAKE_TRAINER = textwrap.dedent("""
    import json, pathlib, signal, sys, time
    out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1])
    if "fail" in out.name:
        print("error: CONCEPT=nowhere: no such folder", flush=True)
        sys.exit(2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps({"options": {"steps": 10000}}))
    stop = []
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    with open(out / "loss.csv", "w", buffering=1) as f:
        f.write("step,loss,lr,skipped\\n")
        for s in range(1, 10001):
            f.write(f"{s},{1 / s:.6g},0.005,0\\n")
            time.sleep(0.01)
            if stop:
                (out / "state.pt").write_bytes(b"saved")
                sys.exit(0)
""")


@pytest.fixture
def jobs(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    manager = JobManager(tmp_path, (sys.executable, str(script)))
    yield manager
    manager.shutdown()


def argv(run: Path) -> list[str]:
    return ["--concept", "x", "--steps", "10000", "--out", str(run)]


def wait_for(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def test_one_job_at_a_time_stop_saves_and_a_new_job_may_follow(jobs, tmp_path):
    run = tmp_path / "runs" / "a"
    jobs.start(run, argv(run))
    wait_for(lambda: jobs.status().progress.step >= 20)
    with pytest.raises(Busy, match=r"already running \(a, step \d+\)"):
        jobs.start(tmp_path / "runs" / "b", argv(tmp_path / "runs" / "b"))
    assert not (tmp_path / "runs" / "b").exists()
    st = wait_for(lambda: (s := jobs.status()).rate and s)
    assert st.state == "running" and st.progress.total == 10000 and 5 < st.rate < 200 and st.eta > 0
    assert jobs.stop().startswith("stopping")
    assert jobs.stop().startswith("already stopping")  # one SIGINT: a second would not save
    st = wait_for(lambda: (s := jobs.status()).state == "stopped" and s)
    assert (run / "state.pt").read_bytes() == b"saved"
    assert st.message == f"stopped at step {st.progress.step} of 10000; saved — Resume continues it"
    with pytest.raises(UIError, match="no training job is running"):
        jobs.stop()
    jobs.start(tmp_path / "runs" / "c", argv(tmp_path / "runs" / "c"))
    assert jobs.status().run.name == "c"


def test_a_failed_job_shows_the_trainers_error_line(jobs, tmp_path):
    jobs.start(tmp_path / "runs" / "fail", argv(tmp_path / "runs" / "fail"))
    st = wait_for(lambda: (s := jobs.status()).state == "failed" and s)
    assert st.message == "failed: CONCEPT=nowhere: no such folder"


def test_shutdown_stops_a_running_job_with_a_save(jobs, tmp_path):
    run = tmp_path / "runs" / "a"
    job = jobs.start(run, argv(run))
    wait_for(lambda: read_progress(run).step >= 3)
    jobs.shutdown()
    assert job.proc.returncode == 0 and (run / "state.pt").is_file()


def test_options_are_checked_by_the_trainer_before_a_process_starts():
    with pytest.raises(UIError, match=r"^STEPS='many' must be a whole number or auto$"):
        check_options(["--concept", "x", "--steps", "many"])
    with pytest.raises(UIError, match=r"^STEPS=0 must be at least 1$"):
        check_options(["--concept", "x", "--steps", "0"])


# --- the page's handlers -----------------------------------------------------------------------------------


def test_start_refusals_are_one_line_messages(ws, tmp_path):
    app = App(ws, JobManager(ws.root), Generator("cpu"))
    (ws.root / "weights" / "m.safetensors").write_bytes(b"")
    assert app.start("../../etc/passwd", None, "experiments/concepts/rings", "S*", "shape", "10", 5, 1) == (
        "⚠ model path '../../etc/passwd' is outside the allowed folders (weights/, experiments/concepts/, runs/, "
        "outputs/); nothing was read or written"
    )
    assert app.start("weights/m.safetensors", None, None, "S*", "shape", "10", 5, 1) == (
        "⚠ drop 3–20 images or choose a concept folder"
    )
    assert app.start("weights/m.safetensors", None, "/etc", "S*", "shape", "10", 5, 1).startswith(
        "⚠ concept folder '/etc' is outside the allowed folders"
    )
    assert app.start("weights/m.safetensors", [str(p) for p in RINGS], None, "S*", "shape", "ten", 5, 1) == (
        "⚠ STEPS='ten' must be a whole number or auto"
    )
    assert not (ws.root / "runs" / "uploads").exists() and app.jobs.job is None
    assert app.resume("runs/../weights", "10", 5).startswith("⚠ run folder 'runs/../weights' is outside")


def test_formatting():
    assert [duration(s) for s in (None, 12.4, 125, 3720)] == ["—", "12 s", "2 min 05 s", "1 h 02 min"]
    assert number(" 7 ", int, "steps") == 7 and number("", float, "scale") is None
    with pytest.raises(UIError, match="steps='7.5' is not a whole number"):
        number("7.5", int, "steps")
    assert App.insert("a photo of", "S*") == "a photo of S*" and App.insert("", "S*") == "S*"


def test_status_text_names_step_rate_eta_and_loss(ws):
    from apps.jobs import Progress, Status

    st = Status(
        ws.root / "runs" / "a", "running", "training: step 40 of 100", Progress(40, 100, [(40, 0.0123)]), 2.0, 30.0
    )
    assert status_text(ws, st) == (
        "**training: step 40 of 100** — `runs/a`\n\nstep 40 / 100 · 2.0 steps/s · ETA 30 s · loss 0.0123"
    )


# --- generation --------------------------------------------------------------------------------------------

needs_shapes = pytest.mark.skipif(not SHAPES.is_file(), reason="weights/shapes.safetensors is not there")


@needs_shapes
def test_generate_saves_pngs_with_make_samples_parameters(tmp_path, one_thread):
    word = tmp_path / "w.safetensors"
    save_safetensors(diffusers_dict("<w>", torch.randn(1, 64)), word)
    gen = Generator("cpu")
    out = tmp_path / "samples"
    saved = gen.generate(SHAPES, [word], Request("a photo of <w>", "blurry", "ddim", 2, 2.5, 11, 2), out)
    model = gen.model
    assert [p.name for p, _ in saved] == ["00000-11.png", "00001-12.png"]
    h, name = gen.identity(SHAPES)
    want = infotext("a photo of <w>", "blurry", 2, "ddim", 2.5, 12, 32, 32, h, name)
    assert Image.open(saved[1][0]).text["parameters"] == want == saved[1][1]
    again = gen.generate(SHAPES, [], Request("a photo of a shape", steps=2, seed=11, count=1), out)
    assert gen.model is model and again[0][0].name == "00002-11.png"  # kept loaded, numbered on
    assert model.tokenizer.placeholders == {}  # the words of that request only
    with pytest.raises(UIError, match="count=17"):
        gen.generate(SHAPES, [], Request("x", count=17), out)
    wide = tmp_path / "wide.safetensors"
    save_safetensors(diffusers_dict("<v>", torch.randn(1, 768)), wide)
    with pytest.raises(UIError, match="768 wide"):
        gen.generate(SHAPES, [wide], Request("a photo of <v>", steps=1, count=1), out)


def test_a_word_in_two_files_is_refused(tmp_path):
    for name in ("a", "b"):
        save_safetensors(diffusers_dict("<w>", torch.randn(1, 64)), tmp_path / f"{name}.safetensors")
    with pytest.raises(UIError, match=r"<w> is in both a\.safetensors and b\.safetensors"):
        read_words([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])


def test_a_runs_base_model_is_named_only_inside_the_allowed_folders(tmp_path):
    import json

    from apps.ui import base_model

    ws = Workspace(ROOT)
    cases = [
        ({"model": "shapes"}, "weights/shapes.safetensors"),
        ({"ckpt": str(SHAPES)}, "weights/shapes.safetensors"),
        ({"model": "tiny"}, None),
        ({"ckpt": "/etc/passwd"}, None),
        ({}, None),
    ]
    for options, want in cases:
        (tmp_path / "args.json").write_text(json.dumps({"options": options}))
        assert base_model(ws, tmp_path) == want, options


# --- editing -----------------------------------------------------------------------------------------------


def ring_and_mask(tmp_path) -> tuple[Path, Path]:
    """A shapes-ring picture and a mask (white = edit) over its left half, drawn with PIL."""
    from PIL import ImageDraw

    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 15, 31), fill=255)
    mask.save(tmp_path / "mask.png")
    return RINGS[0], tmp_path / "mask.png"


@needs_shapes
def test_edit_saves_what_make_edit_saves(tmp_path, one_thread, capsys):
    """Same model, settings and seed: the page's PNGs are `make edit`'s, pixels and `parameters` text alike."""
    from apps import edit
    from ldm import cli

    word = tmp_path / "w.safetensors"
    save_safetensors(diffusers_dict("<w>", torch.randn(1, 64, generator=torch.Generator().manual_seed(0))), word)
    image, mask = ring_and_mask(tmp_path)
    gen = Generator("cpu")
    req = EditRequest("a photo of <w>", "blurry", "ddim", 4, 2.5, 5, 2, strength=0.5, mask_blur=2)
    saved = gen.edit(SHAPES, [word], req, image, mask, tmp_path / "edits")
    assert [p.name for p, _ in saved] == ["00000-5.png", "00001-6.png"]
    h, name = gen.identity(SHAPES)
    want = infotext(
        "a photo of <w>", "blurry", 4, "ddim", 2.5, 6, 32, 32, h, name, {"Denoising strength": 0.5, "Mask blur": 2}
    )
    assert Image.open(saved[1][0]).text["parameters"] == want == saved[1][1]
    assert want.endswith("Denoising strength: 0.5, Mask blur: 2")
    edited, original = (np.asarray(Image.open(p).convert("RGB")) for p in (saved[0][0], image))
    assert np.array_equal(edited[:, 16:], original[:, 16:]) and not np.array_equal(edited, original)
    code = cli.run(
        edit.main,
        [
            "--image",
            str(image),
            "--mask",
            str(mask),
            "--prompt",
            "a photo of <w>",
            "--neg",
            "blurry",
            "--embedding",
            str(word),
            "--ckpt",
            str(SHAPES),
            "--steps",
            "4",
            "--scale",
            "2.5",
            "--seed",
            "5",
            "--n",
            "2",
            "--strength",
            "0.5",
            "--mask-blur",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "cli"),
        ],
    )
    assert code == 0, capsys.readouterr().err
    for path, _ in saved:
        assert path.read_bytes() == (tmp_path / "cli" / path.name).read_bytes(), path.name
    again = gen.edit(
        SHAPES,
        [],
        EditRequest("a photo of a shape", steps=2, seed=3, count=1, strength=0.3),
        image,
        None,
        tmp_path / "edits",
    )
    text = Image.open(again[0][0]).text["parameters"]
    assert again[0][0].name == "00002-3.png" and text.endswith("Denoising strength: 0.3")  # no mask: no blur


@needs_shapes
def test_edit_refusals_are_one_line_messages_on_the_page(tmp_path, one_thread):
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "weights").symlink_to(SHAPES.parent)
    ws = Workspace(tmp_path / "ws")
    app = App(ws, JobManager(ws.root), Generator("cpu"))
    image, mask = ring_and_mask(tmp_path)
    notes = tmp_path / "gradio-tmp-9" / "notes.png"
    notes.parent.mkdir()
    notes.write_text("not pixels")
    Image.new("RGB", (32, 32)).save(tmp_path / "black.png")
    Image.new("RGB", (136, 64), "white").save(tmp_path / "big.png")

    def edit(image=image, mask=None, strength=0.75, prompt="a shape", blur=4):
        gallery, message = app.edit(
            "weights/shapes.safetensors",
            [],
            str(image) if image else None,
            str(mask) if mask else None,
            prompt,
            "",
            strength,
            "ddim",
            "2",
            "",
            1,
            1,
            blur,
        )
        assert gallery is None and "\n" not in message
        return message

    assert edit(image=None) == "⚠ upload an image to edit"
    assert edit(image=notes).startswith("⚠ image notes.png: not a readable image")
    assert "gradio-tmp-9" not in edit(image=notes)
    assert edit(mask=notes).startswith("⚠ mask notes.png: not a readable image")
    assert edit(mask=tmp_path / "black.png") == "⚠ MASK=black.png is empty (no white pixel): nothing to edit"
    assert edit(image=tmp_path / "big.png") == (
        "⚠ IMAGE=big.png is 136×64 px; this model (32 px) edits at most 128 px a side — downscale it first"
    )
    for bad in (0, 1.5, -0.2):
        assert edit(strength=bad) == f"⚠ STRENGTH={bad:g} must be in (0, 1\\] (1 = start from pure noise)"
    assert edit(blur=-1) == "⚠ MASK\\_BLUR=-1 must be 0 or more pixels"
    assert edit(prompt=" ") == "⚠ the prompt is empty"
    assert not (ws.root / "outputs" / "edits").exists()
    gallery, message = app.edit(
        "weights/shapes.safetensors", [], str(image), str(mask), "a shape", "", 0.6, "ddim", "2", "", 4, 2, 4
    )
    assert message == "✓ saved 2 image(s) in outputs/edits (masked edit)" and len(gallery) == 2
    assert gallery[1] == (
        str(ws.root / "outputs" / "edits" / "00001-5.png"),
        Image.open(gallery[1][0]).text["parameters"],
    )
    assert App.edit_upload(str(notes), "image")[0] is None
    assert App.edit_upload(str(tmp_path / "black.png"), "mask") == (
        None,
        "⚠ MASK=black.png is empty (no white pixel): nothing to edit",
    )
    assert App.edit_upload(str(image), "image") == (str(image), "✓ image ring-1-red-on-white.png: 32×32 px")
