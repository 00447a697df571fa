"""Comparison helpers shared by the kernel tests."""

import torch

# Tolerances per dtype. fp32: ~1e-5 relative. fp16/bf16: a few ulp of the dtype
# (the interpreter rounds fp32 -> bf16 toward zero, one ulp more than torch).
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def assert_close(actual, expected, *, ulps: int = 2, atol: float = 1e-6, rtol: float = 1e-5):
    """Elementwise |actual - expected| <= atol + tol * |expected|, NaN never allowed."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert not actual.isnan().any(), "NaN in the result (an unwritten element?)"
    if expected.dtype in ULP:
        rtol, atol = ulps * ULP[expected.dtype], max(atol, ulps * ULP[expected.dtype] * 1e-3)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=False)


def randn(*shape, dtype=torch.float32, scale=1.0):
    """Fresh normal values (never zeros)."""
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype)
