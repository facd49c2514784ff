"""Shared pytest setup."""
import os

import torch

# Triton kernels run on CPU through Triton's interpreter when no GPU exists; it must be chosen before
# any @triton.jit function is defined, i.e. before ldm.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
