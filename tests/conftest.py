"""Shared pytest setup."""

import os

import pytest
import torch

# Triton kernels run on CPU through Triton's interpreter when no GPU exists; it must be chosen before
# any @triton.jit function is defined, i.e. before ldm.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """One intra-op thread while a test runs: tiny models are faster so on a shared machine, and it is what
    the CLI subprocesses use (OMP_NUM_THREADS=1), so in- and out-of-process float results agree."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread_per_module():
    """`one_thread` for a whole module, so module-scoped model fixtures are built on one thread too."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
