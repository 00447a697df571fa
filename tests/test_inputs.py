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


# --------------------------------------------------------------------------- apply_rope
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rope_strided_last_dim_out_of_place_and_in_place(backend):
    q, k = randn(2, 3, 4, 32)[..., ::2], randn(2, 3, 2, 32)[..., ::2]  # head_dim 16 with stride 2
    want = ref.apply_rope(q, k, 7, lk.rope_inv_freq(16, 1e4))
    for got, expected in zip(lk.apply_rope(q, k, 7, theta=1e4, backend=backend), want):
        assert_close(got, expected)
    q_out, k_out = lk.apply_rope(q, k, 7, theta=1e4, inplace=True, backend=backend)
    assert q_out is q and k_out is k
    assert_close(q, want[0])
    assert_close(k, want[1])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rope_in_place_on_an_expanded_view_is_refused(backend):
    q, k = randn(1, 2, 1, 8).expand(1, 2, 4, 8), randn(1, 2, 2, 8)
    with pytest.raises(ValueError, match="q: expected a tensor whose elements do not share memory"):
        lk.apply_rope(q, k, inplace=True, backend=backend)
    with pytest.raises(ValueError, match="k: expected a tensor whose elements do not share memory"):
        lk.apply_rope(randn(1, 2, 4, 8), k[:, :1].expand(1, 2, 2, 8), inplace=True, backend=backend)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(positions=2**63), ValueError, "positions: expected an int offset"),
    (dict(positions=2**63 - 1), ValueError, "positions: expected an int offset"),  # offset + 1 overflows
    (dict(theta="1e6"), TypeError, "theta: expected a finite number > 1"),
    (dict(attention_factor="x"), TypeError, "attention_factor: expected a finite number"),
    (dict(attention_factor=float("nan")), ValueError, "attention_factor: expected a finite number"),
])
def test_rope_bad_values_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        lk.apply_rope(randn(1, 2, 2, 8), randn(1, 2, 2, 8), **kwargs)


def test_rope_under_autocast_keeps_dtypes():
    """q and k from linears under autocast are bf16 both: rotated in bf16, as the reference does."""
    linear = torch.nn.Linear(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qk = linear(randn(2, 3, 16)).view(2, 3, 4, 8)
        q_rot, k_rot = lk.apply_rope(qk[:, :, :2], qk[:, :, 2:], theta=1e4)
    want = ref.apply_rope(qk[:, :, :2], qk[:, :, 2:], None, lk.rope_inv_freq(8, 1e4))
    assert q_rot.dtype == k_rot.dtype == torch.bfloat16
    assert_close(q_rot, want[0], ulps=1)
    assert_close(k_rot, want[1], ulps=1)


# --------------------------------------------------------------------------- rope_inv_freq
@pytest.mark.parametrize("scaling,error,match", [
    ({"rope_type": "linear", "factor": 0}, ValueError, r"scaling\['factor'\]: expected a finite number > 0"),
    ({"rope_type": "linear", "factor": -2}, ValueError, r"scaling\['factor'\]"),
    ({"rope_type": "dynamic", "factor": "2", "original_max_position_embeddings": 16}, TypeError, r"scaling\['factor'\]"),
    ({"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 1,
      "original_max_position_embeddings": 8192}, ValueError, r"scaling\['high_freq_factor'\]"),
    ({"rope_type": "llama3", "factor": 8, "low_freq_factor": 0, "high_freq_factor": 4,
      "original_max_position_embeddings": 8192}, ValueError, r"scaling\['low_freq_factor'\]"),
    ({"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 0}, ValueError,
     r"scaling\['original_max_position_embeddings'\]"),
    ({"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 4096, "beta_fast": -1}, ValueError,
     r"scaling\['beta_fast'\]"),
])
def test_rope_scaling_parameters_are_validated(scaling, error, match):
    with pytest.raises(error, match=match):
        lk.rope_inv_freq(64, 1e4, scaling)


def test_rope_attention_factor_is_validated():
    scaling = {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 4096}
    with pytest.raises(TypeError, match=r"scaling\['attention_factor'\]"):
        lk.rope_attention_factor({**scaling, "attention_factor": "x"})
    with pytest.raises(ValueError, match=r"scaling\['attention_factor'\]"):
        lk.rope_attention_factor({**scaling, "attention_factor": 0})


# --------------------------------------------------------------------------- flash_attention, varlen
def test_attention_under_autocast_casts_to_the_autocast_dtype():
    """As SDPA: q, k, v (an fp32 one included) in bf16, o in bf16, lse fp32; gradients reach the fp32 input."""
    q, k = randn(1, 5, 2, 64, dtype=torch.bfloat16), randn(1, 7, 1, 64, dtype=torch.bfloat16)
    v = randn(1, 7, 1, 64).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, lse = lk.flash_attention(q, k, v, causal=True, return_lse=True)
    want_o, want_lse = ref.attention(q, k, v.bfloat16(), causal=True, return_lse=True)
    assert (o.dtype, lse.dtype) == (torch.bfloat16, torch.float32)
    assert_close(o, want_o, ulps=2, atol=2e-3)
    o.float().sum().backward()
    assert v.grad.dtype == torch.float32 and not v.grad.isnan().any()


VARLEN_CRASH_CODE = """
import torch, llama_kernels as lk
from llama_kernels import reference as ref
q, k, v = torch.randn(8, 2, 64), torch.randn(8, 1, 64), torch.randn(8, 1, 64)
cu = torch.tensor([0, 9, 3, 9, 8, 9], dtype=torch.int32)[::2]  # (0, 3, 8) with stride 2
o = lk.flash_attention_varlen(q, k, v, cu, cu, {max_seqlen}, {max_seqlen}, backend="triton")
want = torch.cat([ref.attention(q[None, a:b], k[None, a:b], v[None, a:b])[0] for a, b in ((0, 3), (3, 8))])
torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-5)
"""


@pytest.mark.parametrize("max_seqlen", [5, 2**40])
def test_varlen_strided_cu_seqlens_and_huge_max_seqlen(max_seqlen):
    """Strided cu_seqlens read as the host checks read them; max_seqlen 2^40 (once a hang) bounded by the tokens.
    In a subprocess with a time bound: a regression crashes or hangs there, not here."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", VARLEN_CRASH_CODE.format(max_seqlen=max_seqlen)],
                            timeout=120, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# --------------------------------------------------------------------------- flash_attention_with_kvcache
def _decode_inputs(batch=2):
    q = randn(batch, 1, 2, 64)
    k_cache, v_cache = randn(batch, 8, 1, 64), randn(batch, 8, 1, 64)
    return q, k_cache, v_cache, torch.tensor([2, 5][:batch], dtype=torch.int32), randn(batch, 1, 1, 64)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_kvcache_bad_inputs_name_the_argument(backend):
    q, k_cache, v_cache, seqlens, new = _decode_inputs()
    call = lk.flash_attention_with_kvcache
    with pytest.raises(TypeError, match="cache_seqlens: expected a torch.Tensor"):
        call(q, k_cache, v_cache, [2, 5], backend=backend)
    with pytest.raises(TypeError, match="rope_theta: expected a finite number > 1"):
        call(q, k_cache, v_cache, seqlens, rope_theta="abc", backend=backend)
    with pytest.raises(ValueError, match="q: expected a tensor that does not require grad.*inference-only"):
        call(q.clone().requires_grad_(), k_cache, v_cache, seqlens, backend=backend)
    with pytest.raises(ValueError, match="k_cache: expected a tensor that does not require grad"):
        call(q, k_cache.clone().requires_grad_(), v_cache, seqlens, new, new.clone(), backend=backend)
    expanded = k_cache[:1].expand(2, 8, 1, 64)
    with pytest.raises(ValueError, match="k_cache: expected a tensor whose elements do not share memory"):
        call(q, expanded, v_cache, seqlens, new, new.clone(), backend=backend)
    with torch.no_grad():  # inference: a cache that requires grad is fine when nothing records
        call(q, k_cache.clone().requires_grad_(), v_cache, seqlens, new, new.clone(), backend=backend)
    # An expanded cache is only read without new tokens: allowed, and the same as its copy.
    assert_close(call(q, expanded, v_cache, seqlens, backend=backend),
                 call(q, expanded.contiguous(), v_cache, seqlens, backend=backend))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_kvcache_batch_zero(backend):
    q, k_cache, v_cache, seqlens, new = (t[:0] for t in _decode_inputs())
    o, lse = lk.flash_attention_with_kvcache(q, k_cache, v_cache, seqlens, new, new.clone(), rope_theta=1e4,
                                             return_lse=True, backend=backend)
    assert o.shape == (0, 1, 2, 64) and lse.shape == (0, 2, 1)


# --------------------------------------------------------------------------- meta tensors
def test_every_op_on_meta_tensors():
    """Shapes and dtypes through the fake implementations: no host read of values (building a model on meta)."""
    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    y, h = lk.rms_norm(meta(3, 8), meta(8, dtype=torch.float32), residual=meta(3, 8, dtype=torch.float32))
    assert (y.device.type, y.shape, y.dtype, h.dtype) == ("meta", (3, 8), torch.float32, torch.float32)
    q, k = meta(2, 3, 4, 64), meta(2, 3, 2, 64)
    for inplace in (False, True):
        q_rot, k_rot = lk.apply_rope(q, k, meta(2, 3, dtype=torch.int64), inplace=inplace)
        assert (q_rot.shape, k_rot.shape, q_rot.device.type) == (q.shape, k.shape, "meta")
    o, lse = lk.flash_attention(q, k, k, return_lse=True)
    assert (o.shape, o.dtype, lse.shape, lse.dtype) == (q.shape, torch.bfloat16, (2, 4, 3), torch.float32)
    cu = meta(3, dtype=torch.int32)
    o, lse = lk.flash_attention_varlen(meta(8, 4, 64), meta(8, 2, 64), meta(8, 2, 64), cu, cu, 5, 5, return_lse=True)
    assert (o.shape, lse.shape) == ((8, 4, 64), (4, 8))
    o, lse = lk.flash_attention_with_kvcache(meta(2, 1, 4, 64), meta(2, 16, 2, 64), meta(2, 16, 2, 64),
                                             meta(2, dtype=torch.int32), meta(2, 1, 2, 64), meta(2, 1, 2, 64),
                                             rope_theta=1e4, return_lse=True)
    assert (o.shape, o.dtype, lse.shape) == ((2, 1, 4, 64), torch.bfloat16, (2, 4, 1))


# --------------------------------------------------------------------------- float64
def test_float64_is_refused_by_every_op():
    x = torch.randn(2, 3, 2, 64, dtype=torch.float64)
    for call in (lambda: lk.rms_norm(x, x[0, 0, 0]), lambda: lk.apply_rope(x, x), lambda: lk.flash_attention(x, x, x),
                 lambda: lk.flash_attention_with_kvcache(x, x, x, torch.zeros(2, dtype=torch.int32))):
        with pytest.raises(TypeError, match=r"expected dtype in \(float16, bfloat16, float32\), got float64"):
            call()
