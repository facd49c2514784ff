"""Time our Triton FlashAttention-2 against torch SDPA and the fp32 math reference, per SD1 head dim.

    python bench/attention.py [--dtype fp16|bf16|fp32] [--batch 2] [--backward] [--out bench.json]

    python bench/attention.py --routes FWD.json FWD_BWD.json   # the ldm.kernels.routing.MEASURED rows they support
                                            # (--out files, or bench.run's phase-attention-*.json)

On CUDA: head dims 40, 64, 80, 160 (8 heads) × self-attention over 4096/1024/256 tokens and cross-attention
to 77 tokens; prints a table (ms, TFLOP/s, max relative error against math) and writes JSON with --out.
Every row runs inside its own exception capture (an error is recorded in the row; the others still run).
Without CUDA it runs tiny shapes through Triton's interpreter only to exercise the script: those
timings mean nothing, a GPU is needed for the real numbers.

--routes sums, per head dim, the Triton and SDPA milliseconds over that head dim's shapes (the UNet's
self- and cross-attentions) in a forward and a forward+backward report of one GPU and dtype, and prints one
`Measured(...)` row per head dim for `ldm.kernels.routing.MEASURED` ("auto" then uses Triton only where both
sums are no slower than SDPA's); a head dim with any failed row gets none.
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

from ldm.precision import DTYPES

HEAD_DIMS = (40, 64, 80, 160)
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

                    error = None
                    try:
                        err = ((step().float() - want).abs().max() / want.abs().max()).item()
                        ms = _timer(step, cuda, warmup, repeats)
                    except Exception as e:  # out of memory, a compile failure, …: recorded, the rest still runs
                        err, ms, error = float("nan"), float("nan"), f"{type(e).__name__}: {e}"[:500]
                        if cuda:
                            torch.cuda.empty_cache()
                    rows.append(
                        dict(
                            head_dim=d,
                            kind=kind,
                            nq=n,
                            nk=nk,
                            backend=backend,
                            ms=ms,
                            tflops=flops / (ms * 1e-3) / 1e12 if ms == ms else float("nan"),
                            max_rel_err=err,
                            error=error,
                        )
                    )
    return {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "arch": "sm_{}{}".format(*torch.cuda.get_device_capability()) if cuda else "cpu",
        "timings_meaningful": cuda,
        "dtype": args.dtype,
        "batch": batch,
        "heads": heads,
        "backward": args.backward,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "results": rows,
    }


def print_table(report: dict) -> None:
    print(
        f"# {report['device']}  dtype={report['dtype']} batch={report['batch']} heads={report['heads']} "
        f"{'fwd+bwd' if report['backward'] else 'fwd'}"
    )
    print(
        f"{'D':>4} {'kind':>5} {'Nq':>5} {'Nk':>5} | {'math ms':>9} {'sdpa ms':>9} {'triton ms':>9} | "
        f"{'triton TF/s':>11} {'vs sdpa':>7} | {'fwd err':>10}"
    )
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in report["results"]:
        by_case.setdefault((r["head_dim"], r["kind"], r["nq"], r["nk"]), {})[r["backend"]] = r
    for (d, kind, nq, nk), rs in by_case.items():
        tri, sdpa = rs["triton"], rs["sdpa"]
        print(
            f"{d:>4} {kind:>5} {nq:>5} {nk:>5} | {rs['math']['ms']:>9.3f} {sdpa['ms']:>9.3f} {tri['ms']:>9.3f} | "
            f"{tri['tflops']:>11.2f} {sdpa['ms'] / tri['ms']:>6.2f}x | {tri['max_rel_err']:>10.2e}"
        )
    if not report["timings_meaningful"]:
        print("(CPU interpreter run: the numbers above only show the script works; run on a GPU to time)")


def routes(fwd: dict, fwd_bwd: dict) -> list[str]:
    """`Measured(...)` lines for ldm.kernels.routing.MEASURED from a forward and a forward+backward report."""
    if (
        fwd["backward"]
        or not fwd_bwd["backward"]
        or fwd["dtype"] != fwd_bwd["dtype"]
        or fwd["device"] != fwd_bwd["device"]
        or not (fwd["timings_meaningful"] and fwd_bwd["timings_meaningful"])
    ):
        raise ValueError("--routes needs a forward and a forward+backward CUDA report of one GPU and dtype")
    dtype = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[fwd["dtype"]]
    lines = []
    for d in sorted({r["head_dim"] for r in fwd["results"]}):
        sums = {}
        for tag, rep in (("fwd", fwd), ("fwdbwd", fwd_bwd)):
            rows = [r for r in rep["results"] if r["head_dim"] == d]
            for backend in ("triton", "sdpa"):
                ms = [r["ms"] for r in rows if r["backend"] == backend]
                sums[f"{backend}_{tag}"] = sum(ms) if ms and all(m == m for m in ms) else None
        if None in sums.values():
            continue
        lines.append(
            f"Measured({fwd.get('arch', '?')!r}, {dtype!r}, {d}, {sums['triton_fwd']:.4f}, "
            f"{sums['sdpa_fwd']:.4f}, {sums['triton_fwdbwd']:.4f}, {sums['sdpa_fwdbwd']:.4f}, "
            f"{fwd['device']!r}, {fwd.get('date', '')!r}),"
        )
    return lines


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
    p.add_argument(
        "--routes",
        type=Path,
        nargs=2,
        metavar=("FWD_JSON", "FWD_BWD_JSON"),
        help="print the routing rows two reports support, and exit",
    )
    args = p.parse_args(argv)
    if args.routes:
        fwd, fwd_bwd = (json.loads(path.read_text()) for path in args.routes)
        fwd, fwd_bwd = fwd.get("result", fwd), fwd_bwd.get("result", fwd_bwd)  # bench.run's phase-*.json too
        print("\n".join(routes(fwd, fwd_bwd)) or "# no head dim with complete Triton and SDPA timings")
        return
    report = run(args)
    print_table(report)
    if args.out:
        write_json(report, args.out, args.force)


if __name__ == "__main__":
    main()
