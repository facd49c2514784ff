"""Every Triton configuration "auto" can route to, compiled for sm_80 and sm_90 on the CPU (no GPU needed).

Built by `bench.compile` through Triton's ahead-of-time API and its bundled ptxas, in one subprocess (this session's
kernels run under TRITON_INTERPRET=1, which replaces the compiler). Asserts: it compiles; no register spills in
fp16/bf16; shared memory within each architecture's limit (the sm_80 tiles, which sm_86/89 also run, and the fp32
backward at head dim 160 within sm_86/89's 99 KB); 128-bit global loads; attention main loops that load with
cp.async/TMA, on sm_90 with wgmma in every dot and on sm_80 with mma.sync.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import compile as bc

ROOT = Path(__file__).resolve().parents[1]
CASES = bc.cases()
MISSING = bc.toolchain_missing()

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=f"no GPU toolchain: {MISSING}")]


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("compile") / "figures.json"
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compile", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["case"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {c.label for c in CASES}
    return rows


@pytest.mark.parametrize("case", CASES, ids=[c.label.replace(" ", "-") for c in CASES])
def test_compiles_within_limits(figures: dict[str, dict], case: bc.Case) -> None:
    r = figures[case.label]
    half = case.dtype != torch.float32
    assert r["shared"] <= bc.SMEM_LIMIT[case.arch if case.arch >= 90 else 86], r  # sm_80 tiles run on sm_86/89 too
    if half:
        assert r["stack"] == 0 and r["local"] == 0, f"register spills: {r}"
        widest = max((bc._load_bits(op) for op in r["loads"]), default=0)
        if case.kernel != "gn_combine":  # a handful of fp32 partials
            assert widest == 128, f"widest global load {widest} bit: {r['loads']}"
    else:
        assert r["shared"] <= bc.SMEM_LIMIT[86], r  # the fp32 backward at head dim 160 fits sm_86/89 on sm_90 too
    if case.kernel in ("attn_fwd", "attn_dkdv", "attn_dq") and half:
        assert r["cp_async"] + r["tma"] > 0, f"main loop without cp.async/TMA: {r}"
        if case.arch >= 90:
            assert r["wgmma"] > 0 and r["mma_sync"] == 0, f"not every dot on wgmma: {r}"
        else:
            assert r["mma_sync"] > 0, r
