"""SwiGLU against float64, forward and gradients, on the Triton kernels (interpreted) and the CPU path."""

import pytest
import torch
import torch.nn.functional as F

import llama_kernels as lk
from utils import assert_close, randn

BACKENDS = ["triton", "reference"]  # CPU tensors run the reference until the C++ kernel lands


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
        (ValueError, "backend: 'native' does not implement swiglu", lambda: lk.swiglu(x, x, backend="native")),
    ]
    for error, message, fn in cases:
        with pytest.raises(error, match=message):
            fn()
