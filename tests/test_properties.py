"""Property-based checks (hypothesis) over shapes, strides and dtypes of both ops."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llama_kernels as lk
from llama_kernels import reference as ref
from utils import ULP, assert_close, randn

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


@SETTINGS
@given(rows=st.integers(1, 40), hidden=st.integers(1, 700), pad=st.integers(0, 9), dtype=DTYPES,
       w_dtype=DTYPES, with_residual=st.booleans(), eps=st.sampled_from([1e-6, 1e-5, 0.1]))
def test_rms_norm_any_shape_and_stride(rows, hidden, pad, dtype, w_dtype, with_residual, eps):
    x = randn(rows, hidden + pad, dtype=dtype)[:, pad:]  # strided rows at an unaligned start
    w = randn(hidden, dtype=w_dtype)
    r = randn(rows, hidden, dtype=dtype) if with_residual else None
    out = lk.rms_norm(x, w, eps, residual=r, backend="triton")
    if with_residual:
        out, h = out
        assert_close(h, x + r, ulps=1)
        x = h
    # A result wider than x's dtype still carries the rounding of the normalized value to x's dtype.
    rtol = ULP.get(dtype, 1e-5) if out.dtype not in ULP else 1e-5
    assert_close(out, ref.rms_norm(x, w, eps), rtol=rtol, atol=1e-5)


@SETTINGS
@given(batch=st.integers(1, 3), seqlen=st.integers(1, 40), n_kv=st.integers(1, 4), group=st.integers(1, 4),
       half=st.integers(1, 80), dtype=DTYPES, interleaved=st.booleans(), transposed=st.booleans(),
       positions_kind=st.sampled_from(["none", "offset", "shared", "per-batch"]))
def test_rope_any_shape_and_stride(batch, seqlen, n_kv, group, half, dtype, interleaved, transposed, positions_kind):
    d = 2 * half
    if transposed:  # (B, H, S, D) storage seen as (B, S, H, D), as after a transpose
        q = randn(batch, n_kv * group, seqlen, d, dtype=dtype).transpose(1, 2)
        k = randn(batch, n_kv, seqlen, d, dtype=dtype).transpose(1, 2)
    else:
        q, k = randn(batch, seqlen, n_kv * group, d, dtype=dtype), randn(batch, seqlen, n_kv, d, dtype=dtype)
    positions = {
        "none": None,
        "offset": 50_000,
        "shared": torch.randint(0, 100_000, (seqlen,)),
        "per-batch": torch.randint(0, 100_000, (batch, seqlen), dtype=torch.int32),
    }[positions_kind]
    got = lk.apply_rope(q, k, positions, theta=1e4, interleaved=interleaved, backend="triton")
    want = ref.apply_rope(q, k, positions, lk.rope_inv_freq(d, 1e4), interleaved)
    for a, b in zip(got, want):
        assert_close(a, b, ulps=1, atol=1e-5)
