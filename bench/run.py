"""`make bench`: oneword vs diffusers on the same machine and the same random full-size SD1 weights.

    python -m bench.run [--device cpu|cuda] [--size 256 512] [--quick] [--skip-train] [--out FILE.json]

One process; oneword (A) and diffusers (B) repetitions alternate A, B, A, B so that load from other
processes hits both alike. Reported: medians of seconds per step and the ratio oneword speed / diffusers
speed (= diffusers s/step ÷ oneword s/step; > 1 means oneword is faster), and peak memory per phase.

(a) sampling: DDIM with classifier-free guidance (scale 7.5, batch 1 → UNet batch 2), seconds per denoising
    step from step callbacks, the first step of every run excluded, latents only (no VAE decode).
(b) textual-inversion training step: diffusers' examples/textual_inversion step (VAE encode of the batch,
    text encoder with the whole token table trainable and masked back, UNet fwd/bwd, AdamW over the table)
    vs inversion.train's step (cached-latent draw, text tower with the spliced vector, UNet fwd/bwd, AdamW
    over the vector only). 1 warm-up step each, then timed steps.
(c) memory: CUDA max_memory_allocated over each repetition minus the allocation at its start (both models'
    weights stay resident, so own weights + Δ is what one library alone would need); CPU: the peak RSS
    over each repetition minus the RSS at its start (VmHWM reset via /proc/self/clear_refs), weights shared.
(d) bench/attention.py (Triton FlashAttention vs SDPA) on CUDA, fp16 and bf16; skipped on CPU unless --attention.
(e) oneword alone (no diffusers needed): UNet forward (CFG batch 2, inference) and forward+backward to the
    context (batch 1, as textual inversion), and DDIM sampling it/s at batch 1 with CFG, eager and CUDA graph.

Every phase runs inside its own exception capture (one failing row or phase costs only itself) and, as soon as
it ends, writes PHASE_DIR/phase-<name>.json and rewrites the whole report (--out); diffusers and transformers are
imported only by the phases that compare against them. --deadline-s stops starting new phases after that many
seconds (they are recorded as skipped).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as C  # noqa: E402
from bench.common import Setup, build, place  # noqa: E402
from bench.trainers import DiffusersTrainer, OnewordTrainer  # noqa: E402
from ldm.precision import DTYPES  # noqa: E402

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a cat sitting on a wooden table"
SEED = 23


# --- arguments ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--config", default="sd1", help="sd1 (full size) | tiny (harness smoke test)")
    p.add_argument(
        "--size",
        type=int,
        nargs="+",
        default=None,
        help="pixel sizes to run (default: CPU 512 256 sampling, 256 512 training; CUDA 512)",
    )
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, not a measurement)")
    p.add_argument("--skip-train", action="store_true", help="sampling only")
    p.add_argument("--skip-sample", action="store_true", help="training only")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="training batch sizes (default 1 2 4)")
    p.add_argument("--reps", type=int, default=None, help="sampling runs per library (default 2, quick 1)")
    p.add_argument(
        "--sample-steps",
        type=int,
        default=None,
        help="DDIM steps per sampling run, the first not timed (default CPU 3, CUDA 12)",
    )
    p.add_argument("--train-steps", type=int, default=None, help="timed training steps per library (default 3)")
    p.add_argument(
        "--sample-dtype", default=None, choices=sorted(DTYPES), help="sampling dtype (default CPU fp32, CUDA fp16)"
    )
    p.add_argument(
        "--train-precision",
        default=None,
        choices=sorted(DTYPES),
        help="training precision (default CPU fp32, CUDA bf16 mixed)",
    )
    p.add_argument("--attention", action="store_true", help="also run bench/attention.py on the CPU")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default torch's; on a CPU shared with other jobs 1 avoids "
        "OpenMP threads stalling each other)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--out", default=None, help="JSON file (default bench/results-<device>-<date>.json)")
    p.add_argument("--phase-dir", default=None, help="folder for phase-<name>.json files (default: --out's folder)")
    p.add_argument("--deadline-s", type=float, default=None, help="start no phase after this many seconds")
    p.add_argument("--skip-oneword", action="store_true", help="skip phase (e), oneword alone")
    return p


# --- timing helpers ----------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Memory:
    """Peak memory over one repetition: CUDA allocator peak or CPU RSS peak, minus the value at its start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.delta_mib: float | None = None

    def __enter__(self) -> Memory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._rss = C.RSSPeak().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.delta_mib = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
        else:
            self._rss.__exit__(*exc)
            self.delta_mib = self._rss.delta_mib


def module_mib(*modules: torch.nn.Module) -> float:
    seen, total = set(), 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total / 2**20


def summarise(
    kind: str,
    params: dict,
    samples: dict[str, list[tuple[float, float]]],
    mem: dict[str, list[float]],
    weights: dict[str, float],
    device: torch.device,
    load: tuple[float, float],
) -> dict:
    """One table row: medians, ratio (oneword speed / diffusers speed), peak memory.

    Process CPU seconds are recorded beside wall seconds: with one torch thread on a CPU shared with other
    jobs they measure the work done, not the time spent waiting for a core."""
    times = {k: [w for w, _ in v] for k, v in samples.items()}
    cpu = {k: [c for _, c in v] for k, v in samples.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    peak = {k: (max(v) if v and all(x is not None for x in v) else None) for k, v in mem.items()}
    row = dict(
        kind=kind,
        **params,
        oneword_s_per_step=med["oneword"],
        diffusers_s_per_step=med["diffusers"],
        ratio=med["diffusers"] / med["oneword"],
        oneword_samples=times["oneword"],
        diffusers_samples=times["diffusers"],
        oneword_cpu_s_per_step=med_cpu["oneword"],
        diffusers_cpu_s_per_step=med_cpu["diffusers"],
        cpu_ratio=med_cpu["diffusers"] / med_cpu["oneword"] if med_cpu["oneword"] > 0 else None,
        oneword_cpu_samples=cpu["oneword"],
        diffusers_cpu_samples=cpu["diffusers"],
        oneword_peak_delta_mib=peak["oneword"],
        diffusers_peak_delta_mib=peak["diffusers"],
        oneword_weights_mib=weights["oneword"],
        diffusers_weights_mib=weights["diffusers"],
        memory="cuda max_memory_allocated - allocated at start"
        if device.type == "cuda"
        else "peak RSS (VmHWM) - RSS at start",
        loadavg_before=load[0],
        loadavg_after=load[1],
    )
    log.info(
        "%s %s: oneword %.3f s/step, diffusers %.3f s/step, ratio %.3f",
        kind,
        params,
        row["oneword_s_per_step"],
        row["diffusers_s_per_step"],
        row["ratio"],
    )
    return row


# --- the two models over one set of weights ----------------------------------------------------------------


def interleave(
    fns: dict[str, Callable[[int], list[tuple[float, float]]]], reps: int, device: torch.device
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, list[float]]]:
    """Run oneword, diffusers, oneword, … collecting per-step (wall, process CPU) seconds and peak memory."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    mem: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for name, fn in fns.items():
            with Memory(device) as m:
                times[name].extend(fn(r))
            mem[name].append(m.delta_mib)
    return times, mem


# --- (a) sampling ------------------------------------------------------------------------------------------


def bench_sampling(
    s: Setup, size: int, device: torch.device, dtype: torch.dtype, reps: int, steps: int, scale: float = 7.5
) -> dict:
    place([s.ours, s.unet, s.vae, s.text], device, dtype)
    if steps < 2:
        raise ValueError("sampling needs at least 2 steps per run (the first is not timed)")

    def stamps() -> tuple[list[float], Callable[[], None]]:
        marks: list[tuple[float, float]] = []

        def mark() -> None:
            sync(device)
            marks.append((time.perf_counter(), time.process_time()))

        return marks, mark

    def intervals(marks: list[tuple[float, float]]) -> list[tuple[float, float]]:
        if len(marks) != steps:
            raise RuntimeError(f"expected {steps} step callbacks, got {len(marks)}")
        # step 1 (warm-up, prompt work) excluded
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])]

    def ours(r: int) -> list[tuple[float, float]]:
        marks, mark = stamps()
        s.ours.sample_latents(
            [PROMPT],
            steps=steps,
            scale=scale,
            sampler="ddim",
            seed=r,
            height=size,
            width=size,
            callback=lambda i, t, x: mark(),
            progress=False,
        )
        return intervals(marks)

    def theirs(r: int) -> list[tuple[float, float]]:
        marks, mark = stamps()

        def on_step(pipe, i, t, kwargs):
            mark()
            return kwargs

        s.pipe(
            PROMPT,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=scale,
            generator=torch.Generator(device).manual_seed(r),
            output_type="latent",
            callback_on_step_end=on_step,
        )
        return intervals(marks)

    load0 = os.getloadavg()[0]
    with torch.no_grad():
        times, mem = interleave({"oneword": ours, "diffusers": theirs}, reps, device)
    weights = {
        "oneword": module_mib(s.ours.unet, s.ours.vae, s.ours.text_encoder),
        "diffusers": module_mib(s.unet, s.vae, s.text),
    }
    params = dict(
        size=size,
        batch=1,
        dtype=str(dtype).removeprefix("torch."),
        cfg_scale=scale,
        steps_per_run=steps,
        runs=reps,
        timed_steps=reps * (steps - 1),
    )
    return summarise("sampling", params, times, mem, weights, device, (load0, os.getloadavg()[0]))


# --- (b) textual-inversion training step (the two trainers: bench/trainers.py) -----------------------------


def bench_training(
    s: Setup, trainers: dict, size: int, batch: int, device: torch.device, precision: str, steps: int
) -> dict:
    for t in trainers.values():
        t.configure(size, batch, device, precision)

    def timed(trainer) -> Callable[[int], list[tuple[float, float]]]:
        def run(r: int) -> list[tuple[float, float]]:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.step()
            sync(device)
            return [(time.perf_counter() - t0, time.process_time() - c0)]

        return run

    fns = {k: timed(t) for k, t in trainers.items()}
    for fn in fns.values():  # one warm-up step each
        fn(-1)
    load0 = os.getloadavg()[0]
    times, mem = interleave(fns, steps, device)
    weights = {
        "oneword": module_mib(s.ours.unet, s.ours.vae, s.ours.text_encoder),
        "diffusers": module_mib(s.unet, s.vae, s.text),
    }
    params = dict(size=size, batch=batch, dtype=precision, timed_steps=steps, warmup_steps=1)
    return summarise("train", params, times, mem, weights, device, (load0, os.getloadavg()[0]))


# --- (d) attention kernel ----------------------------------------------------------------------------------


def bench_attention(backward: bool, dtype: str = "fp16") -> dict:
    from bench import attention as A

    args = argparse.Namespace(dtype=dtype, batch=2, heads=8, repeats=20, backward=backward)
    report = A.run(args)
    A.print_table(report)
    return report


# --- (e) oneword alone -------------------------------------------------------------------------------------


def bench_oneword(config_name: str, seed: int, device: torch.device, size: int, steps: int, reps: int) -> dict:
    """UNet forward / forward+backward-to-context milliseconds and sampling it/s, our model only."""
    cuda = device.type == "cuda"
    half, train_dtype = (torch.float16, torch.bfloat16) if cuda else (torch.float32, torch.float32)
    config = C.get_config(config_name)
    unet, vae, text = C.random_modules(config, seed)
    model = C.oneword_model(config, unet, vae, text).to(device=device, dtype=half)
    lat = size // 8
    g = torch.Generator().manual_seed(seed)
    ctx_dim = config.unet["context_dim"]
    x = torch.randn(2, config.unet["in_channels"], lat, lat, generator=g).to(device, half)
    ctx = torch.randn(2, 77, ctx_dim, generator=g).to(device, half)
    t = torch.tensor([500, 500], device=device)
    out: dict = {
        "size": size,
        "dtype": str(half).removeprefix("torch."),
        "train_dtype": str(train_dtype).removeprefix("torch."),
        "rows": [],
    }

    def timed(fn, n: int) -> list[float]:
        fn()
        times = []
        for _ in range(n):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return times

    def row(name: str, fn, n: int, **extra) -> None:
        try:
            ts = timed(fn, n)
            out["rows"].append(
                dict(name=name, ms=1e3 * statistics.median(ts), samples_ms=[1e3 * v for v in ts], **extra)
            )
        except Exception as err:  # one failing row costs only itself
            out["rows"].append(dict(name=name, error=f"{type(err).__name__}: {err}"[:500], **extra))
        log.info("oneword %s: %s", name, out["rows"][-1].get("ms", out["rows"][-1].get("error")))

    n = max(2, reps * (5 if cuda else 1))
    with torch.no_grad():
        row("unet_forward_cfg_batch2", lambda: model.unet(x, t, ctx), n)

    def fwd_bwd() -> None:
        c = ctx[:1].to(train_dtype).requires_grad_()
        eps = model.unet(x[:1].to(train_dtype), t[:1], c)
        torch.autograd.grad(eps.float().square().mean(), c)

    model.unet.to(train_dtype)
    row("unet_forward_backward_to_context_batch1", fwd_bwd, n)
    model.unet.to(half)

    for graph in (False, True):

        def sample(graph=graph) -> None:
            marks: list[float] = []

            def mark(i, tt, xx) -> None:
                sync(device)
                marks.append(time.perf_counter())

            model.sample_latents(
                [PROMPT],
                steps=steps,
                scale=7.5,
                sampler="ddim",
                seed=0,
                height=size,
                width=size,
                callback=mark,
                progress=False,
                cuda_graph=graph,
            )
            sample.its = (len(marks) - 1) / (marks[-1] - marks[0])  # the first step (warm-up) excluded

        name = f"sampling_ddim_cfg_batch1_{'cuda_graph' if graph else 'eager'}"
        row(name, sample, reps, steps=steps)
        if "error" not in out["rows"][-1]:
            out["rows"][-1]["it_per_s_last_run"] = sample.its
    return out


# --- phases ------------------------------------------------------------------------------------------------


def _jsonable(value: object) -> object:
    """value itself when it is plain JSON data, else its type's name (a model, a trainer)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return type(value).__name__
    return value


class Phases:
    """Runs each phase inside its own exception capture and writes its JSON as soon as it ends."""

    def __init__(self, report: dict, out: Path, phase_dir: Path, deadline_s: float | None) -> None:
        self.report, self.out, self.dir, self.deadline = report, out, phase_dir, deadline_s
        self.t0 = time.perf_counter()
        report["phases"] = {}

    def run(self, name: str, fn: Callable[[], object]) -> object:
        elapsed = time.perf_counter() - self.t0
        if self.deadline is not None and elapsed > self.deadline:
            result: dict = {"status": "skipped", "reason": f"deadline {self.deadline:.0f} s passed ({elapsed:.0f} s)"}
            value = None
        else:
            t0 = time.perf_counter()
            try:
                value = fn()
                result = {"status": "ok", "seconds": time.perf_counter() - t0, "result": _jsonable(value)}
            except Exception as err:  # a phase may fail for any reason; the others still run and are kept
                import traceback

                log.error("phase %s failed: %s: %s", name, type(err).__name__, err)
                value = None
                result = {
                    "status": "failed",
                    "seconds": time.perf_counter() - t0,
                    "error": f"{type(err).__name__}: {err}"[:2000],
                    "traceback": traceback.format_exc()[-4000:],
                }
        self.report["phases"][name] = {k: v for k, v in result.items() if k != "result"}
        write_json({"phase": name, **result}, self.dir / f"phase-{name}.json")
        write_json(self.report, self.out)
        return value


# --- report ------------------------------------------------------------------------------------------------


def versions() -> dict:
    found = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("diffusers", "transformers", "triton"):
        try:
            found[name] = __import__(name).__version__
        except Exception as err:  # a missing oracle only fails the phases that need it
            found[name] = f"missing ({type(err).__name__})"
    return found


def markdown(report: dict) -> str:
    lines = [
        f"device: {report['device_name']} ({report['device']}), nproc {report['nproc']}, torch threads "
        f"{report['threads']}, torch {report['versions']['torch']}, diffusers {report['versions']['diffusers']}, "
        f"loadavg {report['loadavg_start']:.2f} → {report['loadavg_end']:.2f}, {report['date']}",
        "",
        "| phase | px | batch | dtype | oneword s/step | diffusers s/step | ratio (oneword speed / diffusers) "
        "| oneword CPU-s/step | diffusers CPU-s/step | ratio by CPU-s | oneword peak Δ MiB "
        "| diffusers peak Δ MiB | timed steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def mib(x):
        return "n/a" if x is None else f"{x:,.0f}"

    def num(x):
        return "n/a" if x is None else f"{x:.3f}"

    for r in report["sampling"] + report["training"]:
        lines.append(
            f"| {r['kind']} | {r['size']} | {r['batch']} | {r['dtype']} | {r['oneword_s_per_step']:.3f} | "
            f"{r['diffusers_s_per_step']:.3f} | {r['ratio']:.3f} | {r['oneword_cpu_s_per_step']:.3f} | "
            f"{r['diffusers_cpu_s_per_step']:.3f} | {num(r['cpu_ratio'])} | "
            f"{mib(r['oneword_peak_delta_mib'])} | {mib(r['diffusers_peak_delta_mib'])} | "
            f"{len(r['oneword_samples'])} |"
        )
    if report["sampling"] or report["training"]:
        r = (report["sampling"] + report["training"])[-1]
        lines.append("")
        lines.append(
            f"weights resident: oneword {r['oneword_weights_mib']:,.0f} MiB, diffusers "
            f"{r['diffusers_weights_mib']:,.0f} MiB (CPU: the same storage); memory = {r['memory']}"
        )
    for note in report["notes"]:
        lines.append(f"- {note}")
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(report, f, indent=1)
    os.replace(f.name, path)


def run(args: argparse.Namespace, out: Path, phase_dir: Path) -> dict:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    tiny = args.config == "tiny"
    sample_sizes = args.size or ([64] if tiny else [512] if cuda else [512, 256])
    train_sizes = args.size or ([64] if tiny else [512] if cuda else [256, 512])
    batches = args.batches or [1, 2, 4]
    reps = args.reps or (1 if args.quick else (3 if cuda else 2))
    sample_steps = args.sample_steps or (3 if (args.quick or not cuda) else 12)
    train_steps = args.train_steps or (2 if args.quick else (5 if cuda else 3))
    sample_dtype = args.sample_dtype or ("fp16" if cuda else "fp32")
    train_precision = args.train_precision or ("bf16" if cuda else "fp32")
    if device.type == "cpu" and "fp16" in (sample_dtype, train_precision):
        log.warning("fp16 on the CPU is slow and not what either library recommends")
    train_configs = []
    for size in train_sizes:
        for b in batches:
            # CPU: batch 1 at every size, batches 2 and 4 at 256 px only; CUDA: all at 512
            if cuda or tiny or b == 1 or size <= 256:
                train_configs.append((size, b))
    train_configs.sort(key=lambda c: (c[1] > 1, c[0], c[1]))

    report = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine()),
        "nproc": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "config": args.config,
        "quick": args.quick,
        "loadavg_start": os.getloadavg()[0],
        "sampling": [],
        "training": [],
        "attention": None,
        "oneword": None,
        "notes": [],
    }
    phases = Phases(report, out, phase_dir, args.deadline_s)
    t_start = time.perf_counter()
    if args.attention or (cuda and not tiny):  # first, before ldm.kernels is imported in compiled mode
        report["attention"] = {}
        for dtype in ("fp16", "bf16"):
            for backward in (False, True):
                name = f"attention-{dtype}-{'fwd-bwd' if backward else 'fwd'}"
                report["attention"][name] = phases.run(name, lambda d=dtype, b=backward: bench_attention(b, d))
    if not args.skip_oneword:
        report["oneword"] = phases.run(
            "oneword",
            lambda: bench_oneword(
                args.config, args.seed, device, sample_sizes[0], sample_steps if not cuda else 25, reps
            ),
        )
        if cuda:
            torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        s = phases.run("build", lambda: build(args.config, args.seed, Path(tmp)))
        if s is not None:
            report["build_s"] = s.build_s
            report["rss_after_build_mib"] = C.rss_mib()
            if not args.skip_sample:
                for size in sample_sizes:
                    row = phases.run(
                        f"sampling-{size}",
                        lambda size=size: bench_sampling(s, size, device, DTYPES[sample_dtype], reps, sample_steps),
                    )
                    if row is not None:
                        report["sampling"].append(row)
            if not args.skip_train:
                trainers = phases.run(
                    "trainers", lambda: {"oneword": OnewordTrainer(s, device), "diffusers": DiffusersTrainer(s, device)}
                )
                for size, b in train_configs if trainers else ():
                    row = phases.run(
                        f"train-{size}-b{b}",
                        lambda size=size, b=b: bench_training(
                            s, trainers, size, b, device, train_precision, train_steps
                        ),
                    )
                    if row is not None:
                        report["training"].append(row)
    report["loadavg_end"] = os.getloadavg()[0]
    report["total_s"] = time.perf_counter() - t_start
    report["notes"] = [
        "ratio = diffusers s/step ÷ oneword s/step: > 1 means oneword is faster; CPU-s = process CPU seconds "
        "(all threads; meaningful on the CPU device only)",
        "train: diffusers encodes the batch with the VAE every step (its example); oneword draws latents "
        "from the VAE-moment cache filled once before training (inversion.train's default)",
        "diffusers AdamW runs over the whole 49,409-row token table, masked back after the step (its example); "
        "oneword's over the one learned vector",
    ]
    if args.quick:
        report["notes"].append("--quick: too few repetitions for a measurement")
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    except ImportError:
        pass
    args = build_parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    out = (
        Path(args.out)
        if args.out
        else ROOT / "bench" / (f"results-{torch.device(args.device).type}-{dt.date.today().isoformat()}.json")
    )
    report = run(args, out, Path(args.phase_dir) if args.phase_dir else out.parent)
    write_json(report, out)
    print(markdown(report))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
