"""The ops inside torch.compile(fullgraph=True): a pre-norm block slice, forward and backward, on --device."""

import pytest
import torch

import llama_kernels as lk
from llama_kernels import reference as ref
from utils import randn


def block(x, residual, norm_weight, wq, wk, positions):
    """The head of a Llama decoder layer: fused residual RMSNorm, q/k projections, RoPE."""
    normed, residual = lk.rms_norm(x, norm_weight, residual=residual)
    batch, seqlen, _ = x.shape
    q = (normed @ wq).view(batch, seqlen, 4, 32)
    k = (normed @ wk).view(batch, seqlen, 2, 32)
    q, k = lk.apply_rope(q, k, positions, theta=1e6)
    return q, k, residual


def block_reference(x, residual, norm_weight, wq, wk, positions):
    normed, residual = ref.rms_norm(x, norm_weight, residual=residual)
    batch, seqlen, _ = x.shape
    q = (normed @ wq).view(batch, seqlen, 4, 32)
    k = (normed @ wk).view(batch, seqlen, 2, 32)
    q, k = ref.apply_rope(q, k, positions, lk.rope_inv_freq(32, 1e6, device=x.device))
    return q, k, residual


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_fullgraph_compile_forward_and_backward(device, compiler):
    torch._dynamo.reset()
    inputs = [randn(2, 9, 64, device=device), randn(2, 9, 64, device=device), 1 + 0.1 * randn(64, device=device),
              randn(64, 128, device=device) / 8, randn(64, 64, device=device) / 8]
    positions = torch.arange(100, 109, device=device)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in inputs]
        q, k, h = fn(*leaves, positions)
        loss = q.square().sum() + k.sum() + h.sum()
        return (q, k, h), torch.autograd.grad(loss, leaves)

    compiled = torch.compile(block, backend=compiler, fullgraph=True)
    (outs, grads), (want_outs, want_grads) = run(compiled), run(block_reference)
    for got, want in zip(outs + grads, want_outs + want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_in_place_rope_compiles(device):
    torch._dynamo.reset()

    def f(q, k):
        lk.apply_rope(q, k, 5, inplace=True)
        return q * 2, k

    q, k = randn(1, 4, 2, 16, device=device), randn(1, 4, 2, 16, device=device)
    want = [2 * t for t in ref.apply_rope(q, k, 5, lk.rope_inv_freq(16, device=device))]
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q.clone(), k.clone())
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1] * 2, want[1], rtol=1e-5, atol=1e-5)
