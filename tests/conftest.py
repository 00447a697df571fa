"""The suite runs on one device, chosen by ``--device`` (default cpu).

    pytest tests                  # CPU: the Triton kernels through Triton's interpreter, the C++ kernels
    pytest tests --device cuda    # the card: the Triton kernels compiled, the extension's CUDA kernels if built
    pytest tests --device cuda --extension-library LIB -m extension   # the extension's kernels only, from a
                                  # library built apart (bench/gpu_check.py builds one on the card)

TRITON_INTERPRET is read when @triton.jit runs, i.e. when llama_kernels is imported: it is set (CPU
only) in pytest_configure, after the options are parsed and before any test module is imported. So
nothing here imports llama_kernels at module level.

How a test opts in to ``--device``: it takes the ``device`` fixture and builds every tensor on it
(``utils.randn(..., device=device)``, ``torch.tensor(..., device=device)``), and parametrizes its
backends with ``utils.kernel_backends(op)`` (Triton plus the extension's backend for that device,
where the extension implements the op). A test that does not take ``device`` builds CPU tensors:
it is marked ``cpu_only`` here, and ``--device cuda`` deselects every ``cpu_only`` test (mark one
explicitly where it takes no device for a reason, e.g. it tests the C++ CPU kernels).
"""

import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", choices=("cpu", "cuda"), default="cpu",
                     help="where the op tests build their tensors (default cpu: the Triton interpreter)")
    parser.addoption("--extension-library", metavar="PATH",
                     help="load the extension from this library (torch.ops.load_library) before collecting")


def pytest_configure(config):
    device = config.getoption("--device")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        raise pytest.UsageError("--device cuda: unset TRITON_INTERPRET (the kernels must be compiled for the card)")
    if config.getoption("--extension-library"):
        torch.ops.load_library(config.getoption("--extension-library"))
    import utils  # tests/ is on sys.path (this file's folder); utils imports llama_kernels lazily

    utils.DEVICE = torch.device(device)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" not in item.fixturenames:
            item.add_marker(pytest.mark.cpu_only)
    if config.getoption("--device") != "cpu":
        on_cpu_only = [item for item in items if item.get_closest_marker("cpu_only")]
        config.hook.pytest_deselected(items=on_cpu_only)
        items[:] = [item for item in items if not item.get_closest_marker("cpu_only")]


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the op tests build their tensors on (``--device``)."""
    import utils

    return utils.DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every buffer a kernel allocates starts as NaN, so an element it fails to write shows."""
    from llama_kernels.ops import _triton

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_triton, "new_output", poisoned)
