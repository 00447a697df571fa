"""Property-based checks (hypothesis) over shapes, strides and dtypes of the ops."""

import functools
import re

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llama_kernels as lk
from llama_kernels import _native
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


# --------------------------------------------------------------------------- any layout, size and dtype (issue 12)
LAYOUTS = st.sampled_from(["contiguous", "step", "permuted", "expanded"])
ANY_DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.int32])


def _tensor(shape, dtype, layout):
    """Fresh values of `shape` in one of four layouts: contiguous, a step-2 last dim, a permuted storage, or
    expanded along the first dim."""
    def values(*s):
        return torch.randint(-5, 5, s, dtype=dtype) if not dtype.is_floating_point else randn(*s, dtype=dtype)

    if layout == "step":
        return values(*shape[:-1], 2 * shape[-1])[..., ::2]
    if layout == "permuted":
        return values(*reversed(shape)).permute(*reversed(range(len(shape))))
    if layout == "expanded":
        return values(1, *shape[1:]).expand(*shape)
    return values(*shape)


def _matches(got, want):
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        if b.dtype == torch.float32:
            assert_close(a, b, rtol=1e-4, atol=1e-4)
        else:
            assert_close(a, b, ulps=2, atol=2e-3)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(op=st.sampled_from(["rms_norm", "rope", "attention", "kvcache"]), backend=st.sampled_from(["native", "triton"]),
       dtype=ANY_DTYPES, layouts=st.tuples(LAYOUTS, LAYOUTS, LAYOUTS), batch=st.integers(0, 2),
       seqlen=st.integers(1, 5), heads=st.sampled_from([(1, 1), (2, 1), (2, 2)]))
def test_public_ops_match_the_reference_or_refuse(op, backend, dtype, layouts, batch, seqlen, heads):
    """Any strides, expanded dims, zero sizes and dtypes: each call matches the reference or raises a clear error."""
    if backend == "native" and not _native.available("cpu"):
        backend = "triton"
    n_q, n_kv = heads
    la, lb, lc = layouts
    if op == "rms_norm":
        x, w = _tensor((batch, seqlen, 24), dtype, la), _tensor((24,), dtype, lb)
        residual = _tensor((batch, seqlen, 24), dtype, lc)
        call = functools.partial(lk.rms_norm, x, w, residual=residual)
    elif op == "rope":
        q, k = _tensor((batch, seqlen, n_q, 16), dtype, la), _tensor((batch, seqlen, n_kv, 16), dtype, lb)
        call = functools.partial(lk.apply_rope, q, k, 3, theta=1e4, inplace=lc == "expanded")
    elif op == "attention":
        q, k, v = (_tensor((batch, s, h, 64), dtype, layout)
                   for s, h, layout in ((seqlen, n_q, la), (seqlen + 1, n_kv, lb), (seqlen + 1, n_kv, lc)))
        call = functools.partial(lk.flash_attention, q, k, v, causal=True)
    else:
        q = _tensor((batch, 1, n_q, 64), dtype, la)
        k_cache, new = _tensor((batch, 6, n_kv, 64), dtype, lb), _tensor((batch, 1, n_kv, 64), dtype, lc)
        seqlens = torch.randint(0, 6, (batch,), dtype=torch.int32)
        caches = (k_cache, k_cache.clone())
        call = functools.partial(lk.flash_attention_with_kvcache, q, *caches, seqlens, new, new.clone(), rope_theta=1e4)
    try:
        got = call(backend=backend)
    except (TypeError, ValueError) as error:  # refused: the message names an argument
        assert re.match(r"^[\w', ]+: expected", str(error)), str(error)
        return
    if op == "kvcache":  # the reference on copies of the caches as they were before the append
        want = lk.flash_attention_with_kvcache(q, *(c.clone() for c in call.args[1:3]), seqlens, new, new.clone(),
                                               rope_theta=1e4, backend="reference")
    else:
        want = call(backend="reference") if op != "rope" or lc != "expanded" else None
    if want is not None:
        _matches(got, want)
