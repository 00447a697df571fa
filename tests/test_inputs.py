"""Robust inputs (issue 12): every odd input gives the reference's result or a ValueError/TypeError naming the argument.

Layouts a kernel could misread (strided and expanded views), outputs that alias themselves, dtypes that differ
under autocast, meta tensors, empty sizes and values of the wrong type, op by op.
"""

import pytest
import torch

import llama_kernels as lk
from llama_kernels import reference as ref
from utils import KERNEL_BACKENDS, assert_close, randn

ALL_BACKENDS = [*KERNEL_BACKENDS, "reference"]


# --------------------------------------------------------------------------- rms_norm
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("x_dtype,residual_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_rms_norm_residual_of_another_dtype(backend, x_dtype, residual_dtype):
    """h = x + residual in fp32, stored in the promoted dtype; y as the reference gives for that h; grads per input."""
    x = randn(3, 40, dtype=x_dtype).requires_grad_()
    residual = randn(3, 40, dtype=residual_dtype).requires_grad_()
    w = randn(40, dtype=torch.bfloat16).requires_grad_()
    y, h = lk.rms_norm(x, w, residual=residual, backend=backend)
    h_want = x.float() + residual.float()  # exact in fp32 for 16-bit inputs
    assert h.dtype == torch.promote_types(x_dtype, residual_dtype)
    assert_close(h, h_want.to(h.dtype))
    assert_close(y, ref.rms_norm(h_want, w))
    (y * randn(3, 40)).sum().backward()
    assert (x.grad.dtype, residual.grad.dtype, w.grad.dtype) == (x_dtype, residual_dtype, torch.bfloat16)
    assert torch.equal(x.grad.float(), x.grad.float()) and not x.grad.isnan().any()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rms_norm_under_autocast_keeps_dtypes(backend):
    """A bf16 linear output meets the fp32 residual stream, as in the model: fp32 h and y, as HF's unpatched modules."""
    linear, w = torch.nn.Linear(32, 32), randn(32)
    stream = randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = linear(randn(2, 5, 32))
        assert x.dtype == torch.bfloat16
        y, h = lk.rms_norm(x, w, residual=stream, backend=backend)
        y_alone = lk.rms_norm(x, w, backend=backend)
    assert (y.dtype, h.dtype, y_alone.dtype) == (torch.float32, torch.float32, torch.float32)
    assert_close(h, x.float() + stream)
    assert_close(y, ref.rms_norm(x.float() + stream, w))
    assert_close(y_alone, ref.rms_norm(x, w), rtol=2**-7)  # carries x's bf16 rounding of the normalized value


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rms_norm_strided_and_expanded_weight(backend):
    x = randn(4, 64)
    strided = randn(128)[::2]
    expanded = randn(1).expand(64)
    assert_close(lk.rms_norm(x, strided, backend=backend), ref.rms_norm(x, strided))
    assert_close(lk.rms_norm(x, expanded, backend=backend), ref.rms_norm(x, expanded))
    x = x.requires_grad_()
    strided = strided.detach().requires_grad_()
    lk.rms_norm(x, strided, backend=backend).sum().backward()
    x_ref, w_ref = x.detach().requires_grad_(), strided.detach().requires_grad_()
    ref.rms_norm(x_ref, w_ref).sum().backward()
    assert_close(strided.grad, w_ref.grad, rtol=1e-4, atol=1e-4)
    assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rms_norm_empty_rows(backend):
    """(4, 0) and (0, 8): empty results as the reference gives, and empty gradients."""
    for shape in ((4, 0), (0, 8)):
        x, w = randn(*shape).requires_grad_(), randn(shape[1]).requires_grad_()
        y, h = lk.rms_norm(x, w, residual=randn(*shape), backend=backend)
        assert y.shape == h.shape == shape
        (y.sum() + h.sum()).backward()
        assert x.grad.shape == shape and torch.equal(w.grad, torch.zeros_like(w))
