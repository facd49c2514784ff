"""The web app in a real browser: headless Debian Chromium (/usr/bin/chromium) driven by Playwright's Python
package, pointed at that executable (no browser is ever downloaded).

The server (`python -m apps.ui`) runs on a free loopback port over a temporary workspace whose weights/ and
experiments/concepts/ link to the repository's, and is always shut down. One end-to-end test teaches <ring> to the
shipped shapes model from the uploaded ring images: the loss plot redraws while it trains, a validation grid
appears, a second tab shows the same job and is refused a second one, Stop saves (state.pt) and Resume finishes
the run; the Embeddings tab lists the run, downloads its learned_embeds.safetensors and loads the word into
Generate, which draws with it and saves PNGs with `make sample`'s parameters. Another test checks that a
non-image upload and a path-traversal attempt are each answered on the page. An edit round trip uploads a ring
picture and a mask drawn here, is refused a non-image, an empty mask and strength 0 on the page, then edits and
sees the gallery and `make edit`'s img2img parameters. No request may leave the machine.
Screenshots of the four tabs go to a temporary folder, or to docs/ with ONEWORD_UI_SCREENSHOTS=docs.
Without gradio, Playwright or Chromium the tests are skipped, naming what is missing.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RINGS = sorted((ROOT / "experiments" / "concepts" / "shapes-ring").glob("*.png"))
WAIT_MS = 60_000
# a pickle that would call os.system("touch pwned") when loaded without weights_only
PICKLE_RUNNING_CODE = b"cos\nsystem\n(S'touch pwned'\ntR."

pytestmark = pytest.mark.slow


def missing() -> str | None:
    try:
        import gradio  # noqa: F401
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        return f"the browser test needs gradio and playwright (pip install -e '.[ui,test]'): {e}"
    if not CHROMIUM.is_file():
        return f"the browser test needs Debian's chromium at {CHROMIUM} (apt-get install chromium)"
    if not (ROOT / "weights" / "shapes.safetensors").is_file():
        return "weights/shapes.safetensors is not there (make pretrain-shapes)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reason = missing()
    if reason:
        pytest.skip(reason)
    ws = tmp_path_factory.mktemp("ws")
    (ws / "experiments").mkdir()
    (ws / "weights").symlink_to(ROOT / "weights")
    (ws / "experiments" / "concepts").symlink_to(ROOT / "experiments" / "concepts")
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
        GRADIO_TEMP_DIR=str(ws / ".gradio"),
    )
    log = open(ws / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "apps.ui", "--port", str(port), "--root", str(ws)],
        cwd=ws,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (ws / "server.log").read_text()
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not answer within 90 s"
            time.sleep(0.5)
        yield url, ws
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
            accept_downloads=True,
        )
        outside: list[str] = []
        local = server[0].rstrip("/")

        def route(r):
            if r.request.url.startswith((local, "data:", "blob:")):
                r.continue_()
            else:
                outside.append(r.request.url)
                r.abort()

        context.route("**/*", route)
        context.outside = outside
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(server, browser):
    page = browser.new_page()
    page.goto(server[0])
    page.wait_for_selector("#train-start", timeout=WAIT_MS)
    yield page
    page.close()
    assert browser.outside == [], f"the page asked for something beyond this machine: {browser.outside[:5]}"


def shots_dir(tmp_path: Path) -> Path:
    return ROOT / "docs" if os.environ.get("ONEWORD_UI_SCREENSHOTS") == "docs" else tmp_path


def text_of(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def fill(page, elem: str, value: str) -> None:
    box = page.locator(f"#{elem} input, #{elem} textarea").first
    box.fill(value)
    box.press("Tab")


def choose(page, elem: str, value: str) -> None:
    box = page.locator(f"#{elem} input").first
    box.fill(value)
    box.press("Enter")
    box.press("Tab")


def wait_text(page, selector: str, pattern: str, timeout: int = WAIT_MS) -> re.Match:
    """Wait until the element's text matches `pattern`; the match."""
    from playwright.sync_api import expect

    expect(page.locator(selector)).to_contain_text(re.compile(pattern), timeout=timeout)
    m = re.search(pattern, text_of(page, selector))
    assert m, text_of(page, selector)
    return m


def plot_line(page) -> str:
    """The `d` attribute of the loss plot's line (empty while there is none)."""
    line = page.locator("#train-plot .mark-line path")
    return line.first.get_attribute("d") or "" if line.count() else ""


def test_refusals_answered_on_the_page(server, page, tmp_path):
    """A non-image among the uploads and a model path leaving the allowed folders: one line each, nothing runs."""
    fake = tmp_path / "notes.png"
    fake.write_text("these are notes, not pixels")
    page.locator("#train-images input[type=file]").set_input_files([str(fake), *map(str, RINGS[:3])])
    wait_text(page, "#train-message", r"notes\.png: not a readable image")
    page.locator("#train-images button[aria-label=Clear]").click()
    choose(page, "train-model", "../../../etc/passwd")
    page.locator("#train-start").click()
    wait_text(page, "#train-message", r"'\.\./\.\./\.\./etc/passwd' is outside the allowed folders")
    assert not list((server[1] / "runs").glob("*/args.json"))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(PICKLE_RUNNING_CODE)
    page.get_by_role("tab", name="Embeddings").click()
    page.locator("#emb-upload input[type=file]").set_input_files([str(evil)])
    wait_text(page, "#emb-message", r"evil\.pt: not a readable embedding file \(it holds pickled Python code")
    assert not (server[1] / "outputs" / "embeddings").exists()


def test_train_stop_resume_generate(server, page, browser, tmp_path):
    from playwright.sync_api import expect

    url, ws = server
    shots = shots_dir(tmp_path)
    page.locator("#train-images input[type=file]").set_input_files([str(p) for p in RINGS])
    wait_text(page, "#train-message", rf"{len(RINGS)} images ready")
    fill(page, "train-token", "<ring>")
    fill(page, "train-init", "shape")
    fill(page, "train-steps", "3000")
    page.get_by_text("More options").click()
    fill(page, "train-save-every", "10")
    page.locator("#train-start").click()
    run_name = wait_text(page, "#train-message", r"started runs/(\S+)").group(1)
    run = ws / "runs" / run_name

    # live: the step moves, the loss line redraws, a validation grid appears
    first = int(wait_text(page, "#train-status", r"step ([1-9]\d*) / 3000").group(1))
    line = plot_line(page)
    wait_text(page, "#train-status", rf"step (?!{first}\b)\d+ / 3000 · [\d.]+ steps/s · ETA")
    page.wait_for_function(
        "d => { const p = document.querySelector('#train-plot .mark-line path');"
        " return p && p.getAttribute('d') !== d; }",
        arg=line,
        timeout=WAIT_MS,
    )
    wait_text(page, "#train-grid", r"validation grid, step \d+")

    # a second tab sees this job, and its Start is off while the job runs
    other = browser.new_page()
    other.goto(url)
    wait_text(other, "#train-status", rf"training: step \d+ of 3000 — runs/{re.escape(run_name)}")
    expect(other.locator("#train-start")).to_be_disabled()
    expect(other.locator("#train-stop")).to_be_enabled()
    other.close()

    # Stop saves like Ctrl-C; Resume continues to a new step count
    page.locator("#train-stop").click()
    stopped = int(wait_text(page, "#train-status", r"stopped at step (\d+) of 3000").group(1))
    assert (run / "state.pt").is_file() and (run / "learned_embeds.safetensors").is_file()
    rows = (run / "loss.csv").read_text().split()
    assert len(rows) == stopped + 1 and rows[-1].startswith(f"{stopped},")
    fill(page, "train-steps", str(stopped + 5))
    page.locator("#train-resume").click()
    wait_text(page, "#train-status", rf"finished: {stopped + 5} steps")
    assert (run / "loss.csv").read_text().split()[-1].startswith(f"{stopped + 5},")
    page.screenshot(path=str(shots / "ui-train.png"), full_page=True)

    # Embeddings: the run's files are listed; download one, load the word into Generate
    page.get_by_role("tab", name="Embeddings").click()  # opening the tab lists the new run's files
    wait_text(page, "#emb-table", re.escape(f"runs/{run_name}/learned_embeds.safetensors"))
    choose(page, "emb-pick", f"runs/{run_name}/learned_embeds.safetensors")
    download_button = page.locator("#emb-download")
    page.wait_for_function("() => !document.querySelector('#emb-download').disabled", timeout=WAIT_MS)
    with page.expect_download() as got:
        download_button.click()
    saved = tmp_path / "download.safetensors"
    got.value.save_as(saved)
    assert saved.read_bytes() == (run / "learned_embeds.safetensors").read_bytes()
    page.locator("#emb-load").click()
    wait_text(page, "#emb-message", r"loaded <ring> from")
    page.locator("#emb-pick input").press("Escape")
    page.locator("h2").first.click()
    page.wait_for_timeout(300)
    page.screenshot(path=str(shots / "ui-embeddings.png"), full_page=True)

    # Generate with the word: insert it, draw two images, the PNGs carry make sample's parameters
    page.get_by_role("tab", name="Generate").click()
    wait_text(page, "#gen-words", r"<ring>")
    fill(page, "gen-prompt", "a photo of")
    page.locator("#gen-insert").click()
    page.wait_for_function(
        "() => document.querySelector('#gen-prompt textarea').value === 'a photo of <ring>'", timeout=WAIT_MS
    )
    fill(page, "gen-steps", "10")
    fill(page, "gen-seed", "7")
    fill(page, "gen-count", "2")
    page.locator("#gen-go").click()
    wait_text(page, "#gen-message", r"saved 2 image\(s\) in outputs/samples")
    assert page.locator("#gen-gallery img").count() >= 2
    pngs = sorted((ws / "outputs" / "samples").glob("*.png"))
    assert [p.name for p in pngs] == ["00000-7.png", "00001-8.png"]
    params = Image.open(pngs[1]).text["parameters"]
    assert params.startswith("a photo of <ring>\nSteps: 10, Sampler: DDIM, CFG scale: 3, Seed: 8, Size: 32x32")
    page.screenshot(path=str(shots / "ui-generate.png"), full_page=True)

    # Edit shares the model and the loaded word, insertable there too
    page.get_by_role("tab", name="Edit").click()
    wait_text(page, "#edit-using", r"weights/shapes\.safetensors[\s\S]*<ring>")
    fill(page, "edit-prompt", "a photo of")
    page.locator("#edit-insert").click()
    page.wait_for_function(
        "() => document.querySelector('#edit-prompt textarea').value === 'a photo of <ring>'", timeout=WAIT_MS
    )


def test_edit_round_trip(server, page, tmp_path):
    from PIL import ImageDraw

    ws = server[1]
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).ellipse((4, 4, 20, 20), fill=255)
    mask.save(tmp_path / "mask.png")
    Image.new("L", (32, 32), 0).save(tmp_path / "black.png")
    fake = tmp_path / "notes.png"
    fake.write_text("these are notes, not pixels")
    page.get_by_role("tab", name="Edit").click()
    wait_text(page, "#edit-using", r"weights/shapes\.safetensors")
    page.locator("#edit-image input[type=file]").set_input_files([str(fake)])
    wait_text(page, "#edit-message", r"image notes\.png: not a readable image")
    page.locator("#edit-image button[aria-label=Clear]").click()
    page.locator("#edit-image input[type=file]").set_input_files([str(RINGS[0])])
    wait_text(page, "#edit-message", rf"image {re.escape(RINGS[0].name)}: 32×32 px")
    page.locator("#edit-mask input[type=file]").set_input_files([str(tmp_path / "black.png")])
    wait_text(page, "#edit-message", r"MASK=black\.png is empty \(no white pixel\)")
    page.locator("#edit-mask button[aria-label=Clear]").click()
    page.locator("#edit-mask input[type=file]").set_input_files([str(tmp_path / "mask.png")])
    wait_text(page, "#edit-message", r"mask mask\.png: 32×32 px")
    fill(page, "edit-prompt", "a photo of a shape")
    fill(page, "edit-steps", "10")
    fill(page, "edit-seed", "3")
    fill(page, "edit-count", "2")
    fill(page, "edit-strength", "0")
    page.locator("#edit-go").click()
    wait_text(page, "#edit-message", r"STRENGTH=0 must be in \(0, 1\]")
    assert not (ws / "outputs" / "edits").exists()
    fill(page, "edit-strength", "0.8")
    page.locator("#edit-go").click()
    wait_text(page, "#edit-message", r"saved 2 image\(s\) in outputs/edits \(masked edit\)")
    assert page.locator("#edit-gallery img").count() >= 2
    pngs = sorted((ws / "outputs" / "edits").glob("*.png"))
    assert [p.name for p in pngs] == ["00000-3.png", "00001-4.png"]
    params = Image.open(pngs[1]).text["parameters"]
    assert params.startswith("a photo of a shape\nSteps: 10, Sampler: DDIM, CFG scale: 3, Seed: 4, Size: 32x32")
    assert params.endswith("Denoising strength: 0.8, Mask blur: 4")
    page.screenshot(path=str(shots_dir(tmp_path) / "ui-edit.png"), full_page=True)
