"""What the command-line tools share: checked settings, a device and a dtype, writable folders, one-line errors."""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ldm.errors import UserError
from ldm.precision import DTYPES

log = logging.getLogger(__name__)

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class UsageError(UserError):
    """Bad input from the user: printed as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose complaints (unknown option, a value of the wrong type) are one line, not usage + error."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def check(rules: list[tuple[bool, str]], error: type[Exception] = UsageError) -> None:
    """Raise `error` with the message of the first rule that fails: (ok, "SETTING=value must be …")."""
    for ok, message in rules:
        if not ok:
            raise error(message)


def at_least(name: str, value: int | float | None, low: int | float = 1) -> tuple[bool, str]:
    """The rule "name=value must be at least low" (None passes: the default is used)."""
    return value is None or value >= low, f"{name}={value} must be at least {low}"


def finite(name: str, value: float | None, low: float | None = None) -> tuple[bool, str]:
    """The rule "name=value must be a finite number [≥ low]" (None passes)."""
    ok = value is None or (math.isfinite(value) and (low is None or value >= low))
    return ok, f"{name}={value} must be a finite number" + (f" ≥ {low:g}" if low is not None else "")


def steps_rule(name: str, steps: int | None, model) -> tuple[bool, str]:
    """Sampling steps must be at most the model's training timesteps (the schedule a sampler strides through)."""
    limit = model.schedule.num_timesteps
    return steps is None or steps <= limit, f"{name}={steps} must be at most this model's {limit} timesteps"


def seed_rule(name: str, value: int | None) -> tuple[bool, str]:
    """Seeds are non-negative 63-bit integers (torch.Generator.manual_seed's range)."""
    return value is None or 0 <= value < 2**63, f"{name}={value} must be between 0 and 2**63 - 1"


def multiple_rule(name: str, value: int | None, factor: int) -> tuple[bool, str]:
    """Image sides must be positive multiples of the model's latent factor (no silent rounding)."""
    nearest = max(factor, round((value or 0) / factor) * factor)
    return (
        value is None or (value > 0 and value % factor == 0),
        f"{name}={value} must be a positive multiple of {factor} (this model's latent factor); try {nearest}",
    )


def pick_device(name: str = "auto") -> torch.device:
    """auto → cuda, then mps, then cpu; an explicit device that is missing is a UsageError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("DEVICE=cuda but no CUDA device is available; use DEVICE=auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("DEVICE=mps but MPS is not available; use DEVICE=auto or cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise UsageError(f"unknown DEVICE={name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp32 | fp16 | bf16; fp16 on the CPU falls back to fp32 with a notice."""
    if name not in DTYPES:
        raise UsageError(f"unknown DTYPE={name!r}; choose one of {', '.join(DTYPES)}")
    if name == "fp16" and device.type == "cpu":
        log.warning("DTYPE=fp16 is not supported for CPU sampling; using fp32")
        return torch.float32
    return DTYPES[name]


def check_writable(folder: Path, name: str = "OUT") -> Path:
    """Create the output folder and prove it is writable before any long work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to {name}={folder}: {e.strerror or e}") from None
    return folder


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a CLI main, turning expected failures into one line on stderr (exit 2) and Ctrl-C into 130."""
    logging.basicConfig(level=os.environ.get("ONEWORD_LOG", "INFO"), format="%(levelname)s: %(message)s")
    # A shell without job control starts background jobs with SIGINT ignored, and Python then installs no
    # handler: Ctrl-C / kill -INT must stop a CLI the same way however it was started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, file too large, permissions: the machine's problem, said in one line
        where = f"{e.filename}: " if e.filename else ""
        hint = " — free some space and run again" if e.errno in DISK_FULL else ""
        print(f"error: {where}{e.strerror or e}{hint}", file=sys.stderr)
        return 2
