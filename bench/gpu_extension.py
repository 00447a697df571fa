"""The GPU check's part for the compiled extension: build it on the card's machine, test its CUDA kernels, and time
them beside the Triton kernels (issue 6).

The card's machine has torch with CUDA and nvcc but no build of this package, so
``start_build`` compiles, in a background process while the GPU runs the other parts:
the whole extension (``torch.utils.cpp_extension.load`` over csrc/, registering
``torch.ops.llama_kernels_C``), and the standalone CUDA test ``csrc/tests/test_cuda_kernels.cu``.
``load`` then runs that test and loads the library: the test suite's extension tests
(``pytest --extension-library``) check ``backend="cuda"`` against the reference, and the
benchmark's ``ours_cuda`` rows time it beside the Triton kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = Path("/tmp/llama_kernels_gpu_build")  # not under OUTDIR: only a few files come back from there
LIBRARY_NAME = "llama_kernels_C_gpu"

sys.path.insert(0, str(ROOT / "csrc"))
import build_recipe  # noqa: E402  (csrc/build.json: the sources, flags and architectures setup.py and CMake use)

_BUILD_SCRIPT = f"""
import os, sys
from torch.utils import cpp_extension
sys.path.insert(0, {str(ROOT / "csrc")!r})
import build_recipe
os.makedirs({str(BUILD_DIR)!r}, exist_ok=True)
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build_recipe.cuda_arch_list())
from pathlib import Path
kernels = build_recipe.compile_cpu_kernels(Path({str(ROOT)!r}), Path({str(BUILD_DIR)!r}) / "cpu_isa",
                                           os.cpu_count() or 8)
path = cpp_extension.load({LIBRARY_NAME!r}, [{str(ROOT)!r} + "/" + s for s in build_recipe.sources(with_cuda=True)],
    extra_include_paths=[{str(ROOT)!r} + "/" + build_recipe.RECIPE["include_dir"]],
    extra_cflags=build_recipe.cxx_flags(with_cuda=True), extra_cuda_cflags=build_recipe.nvcc_flags(),
    extra_ldflags=[*build_recipe.link_flags(), *kernels], build_directory={str(BUILD_DIR)!r}, is_python_module=False,
    verbose=False)
print("LIBRARY", path)
"""


def start_build() -> tuple[subprocess.Popen, subprocess.Popen]:
    """The extension's and the CUDA test's builds, started in the background (CPU work)."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MAX_JOBS": str(os.cpu_count() or 8)}
    extension = subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=env)
    cuda_sources = [str(ROOT / source) for source in build_recipe.RECIPE["cuda_kernels"]]
    cuda_test = subprocess.Popen(
        ["nvcc", *build_recipe.nvcc_flags(), *build_recipe.gencode_flags(),
         f"-I{ROOT / build_recipe.RECIPE['include_dir']}", str(ROOT / "csrc/tests/test_cuda_kernels.cu"),
         *cuda_sources, "-o", str(BUILD_DIR / "test_cuda_kernels")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return extension, cuda_test


def _wait(process: subprocess.Popen, what: str, deadline: float) -> str:
    try:
        out, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        raise RuntimeError(f"{what}: still building at the time budget's end") from None
    if process.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{out[-4000:]}")
    return out


def load(rec, builds, deadline: float) -> str | None:
    """Wait for the builds, run the CUDA test, and load the extension (its ops join ``torch.ops.llama_kernels_C``,
    so ``backend="cuda"`` runs here and the benchmark's ``ours_cuda`` rows time it); the library's path, or None."""
    extension, cuda_test = builds
    results = rec.results.setdefault("extension", {})
    _wait(cuda_test, "nvcc test_cuda_kernels", deadline)
    run = subprocess.run([str(BUILD_DIR / "test_cuda_kernels")], capture_output=True, text=True, timeout=300)
    results["cuda_test"] = {"returncode": run.returncode, "tail": (run.stdout + run.stderr)[-2000:]}
    print(results["cuda_test"]["tail"])
    if run.returncode != 0:
        rec.fail("extension: csrc/tests/test_cuda_kernels failed")
    out = _wait(extension, "the extension", deadline)
    library = next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("LIBRARY "))
    torch.ops.load_library(library)
    results["library"] = library
    return library
