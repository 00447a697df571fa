"""Comparison helpers shared by the kernel tests, and the device and backends they run on."""

import pytest
import torch

# The device the op tests build their tensors on: conftest.py sets it from --device.
DEVICE = torch.device("cpu")

# Tolerances per dtype. fp32: ~1e-5 relative. fp16/bf16: a few ulp of the dtype
# (the interpreter rounds fp32 -> bf16 toward zero, one ulp more than torch; on a GPU they are upper bounds).
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def assert_close(actual, expected, *, ulps: int = 2, atol: float = 1e-6, rtol: float = 1e-5):
    """Elementwise |actual - expected| <= atol + tol * |expected|, NaN never allowed."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert not actual.isnan().any(), "NaN in the result (an unwritten element?)"
    if expected.dtype in ULP:
        rtol, atol = ulps * ULP[expected.dtype], max(atol, ulps * ULP[expected.dtype] * 1e-3)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=False)


def randn(*shape, dtype=torch.float32, scale=1.0, device="cpu"):
    """Fresh normal values (never zeros)."""
    return (torch.randn(*shape, dtype=torch.float32, device=device) * scale).to(dtype)


def check_attention_out(got, want, of_abs_v=None):
    """Attention outputs. fp32: ~1e-5 relative. fp16/bf16: two ulp (one for the interpreter's rounding toward zero).

    of_abs_v: the reference attention of |v|, sum_j p_j |v_j| / sum_j p_j, for rows that see few keys. The 16-bit
    kernels round P to the 16-bit type before P V (as FlashAttention does), which moves o by up to half an ulp of
    that, however small o is; where many keys average, atol covers it."""
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    if want.dtype == torch.float32:
        assert_close(got, want, atol=1e-5)
    elif of_abs_v is None:
        assert_close(got, want, ulps=2, atol=2e-3)
    else:
        assert not got.isnan().any(), "NaN in the result (an unwritten element?)"
        error = (got.double() - want.double()).abs()
        allowed = 2e-3 + 2 * ULP[want.dtype] * want.double().abs() + ULP[want.dtype] / 2 * of_abs_v.double()
        worst = (error - allowed).argmax()
        assert (error <= allowed).all(), (f"{int((error > allowed).sum())} elements off; the worst, flat index "
                                          f"{int(worst)}: {error.flatten()[worst]:.3g} > {allowed.flatten()[worst]:.3g}")


def check_lse(got, want):
    """lse is fp32 whatever the inputs; rows that see no key are -inf in both, never NaN."""
    assert got.dtype == torch.float32, got.dtype
    assert got.shape == want.shape, (got.shape, want.shape)
    assert not got.isnan().any(), "NaN in lse"
    assert torch.equal(got.isneginf(), want.isneginf()), "the -inf rows (no visible key) differ"
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite].float(), rtol=1e-5, atol=1e-5)


def extension_backends(op: str, device_type: str | None = None) -> list:
    """The extension's backend for ``op`` on ``device_type`` (default DEVICE's): "native" on CPU, "cuda" on the card
    (RMSNorm and RoPE only), as pytest params skipped where it is not built; [] where it has no kernel of ``op``."""
    from llama_kernels import _native
    from llama_kernels.ops._backend import COMPILED, DEVICE_OF

    device_type = device_type or DEVICE.type
    built = _native.available(device_type)
    skip = pytest.mark.skipif(not built, reason=f"the extension is not built with {device_type} kernels (make test "
                              "builds the native ones)")
    return [pytest.param(backend, marks=(skip, pytest.mark.extension))
            for backend in COMPILED[op] if DEVICE_OF[backend] == device_type]


def kernel_backends(op: str, device_type: str | None = None) -> list:
    """The kernel backends a test of ``op`` runs: Triton (interpreted on CPU) and the extension's."""
    return ["triton", *extension_backends(op, device_type)]


# For tests that build CPU tensors whatever --device says: the CPU backends, the same for every op.
KERNEL_BACKENDS = kernel_backends("rms_norm", "cpu")
