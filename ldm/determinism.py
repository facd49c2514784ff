"""`--deterministic`: run-to-run bit-identical results, and exactly what that promise covers on each device.

What `enable(device)` switches on (process-wide, before the model is loaded):
  * `torch.use_deterministic_algorithms(True)`: an op with no deterministic implementation raises instead of
    silently varying; cuDNN `deterministic=True`, `benchmark=False` (no timing-based algorithm choice);
    TF32 off for matmuls and convolutions.
  * `CUBLAS_WORKSPACE_CONFIG=:4096:8` (cuBLAS needs a fixed workspace to be deterministic; set before the
    first CUDA matmul).
  * attention backend "math" and norm/GEGLU kernels "math": the reference paths. SDPA's flash and
    memory-efficient backwards accumulate with atomics, and Triton autotuning picks configurations by timing.
  * the global RNGs seeded from `seed` (our own randomness already comes from explicit generators).

What it guarantees, given the same code, torch version, seed, options and thread count (`torch.set_num_threads`):
  cpu   bit-identical images and learned vectors run to run on the same machine; also without the flag, since
        every CPU kernel we use is deterministic (the flag only adds the checks). Across CPUs with other
        instruction sets (AVX2 vs AVX-512) or thread counts, sums may be ordered differently: close, not equal.
  cuda  bit-identical run to run on the same GPU model, driver and CUDA/cuDNN versions. Not across GPU
        models, CUDA versions or CPU vs GPU (different kernels and summation orders); slower than the default.
  mps   best effort: PyTorch documents no deterministic mode for Metal; repeated runs have been identical in
        practice but nothing enforces it, and a warning says so.
Distributed training (DDP) adds an all-reduce whose order is fixed per world size: same world size, same result.
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from ldm import attention

log = logging.getLogger(__name__)

__all__ = ["enable", "GUARANTEES"]

GUARANTEES = {
    "cpu": "bit-identical run to run on this machine (same torch, seed, options, thread count)",
    "cuda": "bit-identical run to run on this GPU model, driver and CUDA/cuDNN version (not across GPUs)",
    "mps": "best effort only: PyTorch has no enforced deterministic mode for Metal",
}


def enable(device: torch.device | str, seed: int | None = None) -> str:
    """Switch on deterministic algorithms and reference kernels for `device`; returns the guarantee in words."""
    device = torch.device(device)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ["ONEWORD_KERNELS"] = "math"
    attention.set_backend("math")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
    guarantee = GUARANTEES.get(device.type, "no guarantee for this device type")
    if device.type == "mps":
        log.warning("--deterministic on MPS: %s", guarantee)
    else:
        log.info("deterministic mode (%s): %s", device.type, guarantee)
    return guarantee
