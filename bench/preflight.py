"""Preflight of a GPU run (bench/gpu.sh): imports, one trivial Triton launch, a C compiler; offline wheel install.

    python3 -m bench.preflight [--out DIR] [--allow-cpu]          → DIR/preflight.json, exit 0 when the run can go
    python3 -m bench.preflight --install-missing bench/wheels --target DIR

Contract
  * The check records the Python, torch (CUDA device, capability), triton and optional package versions (diffusers,
    transformers, open_clip, PIL), whether one trivial Triton kernel launched and returned the right numbers, and
    the C compiler and Python.h Triton's launcher build needs. It writes DIR/preflight.json (atomically) and exits 0
    when torch sees a CUDA device (or --allow-cpu: the launch then runs in Triton's interpreter), the launch worked
    and a compiler and Python.h exist; else 1 with one line per missing part on stderr. Missing optional packages
    only limit which phases run (bench.run records those phases as failed).
  * --install-missing installs, offline and without dependencies, each wheel of the folder whose distribution is
    not installed already, into --target (to put first on PYTHONPATH); installed distributions are never shadowed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

OPTIONAL = ("diffusers", "transformers", "open_clip", "PIL", "safetensors", "numpy")


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as err:  # an optional package: record why it is unusable
        return f"missing ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
    return str(getattr(mod, "__version__", "present"))


def _compiler() -> dict:
    cc = os.environ.get("CC") or next((shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    include = sysconfig.get_paths().get("include") or ""
    return {"cc": cc, "python_h": str(Path(include) / "Python.h") if (Path(include) / "Python.h").exists() else None}


def _triton_launch(device: str) -> str | None:
    """Launch x + 1 on 1,000 elements; None when it ran and the result is right, else the error."""
    try:
        import torch
        import triton
        import triton.language as tl

        @triton.jit
        def add_one(X, Y, N, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(Y + offs, tl.load(X + offs, mask=offs < N) + 1.0, mask=offs < N)

        x = torch.arange(1000, dtype=torch.float32, device=device)
        y = torch.empty_like(x)
        add_one[(triton.cdiv(1000, 256),)](x, y, 1000, BLOCK=256)
        if not torch.equal(y.cpu(), x.cpu() + 1):
            return "the trivial kernel returned wrong numbers"
    except Exception as err:  # any toolchain failure is the answer here
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
    return None


def check(allow_cpu: bool) -> tuple[dict, list[str]]:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and allow_cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel below is defined
    report: dict = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "cuda": cuda,
        "torch_cuda": torch.version.cuda,
    }
    problems = []
    if cuda:
        report["device_name"] = torch.cuda.get_device_name(0)
        report["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability(0))
    elif not allow_cpu:
        problems.append("torch sees no CUDA device")
    report["triton"] = _version("triton")
    report["optional"] = {m: _version(m) for m in OPTIONAL}
    report["compiler"] = _compiler()
    if not report["compiler"]["cc"]:
        problems.append("no C compiler (cc/gcc/clang or $CC): Triton cannot build its launcher")
    if not report["compiler"]["python_h"]:
        problems.append(f"no Python.h under {sysconfig.get_paths().get('include')}: install python3-dev")
    err = _triton_launch("cuda" if cuda else "cpu") if report["triton"][:7] != "missing" else report["triton"]
    report["triton_launch"] = err or "ok"
    if err:
        problems.append(f"trivial Triton launch failed: {err}")
    try:
        importlib.import_module("ldm.attention")
        report["ldm"] = "ok"
    except Exception as e:  # the project itself must import
        report["ldm"] = f"{type(e).__name__}: {e}"
        problems.append(f"ldm does not import: {e}")
    report["problems"] = problems
    return report, problems


def _dist_name(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def install_missing(folder: Path, target: Path) -> list[str]:
    """Install (no index, no dependencies) the wheels of `folder` whose distribution is not installed yet."""
    wanted = []
    for wheel in sorted(folder.glob("*.whl")):
        try:
            metadata.version(_dist_name(wheel))
        except metadata.PackageNotFoundError:
            wanted.append(wheel)
    if not wanted:
        return []
    target.mkdir(parents=True, exist_ok=True)
    pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    if pip.returncode == 0:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--disable-pip-version-check",
                "--target",
                str(target),
                *map(str, wanted),
            ],
            check=True,
        )
    else:  # no pip on the machine: a wheel is a zip of importable files
        for wheel in wanted:
            with zipfile.ZipFile(wheel) as z:
                z.extractall(target)
    return [w.name for w in wanted]


def write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(data, f, indent=1)
    os.replace(f.name, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.preflight", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="folder for preflight.json")
    p.add_argument("--allow-cpu", action="store_true", help="no CUDA is not an error (tests of the script)")
    p.add_argument("--install-missing", type=Path, metavar="WHEELS", help="install the wheels not yet installed")
    p.add_argument("--target", type=Path, help="with --install-missing: the folder to install into")
    args = p.parse_args(argv)
    if args.install_missing:
        if not args.target:
            p.error("--install-missing needs --target")
        if not args.install_missing.is_dir():
            print(
                f"preflight: wheel folder {args.install_missing} does not exist (run `make gpu-wheels` where "
                "there is network, and carry the folder)",
                file=sys.stderr,
            )
            return 2
        done = install_missing(args.install_missing, args.target)
        print(f"installed {len(done)} wheel(s) into {args.target}: {', '.join(done) or 'none needed'}")
        return 0
    report, problems = check(args.allow_cpu)
    if args.out:
        write_json(report, args.out / "preflight.json")
    print(json.dumps({k: report[k] for k in ("python", "torch", "cuda", "triton", "triton_launch")}))
    for line in problems:
        print(f"preflight: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
