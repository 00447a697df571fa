"""The RMSNorm kernels (Triton: interpreted on CPU; the extension's) against the reference, on --device."""

import pytest
import torch

import llama_kernels as lk
from llama_kernels import reference as ref
from llama_kernels.ops import _triton, rms_norm
from utils import ULP, assert_close, kernel_backends, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = kernel_backends("rms_norm")
pytestmark = pytest.mark.usefixtures("poison_outputs")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (7, 5120), (113, 1023), (3, 6656), (1, 1), (2, 32768)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_reference(device, backend, dtype, rows, hidden, with_residual):
    x, w = randn(rows, hidden, dtype=dtype, device=device), randn(hidden, dtype=dtype, device=device)
    r = randn(rows, hidden, dtype=dtype, device=device) if with_residual else None
    out = lk.rms_norm(x, w, 1e-5, residual=r, backend=backend)
    if with_residual:
        out, h = out
        assert_close(h, x + r, ulps=1)
        x = h  # y is checked given the kernel's h: its one-ulp rounding differences would count twice
    assert_close(out, ref.rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_in_its_own_dtype(device, backend, x_dtype, w_dtype):
    x, w = randn(5, 640, dtype=x_dtype, device=device), randn(640, dtype=w_dtype, device=device)
    out = lk.rms_norm(x, w, backend=backend)
    assert out.dtype == torch.promote_types(x_dtype, w_dtype)
    # An fp32 result still carries the rounding of the normalized value to x's dtype (Meta's .type_as(x)).
    assert_close(out, ref.rms_norm(x, w), rtol=ULP.get(x_dtype, 1e-5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_strided_rows(device, backend):
    big = randn(2, 9, 8192, dtype=torch.bfloat16, device=device)
    x = big[:, 1:8, 1000:6120]  # (2, 7, 5120) with row stride 8192: no copy needed
    # not a (rows, N) view
    r = randn(2, 7, 5120, dtype=torch.bfloat16, device=device).transpose(0, 1).contiguous().transpose(0, 1)
    w = randn(5120, dtype=torch.bfloat16, device=device)
    y, h = lk.rms_norm(x, w, residual=r, backend=backend)
    assert y.shape == h.shape == (2, 7, 5120)
    assert_close(h, x + r, ulps=1)
    assert_close(y, ref.rms_norm(h, w))
    assert_close(lk.rms_norm(x.transpose(0, 1), w, backend=backend), ref.rms_norm(x.transpose(0, 1), w))



# Bits of two unusual nans: a signaling one with only the lowest payload bit, a negative one with every bit set.
# (Kernels round without a nan test where every nan they can see rounds to itself: csrc/cpu/rms_norm.cpp.)
NAN_BITS = {torch.bfloat16: (0x7F81, -1), torch.float16: (0x7C01, -1), torch.float32: (0x7F800001, -1)}
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_values_propagate_like_the_reference(device, backend, dtype, with_residual):
    """A nan or inf in a row makes that row what the reference makes it (a nan row; inf's row nan and zeros), and
    no other row changes."""
    x, w = randn(7, 1023, dtype=dtype, device=device), randn(1023, dtype=dtype, device=device)
    x[1, 5], x[2, 0], x[3, 1022] = float("nan"), float("inf"), float("-inf")
    x.view(INT_VIEW[dtype])[4, 7], x.view(INT_VIEW[dtype])[5, 100] = NAN_BITS[dtype]
    r = randn(7, 1023, dtype=dtype, device=device) if with_residual else None
    out = lk.rms_norm(x, w, 1e-5, residual=r, backend=backend)
    if with_residual:
        out, h = out
        torch.testing.assert_close(h, x + r, equal_nan=True, rtol=ULP.get(dtype, 1e-6), atol=0)
        x = h
    want = ref.rms_norm(x, w, 1e-5)
    assert want[1:6].isnan().any(dim=1).all() and not want[[0, 6]].isnan().any()  # the test's premise
    assert torch.equal(out.isnan(), want.isnan())
    assert_close(out[~want.isnan()], want[~want.isnan()])

def _grads(fn, inputs, gy, gh):
    """Gradients of sum(y * gy) (+ sum(h * gh)) with respect to inputs = (x, weight[, residual])."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    x, w, *r = inputs
    out = fn(x, w, residual=r[0] if r else None)
    loss = (out[0] * gy).sum() + (out[1] * gh).sum() if r else (out * gy).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 64), (113, 5120), (37, 1023), (5, 10007)])  # 10007: chunked rows
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_gradients_match_reference(device, backend, dtype, rows, hidden, with_residual):
    inputs = [randn(rows, hidden, dtype=dtype, device=device), (1 + 0.1 * randn(hidden, device=device)).to(dtype)]
    if with_residual:
        inputs.append(randn(rows, hidden, dtype=dtype, device=device))
    gy, gh = randn(rows, hidden, dtype=dtype, device=device), randn(rows, hidden, dtype=dtype, device=device)

    def kernel(x, w, residual):
        return lk.rms_norm(x, w, residual=residual, backend=backend)

    got = _grads(kernel, inputs, gy, gh)
    # The ideal answer is the fp32 gradient (for 16-bit inputs, rounded once at the end).
    ideal = _grads(ref.rms_norm, [t.float() for t in inputs], gy.float(), gh.float())
    for name, g, want in zip(("x", "weight", "residual"), got, ideal):
        assert g.dtype == dtype, name
        scale = rows**0.5 if name == "weight" else 1.0  # dweight's rounding error grows with the rows summed
        if dtype == torch.float32:
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5 * scale)
        elif name == "weight":
            # Each term dy * cast(n) uses n rounded to the input dtype (Meta's .type_as), and h itself
            # is rounded: the sum may differ from the fp32 ideal by up to two ulp of every term.
            h = sum(t.float() for t in inputs[::2])
            n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
            bound = 2 * ULP[dtype] * (gy.float() * n).abs().sum(0) + 2 * ULP[dtype] * want.abs()
            assert ((g.float() - want).abs() <= bound).all(), ((g.float() - want).abs() - bound).max()
        else:
            torch.testing.assert_close(g.float(), want, rtol=3 * ULP[dtype], atol=1e-2)


def test_dweight_is_deterministic(device):
    x, w = randn(257, 1023, device=device).requires_grad_(), randn(1023, device=device).requires_grad_()
    gy = randn(257, 1023, device=device)
    runs = [torch.autograd.grad((lk.rms_norm(x, w, backend="triton") * gy).sum(), (x, w)) for _ in range(3)]
    for dx, dw in runs[1:]:
        assert torch.equal(dx, runs[0][0]) and torch.equal(dw, runs[0][1])


def test_residual_inputs_both_get_the_gradient_and_accumulate_apart(device):
    x, r = randn(3, 64, device=device).requires_grad_(), randn(3, 64, device=device).requires_grad_()
    w = randn(64, device=device)
    for _ in range(2):
        y, h = lk.rms_norm(x, w, residual=r, backend="triton")
        (y.sum() + h.sum()).backward()
    assert x.grad is not r.grad
    torch.testing.assert_close(x.grad, r.grad)
    x.grad.zero_()
    assert r.grad.abs().sum() > 0


def test_row_offsets_past_2_31_elements(device):
    """Row 2 starts 2^31 + 16 elements in: int32 offsets would wrap (the interpreter wraps like the GPU)."""
    hidden, row_stride = 64, 2**30 + 8
    # 4 GiB, untouched but three rows (on CPU lazily allocated; on the card allocated, never written)
    storage = torch.empty(2 * row_stride + hidden, dtype=torch.float16, device=device)
    x = storage.as_strided((3, hidden), (row_stride, 1))
    x.copy_(randn(3, hidden, dtype=torch.float16, device=device))
    w = randn(hidden, dtype=torch.float16, device=device)
    y = lk.rms_norm(x, w, backend="triton")
    assert_close(y, ref.rms_norm(x.clone(), w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(device, backend):
    x, w = randn(0, 4096, device=device), randn(4096, device=device)
    assert lk.rms_norm(x, w, backend=backend).shape == (0, 4096)


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda: (randn(4, 8).int(), randn(8)), TypeError, r"x: expected dtype in \(float16, bfloat16, float32\), got int32"),
        (lambda: (randn(4, 8), randn(8, 1)), ValueError, r"weight: expected 1 dimensions"),
        (lambda: (randn(4, 8), randn(7)), ValueError, r"weight: expected shape \(8,\)"),
        (lambda: (randn(4, 8), randn(8).to("meta")), ValueError, r"weight: expected device cpu"),
        (lambda: ([1.0], randn(8)), TypeError, r"x: expected a torch.Tensor, got list"),
        (lambda: (randn(()), randn(1)), ValueError, r"x: expected at least 1 dimension"),
    ],
)
def test_bad_input_is_refused(make_args, error, match):
    with pytest.raises(error, match=match):
        lk.rms_norm(*make_args())


def test_bad_residual_and_eps_are_refused():
    x, w = randn(4, 8), randn(8)
    with pytest.raises(ValueError, match=r"residual: expected x's shape \(4, 8\)"):
        lk.rms_norm(x, w, residual=randn(4, 9))
    with pytest.raises(TypeError, match="residual: expected dtype in"):  # another float dtype is fine: test_inputs.py
        lk.rms_norm(x, w, residual=randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="eps: expected a non-negative float"):
        lk.rms_norm(x, w, eps=-1.0)
    with pytest.raises(ValueError, match="backend: expected one of"):
        lk.rms_norm(x, w, backend="cutlass")


def test_opcheck(device):
    x, w, r = (randn(*shape, device=device).requires_grad_() for shape in ((5, 96), (96,), (5, 96)))
    torch.library.opcheck(torch.ops.llama_kernels.rms_norm, (x, w, 1e-5, "triton"))
    torch.library.opcheck(torch.ops.llama_kernels.rms_norm_residual, (x, r, w, 1e-5, "triton"))
    torch.library.opcheck(torch.ops.llama_kernels.rms_norm_backward, (randn(5, 96, device=device), None, x.detach(), w.detach(), 1e-5, "triton"))


@pytest.mark.parametrize("tuning", [rms_norm.FORWARD_TUNING, rms_norm.BACKWARD_TUNING], ids=lambda t: t.kernel)
def test_every_sweep_candidate_at_4096_is_correct(tuning):
    """What the GPU check's sweep may pick for 4096-wide rows, each forced under the interpreter, with a residual
    (9 rows: not a multiple of any BLOCK_M)."""
    default = rms_norm.gpu_default(4096)
    candidates = tuning.candidates(default, "sm90", {"n_cols": 4096, "dtype": "float32"})
    assert len(candidates) > 1 and candidates[0] == default
    inputs = [randn(9, 4096), 1 + 0.1 * randn(4096), randn(9, 4096)]
    gy, gh = randn(9, 4096), randn(9, 4096)
    ideal = _grads(ref.rms_norm, inputs, gy, gh)

    def kernel(x, w, residual):
        return lk.rms_norm(x, w, residual=residual, backend="triton")

    for config in candidates:
        with _triton.forced_config(tuning.kernel, lambda _: config) as asks:
            got = _grads(kernel, inputs, gy, gh)
        assert asks, config  # the forced config is what launched
        for name, g, want in zip(("x", "weight", "residual"), got, ideal):
            torch.testing.assert_close(g, want, rtol=1e-5, atol=3e-5, msg=lambda m: f"{config} {name}: {m}")
