"""Time our Triton FlashAttention-2 against torch SDPA and the fp32 math reference, per SD1 head dim.

    python bench/attention.py [--dtype fp16|bf16|fp32] [--batch 2] [--backward] [--out bench.json]

On CUDA: head dims 40, 80, 160 (8 heads) × self-attention over 4096/1024/256 tokens and cross-attention
to 77 tokens; prints a table (ms, TFLOP/s, max relative error against math) and writes JSON with --out.
Without CUDA it runs tiny shapes through Triton's interpreter only to exercise the script: those
timings mean nothing, a GPU is needed for the real numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = (40, 80, 160)
LENGTHS = (4096, 1024, 256)
CONTEXT = 77


def _timer(fn, cuda: bool, warmup: int, repeats: int) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict:
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit is defined
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ldm.attention import attention, attention_math

    device = "cuda" if cuda else "cpu"
    dtype = DTYPES[args.dtype]
    heads, batch = args.heads, args.batch
    lengths, dims, repeats, warmup = LENGTHS, HEAD_DIMS, args.repeats, 3
    if not cuda:
        lengths, heads, batch, repeats, warmup = (64,), 1, 1, 1, 0
        print("no CUDA device: tiny shapes through the Triton interpreter; timings need a GPU", file=sys.stderr)
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for d in dims:
        for n in lengths:
            for kind, nk in (("self", n), ("cross", CONTEXT)):
                q = torch.randn(batch, heads, n, d, device=device, dtype=dtype, generator=g)
                k = torch.randn(batch, heads, nk, d, device=device, dtype=dtype, generator=g)
                v = torch.randn(batch, heads, nk, d, device=device, dtype=dtype, generator=g)
                want = attention_math(q, k, v).float()
                flops = 4 * batch * heads * n * nk * d * (3.5 if args.backward else 1.0)
                for backend in ("math", "sdpa", "triton"):
                    leaves = [t.detach().requires_grad_(args.backward) for t in (q, k, v)]
                    do = torch.randn_like(q) if args.backward else None

                    def step(backend=backend, leaves=leaves, do=do):
                        out = attention(*leaves, backend=backend)
                        if do is not None:
                            torch.autograd.grad(out, leaves, do)
                        return out

                    try:
                        err = ((step().float() - want).abs().max() / want.abs().max()).item()
                        ms = _timer(step, cuda, warmup, repeats)
                    except torch.OutOfMemoryError:
                        err, ms = float("nan"), float("nan")
                    rows.append(dict(head_dim=d, kind=kind, nq=n, nk=nk, backend=backend, ms=ms,
                                     tflops=flops / (ms * 1e-3) / 1e12 if ms == ms else float("nan"),
                                     max_rel_err=err))
    return {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "timings_meaningful": cuda, "dtype": args.dtype, "batch": batch, "heads": heads,
            "backward": args.backward, "torch": torch.__version__, "results": rows}


def print_table(report: dict) -> None:
    print(f"# {report['device']}  dtype={report['dtype']} batch={report['batch']} heads={report['heads']} "
          f"{'fwd+bwd' if report['backward'] else 'fwd'}")
    print(f"{'D':>4} {'kind':>5} {'Nq':>5} {'Nk':>5} | {'math ms':>9} {'sdpa ms':>9} {'triton ms':>9} | "
          f"{'triton TF/s':>11} {'vs sdpa':>7} | {'fwd err':>10}")
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in report["results"]:
        by_case.setdefault((r["head_dim"], r["kind"], r["nq"], r["nk"]), {})[r["backend"]] = r
    for (d, kind, nq, nk), rs in by_case.items():
        tri, sdpa = rs["triton"], rs["sdpa"]
        print(f"{d:>4} {kind:>5} {nq:>5} {nk:>5} | {rs['math']['ms']:>9.3f} {sdpa['ms']:>9.3f} {tri['ms']:>9.3f} | "
              f"{tri['tflops']:>11.2f} {sdpa['ms'] / tri['ms']:>6.2f}x | {tri['max_rel_err']:>10.2e}")
    if not report["timings_meaningful"]:
        print("(CPU interpreter run: the numbers above only show the script works; run on a GPU to time)")


def write_json(report: dict, path: Path, force: bool) -> None:
    """Atomic write (temp file + rename); refuses to replace an existing file without --force."""
    if path.exists() and not force:
        raise SystemExit(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(report, f, indent=1)
    os.replace(f.name, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--backward", action="store_true", help="time forward + backward (dQ, dK, dV)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = p.parse_args(argv)
    report = run(args)
    print_table(report)
    if args.out:
        write_json(report, args.out, args.force)


if __name__ == "__main__":
    main()
