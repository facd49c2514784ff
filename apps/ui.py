"""The local web app: teach a word from your pictures, watch it learn, use it (`make ui`).

    python -m apps.ui [--host 127.0.0.1] [--port 7860] [--root .] [--device auto]

Tabs: Train (the ordinary trainer as a child process writing an ordinary run folder, apps/jobs.py; the page
polls that folder once a second for the loss, the validation grids, step, rate and ETA), Generate (one model kept
loaded, apps/generate.py), Edit (image-to-image and masked editing as `make edit`, on the Generate tab's model and
learned words) and Embeddings (runs and embedding files: load into Generate, download, add a file).
Every typed path and uploaded file passes apps/workspace.py's guards. Job state lives in the server, so a second
tab shows the running job instead of starting another.

Offline: analytics off (GRADIO_ANALYTICS_ENABLED=False, set before gradio is imported), no share link, no
server-side rendering (no Node process), the theme's fonts served by the app itself; nothing is downloaded. It
listens on 127.0.0.1 unless --host says otherwise, with a warning then: there is no login, so whoever reaches the
port can train, generate and read the allowed folders.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import re
import signal
import sys
from pathlib import Path

from apps.edit import check_mask
from apps.generate import MAX_COUNT, EditRequest, Generator, Request, read_upload
from apps.jobs import JobManager, Status, check_options
from apps.sample import SAMPLER_NAMES
from apps.workspace import (
    MAX_IMAGE_BYTES,
    MAX_IMAGES,
    MIN_IMAGES,
    UIError,
    Workspace,
    check_images,
    read_embedding,
    run_options,
)
from inversion import models
from inversion.config import TrainConfig
from inversion.embedding import WIDTH_FAMILIES
from ldm import cli

log = logging.getLogger("apps.ui")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
STEPS_DEFAULT = "auto"  # the trainer's --steps: stop by itself (STEPS=auto), at most --max-steps
SAVE_EVERY_DEFAULT = 100
TOKEN_DEFAULT = "S*"
POLL_SECONDS = 1.0
PLOT_POINTS = 1000
OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "GRADIO_SSR_MODE": "False",
    "NO_PROXY": "127.0.0.1,localhost,::1",
    "no_proxy": "127.0.0.1,localhost,::1",
}


def duration(seconds: float | None) -> str:
    """12 s · 2 min 05 s · 1 h 02 min."""
    if seconds is None:
        return "—"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def status_text(ws: Workspace, st: Status) -> str:
    """The Train tab's status block: state, run, step of total, rate, ETA and the last loss."""
    if st.run is None:
        return f"**{plain(st.message)}**"
    p = st.progress
    parts = [f"step {p.step}" + (f" / {p.total}" if p.total else "")]
    if st.rate:
        parts += [f"{st.rate:.1f} steps/s", f"ETA {duration(st.eta)}"]
    if p.losses:
        parts.append(f"loss {p.losses[-1][1]:.4f}")
    return f"**{plain(st.message)}** — `{ws.show(st.run)}`\n\n" + " · ".join(parts)


def number(text: str | None, kind: type, name: str) -> int | float | None:
    """A typed number, None when blank (the model's default)."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        raise UIError(f"{name}={text!r} is not a {'whole ' if kind is int else ''}number") from None


def plain(text: str) -> str:
    """Text shown literally in a Markdown block: words like <cat> or S* are neither HTML nor emphasis."""
    return re.sub(r"([\\`*_\[\]#|~])", r"\\\1", html.escape(text, quote=False))


def note(text: str, ok: bool = True) -> str:
    return f"✓ {plain(text)}" if ok else f"⚠ {plain(text)}"


def base_model(ws: Workspace, run: Path) -> str | None:
    """The checkpoint a run was trained on, as the page names it, if it lies in the allowed folders."""
    options = run_options(run)
    ckpt = options.get("ckpt")
    try:
        if not ckpt and options.get("model") not in (None, "tiny"):
            ckpt = str(models.model_path(str(options["model"])))  # MODEL=sd15 … → its file in weights/
        return ws.show(ws.resolve(ckpt, "model")) if ckpt else None
    except (UIError, cli.UsageError):
        return None


class App:
    """The page's handlers, on one workspace, job manager and generator shared by every tab."""

    def __init__(self, ws: Workspace, jobs: JobManager, gen: Generator) -> None:
        self.ws, self.jobs, self.gen = ws, jobs, gen

    # --- Train ---------------------------------------------------------------------------------------------

    def model_path(self, model: str) -> Path:
        path = self.ws.resolve(model, "model path")
        if not path.exists():
            raise UIError(f"model {model!r}: no such file or folder")
        return path

    def check_uploads(self, uploads: list[str] | None) -> str:
        if not uploads:
            return ""
        try:
            return note(f"{len(check_images(uploads))} images ready")
        except UIError as e:
            return note(str(e), ok=False)

    def start(
        self,
        model: str,
        uploads: list[str] | None,
        concept: str | None,
        token: str,
        init: str,
        steps: str,
        save_every: float | None,
        vectors: float | None,
    ) -> str:
        try:
            self.jobs.ensure_free()
            ckpt = self.model_path(model)
            token = (token or "").strip() or TOKEN_DEFAULT
            run = self.ws.new_run(token)
            if uploads:
                folder = self.ws.folders["runs"] / "uploads" / run.name
            elif concept:
                folder = self.ws.resolve(concept, "concept folder", ("experiments/concepts", "runs", "outputs"))
                if not folder.is_dir():
                    raise UIError(f"concept folder {concept!r} does not exist")
            else:
                raise UIError(f"drop {MIN_IMAGES}–{MAX_IMAGES} images or choose a concept folder")
            argv = [
                "--concept",
                str(folder),
                "--ckpt",
                str(ckpt),
                "--token",
                token,
                "--init",
                (init or "").strip(),
                "--steps",
                str(steps).strip(),
                "--save-every",
                str(int(save_every or SAVE_EVERY_DEFAULT)),
                "--vectors",
                str(int(vectors or 1)),
                "--out",
                str(run),
            ]
            check_options(argv)
            if uploads:
                argv[1] = str(self.ws.keep_images(uploads, run))
            self.jobs.start(run, argv)
            return note(f"started {self.ws.show(run)}")
        except UIError as e:
            return note(str(e), ok=False)

    def resume(self, run_text: str | None, steps: str, save_every: float | None) -> str:
        try:
            run = self.ws.resolve(run_text or "", "run folder", ("runs",))
            if not (run / "args.json").is_file():
                raise UIError(f"{run_text!r} is not a training run (no args.json)")
            self.jobs.start(
                run,
                [
                    "--resume",
                    str(run),
                    "--steps",
                    str(steps).strip(),
                    "--save-every",
                    str(int(save_every or SAVE_EVERY_DEFAULT)),
                ],
            )
            return note(f"resumed {self.ws.show(run)}")
        except UIError as e:
            return note(str(e), ok=False)

    def stop(self) -> str:
        try:
            return note(self.jobs.stop())
        except UIError as e:
            return note(str(e), ok=False)

    def poll(self, seen: dict):
        """One timer tick: every output that changed since this tab's last tick (gr.skip() for the others)."""
        import gradio as gr
        import pandas as pd

        st = self.jobs.status()
        p = st.progress
        key = (str(st.run), p.step)
        plot = gr.skip()
        if key != seen.get("plot"):
            rows = p.losses[:: max(1, len(p.losses) // PLOT_POINTS)]
            plot = pd.DataFrame(
                {
                    "step": pd.Series([r[0] for r in rows], dtype="int64"),
                    "loss": pd.Series([r[1] for r in rows], dtype="float64"),
                }
            )
        grid = gr.skip()
        if p.grid is not None and (str(p.grid), p.grid_step) != seen.get("grid"):
            grid = gr.update(value=str(p.grid), label=f"validation grid, step {p.grid_step}")
        run = gr.skip()
        if st.run is not None and str(st.run) != seen.get("run"):
            run = gr.update(choices=self.run_choices(), value=self.ws.show(st.run))
        busy = st.state in ("running", "stopping")
        buttons = [
            gr.update(interactive=not busy),
            gr.update(interactive=st.state == "running"),
            gr.update(interactive=not busy),
        ]
        seen = {"plot": key, "grid": (str(p.grid), p.grid_step), "run": str(st.run)}
        return [status_text(self.ws, st), plot, grid, st.log, run, *buttons, seen]

    def run_choices(self) -> list[str]:
        return [self.ws.show(r) for r in self.ws.runs()]

    # --- Generate ------------------------------------------------------------------------------------------

    def generate(
        self,
        model: str,
        loaded: list[str],
        prompt: str,
        negative: str,
        sampler: str,
        steps: str,
        scale: str,
        seed: float | None,
        count: float,
    ):
        try:
            files = [self.ws.resolve(f, "embedding file") for f in loaded]
            req = Request(
                prompt or "",
                negative or "",
                sampler,
                number(steps, int, "steps"),
                number(scale, float, "scale"),
                -1 if seed is None else int(seed),
                int(count),
            )
            saved = self.gen.generate(self.model_path(model), files, req, self.ws.folders["outputs"] / "samples")
            where = self.ws.show(saved[0][0].parent)
            return [(str(path), params) for path, params in saved], note(f"saved {len(saved)} image(s) in {where}")
        except UIError as e:
            return None, note(str(e), ok=False)

    # --- Edit ----------------------------------------------------------------------------------------------

    def edit(
        self,
        model: str,
        loaded: list[str],
        image: str | None,
        mask: str | None,
        prompt: str,
        negative: str,
        strength: float | None,
        sampler: str,
        steps: str,
        scale: str,
        seed: float | None,
        count: float,
        mask_blur: float | None,
    ):
        """Edit the uploaded image with the Generate tab's model and words; (gallery, message)."""
        try:
            if not image:
                raise UIError("upload an image to edit")
            files = [self.ws.resolve(f, "embedding file") for f in loaded]
            req = EditRequest(
                prompt or "",
                negative or "",
                sampler,
                number(steps, int, "steps"),
                number(scale, float, "scale"),
                -1 if seed is None else int(seed),
                int(count),
                float(0 if strength is None else strength),
                int(mask_blur or 0),
            )
            saved = self.gen.edit(
                self.model_path(model),
                files,
                req,
                Path(image),
                Path(mask) if mask else None,
                self.ws.folders["outputs"] / "edits",
            )
            where = self.ws.show(saved[0][0].parent)
            kind = "masked edit" if "Mask blur: " in saved[0][1].rsplit("\n", 1)[-1] else "image-to-image"
            return (
                [(str(path), params) for path, params in saved],
                note(f"saved {len(saved)} image(s) in {where} ({kind})"),
            )
        except UIError as e:
            return None, note(str(e), ok=False)

    @staticmethod
    def edit_upload(upload: str | None, what: str):
        """An Edit upload checked at once (a mask must hold white): (preview, message); a refused file shows no
        preview."""
        if not upload:
            return None, ""
        try:
            image = read_upload(upload, what)
            if what == "mask":
                check_mask(image, 0, Path(upload).name)
            return upload, note(f"{what} {Path(upload).name}: {image.size[0]}×{image.size[1]} px")
        except (UIError, cli.UsageError) as e:
            return None, note(str(e), ok=False)

    def edit_view(self, model: str | None, loaded: list[str]):
        """(markdown naming the Generate tab's model and words, the insert dropdown) for Edit."""
        text, words = self.words_view(loaded)
        return f"Model and words of the Generate tab: `{model or '—'}`\n\n{text}", words

    @staticmethod
    def insert(prompt: str, word: str | None) -> str:
        if not word:
            return prompt
        return f"{prompt.rstrip()} {word}".strip() if prompt else word

    # --- Embeddings ----------------------------------------------------------------------------------------

    def table(self) -> list[list[str]]:
        rows = []
        for f in self.ws.embedding_files():
            run = f.parent if (f.parent / "args.json").is_file() else None
            trained_on = (base_model(self.ws, run) or run_options(run).get("model") or "") if run else ""
            try:
                words = read_embedding(f)
                width = next(iter(words.values())).shape[1]
                names = ", ".join(f"{w} ({v.shape[0]} vector{'s' if v.shape[0] > 1 else ''})" for w, v in words.items())
                rows.append([self.ws.show(f), names, f"{width} ({WIDTH_FAMILIES.get(width, 'other')})", trained_on])
            except UIError as e:
                rows.append([self.ws.show(f), f"unreadable: {e}", "", trained_on])
        return rows

    def load_word(self, choice: str | None, loaded: list[str], model: str):
        """Add an embedding file to this tab's Generate words; a run's file also selects the run's base model."""
        try:
            path = self.ws.resolve(choice or "", "embedding file")
            words = read_embedding(path)
            shown = self.ws.show(path)
            loaded = [f for f in loaded if f != shown] + [shown]
            run_model = base_model(self.ws, path.parent) if (path.parent / "args.json").is_file() else None
            return (
                loaded,
                *self.words_view(loaded),
                run_model or model,
                note(f"loaded {', '.join(words)} from {shown} into Generate"),
            )
        except UIError as e:
            return (loaded, *self.words_view(loaded), model, note(str(e), ok=False))

    def words_view(self, loaded: list[str]):
        """(markdown listing the loaded words, the insert dropdown) for Generate."""
        import gradio as gr

        words, lines = [], []
        for f in loaded:
            try:
                names = list(read_embedding(self.ws.resolve(f, "embedding file")))
            except UIError as e:
                lines.append(f"- `{f}`: {plain(str(e))}")
                continue
            words += names
            lines.append(f"- {', '.join(f'**{plain(w)}**' for w in names)} — `{f}`")
        text = "Learned words:\n" + "\n".join(lines) if lines else "No learned words loaded (Embeddings tab)."
        return text, gr.update(choices=words, value=words[-1] if words else None)

    def add_file(self, upload: str | None):
        if not upload:
            return self.table(), self.embedding_choices(), ""
        try:
            path, words = self.ws.keep_embedding(upload)
            message = note(f"kept {', '.join(words)} in {self.ws.show(path)}")
        except UIError as e:
            message = note(str(e), ok=False)
        return self.table(), self.embedding_choices(), message

    def embedding_choices(self):
        import gradio as gr

        return gr.update(choices=[self.ws.show(f) for f in self.ws.embedding_files()])

    def download(self, choice: str | None):
        """A run's learned_embeds.safetensors (or the chosen file itself) for the download button."""
        import gradio as gr

        try:
            path = self.ws.resolve(choice or "", "embedding file")
        except UIError:
            return gr.update(value=None, interactive=False)
        target = path.parent / "learned_embeds.safetensors" if (path.parent / "args.json").is_file() else path
        return gr.update(
            value=str(target) if target.is_file() else None,
            interactive=target.is_file(),
            label=f"Download {target.name}",
        )


def build(app: App):
    """The gradio Blocks of the four tabs."""
    from apps.layout import layout

    return layout(
        app,
        defaults={
            "steps": STEPS_DEFAULT,
            "save_every": SAVE_EVERY_DEFAULT,
            "token": TOKEN_DEFAULT,
            "init": TrainConfig.init,
            "max_count": MAX_COUNT,
            "samplers": list(SAMPLER_NAMES),
            "strength": EditRequest.strength,
            "mask_blur": EditRequest.mask_blur,
            "poll": POLL_SECONDS,
        },
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m apps.ui", description="The local web app (make ui).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (HOST=; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (PORT=; default 7860)")
    p.add_argument("--root", default=".", help="workspace holding weights/, experiments/concepts/, runs/, outputs/")
    p.add_argument("--device", default="auto", help="device for Generate: auto | cpu | cuda | mps (DEVICE=)")
    return p.parse_args(argv)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=os.environ.get("ONEWORD_LOG", "INFO"), format="%(levelname)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not 1 <= args.port <= 65535:
        print(f"error: PORT={args.port} must be between 1 and 65535", file=sys.stderr)
        return 2
    for k, v in OFFLINE_ENV.items():
        os.environ[k] = v
    try:
        import gradio as gr  # noqa: F401
    except ImportError:
        print("error: the web app needs gradio: run `make ui`, or pip install -e '.[ui]'", file=sys.stderr)
        return 2
    ws = Workspace(args.root)
    if args.host not in LOCAL_HOSTS:
        log.warning(
            "HOST=%s: listening beyond this machine; there is no login, so anyone who reaches port %d "
            "can train, generate and read weights/, experiments/concepts/, runs/ and outputs/",
            args.host,
            args.port,
        )
    jobs = JobManager(ws.root)
    try:
        gen = Generator(args.device)
    except Exception as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from apps.layout import CSS

    demo = build(App(ws, jobs, gen))
    signal.signal(signal.SIGTERM, _terminate)
    for name in ("runs", "outputs"):
        ws.folders[name].mkdir(parents=True, exist_ok=True)
    try:
        demo.queue(default_concurrency_limit=1).launch(
            server_name=args.host,
            server_port=args.port,
            share=False,
            ssr_mode=False,
            pwa=False,
            mcp_server=False,
            enable_monitoring=False,
            max_file_size=MAX_IMAGE_BYTES,
            footer_links=[],
            quiet=True,
            css=CSS,
            prevent_thread_lock=True,
            allowed_paths=[str(ws.folders["runs"]), str(ws.folders["outputs"])],
        )
        host = f"[{args.host}]" if ":" in args.host else args.host
        log.info("oneword web app on http://%s:%d (workspace %s); Ctrl-C stops it", host, args.port, ws.root)
        demo.block_thread()
    except OSError as e:
        reason = str(e).split(". ")[0]
        print(
            f"error: cannot listen on {args.host}:{args.port} ({reason}); choose another PORT or HOST", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        jobs.shutdown()
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
