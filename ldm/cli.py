"""What the command-line tools share: picking a model, a device and a dtype, and one-line errors."""
from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MODEL_CHOICES = ("sd15", "sd21", "sd21-v", "ldm-1.4b", "shapes", "instances", "tiny")
LOCAL_MODELS = {"shapes": "pretrain-shapes", "instances": "pretrain-instances"}   # offline worlds → make target
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ROOT = Path(__file__).resolve().parent.parent
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


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


def check_writable(folder: Path) -> Path:
    """Create the output folder and prove it is writable before any long work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to {folder}: {e.strerror or e}") from None
    return folder


def model_path(model: str) -> Path:
    """The checkpoint file behind a MODEL name (downloaded ones live in weights/)."""
    if model in LOCAL_MODELS:
        return ROOT / "weights" / f"{model}.safetensors"
    from weights.download import DownloadError, local_path

    try:
        return local_path(model)
    except DownloadError as e:
        raise UsageError(f"{e}; or use MODEL=shapes / MODEL=tiny, or CKPT=path") from None


def load(model: str | None, ckpt: str | None, device: torch.device, dtype: torch.dtype,
         prediction: str | None = None, allow_pickle: bool = False):
    """A LatentDiffusion from MODEL (a known name) or CKPT (a path); missing weights say how to get them."""
    import ldm

    if ckpt:
        path = Path(ckpt)
        if not path.exists():
            raise UsageError(f"CKPT={ckpt}: no such file or folder")
        return ldm.load_model(path, device=device, dtype=dtype, prediction=prediction, allow_pickle=allow_pickle)
    model = model or "sd15"
    if model not in MODEL_CHOICES:
        raise UsageError(f"unknown MODEL={model!r}; choose one of {', '.join(MODEL_CHOICES)} or give CKPT=path")
    if model == "tiny":
        return ldm.tiny_model(seed=0).to(device=device, dtype=dtype)
    path = model_path(model)
    if not path.exists():
        if model in LOCAL_MODELS:
            raise UsageError(f"{path} is missing; run `make {LOCAL_MODELS[model]}` to rebuild it")
        raise UsageError(f"no weights for MODEL={model} at {path}; download them with `make weights MODEL={model}`, "
                         "or try the offline `make demo` (MODEL=shapes)")
    if prediction is None and model == "sd21-v":
        prediction = "v"
    return ldm.load_model(path, device=device, dtype=dtype, prediction=prediction, allow_pickle=allow_pickle)


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a CLI main, turning expected failures into one line on stderr (exit 2) and Ctrl-C into 130."""
    from ldm.checkpoint import CheckpointError

    expected: tuple[type[BaseException], ...] = (UsageError, CheckpointError, ValueError)
    try:
        from inversion.embedding import InversionError

        expected += (InversionError,)
    except ImportError:
        pass
    logging.basicConfig(level=os.environ.get("ONEWORD_LOG", "INFO"), format="%(levelname)s: %(message)s")
    # A shell without job control starts background jobs with SIGINT ignored, and Python then installs no
    # handler: Ctrl-C / kill -INT must stop a CLI the same way however it was started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main(argv)
    except expected as e:
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
