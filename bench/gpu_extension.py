"""The GPU check's part for the compiled extension: build it on the card's machine, test its CUDA kernels, and time
them beside the Triton kernels (issue 6).

The card's machine has torch with CUDA and nvcc but no build of this package, so
``start_build`` compiles, in a background process while the GPU runs the other parts:
the whole extension (``torch.utils.cpp_extension.load`` over csrc/, registering
``torch.ops.llama_kernels_C``), and the standalone CUDA test ``csrc/tests/test_cuda_kernels.cu``.
``check`` then runs that test, compares ``backend="cuda"`` with the Triton kernels and
the reference, and times both as a fraction of the copy bandwidth.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import llama_kernels as lk
from llama_kernels import reference
from llama_kernels.bench import harness

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = Path("/tmp/llama_kernels_gpu_build")  # not under OUTDIR: only a few files come back from there
LIBRARY_NAME = "llama_kernels_C_gpu"
TOKENS = 16384
HIDDEN = (4096, 8192)
HEADS = ((32, 32, 128), (64, 8, 128))

sys.path.insert(0, str(ROOT / "csrc"))
import build_recipe  # noqa: E402  (csrc/build.json: the sources, flags and architectures setup.py and CMake use)

_BUILD_SCRIPT = f"""
import os, sys
from torch.utils import cpp_extension
sys.path.insert(0, {str(ROOT / "csrc")!r})
import build_recipe
os.makedirs({str(BUILD_DIR)!r}, exist_ok=True)
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build_recipe.cuda_arch_list())
path = cpp_extension.load({LIBRARY_NAME!r}, [{str(ROOT)!r} + "/" + s for s in build_recipe.sources(with_cuda=True)],
    extra_include_paths=[{str(ROOT)!r} + "/" + build_recipe.RECIPE["include_dir"]],
    extra_cflags=build_recipe.cxx_flags(with_cuda=True), extra_cuda_cflags=build_recipe.nvcc_flags(),
    extra_ldflags=build_recipe.link_flags(), build_directory={str(BUILD_DIR)!r}, is_python_module=False, verbose=False)
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


def check(rec, builds, copy_gbps: float, deadline: float) -> None:
    """The CUDA test, then backend="cuda" against Triton and the reference, timed (min/median/max)."""
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
    rows = results.setdefault("rows", [])
    for hidden in HIDDEN:
        x, r = (torch.randn(TOKENS, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16)
        want_y, want_h = reference.rms_norm(x, w, 1e-5, residual=r)
        for label, fn, nbytes in (
            ("rms_norm", lambda b: lk.rms_norm(x, w, backend=b), 2 * x.numel() * 2),
            ("rms_norm_residual", lambda b: lk.rms_norm(x, w, residual=r, backend=b), 4 * x.numel() * 2),
        ):
            for backend in ("cuda", "triton"):
                got = fn(backend)
                y = got[0] if isinstance(got, tuple) else got
                want = want_y if isinstance(got, tuple) else reference.rms_norm(x, w, 1e-5)
                ok = _close(y, want)
                _record(rec, rows, f"{label} T={TOKENS} H={hidden}", backend, fn, nbytes, copy_gbps, ok)
    for hq, hk, d in HEADS:
        q = torch.randn(1, TOKENS, hq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, TOKENS, hk, d, device="cuda", dtype=torch.bfloat16)
        for interleaved in (False, True):
            want = reference.apply_rope(q, k, None, lk.rope_inv_freq(d, 1e6, device="cuda"), interleaved)
            nbytes = 2 * (q.numel() + k.numel()) * 2
            layout = "interleaved" if interleaved else "half"
            for backend in ("cuda", "triton"):
                def fn(b, interleaved=interleaved):
                    return lk.apply_rope(q, k, theta=1e6, interleaved=interleaved, backend=b)
                got = fn(backend)
                ok = all(_close(a, e) for a, e in zip(got, want))
                _record(rec, rows, f"rope {hq}/{hk}x{d} {layout} S={TOKENS}", backend, fn, nbytes, copy_gbps, ok)


def _close(got, want) -> bool:
    """Within two bf16 roundings (2^-8 relative each: the kernel's and the reference's) of the reference."""
    return bool(((got.float() - want.float()).abs() <= 2 * 2**-8 * want.float().abs() + 1e-5).all())


def _record(rec, rows, label, backend, fn, nbytes, copy_gbps, ok) -> None:
    timing = harness.measure(lambda: fn(backend), torch.device("cuda"))  # the benchmark's own timing
    median = timing.median_ms
    gbps = nbytes / (median * 1e-3) / 1e9
    rows.append({"case": label, "backend": backend, "ok": ok, "min_ms": timing.min_ms, "median_ms": median,
                 "max_ms": timing.max_ms, "gbps": gbps, "of_copy": gbps / copy_gbps})
    print(f"  {label:40} {backend:7} {'ok' if ok else 'WRONG':5} {median:8.4f} ms  {gbps:6.0f} GB/s "
          f"{gbps / copy_gbps:5.0%} of copy", flush=True)
    if not ok:
        rec.fail(f"extension: {label} on {backend} differs from the reference")
