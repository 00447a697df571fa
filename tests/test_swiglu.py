"""SwiGLU against float64, forward and gradients, on the Triton kernels (interpreted), the C++ kernels and the
reference."""

import pytest
import torch
import torch.nn.functional as F

import llama_kernels as lk
from llama_kernels import _native, reference
from utils import assert_close, kernel_backends, randn

BACKENDS = [*kernel_backends("swiglu", "cpu"), "reference"]


def float64_swiglu_and_grads(gate, up, dy):
    g, u = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    y = F.silu(g) * u
    return (y, *torch.autograd.grad(y, (g, u), dy.double()))


def check(gate, up, backend):
    dy = randn(*gate.shape, dtype=gate.dtype)
    gate_leaf, up_leaf = gate.detach().requires_grad_(), up.detach().requires_grad_()
    y = lk.swiglu(gate_leaf, up_leaf, backend=backend)
    got = (y, *torch.autograd.grad(y, (gate_leaf, up_leaf), dy))
    for actual, want in zip(got, float64_swiglu_and_grads(gate, up, dy)):
        assert_close(actual, want.to(gate.dtype), ulps=1, atol=1e-6)  # fp32 math, rounded once


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (7, 113), (2, 3, 1023), (3, 11008)])
def test_matches_float64(poison_outputs, backend, dtype, shape):
    check(randn(*shape, dtype=dtype, scale=3.0), randn(*shape, dtype=dtype), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_halves_of_one_fused_projection_are_read_in_place(poison_outputs, backend):
    gate_up = randn(2, 5, 2 * 300, dtype=torch.bfloat16, scale=2.0)
    gate, up = gate_up.chunk(2, -1)
    check(gate, up, backend)
    # Through autograd the gradient of the fused projection is the two halves' side by side.
    leaf = gate_up.clone().requires_grad_()
    dy = randn(2, 5, 300, dtype=torch.bfloat16)
    lk.swiglu(*leaf.chunk(2, -1), backend=backend).backward(dy)
    _, dgate, dup = float64_swiglu_and_grads(gate, up, dy)
    assert_close(leaf.grad, torch.cat((dgate, dup), -1).bfloat16(), ulps=1)


def test_transposed_and_empty_inputs():
    gate, up = randn(64, 9).T, randn(64, 9).T  # no row-stride view: copied
    check(gate, up, "triton")
    empty = randn(0, 8)
    assert lk.swiglu(empty, empty, backend="triton").shape == (0, 8)


def test_training_step_compiles_fullgraph():
    torch._dynamo.reset()
    x, w_gate_up, w_down = randn(6, 32), randn(32, 2 * 48) / 6, randn(48, 32) / 7

    def feed_forward(x, w_gate_up, w_down, swiglu):
        return swiglu(*(x @ w_gate_up).chunk(2, -1)) @ w_down

    def run(fn, swiglu):
        leaves = [t.clone().requires_grad_() for t in (x, w_gate_up, w_down)]
        out = fn(*leaves, swiglu)
        return out, torch.autograd.grad(out.square().sum(), leaves)

    compiled = torch.compile(feed_forward, backend="aot_eager", fullgraph=True)
    (out, grads), (want, want_grads) = run(compiled, lk.swiglu), run(feed_forward, lambda g, u: F.silu(g) * u)
    for got, expected in zip((out, *grads), (want, *want_grads)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    gate, up = randn(3, 40).requires_grad_(), randn(3, 40).requires_grad_()
    torch.library.opcheck(torch.ops.llama_kernels.swiglu, (gate, up, backend))


def test_refusals():
    x = randn(4, 8)
    cases = [
        (ValueError, r"up: expected gate's shape \(4, 8\)", lambda: lk.swiglu(x, x[:, :7])),
        (TypeError, "up: expected dtype torch.float32", lambda: lk.swiglu(x, x.bfloat16())),
        (TypeError, "gate: expected dtype in", lambda: lk.swiglu(x.long(), x)),
        (TypeError, "up: expected a torch.Tensor", lambda: lk.swiglu(x, 1.0)),
        (ValueError, "up: expected device", lambda: lk.swiglu(x, x.to("meta"))),
        (ValueError, "gate: expected at least 1 dimension", lambda: lk.swiglu(x[0, 0], x[0, 0])),
    ]
    for error, message, fn in cases:
        with pytest.raises(error, match=message):
            fn()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", kernel_backends("swiglu", "cpu")[1:])
def test_native_matches_the_reference(backend, dtype):
    """The same fp32 expressions, rounded once; only e^x differs (the kernel's polynomial, torch's Sleef), by an ulp
    of fp32 at most: in bf16 and fp16 a result differs only where that ulp crosses a rounding boundary, by one ulp.
    Gates over [-30, 30] reach both tails, the halves of a fused projection the row stride."""
    gate, up = (randn(113, 2 * 1000, scale=10.0).clamp(-30, 30).to(dtype)).chunk(2, -1)
    dy = randn(113, 1000, dtype=dtype)
    got = (lk.swiglu(gate, up, backend=backend), *torch.ops.llama_kernels.swiglu_backward(dy, gate, up, backend))
    want = (reference.swiglu(gate, up), *reference.swiglu_backward(dy, gate, up))
    for actual, expected in zip(got, want):
        assert_close(actual, expected, ulps=1)
        if dtype != torch.float32:
            assert (actual != expected).float().mean() < 1e-3, "more than rare rounding-boundary differences"


@pytest.mark.extension
@pytest.mark.skipif(not _native.available("cpu"), reason="the native extension is not built")
def test_native_op_refuses_what_would_read_out_of_bounds():
    x = randn(4, 8)
    cases = [
        ("swiglu: up: expected shape \\[4, 8\\]", lambda: _native.ops().swiglu(x, x[:, :7])),
        ("swiglu: up: expected dtype Float", lambda: _native.ops().swiglu(x, x.half())),
        ("swiglu: gate: expected a contiguous last dim", lambda: _native.ops().swiglu(x.T, x.T)),
        ("swiglu: gate: expected dtype float32, bfloat16 or float16", lambda: _native.ops().swiglu(x.long(), x)),
        ("swiglu_backward: dy: expected 2 dims", lambda: _native.ops().swiglu_backward(x[0], x, x)),
    ]
    for message, fn in cases:
        with pytest.raises(RuntimeError, match=message):
            fn()
