"""Time ldm.load_model on one checkpoint and report what it found.

    python bench/load.py weights/v1-5-pruned-emaonly.safetensors [--dtype fp16] [--device cuda] [--repeat 2]
    /usr/bin/time -v python bench/load.py FILE --dtype fp16     # for the peak resident memory

Prints the detected variant, parameter count, load time per repeat and this process's peak RSS.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.checkpoint import CheckpointError, load_model  # noqa: E402
from ldm.precision import DTYPES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help=".safetensors / .ckpt file or diffusers folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prediction", choices=["eps", "v"], default=None)
    parser.add_argument("--allow-pickle", action="store_true", help="trust a .ckpt that needs code execution")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        try:
            model = load_model(
                args.path,
                device=args.device,
                dtype=DTYPES[args.dtype],
                prediction=args.prediction,
                allow_pickle=args.allow_pickle,
            )
        except CheckpointError as e:
            print(f"CheckpointError: {e}", file=sys.stderr)
            return 1
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        n = sum(p.numel() for p in model.parameters())
        name, prediction = model.config.name, model.config.parameterization
        del model
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{args.path}: {name} ({prediction} prediction), {n / 1e9:.3f} B params as {args.dtype} on {args.device}")
    print("load seconds: " + ", ".join(f"{t:.2f}" for t in times))
    print(f"peak RSS: {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
