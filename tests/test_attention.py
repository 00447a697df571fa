"""Flash attention (the Triton kernels: interpreted on CPU; the C++ ones) against reference.attention, on --device.

Sizes are kept small: the interpreter costs ~8 ms per program and loop step, with 64 x 64
blocks (S = 257 is five blocks). Shapes cover Sq == Sk and Sq != Sk both ways (bottom-right
causal alignment, rows that see no key), odd lengths 1, 17, 113, 257, heads 4/4, 8/2 (GQA),
8/1 (MQA) and head_dim 64 and 128, without taking the full cross-product.
"""

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llama_kernels as lk
from llama_kernels import reference as ref
from utils import check_attention_out, check_lse, extension_backends, kernel_backends, randn

pytestmark = pytest.mark.usefixtures("poison_outputs")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
BACKENDS = kernel_backends("flash_attention")


# --------------------------------------------------------------------------- helpers
def make_qkv(batch, seqlen_q, seqlen_k, hq, hk, d, dtype=F32, scale=1.0, *, device):
    return (randn(batch, seqlen_q, hq, d, dtype=dtype, scale=scale, device=device),
            randn(batch, seqlen_k, hk, d, dtype=dtype, scale=scale, device=device),
            randn(batch, seqlen_k, hk, d, dtype=dtype, device=device))


def check_grads(got, want, dtype):
    """Gradients against the ideal ones: autograd of the reference on the same inputs upcast to fp64.

    fp32: 1e-4, the absolute part scaled by the gradient's largest element (large scores give
    gradients ~30, where fp32 rounding alone is ~2e-4). fp16/bf16: a few ulp (2e-2).
    """
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == dtype, (name, g.dtype)
        assert not g.isnan().any(), f"NaN in d{name}"
        tol = 1e-4 if dtype == F32 else 2e-2
        scale = max(1.0, w.abs().max().item()) if dtype == F32 else 1.0
        torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"d{name}: {m}")


def ideal_grads(fn, inputs, do):
    """The gradients of sum(fn(inputs) * do) computed in fp64 from the same values."""
    return grads(fn, [t.double() for t in inputs], do.double())[1]


def grads(fn, inputs, do):
    """fn's output and the gradients of sum(out * do) with respect to (q, k, v)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad((out * do).sum(), leaves)


def shape_id(case):
    return "x".join(str(c).removeprefix("torch.") for c in case)


# --------------------------------------------------------------------------- forward and lse
# (batch, Sq, Sk, Hq, Hk, head_dim, dtype)
FORWARD_CASES = [
    (2, 17, 17, 4, 4, 64, F32),
    (1, 113, 257, 8, 2, 128, BF16),
    (1, 257, 113, 8, 1, 64, F32),  # causal: the first 144 queries see no key
    (1, 1, 300, 8, 2, 128, F32),  # decoding one token
    (1, 300, 1, 4, 4, 64, BF16),  # causal: only the last query sees the key
    (2, 17, 17, 8, 1, 128, F16),
    (1, 257, 257, 8, 2, 64, BF16),
    (1, 113, 113, 4, 1, 128, F32),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", FORWARD_CASES, ids=shape_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_lse_match_reference(device, backend, case, causal):
    batch, sq, sk, hq, hk, d, dtype = case
    q, k, v = make_qkv(batch, sq, sk, hq, hk, d, dtype, device=device)
    o, lse = lk.flash_attention(q, k, v, causal=causal, return_lse=True, backend=backend)
    want_o, want_lse = ref.attention(q, k, v, causal, return_lse=True)
    assert o.shape == q.shape and lse.shape == (batch, hq, sq)
    check_attention_out(o, want_o)
    check_lse(lse, want_lse)


def test_default_backend_and_return_lse_false(device):
    """CUDA tensors (and CPU ones under TRITON_INTERPRET=1) run the Triton kernels; return_lse=False gives o alone."""
    q, k, v = make_qkv(1, 17, 29, 4, 2, 64, device=device)
    o = lk.flash_attention(q, k, v)
    assert isinstance(o, torch.Tensor)
    o_triton, _ = lk.flash_attention(q, k, v, causal=True, return_lse=True, backend="triton")
    assert torch.equal(o, o_triton)
    check_attention_out(o, ref.attention(q, k, v, causal=True))
    o_ref, lse_ref = lk.flash_attention(q, k, v, return_lse=True, backend="reference")
    check_attention_out(o_ref, ref.attention(q, k, v, causal=True))
    check_lse(lse_ref, ref.attention(q, k, v, causal=True, return_lse=True)[1])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_scale_and_large_scores(device, backend, causal):
    """Scores with a spread of ~±100 exercise the running maximum of the online softmax.

    At scores of ~200 fp32 itself is off by ~|s| * 2^-24 ~ 1e-5 relative in each probability, whatever
    the summation order, so o is held to float64 within twice the fp32 reference's own error (measured:
    the fp32 reference 2.7e-5, the kernels 1.4e-5 to 2.7e-5), not to the fp32 reference at 1e-5."""
    q, k, v = make_qkv(1, 70, 90, 4, 2, 64, scale=3.0, device=device)
    do = randn(*q.shape, device=device)

    def fn(a, b, c):
        return lk.flash_attention(a, b, c, causal=causal, softmax_scale=0.4, backend=backend)

    o, lse = lk.flash_attention(q, k, v, causal=causal, softmax_scale=0.4, return_lse=True, backend=backend)
    want_o, want_lse = ref.attention(q, k, v, causal, 0.4, return_lse=True)
    exact = ref.attention(q.double(), k.double(), v.double(), causal, 0.4)
    fp32_error = (want_o.double() - exact).abs().max().item()
    assert (o.double() - exact).abs().max().item() <= 2 * fp32_error
    check_lse(lse, want_lse)
    _, got = grads(fn, (q, k, v), do)
    want = ideal_grads(lambda a, b, c: ref.attention(a, b, c, causal, 0.4), (q, k, v), do)
    check_grads(got, want, F32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(device, backend):
    """q seen through a (B, H, S, D) transpose, k and v interleaved in one buffer: only the last dim is contiguous."""
    q = randn(2, 4, 40, 64, device=device).transpose(1, 2)  # (2, 40, 4, 64)
    kv = randn(2, 50, 2, 2, 64, device=device)
    k, v = kv[:, :, 0], kv[:, :, 1]  # (2, 50, 2, 64), token stride 256
    do = randn(*q.shape, device=device)
    o, lse = lk.flash_attention(q, k, v, causal=True, return_lse=True, backend=backend)
    want_o, want_lse = ref.attention(q, k, v, True, return_lse=True)
    check_attention_out(o, want_o)
    check_lse(lse, want_lse)
    _, got = grads(lambda a, b, c: lk.flash_attention(a, b, c, backend=backend), (q, k, v), do)
    want = ideal_grads(lambda a, b, c: ref.attention(a, b, c, True), (q, k, v), do)
    check_grads(got, want, F32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_kernels_through_tensor_descriptors(device, monkeypatch, causal):
    """The kernels' sm_90 form (the blocks each loop streams through tensor descriptors: k and v in the forward and
    for dq, q and do for dk/dv), forced here (on the interpreter, or a card with TMA): Sq = 70 and Sk = 113 end in
    partial blocks, which the descriptors fill with zeros; k and v interleaved in one buffer (token stride 256
    elements: 16-byte aligned, as TMA needs)."""
    from llama_kernels.ops import attention

    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        pytest.skip("tensor descriptors (TMA) need sm_90 or newer")

    config = attention._config
    monkeypatch.setattr(attention, "_config",
                        lambda kernel, q, head_dim, **kw: {**config(kernel, q, head_dim, **kw), "TMA": True})
    described = []
    monkeypatch.setattr(attention.TensorDescriptor, "from_tensor", staticmethod(
        lambda t, block, make=attention.TensorDescriptor.from_tensor: described.append(t.shape) or make(t, block)))
    q, do = randn(2, 70, 4, 64, dtype=BF16, device=device), randn(2, 70, 4, 64, dtype=BF16, device=device)
    kv = randn(2, 113, 2, 2, 64, dtype=BF16, device=device)
    k, v = kv[:, :, 0], kv[:, :, 1]
    o, lse = lk.flash_attention(q, k, v, causal=causal, return_lse=True, backend="triton")
    _, got = grads(lambda a, b, c: lk.flash_attention(a, b, c, causal=causal, backend="triton"), (q, k, v), do)
    # k, v for each forward, q and do for dk/dv, k and v for dq
    assert described == [k.shape, v.shape] * 2 + [q.shape, do.shape, k.shape, v.shape], described
    want_o, want_lse = ref.attention(q, k, v, causal, return_lse=True)
    check_attention_out(o, want_o)
    check_lse(lse, want_lse)
    check_grads(got, ideal_grads(lambda a, b, c: ref.attention(a, b, c, causal), (q, k, v), do), BF16)
    # Packed sequences keep pointer loads: a descriptor's rows past one sequence would be the next one's.
    described.clear()
    cu = torch.tensor([0, 30, 70], dtype=torch.int32, device=device)
    o = lk.flash_attention_varlen(q[0], k[0, :70], v[0, :70], cu, cu, 40, 40, causal=causal, backend="triton")
    assert described == []
    for start, end in ((0, 30), (30, 70)):
        check_attention_out(o[start:end], ref.attention(q[:1, start:end], k[:1, start:end], v[:1, start:end],
                                                        causal)[0])


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_see_no_key_are_zero(device, backend, dtype):
    """Causal with Sq > Sk: queries 0..Sq-Sk-1 see nothing; zeros, lse -inf, zero dq, no NaN anywhere."""
    q, k, v = make_qkv(1, 150, 20, 4, 2, 64, dtype, device=device)
    o, lse = lk.flash_attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert not o.isnan().any() and not lse.isnan().any()
    assert (o[:, :130] == 0).all()
    assert lse[:, :, :130].isneginf().all() and lse[:, :, 130:].isfinite().all()
    do = randn(*q.shape, dtype=dtype, device=device)
    _, (dq, dk, dv) = grads(lambda a, b, c: lk.flash_attention(a, b, c, backend=backend), (q, k, v), do)
    for g in (dq, dk, dv):
        assert not g.isnan().any()
    assert (dq[:, :130] == 0).all()


def test_offsets_past_2_31_elements(device):
    """Token 2 of q, k and v starts 2^31 + 16 elements in: 32-bit offsets would wrap (the interpreter wraps
    like the GPU). The forward and both backward kernels read through these offsets."""
    token_stride = 2**30 + 8

    def far_apart(n_heads):  # (1, 3, H, 64) in a 4 GiB storage (lazily allocated on CPU), three tokens touched
        storage = torch.empty(2 * token_stride + n_heads * 64, dtype=torch.float16, device=device)
        t = storage.as_strided((1, 3, n_heads, 64), (3 * token_stride, token_stride, 64, 1))
        return t.copy_(randn(1, 3, n_heads, 64, dtype=torch.float16, device=device))

    q, k, v = far_apart(2), far_apart(1), far_apart(1)
    do = randn(1, 3, 2, 64, dtype=torch.float16, device=device)

    def run(inputs):
        leaves = [t.detach().requires_grad_() for t in inputs]  # no clone: keep the strides
        o = lk.flash_attention(*leaves, backend="triton")
        return o, torch.autograd.grad(o, leaves, do)

    o, got = run((q, k, v))
    o_compact, want = run([t.contiguous() for t in (q, k, v)])
    assert torch.equal(o, o_compact)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    check_attention_out(o, ref.attention(q.contiguous(), k.contiguous(), v.contiguous()))


# --------------------------------------------------------------------------- gradients
# (batch, Sq, Sk, Hq, Hk, head_dim, causal)
GRAD_CASES = [
    (2, 17, 17, 4, 4, 64, True),
    (1, 113, 257, 8, 2, 128, True),
    (1, 257, 113, 8, 1, 64, True),  # rows that see no key
    (1, 1, 300, 4, 2, 128, False),
    (1, 300, 1, 8, 4, 64, False),
]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=shape_id)
@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_gradients_match_reference(device, backend, case, dtype):
    batch, sq, sk, hq, hk, d, causal = case
    q, k, v = make_qkv(batch, sq, sk, hq, hk, d, dtype, device=device)
    do = randn(*q.shape, dtype=dtype, device=device)
    o, got = grads(lambda a, b, c: lk.flash_attention(a, b, c, causal=causal, backend=backend), (q, k, v), do)
    check_attention_out(o, ref.attention(q, k, v, causal))
    want = ideal_grads(lambda a, b, c: ref.attention(a, b, c, causal), (q, k, v), do)
    check_grads(got, want, dtype)


# (Sq, Sk, Hq, Hk): the C++ backward's query tiles hold 64 rows (queries x the GQA group) and its key blocks 64
# keys, so these span several of each, with partial last ones and causal rows that see no key.
NATIVE_GRAD_CASES = [(1, 1, 8, 2), (17, 17, 8, 1), (113, 257, 8, 2), (257, 113, 8, 1), (300, 300, 8, 2),
                     (1, 300, 8, 1), (300, 17, 8, 2)]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", NATIVE_GRAD_CASES, ids=shape_id)
@pytest.mark.cpu_only  # the C++ CPU kernels' own tiling
@pytest.mark.parametrize("backend", extension_backends("flash_attention", "cpu"))
def test_native_backward_across_blocks(backend, case, causal, dtype):
    """The C++ backward's gradients of a loss on o and lse (the lse's gradient joins the row term delta)."""
    sq, sk, hq, hk = case
    q, k, v = make_qkv(2, sq, sk, hq, hk, 64, dtype, device="cpu")
    do, dlse = randn(*q.shape, dtype=dtype), randn(2, hq, sq)

    def loss(o, lse):
        return (o.double() * do.double()).sum() + (torch.where(lse.isfinite(), lse, 0.0).double() * dlse).sum()

    def run(fn, inputs):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        return torch.autograd.grad(loss(*fn(*leaves)), leaves)

    got = run(lambda a, b, c: lk.flash_attention(a, b, c, causal, return_lse=True, backend=backend), (q, k, v))
    want = run(lambda a, b, c: ref.attention(a, b, c, causal, return_lse=True), [t.double() for t in (q, k, v)])
    check_grads(got, want, dtype)


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_lse_is_differentiable(device, backend):
    """A loss on o and lse (as ring attention combines partial results): the lse's gradient joins the row term."""
    q, k, v = make_qkv(1, 90, 60, 4, 2, 64, device=device)  # causal: the first 30 queries see no key
    do, dlse = randn(*q.shape, device=device), randn(1, 4, 90, device=device)

    def loss(o, lse):
        return (o * do).sum() + (torch.where(lse.isfinite(), lse, 0.0) * dlse).sum()

    def run(fn, inputs):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        return torch.autograd.grad(loss(*fn(*leaves)), leaves)

    got = run(lambda a, b, c: lk.flash_attention(a, b, c, return_lse=True, backend=backend), (q, k, v))
    want = run(lambda a, b, c: ref.attention(a, b, c, True, return_lse=True), [t.double() for t in (q, k, v)])
    check_grads(got, want, F32)


def test_backward_op_reads_a_strided_dlse(device):
    """The raw backward op given dlse as a transposed view gives what its contiguous copy gives."""
    q, k, v = make_qkv(1, 20, 20, 4, 2, 64, device=device)
    o, lse = lk.flash_attention(q, k, v, return_lse=True, backend="triton")
    do, dlse = randn(*q.shape, device=device), randn(1, 20, 4, device=device).transpose(1, 2)
    grads = [torch.ops.llama_kernels.flash_attention_backward(do, q, k, v, o, lse, g, None, None, 0, 0, True,
                                                               64**-0.5, True, "triton")
             for g in (dlse, dlse.contiguous())]
    for got, want in zip(*grads):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------- varlen
SEQLENS_Q = [1, 17, 70, 40, 3]
SEQLENS_K = [5, 17, 130, 7, 0]  # (40, 7): causal rows 0..32 see nothing; (3, 0): no key at all


def cu_seqlens(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def varlen_reference(q, k, v, cu_q, cu_k, causal, return_lse=False):
    """reference.attention on each sequence; o (total_q, Hq, D), lse (Hq, total_q)."""
    outs, lses = [], []
    for i in range(len(cu_q) - 1):
        sq, sk = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        o, lse = ref.attention(q[None, sq], k[None, sk], v[None, sk], causal, return_lse=True)
        outs.append(o[0])
        lses.append(lse[0])
    o = torch.cat(outs)
    return (o, torch.cat(lses, dim=-1)) if return_lse else o


def varlen_inputs(dtype, hq=8, hk=2, d=64, *, device):
    total_q, total_k = sum(SEQLENS_Q), sum(SEQLENS_K)
    q = randn(total_q, hq, d, dtype=dtype, device=device)
    k, v = randn(total_k, hk, d, dtype=dtype, device=device), randn(total_k, hk, d, dtype=dtype, device=device)
    return q, k, v, cu_seqlens(SEQLENS_Q, device), cu_seqlens(SEQLENS_K, device)


def varlen_runs():
    """(backend, causal, dtype): Triton's three, the reference's two, the extension's two (where it has the op)."""
    runs = [("triton", True, F32), ("triton", False, F32), ("triton", True, BF16), ("reference", True, F32),
            ("reference", False, BF16)]
    runs += [pytest.param(param.values[0], causal, dtype, marks=param.marks)
             for param in extension_backends("flash_attention_varlen")
             for causal, dtype in ((True, BF16), (False, F32))]
    return runs


def varlen_run_id(value):
    return {True: "causal", False: "full", F32: "fp32", BF16: "bf16"}.get(value, value)


@pytest.mark.parametrize("backend,causal,dtype", varlen_runs(), ids=varlen_run_id)
def test_varlen_matches_reference_per_sequence(device, backend, causal, dtype):
    q, k, v, cu_q, cu_k = varlen_inputs(dtype, device=device)
    max_q, max_k = max(SEQLENS_Q), max(SEQLENS_K)

    def flash(a, b, c, **kwargs):
        return lk.flash_attention_varlen(a, b, c, cu_q, cu_k, max_q, max_k, causal=causal, backend=backend, **kwargs)

    o, lse = flash(q, k, v, return_lse=True)
    want_o, want_lse = varlen_reference(q, k, v, cu_q.tolist(), cu_k.tolist(), causal, return_lse=True)
    assert o.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    check_attention_out(o, want_o, varlen_reference(q, k, v.abs(), cu_q.tolist(), cu_k.tolist(), causal))
    check_lse(lse, want_lse)
    if causal:
        start = sum(SEQLENS_Q[:3])
        assert (o[start: start + 33] == 0).all()  # (40, 7): rows that see nothing
    assert (o[-3:] == 0).all() and lse[:, -3:].isneginf().all()  # the sequence with no key

    do = randn(*q.shape, dtype=dtype, device=device)
    _, got = grads(flash, (q, k, v), do)
    want = ideal_grads(lambda a, b, c: varlen_reference(a, b, c, cu_q.tolist(), cu_k.tolist(), causal), (q, k, v), do)
    check_grads(got, want, dtype)


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("backend", extension_backends("flash_attention", "cpu"))
def test_native_backward_split_over_queries(backend):
    """With one kv head and more threads than that, the C++ backward splits the 1100 queries into 2 chunks (on 2
    or 3 threads: at least 512 queries a chunk), their dk and dv summed afterwards in chunk order; on 1 thread, one
    chunk. Each gives the reference's gradients, and 2 and 3 threads the same bits."""
    q, k, v = (randn(1, 1100, h, 64, dtype=BF16) for h in (4, 1, 1))
    do = randn(*q.shape, dtype=BF16)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(grads(lambda a, b, c: lk.flash_attention(a, b, c, causal=True, backend=backend),
                                 (q, k, v), do)[1])
    finally:
        torch.set_num_threads(threads)
    want = ideal_grads(lambda a, b, c: ref.attention(a, b, c, True), (q, k, v), do)
    for got in results:
        check_grads(got, want, BF16)
    assert all(torch.equal(g, w) for g, w in zip(results[2], results[1])), "3 threads differ from 2"



@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_backward_is_bit_identical_across_runs(device, layout):
    """dk and dv sum over the 4 query heads of a group and over query blocks: the same bits every run."""
    if layout == "dense":
        q, k, v = make_qkv(1, 150, 150, 8, 2, 64, device=device)

        def fn(a, b, c):
            return lk.flash_attention(a, b, c, deterministic=True, backend="triton")
    else:
        q, k, v, cu_q, cu_k = varlen_inputs(F32, device=device)

        def fn(a, b, c):
            return lk.flash_attention_varlen(a, b, c, cu_q, cu_k, max(SEQLENS_Q), max(SEQLENS_K),
                                             deterministic=True, backend="triton")
    do = randn(*q.shape, device=device)
    runs = [grads(fn, (q, k, v), do)[1] for _ in range(3)]
    for run in runs[1:]:
        for name, a, b in zip("qkv", run, runs[0]):
            assert torch.equal(a, b), f"d{name} differs between runs"


HF, PERSISTENT, SPLIT = {"HEAVIEST_FIRST": True}, {"PERSISTENT": True}, {"SPLIT_DIAGONAL": True}


@pytest.mark.parametrize("variants", [
    {"attention_fwd": HF, "attention_bwd_dq": HF, "attention_bwd_dkdv": SPLIT},
    {"attention_fwd": PERSISTENT, "attention_bwd_dkdv": PERSISTENT},
    {"attention_fwd": {**HF, **PERSISTENT}, "attention_bwd_dkdv": PERSISTENT, "attention_bwd_dq": HF},
], ids=["heaviest-first-split-diagonal", "persistent", "causal-persistent"])
def test_config_variants(device, monkeypatch, variants):
    """The sweep's config variants, forced on their kernels: HEAVIEST_FIRST (the forward's and dq's causal query
    blocks launched last to first), PERSISTENT (the forward and dk/dv on fewer programs than tiles, each taking
    tiles pid, pid + grid, ...), SPLIT_DIAGONAL (dk/dv's causal mask only on the query blocks it cuts); causal
    with HEAVIEST_FIRST, else without the mask. A partial last block, Sq != Sk (Sk > Sq: the diagonal is offset),
    GQA, and packed sequences shorter than the grid's longest (their tiles past the end do nothing)."""
    from llama_kernels.ops import _triton, attention

    launches, launch = {}, _triton.launch

    def recorded(kernel, grid, *args, **kw):
        launches.setdefault(kernel, []).append((grid[0], kw))
        launch(kernel, grid, *args, **kw)

    monkeypatch.setattr(_triton, "launch", recorded)
    causal = "HEAVIEST_FIRST" in variants["attention_fwd"]
    with contextlib.ExitStack() as forced:
        for kernel, variant in variants.items():
            forced.enter_context(_triton.forced_config(kernel, lambda default, variant=variant: {**default, **variant}))
        q, k, v = make_qkv(2, 150, 170, 2, 1, 64, BF16, device=device)
        do = randn(*q.shape, dtype=BF16, device=device)
        o, lse = lk.flash_attention(q, k, v, causal=causal, return_lse=True, backend="triton")
        _, got = grads(lambda a, b, c: lk.flash_attention(a, b, c, causal=causal, backend="triton"), (q, k, v), do)
        cu = torch.tensor([0, 30, 150], dtype=torch.int32, device=device)
        o_packed = lk.flash_attention_varlen(q[0], k[0, :150], v[0, :150], cu, cu, 120, 120, causal=causal,
                                             backend="triton")
    want_o, want_lse = ref.attention(q, k, v, causal, return_lse=True)
    check_attention_out(o, want_o)
    check_lse(lse, want_lse)
    check_grads(got, ideal_grads(lambda a, b, c: ref.attention(a, b, c, causal), (q, k, v), do), BF16)
    for start, end in ((0, 30), (30, 150)):
        want = ref.attention(q[:1, start:end], k[:1, start:end], v[:1, start:end], causal)[0]
        check_attention_out(o_packed[start:end], want)
    kernels = {"attention_fwd": attention._fwd_kernel, "attention_bwd_dkdv": attention._bwd_dkdv_kernel,
               "attention_bwd_dq": attention._bwd_dq_kernel}
    for name, variant in variants.items():
        for grid, kw in launches[kernels[name]]:
            assert all(kw[field] == (value and (causal or field == "PERSISTENT")) for field, value in variant.items())
            assert grid < kw["n_tiles"] if kw.get("PERSISTENT") else grid == kw.get("n_tiles", grid), name


# --------------------------------------------------------------------------- torch.compile
@pytest.fixture
def atomic_dq():
    """deterministic=False's backward forced to sum dq by atomic adds in the dk/dv pass; yields the launches' asks."""
    from llama_kernels.ops import _triton, attention

    with _triton.forced_config(attention.ANY_ORDER_TUNING.kernel, lambda default: {**default, "ATOMIC_DQ": True}) as asks:
        yield asks


@pytest.mark.parametrize("case", [(1, 70, 130, 8, 2, 64, True, BF16), (1, 100, 40, 8, 1, 128, True, F32),
                                  (2, 40, 40, 4, 4, 64, False, F32)], ids=shape_id)
def test_atomic_dq_backward_matches_reference(device, atomic_dq, case):
    """Partial blocks, GQA groups of 4 and 8, rows that see no key (Sq > Sk, causal), Sq != Sk."""
    batch, sq, sk, hq, hk, d, causal, dtype = case
    q, k, v = make_qkv(batch, sq, sk, hq, hk, d, dtype, device=device)
    do = randn(*q.shape, dtype=dtype, device=device)
    _, got = grads(lambda a, b, c: lk.flash_attention(a, b, c, causal=causal, backend="triton"), (q, k, v), do)
    assert [ask.default["ATOMIC_DQ"] for ask in atomic_dq] == [False]  # off unless a measured table chose it
    check_grads(got, ideal_grads(lambda a, b, c: ref.attention(a, b, c, causal), (q, k, v), do), dtype)


@pytest.mark.parametrize("deterministic", [False, True])
def test_atomic_dq_packed_and_never_when_deterministic(device, atomic_dq, deterministic):
    lengths_q, lengths_k = [17, 40, 3], [30, 7, 0]  # rows that see no key; a sequence with none at all
    cu_q, cu_k = cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device)
    q, k, v = (randn(sum(n), h, 64, dtype=BF16, device=device) for n, h in ((lengths_q, 4), (lengths_k, 2),
                                                                            (lengths_k, 2)))
    do = randn(*q.shape, dtype=BF16, device=device)
    _, got = grads(lambda a, b, c: lk.flash_attention_varlen(a, b, c, cu_q, cu_k, 40, 30, deterministic=deterministic,
                                                             backend="triton"), (q, k, v), do)
    assert len(atomic_dq) == (0 if deterministic else 1)
    want = ideal_grads(lambda a, b, c: varlen_reference(a, b, c, cu_q.tolist(), cu_k.tolist(), True), (q, k, v), do)
    check_grads(got, want, BF16)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fullgraph_compile_forward_and_backward(device, backend):
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 33, 40, 4, 2, 64, device=device)
    do = randn(*q.shape, device=device)

    def f(q, k, v):
        o, lse = lk.flash_attention(q, k, v, causal=True, return_lse=True, backend=backend)
        return o * 2, lse

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o, lse = fn(*leaves)
        return (o.detach(), lse.detach()), torch.autograd.grad((o * do).sum(), leaves)

    (outs, got), (want_outs, want) = run(torch.compile(f, backend="aot_eager", fullgraph=True)), run(f)
    for a, b in zip(outs + got, want_outs + want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    check_attention_out(outs[0] / 2, ref.attention(q, k, v, True))


# --------------------------------------------------------------------------- refusals
def _dense(**kwargs):
    args = {"q": randn(1, 5, 4, 64), "k": randn(1, 7, 2, 64), "v": randn(1, 7, 2, 64)}
    return {**args, **kwargs}


@pytest.mark.parametrize(
    "make_kwargs,error,match",
    [
        (lambda: _dense(q=randn(5, 4, 64)), ValueError, r"^q: expected"),
        (lambda: _dense(k=randn(7, 2, 64), v=randn(7, 2, 64)), ValueError, r"^k: expected"),
        (lambda: _dense(q=randn(1, 5, 4, 96), k=randn(1, 7, 2, 96), v=randn(1, 7, 2, 96)), ValueError,
         r"^q: expected head_dim 64 or 128"),
        (lambda: _dense(q=randn(1, 5, 4, 32), k=randn(1, 7, 2, 32), v=randn(1, 7, 2, 32)), ValueError,
         r"^q: expected head_dim"),
        (lambda: _dense(k=randn(1, 7, 2, 128), v=randn(1, 7, 2, 128)), ValueError, r"^k: expected"),  # head_dim
        (lambda: _dense(k=randn(2, 7, 2, 64), v=randn(2, 7, 2, 64)), ValueError, r"^k: expected"),  # batch
        (lambda: _dense(k=randn(1, 7, 3, 64), v=randn(1, 7, 3, 64)), ValueError, r"^k: expected"),  # 4 % 3 heads
        (lambda: _dense(q=randn(1, 5, 2, 64), k=randn(1, 7, 4, 64), v=randn(1, 7, 4, 64)), ValueError,
         r"^k: expected"),  # more kv heads than q heads
        (lambda: _dense(v=randn(1, 6, 2, 64)), ValueError, r"^v: expected"),
        (lambda: _dense(q=randn(1, 5, 4, 64).double(), k=randn(1, 7, 2, 64).double(),
                        v=randn(1, 7, 2, 64).double()), TypeError, r"^q: expected.*dtype"),
        (lambda: _dense(q=randn(1, 5, 4, 64).int()), TypeError, r"^q: expected.*dtype"),
        (lambda: _dense(k=randn(1, 7, 2, 64, dtype=BF16)), TypeError, r"^k: expected.*dtype"),
        (lambda: _dense(v=randn(1, 7, 2, 64, dtype=F16)), TypeError, r"^v: expected.*dtype"),
        (lambda: _dense(k=randn(1, 7, 2, 64).to("meta")), ValueError, r"^k: expected device"),
        (lambda: _dense(v=randn(1, 7, 2, 64).to("meta")), ValueError, r"^v: expected device"),
        (lambda: _dense(q=randn(1, 5, 4, 128)[..., ::2]), ValueError, r"^q: expected.*last dim"),
        (lambda: _dense(k=randn(1, 7, 2, 128)[..., ::2]), ValueError, r"^k: expected.*last dim"),
        (lambda: _dense(v=randn(1, 7, 2, 128)[..., ::2]), ValueError, r"^v: expected.*last dim"),
        (lambda: _dense(q=[1.0]), TypeError, r"^q: expected"),
        (lambda: _dense(backend="cutlass"), ValueError, r"^backend: expected"),
    ],
    ids=["q-3d", "k-3d", "head_dim-96", "head_dim-32", "head_dim-mismatch", "batch", "heads-not-multiple",
         "more-kv-heads", "v-shape", "float64", "int", "k-dtype", "v-dtype", "k-device", "v-device",
         "q-last-stride", "k-last-stride", "v-last-stride", "q-list", "backend"],
)
def test_bad_input_is_refused(make_kwargs, error, match):
    with pytest.raises(error, match=match):
        lk.flash_attention(**make_kwargs())


def _varlen(**kwargs):
    args = {
        "q": randn(9, 4, 64), "k": randn(12, 2, 64), "v": randn(12, 2, 64),
        "cu_seqlens_q": torch.tensor([0, 4, 9], dtype=torch.int32),
        "cu_seqlens_k": torch.tensor([0, 5, 12], dtype=torch.int32),
        "max_seqlen_q": 5, "max_seqlen_k": 7,
    }
    return {**args, **kwargs}


@pytest.mark.parametrize(
    "make_kwargs,error,match",
    [
        (lambda: _varlen(), None, None),  # the baseline is accepted
        (lambda: _varlen(q=randn(1, 9, 4, 64)), ValueError, r"^q: expected"),
        (lambda: _varlen(q=randn(9, 4, 96), k=randn(12, 2, 96), v=randn(12, 2, 96)), ValueError,
         r"^q: expected head_dim"),
        (lambda: _varlen(k=randn(12, 3, 64), v=randn(12, 3, 64)), ValueError, r"^k: expected"),
        (lambda: _varlen(k=randn(12, 2, 64, dtype=BF16), v=randn(12, 2, 64, dtype=BF16)), TypeError,
         r"^k: expected.*dtype"),
        (lambda: _varlen(cu_seqlens_q=torch.tensor([0, 4, 9])), TypeError, r"^cu_seqlens_q: expected.*dtype"),
        (lambda: _varlen(cu_seqlens_k=torch.tensor([0.0, 5.0, 12.0])), TypeError, r"^cu_seqlens_k: expected.*dtype"),
        (lambda: _varlen(cu_seqlens_q=torch.tensor([[0, 4, 9]], dtype=torch.int32)), ValueError,
         r"^cu_seqlens_q: expected"),
        (lambda: _varlen(cu_seqlens_q=torch.tensor([0, 9], dtype=torch.int32), max_seqlen_q=9), ValueError,
         r"^cu_seqlens_[qk]: expected"),  # 1 sequence in q, 2 in k
        (lambda: _varlen(cu_seqlens_q=torch.tensor([0, 6, 4, 9], dtype=torch.int32),
                         cu_seqlens_k=torch.tensor([0, 5, 8, 12], dtype=torch.int32)), ValueError,
         r"^cu_seqlens_q: expected"),  # decreasing
        (lambda: _varlen(cu_seqlens_k=torch.tensor([0, 8, 5], dtype=torch.int32)), ValueError,
         r"^cu_seqlens_k: expected"),  # decreasing
        (lambda: _varlen(k=randn(12, 2, 64).to("meta"), v=randn(12, 2, 64).to("meta")), ValueError,
         r"^k: expected device"),
    ],
    ids=["ok", "q-4d", "head_dim-96", "heads-not-multiple", "k-dtype", "cu_q-int64", "cu_k-float", "cu_q-2d",
         "cu-batch-mismatch", "cu_q-decreasing", "cu_k-decreasing", "k-device"],
)
def test_varlen_bad_input_is_refused(make_kwargs, error, match):
    if error is None:
        assert lk.flash_attention_varlen(**make_kwargs(), causal=False).shape == (9, 4, 64)
        return
    with pytest.raises(error, match=match):
        lk.flash_attention_varlen(**make_kwargs())


# --------------------------------------------------------------------------- property
@settings(max_examples=15, deadline=None, derandomize=True)
@given(batch=st.integers(1, 2), seqlen_q=st.integers(1, 140), seqlen_k=st.integers(1, 140),
       n_kv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([64, 128]),
       causal=st.booleans(), dtype=st.sampled_from([F32, F16, BF16]))
def test_any_shape(device, batch, seqlen_q, seqlen_k, n_kv, group, head_dim, causal, dtype):
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, n_kv * group, n_kv, head_dim, dtype, device=device)
    o, lse = lk.flash_attention(q, k, v, causal=causal, return_lse=True, backend="triton")
    want_o, want_lse = ref.attention(q, k, v, causal, return_lse=True)
    check_attention_out(o, want_o)
    check_lse(lse, want_lse)
