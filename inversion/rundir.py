"""The run folder: every file a training run writes, and how evaluation, curation and figures read a run back.

    args.json                   {"options": the TrainConfig, "lr", "world_size", "model", "token_ids", …}
    embeddings.pt               official textual_inversion file (latest save)
    learned_embeds.safetensors  diffusers file (latest save)
    <token>.pt                  AUTOMATIC1111 file, e.g. cat.pt for <cat> (latest save)
    steps/…-step<N>.*           the three files of every save
    samples/val-step<N>.png     validation grids
    loss.csv, loss.png          per-step loss log, and its plot at the end
    state.pt                    RESUME state: vectors, optimiser, scaler, step, counters, every RNG state
    stop.json                   STEPS=auto: where and why the run stopped, with the objective's history
    init_search.json            --init-search: the words measured, the one chosen, the image-passes it cost

Every file is written atomically (temp file + rename, see `atomic_write`); a kill leaves the previous version,
and the temp files of an interrupted save are removed when the run resumes.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

from inversion import initsearch
from inversion.embedding import (
    InversionError,
    LearnedWords,
    atomic_write,
    file_stem,
    load_failure,
    save_embedding_files,
    save_torch,
)
from ldm import cli
from ldm.images import image_grid

log = logging.getLogger(__name__)

EMBEDDING_FILES = ("embeddings.pt", "learned_embeds.safetensors")
RUN_FILES = (*EMBEDDING_FILES, "args.json", "loss.csv", "loss.png", "state.pt", "stop.json", initsearch.FILE)
STEP_FILE = r".+-step\d+\.(pt|safetensors)"  # steps/: the three files of every save
GRID_FILE = r"val-step\d+\.png"  # samples/: validation grids
TEMP_FILE = r"\..+\.[A-Za-z0-9_]+\.tmp"  # atomic_write's `.<name>.<random>.tmp`
STATE_KEYS = {"vectors", "optimizer", "scaler", "step", "skipped", "bad_in_row", "rng"}
LossRow = tuple[int, float, float, int]  # step, loss, lr, skipped so far


# --- RNG state (plain tensors and numbers, so state.pt loads with weights_only) ------------------------------


def rng_state() -> dict:
    """Every global RNG as plain tensors and numbers, so state.pt loads with weights_only (no pickled code)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# what older state.pt files hold besides tensors: NumPy's RNG key array (rebuilt as data, no code runs)
_NUMPY_GLOBALS = [
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct,
]


def load_state(path: Path) -> dict:
    """The RESUME state, read with weights_only: a state.pt crafted to run code is refused, not executed."""
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InversionError(f"{path}: unreadable resume state ({load_failure(e)}); start a new run") from None
    have = set(st) if isinstance(st, dict) else set()
    if STATE_KEYS - have or not isinstance(st["vectors"], torch.Tensor) or not isinstance(st["step"], int):
        raise InversionError(f"{path}: not a resume state of this tool (missing or wrong {sorted(STATE_KEYS - have)})")
    return st


# --- the loss log ----------------------------------------------------------------------------------------------


def write_loss_csv(path: Path, rows: list[LossRow]) -> None:
    def write(f):
        f.write(b"step,loss,lr,skipped\n")
        f.write("".join(f"{s},{v:.6g},{lr:.6g},{sk}\n" for s, v, lr, sk in rows).encode())

    atomic_write(path, write)


def read_loss_csv(path: Path, upto: int) -> list[LossRow]:
    """Rows with step ≤ upto; a line cut short by a kill is ignored."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                rows.append((int(r["step"]), float(r["loss"]), float(r["lr"]), int(r["skipped"])))
            except (TypeError, ValueError):
                continue
    return [r for r in rows if r[0] <= upto]


def plot_loss(rows: list[LossRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r[0] for r in rows])
    loss = np.array([r[1] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.6, alpha=0.5, label="loss")
    if len(loss) >= 10:
        w = max(5, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, lw=1.5, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


# --- the folder ------------------------------------------------------------------------------------------------


class RunDir:
    """One training run's folder: creation, the files of a save, the loss log, validation grids, reading back."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def state_path(self) -> Path:
        return self.path / "state.pt"

    @property
    def loss_path(self) -> Path:
        return self.path / "loss.csv"

    @classmethod
    def create(cls, out: str | None, concept: Path, resume: bool, overwrite: bool) -> RunDir:
        """The run's folder (default runs/<concept>-<time>): new and empty unless RESUME or --overwrite."""
        path = Path(out) if out else Path("runs") / f"{concept.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if not resume and path.is_dir() and any(path.iterdir()) and not overwrite:
            raise InversionError(
                f"OUT={path} already holds files; choose another OUT, pass --overwrite, "
                f"or continue it with RESUME={path}"
            )
        cli.check_writable(path)
        run = cls(path)
        if resume:
            run.remove_stale_temp_files()
        elif path.is_dir():
            run.remove_earlier_run()
        return run

    # -- reading a run back ----------------------------------------------------------------------------------

    def options(self) -> dict:
        """The trainer's options from args.json ({} when absent)."""
        path = self.path / "args.json"
        if not path.is_file():
            return {}
        try:
            return dict(json.loads(path.read_text()).get("options", {}))
        except (json.JSONDecodeError, AttributeError) as e:
            raise InversionError(f"{path} is not the trainer's args.json ({e})") from None

    def embedding_file(self) -> Path:
        """The learned-word file: the official embeddings.pt (all words), else the diffusers file."""
        if not self.path.is_dir():
            raise InversionError(f"RUN={self.path}: no such run directory")
        for name in EMBEDDING_FILES:
            if (self.path / name).is_file():
                return self.path / name
        raise InversionError(
            f"RUN={self.path} holds no learned embedding ({' or '.join(EMBEDDING_FILES)}); "
            f"train one first with `make train CONCEPT=… OUT={self.path}`"
        )

    # -- writing ---------------------------------------------------------------------------------------------

    def _remove(self, folder: str, pattern: str) -> None:
        """Delete the files in `folder` (relative to the run) whose whole name matches `pattern`."""
        where = self.path / folder
        for f in where.iterdir() if where.is_dir() else []:
            if f.is_file() and re.fullmatch(pattern, f.name):
                f.unlink(missing_ok=True)
                log.debug("removed %s", f)

    def remove_stale_temp_files(self) -> None:
        """Delete the temp files of saves that a kill interrupted (atomic_write's `.<name>.<random>.tmp`)."""
        for folder in (".", "steps", "samples"):
            self._remove(folder, TEMP_FILE)

    def remove_earlier_run(self) -> None:
        """--overwrite: delete the files an earlier run wrote here (those listed above, by their names, and its
        interrupted saves), so that none of its step copies, grids, logs or stop record reads as the new run's; any
        other file is left alone."""
        try:
            token = self.options().get("token")
        except InversionError:  # an unreadable args.json is replaced like the rest
            token = None
        for name in [*RUN_FILES, *([f"{file_stem(token)}.pt"] if token else [])]:
            (self.path / name).unlink(missing_ok=True)
        self._remove("steps", STEP_FILE)
        self._remove("samples", GRID_FILE)
        self.remove_stale_temp_files()

    def write_json(self, name: str, obj: dict) -> Path:
        return atomic_write(self.path / name, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))

    def save(self, words: LearnedWords, step: int, state: dict, checkpoint: tuple[str | None, str | None]) -> None:
        """The three embedding files (latest and step copies) and state.pt."""
        save_embedding_files(self.path / "steps", words, step, *checkpoint, suffix=f"-step{step}")
        save_embedding_files(self.path, words, step, *checkpoint)
        save_torch(state, self.state_path)

    def open_loss_log(self, rows: list[LossRow]):
        """Rewrite loss.csv with `rows` (a resumed run drops rows after its state), then append line by line."""
        write_loss_csv(self.loss_path, rows)
        return open(self.loss_path, "a", buffering=1)

    def validation_grid(
        self, model, words: LearnedWords, prompts: list[str], n: int, steps: int, size: int, seed: int, step: int
    ) -> Path:
        """Rows of n samples for each prompt (S* = the word) with the current vectors: samples/val-step<N>.png."""
        model.extra_embeddings = words.vectors.detach().to(model.dtype)
        try:
            rows = [
                model.sample(
                    [p.replace("S*", words.token)] * n,
                    steps=steps,
                    scale=model.config.guidance,
                    seed=seed,
                    height=size,
                    width=size,
                    progress=False,
                )
                for p in prompts
            ]
        finally:
            model.extra_embeddings = None
        grid = image_grid([im for row in rows for im in row], cols=n)
        return atomic_write(self.path / "samples" / f"val-step{step}.png", lambda f: grid.save(f, format="PNG"))
