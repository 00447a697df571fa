"""The native extension's place in the package: which backend runs by default, the fallback without it,
and its own argument checks. Its results against the reference are in each op's tests (KERNEL_BACKENDS)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama_kernels as lk
from llama_kernels import _native
from llama_kernels import reference as ref
from llama_kernels.ops import _triton
from utils import randn

built = pytest.mark.skipif(not _native.available("cpu"), reason="the native extension is not built")


@pytest.fixture
def no_interpreter(monkeypatch):
    """CPU tensors as a user without TRITON_INTERPRET sees them."""
    monkeypatch.setattr(_triton, "INTERPRET", False)


@built
def test_cpu_tensors_run_the_native_kernels_by_default(no_interpreter):
    x, w = randn(4, 32), randn(32)
    assert torch.equal(lk.rms_norm(x, w), lk.rms_norm(x, w, backend="native"))
    q, k = randn(1, 5, 4, 64), randn(1, 5, 2, 64)
    assert torch.equal(lk.flash_attention(q, k, k), lk.flash_attention(q, k, k, backend="native"))
    with pytest.raises(ValueError, match="backend: 'triton' needs CUDA tensors"):
        lk.rms_norm(x, w, backend="triton")


def test_without_the_extension_cpu_tensors_run_the_reference_and_say_so_once(no_interpreter, monkeypatch):
    monkeypatch.setattr(_native, "MISSING_REASON", "ImportError: not built")
    monkeypatch.setattr(_native, "available", lambda device_type="cpu": False)
    monkeypatch.setattr(_native, "_noticed", False)
    x, w = randn(4, 32), randn(32)
    with pytest.warns(UserWarning, match="native extension is not built .*pip install --no-build-isolation"):
        assert torch.equal(lk.rms_norm(x, w), ref.rms_norm(x, w))
    with pytest.raises(ValueError, match="backend: 'native' needs the native extension built"):
        lk.rms_norm(x, w, backend="native")


def test_an_op_a_backend_lacks_is_refused():
    q = randn(1, 9, 4, 64)
    with pytest.raises(ValueError, match="backend: 'cuda' does not implement flash_attention"):
        lk.flash_attention(q, q, q, backend="cuda")


def test_cuda_backend_needs_cuda_tensors():
    with pytest.raises(ValueError, match="backend: 'cuda' runs cuda tensors, got cpu tensors"):
        lk.rms_norm(randn(4, 32), randn(32), backend="cuda")
    with pytest.raises(ValueError, match="backend: 'cuda' does not implement flash_attention"):
        lk.flash_attention(*(randn(1, 5, 4, 64),) * 3, backend="cuda")


@built
@pytest.mark.parametrize("call,match", [
    (lambda ops: ops.rms_norm(randn(4, 32).double(), None, randn(32).double(), 1e-5),
     r"^rms_norm: x: expected dtype float32, bfloat16 or float16, got Double"),
    (lambda ops: ops.rms_norm(randn(32, 4).t(), None, randn(32), 1e-5),
     r"^rms_norm: x: expected a contiguous last dim \(stride 1\), got strides \[1, 4\]"),
    (lambda ops: ops.rms_norm(randn(4, 32), None, randn(31), 1e-5),
     r"^rms_norm: weight: expected shape \[32\], got \[31\]"),
    (lambda ops: ops.rms_norm(randn(4, 32).bfloat16(), None, randn(32).half(), 1e-5),
     r"^rms_norm: weight: expected dtype BFloat16 \(x's\) or float32, got Half"),
    (lambda ops: ops.rms_norm(randn(4, 32), randn(4, 31), randn(32), 1e-5),
     r"^rms_norm: residual: expected shape \[4, 32\], got \[4, 31\]"),
    (lambda ops: ops.rms_norm_backward(randn(4, 32).half(), None, randn(4, 32), randn(32), 1e-5),
     r"^rms_norm_backward: dy: expected dtype Float, got Half"),
    (lambda ops: ops.rope(*(randn(1, 5, 4, 64),) * 4, torch.zeros(1, 4, dtype=torch.long), randn(32), 1.0, False,
                          False), r"^rope: positions: expected shape \[1, 5\], got \[1, 4\]"),
    (lambda ops: ops.attention(randn(1, 5, 4, 64), randn(1, 5, 3, 64), randn(1, 5, 3, 64), True, 0.1),
     r"^attention: k: expected a number of heads dividing q's 4, got 3"),
    (lambda ops: ops.attention(randn(1, 5, 4, 64), randn(1, 5, 4, 64).half(), randn(1, 5, 4, 64), True, 0.1),
     r"^attention: k: expected dtype Float, got Half"),
    (lambda ops: ops.attention_kvcache(randn(1, 1, 4, 64), randn(1, 8, 4, 64), randn(1, 8, 4, 64),
                                       torch.tensor([3]), True, 0.1),
     r"^attention_kvcache: seqlens_k: expected dtype Int"),
    (lambda ops: ops.attention_kvcache(randn(1, 1, 4, 64), randn(1, 8, 4, 64), randn(1, 8, 4, 64),
                                       torch.tensor([9], dtype=torch.int32), True, 0.1),
     r"^attention_kvcache: seqlens_k: expected values in \[0, 8\] \(the cache length\), got 9 at index 0"),
    (lambda ops: ops.attention_backward(*(randn(1, 5, 4, 64),) * 4, randn(1, 6, 4, 64), randn(1, 4, 5), None, True,
                                        0.1),
     r"^attention_backward: o: expected shape \[1, 5, 4, 64\], got \[1, 6, 4, 64\]"),
    (lambda ops: ops.attention_backward(*(randn(1, 5, 4, 64),) * 5, randn(1, 4, 5).double(), None, True, 0.1),
     r"^attention_backward: lse: expected dtype Float, got Double"),
    (lambda ops: ops.attention_backward(*(randn(1, 5, 4, 64),) * 5, randn(1, 4, 5), randn(1, 5, 4), True, 0.1),
     r"^attention_backward: dlse: expected shape \[1, 4, 5\], got \[1, 5, 4\]"),
    (lambda ops: ops.pack_pairs(randn(4, 6)), r"^pack_pairs: b: expected dtype BFloat16, got Float"),
    (lambda ops: ops.bf16_matmul(randn(3, 5, dtype=torch.bfloat16), ops.pack_pairs(randn(4, 7, dtype=torch.bfloat16)),
                                 torch.empty(3, 7), False),
     r"^bf16_matmul: .*b_pairs: expected a contiguous \(\(K \+ 1\) / 2, N, 2\) = \(3, N, 2\)"),
    (lambda ops: ops.bf16_matmul(randn(3, 4, dtype=torch.bfloat16), ops.pack_pairs(randn(4, 7, dtype=torch.bfloat16)),
                                 torch.empty(3, 6), False), r"^bf16_matmul: .*out: expected shape \[3, 7\], got \[3, 6\]"),
], ids=["rms-float64", "rms-strided-rows", "rms-weight-shape", "rms-weight-dtype", "rms-residual-shape",
        "rms-backward-dy-dtype", "rope-positions-shape", "attention-heads", "attention-dtype", "seqlens-dtype",
        "seqlens-past-the-cache", "backward-o-shape", "backward-lse-dtype", "backward-dlse-shape",
        "pack-dtype", "matmul-pairs-shape", "matmul-out-shape"])
def test_the_extension_guards_its_memory_accesses(call, match):
    """Called directly (the public functions check their arguments first), the C++ ops refuse what would read or
    write out of bounds with a message "op: argument: expected ..., got ...": a RuntimeError from TORCH_CHECK, never
    a crash."""
    with pytest.raises(RuntimeError, match=match):
        call(_native.ops())


bf16_matmul = pytest.mark.skipif(not _native.available("cpu") or not _native.ops().bf16_matmul_available(),
                                 reason="the bf16 products need the extension, AVX-512 and oneDNN")


@bf16_matmul
@pytest.mark.extension
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 3, 5), (113, 64, 1023), (65, 1023, 7), (3, 4099, 130)])
@pytest.mark.parametrize("b_layout", ["rows", "transposed"])
def test_bf16_matmul_matches_float64(m, k, n, b_layout):
    """The cross-entropy's CPU matmuls: bf16 products, fp32 accumulation and output, odd K paired with a zero row,
    the blocks' edges at odd M and N, b packed from rows or from a transpose (the weight's .T); with accumulate,
    added to out's values."""
    ops = _native.ops()
    a = randn(m, k, dtype=torch.bfloat16)
    b = randn(k, n, dtype=torch.bfloat16) if b_layout == "rows" else randn(n, k, dtype=torch.bfloat16).T
    b_pairs = ops.pack_pairs(b)
    assert b_pairs.shape == ((k + 1) // 2, n, 2)
    want = a.double() @ b.double()
    bound = 4 * k * 2**-24 * (a.double().abs() @ b.double().abs())  # fp32 accumulation over k terms
    out = torch.full((m, n), float("nan"))
    ops.bf16_matmul(a, b_pairs, out, False)
    assert ((out.double() - want).abs() <= bound).all()
    base = randn(m, n)
    out = base.clone()
    ops.bf16_matmul(a, b_pairs, out, True)
    assert ((out.double() - want - base.double()).abs() <= bound + 2**-23 * base.double().abs()).all()


def test_the_cmake_library_loads_and_runs():
    """The CMake build's library (make test builds it first) registers the same ops for torch.ops.load_library."""
    library = Path(__file__).resolve().parent.parent / "build" / "cmake" / "libllama_kernels_C.so"
    if not library.exists():
        pytest.skip("no CMake build (make cmake-check makes one)")
    script = ("import torch; torch.ops.load_library(%r); x = torch.randn(3, 8); w = torch.randn(8);"
              "y, _ = torch.ops.llama_kernels_C.rms_norm(x, None, w, 1e-5);"
              "want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w;"
              "assert torch.allclose(y, want, atol=1e-5), (y - want).abs().max(); print('ok')" % str(library))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
