"""Compile the Triton kernels for sm_80 and sm_90 on the CPU and read what the GPU would run: no GPU needed.

Contract
  * `compile_kernel(case)` builds one `Case` through Triton's ahead-of-time API (`ASTSource` + `triton.compile`
    with a `GPUTarget`) and the ptxas bundled with Triton, exactly as a launch from `ldm.kernels` would specialise
    it (the same tile table, constexprs and host-checked alignment; pointers 16-byte aligned, integer strides left
    unspecialised — the worst case the launch can meet), and returns a `Figures` row: registers, stack/local bytes
    (spills), static + dynamic shared memory, and PTX facts (global load widths, cp.async, TMA, wgmma, mma.sync).
  * `cases()` lists every configuration backend "auto" can route to (attention forward, Δ, dK/dV and dQ at head
    dims 40/64/80/160 in fp16 and bf16; fused GroupNorm(+SiLU) statistics (chunked and single-chunk), merge,
    apply and backward; GEGLU forward and backward) plus the fp32 attention backward at head dim 160 (its shared
    memory must fit sm_86/89's 99 KB).
  * Results are cached per process; `toolchain_missing()` names what is absent (ptxas, cuobjdump), else None.
  * `python -m bench.compile [--arch 80 90] [--json PATH]` prints the table recorded in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # per block, opt-in
HEAD_DIMS = (40, 64, 80, 160)
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Case:
    kernel: str  # "attn_fwd", "attn_delta", "attn_dkdv", "attn_dq", "gn_stats", "gn_combine", "gn_apply", ...
    dtype: torch.dtype
    arch: int  # compute capability, 80 or 90
    head_dim: int = 0
    silu: bool = False

    @property
    def label(self) -> str:
        extra = f" d{self.head_dim}" if self.head_dim else (" silu" if self.silu else "")
        return f"sm_{self.arch} {self.kernel}{extra} {_DTYPES[self.dtype]}"


@dataclass
class Figures:
    case: str
    regs: int
    stack: int  # bytes of stack frame (register spills land here)
    local: int
    shared: int  # static + dynamic bytes per block
    num_warps: int
    num_stages: int
    block: str
    loads: dict[str, int] = field(default_factory=dict)  # ld.global opcode (with vector width) -> count
    cp_async: int = 0
    tma: int = 0
    wgmma: int = 0
    mma_sync: int = 0
    seconds: float = 0.0

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0

    @property
    def widest_load_bits(self) -> int:
        bits = [_load_bits(op) for op in self.loads]
        return max(bits, default=0)


def _load_bits(op: str) -> int:
    m = re.search(r"(?:\.v(\d))?\.[bfsu](\d+)$", op)
    return (int(m.group(1) or 1) * int(m.group(2))) if m else 0


def _bin(tool: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool


def toolchain_missing() -> str | None:
    """What is missing to compile for NVIDIA GPUs here (None when everything is present)."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as err:
        return f"triton's ahead-of-time API does not import ({err})"
    for tool in ("ptxas", "cuobjdump"):
        if not os.access(_bin(tool), os.X_OK):
            return f"{_bin(tool)} is missing"
    return None


def _attention_case(case: Case):
    from ldm.kernels import attention as A
    from ldm.kernels import flash as F

    fn = {
        "attn_fwd": F.attn_fwd,
        "attn_delta": F.attn_bwd_delta,
        "attn_dkdv": F.attn_bwd_dkdv,
        "attn_dq": F.attn_bwd_dq,
    }[case.kernel]
    kind = case.kernel.removeprefix("attn_")
    da, db = A.split_head_dim(case.head_dim)
    bm, bn, warps, stages = A.tiles(case.head_dim, case.dtype, kind, case.arch)
    meta = dict(
        HEAD_DIM=case.head_dim,
        DA=da,
        DB=db,
        ALIGN=16 // torch.empty((), dtype=case.dtype).element_size(),
        CAUSAL=False,
        IEEE=case.dtype == torch.float32,
        BLOCK_M=bm,
        BLOCK_N=bn,
    )
    return fn, meta, {"LSE": "fp32", "DELTA": "fp32"}, warps, stages, f"{bm}x{bn} D={da}+{db}"


def _norm_case(case: Case):
    from ldm.kernels import norm as N

    fn = {
        "gn_stats": N._gn_stats,
        "gn_stats_final": N._gn_stats,
        "gn_combine": N._gn_combine,
        "gn_apply": N._gn_apply,
        "gn_bwd_reduce": N._gn_bwd_reduce,
        "gn_bwd_dx": N._gn_bwd_dx,
    }[case.kernel]
    final = case.kernel == "gn_stats_final"  # a group of one chunk: statistics without the merge kernel
    meta = {"SILU": case.silu, **N.launch_meta(case.kernel.removesuffix("_final"), split=1 if final else 64)}
    warps = meta.pop("num_warps")
    stages = meta.pop("num_stages")
    fp32 = {n: "fp32" for n in ("W", "B", "MEAN", "RSTD", "PART", "PMEAN", "PM2", "DW", "DB", "C1", "C2")}
    return fn, meta, fp32, warps, stages, f"BLOCK={meta.get('BLOCK', '')}"


def _geglu_case(case: Case):
    from ldm.kernels import geglu as G

    fn = {"geglu_fwd": G._geglu_fwd, "geglu_bwd": G._geglu_bwd}[case.kernel]
    meta = dict(G.launch_meta(16 // torch.empty((), dtype=case.dtype).element_size()))
    warps = meta.pop("num_warps")
    stages = meta.pop("num_stages")
    return fn, meta, {}, warps, stages, f"BLOCK={meta['BLOCK']}"


_CACHE: dict[Case, Figures] = {}
_INT_ARGS = {"H", "NQ", "NK", "L", "S", "C", "CG", "G", "SPLIT", "CHUNK", "CPB"}


def compile_kernel(case: Case) -> Figures:
    """Compile one case for its architecture and read its resource figures (cached per process)."""
    if case in _CACHE:
        return _CACHE[case]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if case.kernel.startswith("attn_"):
        fn, meta, fixed, warps, stages, block = _attention_case(case)
    elif case.kernel.startswith("gn_"):
        fn, meta, fixed, warps, stages, block = _norm_case(case)
    else:
        fn, meta, fixed, warps, stages, block = _geglu_case(case)
    elem = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[case.dtype]
    names = list(inspect.signature(fn.fn).parameters)
    meta = {k: v for k, v in meta.items() if k in names}
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in meta:
            signature[name] = "constexpr"
        elif name in ("qk_scale", "sm_scale", "eps", "inv_len"):
            signature[name] = "fp32"
        elif name[0].isupper() and (name not in _INT_ARGS or case.kernel.startswith("geglu")):
            signature[name] = "*" + fixed[name] if name in fixed else elem
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
    start = time.perf_counter()
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in meta.items()}, attrs=attrs)
    kernel = triton.compile(
        src, target=GPUTarget("cuda", case.arch, 32), options={"num_warps": warps, "num_stages": stages}
    )
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run(
            [str(_bin("cuobjdump")), "-res-usage", str(cubin)], check=True, capture_output=True, text=True
        ).stdout
    res = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage.split("Function", 1)[1]))
    ptx = kernel.asm["ptx"]
    loads: dict[str, int] = {}
    for op in re.findall(r"\bld\.global[\w.]*", ptx):
        loads[op] = loads.get(op, 0) + 1
    fig = Figures(
        case=case.label,
        regs=int(res["REG"]),
        stack=int(res["STACK"]),
        local=int(res["LOCAL"]),
        shared=int(res["SHARED"]) + int(kernel.metadata.shared),
        num_warps=warps,
        num_stages=stages,
        block=block,
        loads=loads,
        cp_async=len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx)),
        tma=len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
        seconds=seconds,
    )
    _CACHE[case] = fig
    return fig


def cases(archs: tuple[int, ...] = (80, 90)) -> list[Case]:
    """Every configuration "auto" can route to, per architecture, plus the fp32 attention backward at d 160."""
    out = []
    for arch in archs:
        for dtype in (torch.float16, torch.bfloat16):
            for d in HEAD_DIMS:
                out += [Case(k, dtype, arch, head_dim=d) for k in ("attn_fwd", "attn_delta", "attn_dkdv", "attn_dq")]
            for silu in (False, True):
                out += [Case(k, dtype, arch, silu=silu) for k in ("gn_apply", "gn_bwd_reduce", "gn_bwd_dx")]
            out += [
                Case(k, dtype, arch) for k in ("gn_stats", "gn_stats_final", "gn_combine", "geglu_fwd", "geglu_bwd")
            ]
        out += [Case(k, torch.float32, arch, head_dim=160) for k in ("attn_dkdv", "attn_dq")]
    return out


def table(rows: list[Figures]) -> str:
    head = (
        "| config | tile | warps/stages | regs | spill B | smem KB | widest ld.global | cp.async | TMA | wgmma "
        "| mma.sync |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.block} | {r.num_warps}/{r.num_stages} | {r.regs} | {r.stack + r.local} | "
            f"{r.shared / 1024:.1f} | {r.widest_load_bits} bit | {r.cp_async} | {r.tma} | {r.wgmma} | "
            f"{r.mma_sync} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities ×10 (≥ 80)")
    p.add_argument("--only", default="", help="substring of the config label to keep (e.g. 'attn_fwd d40')")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    missing = toolchain_missing()
    if missing:
        print(f"bench.compile: {missing}", file=sys.stderr)
        return 2
    rows = [compile_kernel(c) for c in cases(tuple(args.arch)) if args.only in c.label]
    print(table(rows))
    if args.json:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(r) for r in rows], indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
