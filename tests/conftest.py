"""Tests run the Triton kernels on CPU tensors through Triton's interpreter.

TRITON_INTERPRET is read when @triton.jit runs, so it is set here, before any
test module imports the package.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from llama_kernels.ops import _triton  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every buffer a kernel allocates starts as NaN, so an element it fails to write shows."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_triton, "new_output", poisoned)
