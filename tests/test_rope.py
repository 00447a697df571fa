"""The RoPE kernels (Triton: interpreted on CPU; the extension's) against the reference, on --device."""

import math

import pytest
import torch

import llama_kernels as lk
from llama_kernels import reference as ref
from llama_kernels.ops import _triton
from llama_kernels.ops import rope as rope_op
from utils import assert_close, kernel_backends, randn

pytestmark = pytest.mark.usefixtures("poison_outputs")
BACKENDS = kernel_backends("rope")

# (batch, seqlen, Hq, Hk, head_dim): Code Llama 7B (32/32), 34B (64/8), MQA (8/1), odd lengths.
SHAPES = [(1, 1, 32, 32, 128), (2, 17, 64, 8, 128), (1, 300, 8, 1, 64), (3, 7, 4, 4, 64)]


def rope(backend, q, k, positions=None, **kwargs):
    return lk.apply_rope(q, k, positions, backend=backend, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(device, backend, shape, interleaved, dtype):
    batch, seqlen, hq, hk, d = shape
    q = randn(batch, seqlen, hq, d, dtype=dtype, device=device)
    k = randn(batch, seqlen, hk, d, dtype=dtype, device=device)
    positions = torch.randint(0, 100_000, (batch, seqlen), device=device)  # far past the 16k training context
    q2, k2 = rope(backend, q, k, positions, interleaved=interleaved)
    eq, ek = ref.apply_rope(q, k, positions, lk.rope_inv_freq(d, device=device), interleaved)
    assert_close(q2, eq, ulps=1, atol=1e-5)
    assert_close(k2, ek, ulps=1, atol=1e-5)


@pytest.mark.parametrize("make_positions", [
    lambda b, s, device: None,
    lambda b, s, device: 16_380,
    lambda b, s, device: torch.arange(s, dtype=torch.int32, device=device) * 7,
    lambda b, s, device: torch.randint(0, 131_072, (b, s), device=device),
    lambda b, s, device: torch.randint(0, 131_072, (b, 2 * s), device=device)[:, ::2],  # a strided (B, S) view
], ids=["none", "offset", "shared-int32", "per-batch", "strided"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_position_forms(device, backend, make_positions):
    q, k = randn(2, 9, 4, 64, device=device), randn(2, 9, 2, 64, device=device)
    positions = make_positions(2, 9, device)
    expected = ref.apply_rope(q, k, positions, lk.rope_inv_freq(64, 1e4, device=device))
    for got, want in zip(rope(backend, q, k, positions, theta=1e4), expected):
        assert_close(got, want, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_frequencies_and_attention_factor(device, backend, interleaved):
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    inv_freq, factor = lk.rope_inv_freq(128, 1e6, scaling, device=device), lk.rope_attention_factor(scaling)
    q, k = randn(1, 20, 4, 128, device=device), randn(1, 20, 4, 128, device=device)
    got = rope(backend, q, k, 60_000, inv_freq=inv_freq, attention_factor=factor, interleaved=interleaved)
    want = ref.apply_rope(q, k, 60_000, inv_freq, interleaved, attention_factor=factor)
    for a, b in zip(got, want):
        assert_close(a, b, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_head_dim_pairs(device, backend):
    """head_dim 80 (40 pairs, not a power of two) masks the padded pairs."""
    q, k = randn(1, 5, 3, 80, device=device), randn(1, 5, 1, 80, device=device)
    inv_freq = lk.rope_inv_freq(80, device=device)
    for interleaved in (False, True):
        want = ref.apply_rope(q, k, None, inv_freq, interleaved)
        for a, b in zip(rope(backend, q, k, interleaved=interleaved), want):
            assert_close(a, b, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_on_views_of_a_fused_qkv(device, backend, interleaved):
    hq, hk, d = 8, 2, 64
    qkv = randn(2, 11, (hq + 2 * hk) * d, dtype=torch.bfloat16, device=device)
    q = qkv[..., : hq * d].view(2, 11, hq, d)
    k = qkv[..., hq * d: (hq + hk) * d].view(2, 11, hk, d)
    v_before = qkv[..., (hq + hk) * d:].clone()
    eq, ek = ref.apply_rope(q, k, 3, lk.rope_inv_freq(d, device=device), interleaved)
    out = rope(backend, q, k, 3, interleaved=interleaved, inplace=True)
    assert out[0] is q and out[1] is k
    assert_close(q, eq, ulps=1)
    assert_close(k, ek, ulps=1)
    assert torch.equal(qkv[..., (hq + hk) * d:], v_before)  # v untouched


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_gradients(device, backend, interleaved, dtype):
    q, k = randn(2, 17, 8, 64, dtype=dtype, device=device), randn(2, 17, 2, 64, dtype=dtype, device=device)
    positions = torch.randint(0, 100_000, (17,), device=device)
    gq, gk = randn(*q.shape, dtype=dtype, device=device), randn(*k.shape, dtype=dtype, device=device)

    def grads(fn):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        a, b = fn(qq, kk)
        return torch.autograd.grad((a * gq).sum() + (b * gk).sum(), (qq, kk))

    got = grads(lambda a, b: lk.apply_rope(a, b, positions, interleaved=interleaved, attention_factor=1.1,
                                           backend=backend))
    want = grads(lambda a, b: ref.apply_rope(a, b, positions, lk.rope_inv_freq(64, device=device), interleaved, 1.1))
    for a, b in zip(got, want):
        assert_close(a, b, ulps=2, atol=1e-5)


def test_backward_is_the_inverse_rotation(device):
    q, k = randn(1, 50, 4, 128, device=device), randn(1, 50, 4, 128, device=device)
    q2, k2 = rope("triton", q, k, 99_000)
    op = torch.ops.llama_kernels.rope
    q3, k3 = op(q2, k2, None, 99_000, lk.rope_inv_freq(128, device=device), 1.0, False, True, "triton")
    torch.testing.assert_close(q3, q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k3, k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_angle_error_against_float64_up_to_131072(device, backend):
    """Measured here: the default (fp32) angles match the reference's cos and sin within 2e-7 (Triton's libdevice
    and the C++ kernels' own vectorized cos and sin); precise mode is ~1e-7 from exact."""
    d = 128
    positions = torch.arange(0, 131_072, 97, device=device)  # 1352 positions spread over the range
    q = torch.zeros(1, positions.numel(), 1, d, device=device)
    q[..., : d // 2] = 1.0  # every half-split pair is (1, 0): out[i] = cos(angle_i), out[i + d/2] = sin(angle_i)
    exact = positions.double()[:, None] * torch.tensor([1e6 ** (-2 * i / d) for i in range(d // 2)],
                                                       dtype=torch.float64, device=device)
    errors = {}
    for precise in (False, True):
        out, _ = rope(backend, q, q, positions[None], precise=precise)
        cos, sin = out[0, :, 0, : d // 2].double(), out[0, :, 0, d // 2:].double()
        errors[precise] = max((cos - exact.cos()).abs().max().item(), (sin - exact.sin()).abs().max().item())
        if not precise:  # fp32 angles: the reference's, cos and sin within an ulp or two
            want, _ = ref.apply_rope(q, q, positions[None], lk.rope_inv_freq(d, device=device))
            assert_close(out, want, atol=2e-7, rtol=0)
    print(f"max |cos/sin - float64| up to position 131072: fp32 angles {errors[False]:.2e}, precise {errors[True]:.2e}")
    assert 1e-3 < errors[False] < 2e-2
    assert errors[True] < 1e-6


def test_row_offsets_past_2_31_elements(device):
    """Token 2 of q starts 2^31 + 16 elements in: int32 offsets would wrap."""
    d, token_stride = 64, 2**30 + 8
    # 4 GiB, untouched but three tokens (on CPU lazily allocated; on the card allocated, never written)
    storage = torch.empty(2 * token_stride + 2 * d, dtype=torch.float16, device=device)
    q = storage.as_strided((1, 3, 2, d), (3 * token_stride, token_stride, d, 1))
    q.copy_(randn(1, 3, 2, d, dtype=torch.float16, device=device))
    k = randn(1, 3, 1, d, dtype=torch.float16, device=device)
    want_q, want_k = ref.apply_rope(q.clone(), k, None, lk.rope_inv_freq(d, device=device))
    got_q, got_k = rope("triton", q, k)
    assert_close(got_q, want_q, ulps=1)
    rope("triton", q, k, inplace=True)
    assert_close(q.clone(), want_q, ulps=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_single_token(device, backend):
    q, k = randn(2, 0, 4, 64, device=device), randn(2, 0, 4, 64, device=device)
    assert rope(backend, q, k)[0].shape == (2, 0, 4, 64)
    q, k = randn(1, 1, 1, 2, device=device), randn(1, 1, 1, 2, device=device)  # head_dim 2: one pair
    for a, b in zip(rope(backend, q, k, 5), ref.apply_rope(q, k, 5, lk.rope_inv_freq(2, device=device))):
        assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(q=randn(2, 3, 4)), ValueError, r"q: expected 4 dimensions, got shape \(2, 3, 4\)"),
        (dict(k=randn(1, 5, 2, 64, dtype=torch.bfloat16)), TypeError, r"k: expected dtype torch.float32"),
        (dict(k=randn(1, 4, 2, 64)), ValueError, r"k: expected batch and sequence sizes \(1, 5\)"),
        (dict(k=randn(1, 5, 2, 32)), ValueError, r"k: expected head_dim 64"),
        (dict(k=randn(1, 5, 3, 64)), ValueError, r"k: expected a head count that divides q's 4 heads, got 3"),
        (dict(q=randn(1, 5, 4, 63), k=randn(1, 5, 2, 63)), ValueError, r"q: expected an even head_dim, got 63"),
        (dict(positions=torch.arange(5.0)), TypeError, r"positions: expected dtype in \(int32, int64\)"),
        (dict(positions=torch.arange(6)), ValueError, r"positions: expected shape \(S,\) = \(5,\) or \(B, S\) = \(1, 5\)"),
        (dict(positions=1.5), TypeError, r"positions: expected None, an int or an integer tensor, got float"),
        (dict(positions=torch.arange(5, device="meta")), ValueError, r"positions: expected device cpu"),
        (dict(inv_freq=torch.ones(31)), ValueError, r"inv_freq: expected shape \(D/2,\) = \(32,\)"),
        (dict(inv_freq=torch.ones(32, dtype=torch.float16)), TypeError, r"inv_freq: expected dtype in \(float32, float64\)"),
        (dict(inv_freq=torch.ones(32), precise=True), TypeError, r"inv_freq: precise=True needs float64"),
        (dict(k=randn(1, 5, 2, 64).to("meta")), ValueError, r"k: expected device cpu"),
        (dict(theta=1.0), ValueError, r"theta: expected a finite number > 1"),
    ],
)
def test_bad_input_is_refused(kwargs, error, match):
    args = {"q": randn(1, 5, 4, 64), "k": randn(1, 5, 2, 64), **kwargs}
    with pytest.raises(error, match=match):
        lk.apply_rope(**args)


def test_in_place_refuses_autograd():
    q, k = randn(1, 2, 2, 8).requires_grad_(), randn(1, 2, 2, 8)
    with pytest.raises(ValueError, match="inplace: in-place RoPE has no autograd"):
        lk.apply_rope(q, k, inplace=True)


def test_opcheck(device):
    q, k = randn(1, 6, 4, 64, device=device).requires_grad_(), randn(1, 6, 2, 64, device=device).requires_grad_()
    f = lk.rope_inv_freq(64, device=device)
    positions = torch.arange(6, device=device)
    torch.library.opcheck(torch.ops.llama_kernels.rope, (q, k, positions, 0, f, 1.0, True, False, "triton"))
    torch.library.opcheck(torch.ops.llama_kernels.rope_, (q.detach().clone(), k.detach().clone(), None, 3, f, 1.0, False, False, "triton"))


def test_cos_sin_identity_sanity(device):
    """A rotation keeps each pair's norm (a cheap check that cos^2 + sin^2 = attention_factor^2)."""
    q, k = randn(1, 33, 2, 128, device=device), randn(1, 33, 2, 128, device=device)
    q2, _ = rope("triton", q, k, 77_777, interleaved=True, attention_factor=math.sqrt(2))
    pairs_in = q.reshape(1, 33, 2, 64, 2).pow(2).sum(-1)
    pairs_out = q2.reshape(1, 33, 2, 64, 2).pow(2).sum(-1)
    torch.testing.assert_close(pairs_out, 2 * pairs_in, rtol=1e-5, atol=1e-5)


def test_every_sweep_candidate_at_7b_heads_is_correct():
    """What the GPU check's sweep may pick for 7B's heads (32/32, D 128), each forced under the interpreter,
    forward and backward (9 tokens: not a multiple of any BLOCK_S)."""
    default = rope_op.gpu_default(64, 32)
    candidates = rope_op.TUNING.candidates(default, "sm90", {"n_q_heads": 32, "n_kv_heads": 32})
    assert len(candidates) > 1
    q, k = randn(1, 9, 32, 128), randn(1, 9, 32, 128)
    gq, gk = randn(1, 9, 32, 128), randn(1, 9, 32, 128)
    positions = torch.randint(0, 100_000, (9,))

    def outputs_and_grads(fn):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        a, b = fn(qq, kk)
        return (a, b, *torch.autograd.grad((a * gq).sum() + (b * gk).sum(), (qq, kk)))

    want = outputs_and_grads(lambda a, b: ref.apply_rope(a, b, positions, lk.rope_inv_freq(128)))
    for config in candidates:
        with _triton.forced_config(rope_op.TUNING.kernel, lambda _: {**config, "BLOCK_HALF": 64}) as asks:
            got = outputs_and_grads(lambda a, b: lk.apply_rope(a, b, positions, backend="triton"))
        assert len(asks) == 2, config  # the forward and the backward launched the forced config
        for a, b in zip(got, want):
            assert_close(a.detach(), b.detach(), ulps=1, atol=1e-5)
