"""One training job at a time: the ordinary trainer as a child process, watched through its run folder.

A job is `python -m inversion.train …`, started by `JobManager.start` and refused while another runs, whichever
browser tab asks: the manager lives in the server (one per process), so every tab shows the same job. The job
writes an ordinary run folder — the files of `make train`, nothing else — and progress is read back from it:
loss.csv (loss plot and step), args.json (total steps), samples/val-step<N>.png (the newest validation grid).
Rate and ETA come from how the step moved over the last RATE_WINDOW seconds of polls.

Stop sends SIGINT, which the trainer takes as Ctrl-C: it finishes the step, saves (state.pt and the embedding
files) and exits 0; resuming starts `--resume RUN`. Options are checked with the trainer's own `TrainConfig.from_argv`
before a process starts, so a bad value is one line on the page. The trainer's output is kept in memory (the
last LOG_LINES lines), not in the run folder. On shutdown a running job is stopped the same way and waited for.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from apps.workspace import UIError, run_options
from inversion.config import TrainConfig
from inversion.embedding import InversionError
from inversion.rundir import read_loss_csv
from ldm import cli

log = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parent.parent  # the checkout whose inversion/ and ldm/ the trainer runs
LOG_LINES = 300
RATE_WINDOW = 30.0
STOP_WAIT = 120.0


class Busy(UIError):
    """A second job was asked for while one runs."""


@dataclass
class Progress:
    """What a run folder says about its training: steps done, the loss per step, the newest validation grid."""

    step: int = 0
    total: int | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    grid: Path | None = None
    grid_step: int | None = None


def read_progress(run: Path) -> Progress:
    rows = read_loss_csv(run / "loss.csv", 2**62)
    total = run_options(run).get("steps")
    grids = [
        (int(m.group(1)), p)
        for p in (run / "samples").glob("val-step*.png")
        if (m := re.fullmatch(r"val-step(\d+)\.png", p.name))
    ]
    grid_step, grid = max(grids) if grids else (None, None)
    return Progress(
        rows[-1][0] if rows else 0,
        total if isinstance(total, int) else None,
        [(r[0], r[1]) for r in rows],
        grid,
        grid_step,
    )


def check_options(argv: list[str]) -> None:
    """The trainer's own option checks (TrainConfig.from_argv), as one UIError line."""
    try:
        TrainConfig.from_argv(argv)
    except (cli.UsageError, InversionError) as e:
        raise UIError(str(e)) from None


class Job:
    """One trainer process and what has been seen of it."""

    def __init__(self, run: Path, proc: subprocess.Popen) -> None:
        self.run, self.proc = run, proc
        self.lines: deque[str] = deque(maxlen=LOG_LINES)
        self.stopping = False
        self.seen: deque[tuple[float, int]] = deque()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            log.debug("trainer: %s", line.rstrip())

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def rate(self, step: int, now: float) -> float | None:
        """Steps per second over the last RATE_WINDOW seconds of observations."""
        if not self.seen or self.seen[-1][1] != step:
            self.seen.append((now, step))
        while len(self.seen) > 2 and now - self.seen[1][0] > RATE_WINDOW:
            self.seen.popleft()
        (t0, s0), (t1, s1) = self.seen[0], self.seen[-1]
        return (s1 - s0) / (t1 - t0) if s1 > s0 and t1 > t0 else None

    def outcome(self, progress: Progress) -> tuple[str, str]:
        """(state, one line) for the page."""
        of = f" of {progress.total}" if progress.total else ""
        rc = self.proc.poll()
        if rc is None:
            return (
                ("stopping", f"stopping: finishing step {progress.step + 1} and saving")
                if self.stopping
                else ("running", f"training: step {progress.step}{of}")
            )
        if rc == 0 and self.stopping and (progress.total is None or progress.step < progress.total):
            return "stopped", f"stopped at step {progress.step}{of}; saved — Resume continues it"
        if rc == 0:
            return "finished", f"finished: {progress.step} steps"
        if rc == 130 or rc == -signal.SIGINT:
            return "stopped", "stopped before the first save; start again"
        self._reader.join(timeout=2)
        errors = [line for line in self.lines if line.startswith("error:")]
        last = errors[-1] if errors else (self.lines[-1] if self.lines else f"exit status {rc}")
        return "failed", f"failed: {last.removeprefix('error: ')}"


@dataclass
class Status:
    """One poll's view of the job, the same in every tab."""

    run: Path | None = None
    state: str = "idle"
    message: str = "no training job yet"
    progress: Progress = field(default_factory=Progress)
    rate: float | None = None
    eta: float | None = None
    log: str = ""


class JobManager:
    """Starts, stops and watches at most one trainer process for the whole server."""

    def __init__(self, cwd: Path, command: tuple[str, ...] = (sys.executable, "-m", "inversion.train")) -> None:
        self.cwd, self.command = cwd, command
        self.job: Job | None = None
        self._lock = threading.Lock()

    def ensure_free(self) -> None:
        """Busy, naming the running job, if there is one."""
        job = self.job
        if job is not None and job.running:
            step = read_progress(job.run).step
            raise Busy(
                f"a training job is already running ({job.run.name}, step {step}); it is shown here — "
                "stop it or wait for it before starting another"
            )

    def start(self, run: Path, argv: list[str]) -> Job:
        """Start the trainer with argv writing `run`, unless a job is running."""
        check_options(argv)
        with self._lock:
            self.ensure_free()
            env = dict(
                os.environ,
                PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")])),
            )
            cmd = [*self.command, *argv, "--no-progress"]
            log.info("starting %s", " ".join(cmd))
            proc = subprocess.Popen(
                cmd,
                cwd=self.cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                bufsize=1,
                start_new_session=True,
            )
            self.job = Job(run, proc)
            return self.job

    def stop(self) -> str:
        """SIGINT to the running trainer (Ctrl-C: it saves, then exits)."""
        with self._lock:
            job = self.job
            if job is None or not job.running:
                raise UIError("no training job is running")
            if job.stopping:
                return "already stopping: the trainer is finishing its step and saving"
            job.stopping = True
            job.proc.send_signal(signal.SIGINT)
            return "stopping: the trainer finishes its step, saves and exits"

    def status(self) -> Status:
        with self._lock:
            job = self.job
            if job is None:
                return Status()
            progress = read_progress(job.run)
            state, message = job.outcome(progress)
            rate = job.rate(progress.step, time.monotonic()) if state in ("running", "stopping") else None
            eta = (progress.total - progress.step) / rate if rate and progress.total else None
            return Status(job.run, state, message, progress, rate, eta, "\n".join(list(job.lines)[-40:]))

    def shutdown(self) -> None:
        """Stop a running job as Stop does and wait for its save (kill it after STOP_WAIT seconds)."""
        job = self.job
        if job is None or not job.running:
            return
        log.info("stopping the training job %s: it finishes its step and saves", job.run)
        if not job.stopping:
            job.stopping = True
            job.proc.send_signal(signal.SIGINT)
        try:
            job.proc.wait(timeout=STOP_WAIT)
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as e:
            why = "a second Ctrl-C" if isinstance(e, KeyboardInterrupt) else f"no stop within {STOP_WAIT:.0f} s"
            log.warning("%s: killing the trainer; its last save in %s is kept", why, job.run)
            job.proc.kill()
            job.proc.wait()
