"""Fused linear cross-entropy against torch's cross-entropy on float64 logits, forward and gradients.

The big sizes run the CPU chunk loop ("native": torch ops per chunk); the Triton step runs under the
interpreter at small sizes. The chunk budget is shrunk so that every case crosses chunk boundaries.
"""

import pytest
import torch
import torch.nn.functional as F

import llama_kernels as lk
from llama_kernels.ops import cross_entropy
from utils import ULP, assert_close, randn


@pytest.fixture
def chunks_of(monkeypatch):
    """Makes the chunk loop take ``rows`` tokens at a time at vocabulary ``vocab``."""

    def set_rows(rows, vocab):
        for device in ("cpu", "cuda"):
            monkeypatch.setitem(cross_entropy.LOGITS_CHUNK_BYTES, device, rows * vocab * 4)

    return set_rows


def make_inputs(n, vocab, hidden, dtype=torch.float32, n_ignored=0, with_bias=True):
    h = randn(n, hidden, dtype=dtype)
    w = randn(vocab, hidden, dtype=dtype, scale=hidden**-0.5)
    b = randn(vocab, dtype=dtype, scale=0.1) if with_bias else None
    t = torch.randint(0, vocab, (n,))
    t[torch.randperm(n)[:n_ignored]] = -100
    return h, w, t, b


def float64_loss_and_grads(h, w, t, b, grad, **kwargs):
    """The loss, the gradients of (h, w, b) and dz, the gradient of the logits, all in float64."""
    leaves = [x.detach().double().requires_grad_() for x in (h, w, b) if x is not None]
    logits = leaves[0] @ leaves[1].T + (leaves[2] if b is not None else 0)
    loss = F.cross_entropy(logits, t, **kwargs)
    *grads, dz = torch.autograd.grad(loss, [*leaves, logits], grad.double())
    return loss, grads, dz


def run_ours(h, w, t, b, grad, **kwargs):
    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b) if x is not None]
    loss = lk.fused_linear_cross_entropy(*leaves[:2], t, leaves[2] if b is not None else None, **kwargs)
    return loss, torch.autograd.grad(loss, leaves, grad)


def dz_rounding_bounds(h, w, dz):
    """What rounding dz to a 16-bit dtype before the dh and dW matmuls (the design's, as the materialized
    bf16 path rounds its logits' gradient) can move dh = dz W and dW = dz^T h by: half an ulp of each term.
    dbias sums the fp32 dz: no such term."""
    half_ulp = ULP[h.dtype] / 2
    return half_ulp * (dz.abs() @ w.double().abs()), half_ulp * (dz.abs().T @ h.double().abs()), 0.0


def check_against_float64(h, w, t, b, reduction="mean", label_smoothing=0.0, backend=None):
    grad = 0.5 + torch.rand(t.shape if reduction == "none" else ())  # an upstream gradient other than 1
    want_loss, want_grads, dz = float64_loss_and_grads(h, w, t, b, grad, reduction=reduction,
                                                       label_smoothing=label_smoothing)
    loss, grads = run_ours(h, w, t, b, grad, reduction=reduction, label_smoothing=label_smoothing, backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == want_loss.shape
    # fp32 logits from exact products: the loss to fp32 rounding of sums over H and V.
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=2e-5)
    if h.dtype in ULP:
        # Rounded once to their dtype (twice for "mean"/"sum", the upstream gradient applied to the rounded one),
        # beside dz's rounding, relative to the largest term.
        for got, want, dz_bound in zip(grads, want_grads, dz_rounding_bounds(h, w, dz)):
            allowed = 3 * ULP[got.dtype] * (want.abs() + 1e-2 * want.abs().max()) + dz_bound
            assert not got.isnan().any() and got.dtype == h.dtype
            excess = (got.double() - want).abs() - allowed
            assert excess.max() <= 0, f"{excess.gt(0).sum()} elements beyond the bound, by up to {excess.max()}"
    else:  # fp32: the rounding of sums over N or V, relative to their largest term
        for got, want in zip(grads, want_grads):
            assert_close(got, want.float(), atol=1e-5 * want.abs().max().item(), rtol=1e-4)


# --------------------------------------------------------------------------- the CPU chunk loop, big sizes
@pytest.mark.extension  # the bf16 cases run the extension's products where the CPU has them
@pytest.mark.parametrize("n,vocab,hidden,dtype,reduction,label_smoothing,with_bias,n_ignored", [
    (1, 1000, 64, torch.float32, "mean", 0.0, True, 0),
    (7, 4099, 128, torch.float32, "none", 0.1, False, 2),
    (113, 32016, 64, torch.bfloat16, "mean", 0.0, False, 10),
    (113, 32000, 128, torch.float16, "sum", 0.2, True, 5),
    (1023, 32016, 64, torch.float32, "mean", 0.1, True, 100),
    (1023, 1000, 128, torch.bfloat16, "none", 0.0, True, 7),
    (7, 4099, 4096, torch.bfloat16, "sum", 0.0, True, 1),
    (37, 1001, 33, torch.bfloat16, "mean", 0.1, True, 3),
])
def test_native_matches_float64(chunks_of, n, vocab, hidden, dtype, reduction, label_smoothing, with_bias, n_ignored):
    chunks_of(max(1, n // 3) + 1, vocab)  # three or four chunks, the last one short
    h, w, t, b = make_inputs(n, vocab, hidden, dtype, n_ignored, with_bias)
    check_against_float64(h, w, t, b, reduction, label_smoothing, backend="native")


# --------------------------------------------------------------------------- the Triton step, interpreted
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_matches_float64(chunks_of, poison_outputs, reduction):
    chunks_of(4, 4099)
    h, w, t, b = make_inputs(7, 4099, 64, n_ignored=2, with_bias=reduction != "sum")
    check_against_float64(h, w, t, b, reduction, label_smoothing=0.1 if reduction == "mean" else 0.0,
                          backend="triton")


def test_triton_bf16_and_reference_backend():
    h, w, t, b = make_inputs(5, 1000, 64, torch.bfloat16, n_ignored=1)
    check_against_float64(h, w, t, b, "mean", 0.05, backend="triton")
    check_against_float64(h, w, t, b, "none", 0.05, backend="reference")


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_bit_identical_across_runs(chunks_of, backend):
    chunks_of(3, 1000)
    h, w, t, b = make_inputs(7, 1000, 64, torch.bfloat16, n_ignored=1)
    grad = torch.tensor(1.7)
    first, second = (run_ours(h, w, t, b, grad, label_smoothing=0.1, backend=backend) for _ in range(2))
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(x, y) for x, y in zip(first[1], second[1]))


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_every_target_ignored(backend):
    h, w, _, b = make_inputs(4, 1000, 64)
    t = torch.full((4,), -1, dtype=torch.int64)
    for reduction, want in (("mean", float("nan")), ("sum", 0.0)):
        loss, grads = run_ours(h, w, t, b, torch.tensor(2.0), ignore_index=-1, reduction=reduction, backend=backend)
        torch.testing.assert_close(loss, torch.tensor(want), equal_nan=True)  # torch's 0 / 0 for "mean"
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)  # torch's zero gradients


def test_leading_dims_int32_target_and_partial_grads():
    h, w, t, _ = make_inputs(2 * 5, 1000, 64)
    h3, t3 = h.view(2, 5, 64), t.view(2, 5).int()
    loss = lk.fused_linear_cross_entropy(h3, w, t3, reduction="none", backend="native")
    assert loss.shape == (2, 5)
    torch.testing.assert_close(loss, F.cross_entropy(h.double() @ w.double().T, t, reduction="none").float().view(2, 5))
    # Only hidden requires a gradient: weight gets none, and the loss is the same.
    leaf = h3.clone().requires_grad_()
    lk.fused_linear_cross_entropy(leaf, w, t3, backend="native").backward()
    assert leaf.grad.shape == h3.shape and w.grad is None
    with torch.no_grad():  # no gradient work at all: the loss only
        torch.testing.assert_close(lk.fused_linear_cross_entropy(leaf, w, t3, backend="native"),
                                   F.cross_entropy(h @ w.T, t))


def test_chunk_rows_bounds_the_logits():
    for n, vocab in ((1, 32016), (100_000, 32016), (100_000, 1000), (5, 7)):
        rows = cross_entropy.chunk_rows(n, vocab, torch.device("cpu"))
        assert 1 <= rows <= n
        assert rows == n or rows * vocab * 4 <= cross_entropy.LOGITS_CHUNK_BYTES["cpu"]


def test_training_step_compiles_fullgraph():
    torch._dynamo.reset()
    x, proj, w, t = randn(6, 32), randn(32, 64) / 6, randn(1000, 64) / 8, torch.randint(0, 1000, (6,))
    t[1] = -100

    def step(x, proj, w):
        return lk.fused_linear_cross_entropy(torch.tanh(x @ proj), w, t, label_smoothing=0.1)

    def reference_step(x, proj, w):
        return F.cross_entropy(torch.tanh(x @ proj) @ w.T, t, label_smoothing=0.1)

    def run(fn):
        leaves = [a.clone().requires_grad_() for a in (x, proj, w)]
        loss = fn(*leaves)
        return loss, torch.autograd.grad(loss * 3, leaves)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    (loss, grads), (want, want_grads) = run(compiled), run(reference_step)
    torch.testing.assert_close(loss, want)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(reduction):
    h, w, t, b = make_inputs(5, 100, 16, n_ignored=1)
    args = (h.requires_grad_(), w.requires_grad_(), t, b.requires_grad_(), -100, reduction, 0.1, True, True, True,
            "native")
    torch.library.opcheck(torch.ops.llama_kernels.fused_linear_cross_entropy, args)


# --------------------------------------------------------------------------- refusals
def test_refusals():
    h, w, t, b = make_inputs(4, 100, 16)
    call = lk.fused_linear_cross_entropy
    cases = [
        (TypeError, "target: expected dtype", lambda: call(h, w, t.float(), b)),
        (ValueError, r"target: expected class indices in \[0, 100\)", lambda: call(h, w, torch.tensor([0, 1, 100, 2]))),
        (ValueError, r"target: expected class indices", lambda: call(h, w, torch.tensor([0, -5, 1, 2]))),
        (ValueError, r"weight: expected \(V, 16\)", lambda: call(h, w[:, :15], t)),
        (ValueError, "weight: expected 2 dimensions", lambda: call(h, w[None], t)),
        (ValueError, "weight: expected device", lambda: call(h, w.to("meta"), t)),
        (ValueError, "target: expected device", lambda: call(h, w, t.to("meta"))),
        (ValueError, r"target: expected shape \(4,\)", lambda: call(h, w, t[:3])),
        (ValueError, r"bias: expected shape \(100,\)", lambda: call(h, w, t, b[:99])),
        (TypeError, "bias: expected dtype torch.float32", lambda: call(h, w, t, b.double().half())),
        (TypeError, "weight: expected dtype torch.float32", lambda: call(h, w.bfloat16(), t)),
        (ValueError, "hidden: expected", lambda: call(h[0], w, t[0])),
        (ValueError, "reduction: expected one of", lambda: call(h, w, t, reduction="avg")),
        (ValueError, "label_smoothing: expected a float in", lambda: call(h, w, t, label_smoothing=1.5)),
        (TypeError, "ignore_index: expected an int", lambda: call(h, w, t, ignore_index=-100.0)),
    ]
    for error, message, fn in cases:
        with pytest.raises(error, match=message):
            fn()
