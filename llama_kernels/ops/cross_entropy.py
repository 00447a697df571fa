"""Fused linear cross-entropy: the loss of ``hidden @ weight.T + bias`` without the (N, V) logits.

Math, per row i with logits z = h_i W^T + b (fp32), target t, smoothing e, V classes
(``F.cross_entropy``'s definition):
    loss_i = lse(z) - (1 - e) z_t - e mean_j(z_j)      (0 for an ignored row)
    dz_j   = softmax(z)_j - (1 - e) [j == t] - e / V    (0 for an ignored row)
    dh_i = dz W,  dW = sum_i dz_i^T h_i,  db = sum_i dz_i
"mean" divides by the number of rows not ignored (nan when every row is: 0 / 0, as torch).

Design (Liger's): the tokens go in chunks of C rows. Per chunk, the logits (C, V) are formed in
fp32 by a matmul (cuBLAS on a GPU); one kernel turns them in place into dz and writes each row's
loss and lse (``_logits_to_grad_kernel`` on Triton; the extension's ``cross_entropy_step`` on the
CPU, dz in bf16 or in place); then
dh_chunk = dz @ W and dW += dz^T @ h_chunk, both accumulated in fp32. Why this and not a fully
fused matmul (Cut Cross-Entropy): the three matmuls stay cuBLAS's, at its peak, and 6 N H V FLOPs
is what the materialized path does; the kernel between them is a memory-bound pass over a chunk.

- "mean" and "sum": the gradients are computed in the forward (the upstream gradient is a
  scalar) and scaled by it in the backward, so the whole step is one pass over the vocabulary.
- "none": the upstream gradient scales each row differently, which dW cannot absorb after the
  fact, so the forward computes the loss only and the backward recomputes the chunk's logits
  (8 N H V FLOPs in all).
- Nothing needs a gradient (no_grad, or no input requiring one): the loss only.
- Memory: the chunk's fp32 logits, C x V x 4 bytes (on a GPU plus dz's 16-bit copy for the
  matmuls, C x V x 2; on the CPU for bf16 dz's two bf16 copies, plain and packed for the matmuls), C from ``chunk_rows`` (a fixed budget per device, ``LOGITS_CHUNK_BYTES``), besides the
  gradients themselves (dW's fp32 accumulator, V x H x 4 bytes when weight is 16-bit) and, on the
  CPU, the weight's copies for the matmuls (2 x V x H x 2 bytes). Nothing of size N x V.
- The CPU's matmuls (torch has no 16-bit matmul with an fp32 output there): for bf16, the
  extension's ``bf16_matmul`` (oneDNN's bf16 micro-kernel, fp32 accumulation and output, as on a
  GPU), dz rounded to bf16 as on a GPU; otherwise fp32 operands, a 16-bit weight upcast once per call.
- Deterministic: chunks in a fixed order, no atomics, each sum in one place.
- A target outside [0, V) that is not ignore_index is refused on the CPU. On a GPU it is not
  checked on the host (that would sync), nor inside torch.compile (no data-dependent branch):
  there its row's loss and gradient row are nan, and nothing outside the buffers is read or written.
"""

from __future__ import annotations

import functools
import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _native, reference
from .._checks import check_same_device, check_same_dtype, check_tensor
from . import _triton
from ._backend import pick, resolve_backend

REDUCTIONS = ("mean", "sum", "none")
# The budget of one chunk's fp32 logits, per device type: big enough that the chunk's matmuls run
# at the GEMM peak (2048 rows at V = 32,016 on a GPU), small beside the activations.
LOGITS_CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 32 * 2**20}


def chunk_rows(n_rows: int, vocab: int, device: torch.device) -> int:
    """How many tokens go through the loss at a time: as many as fit the device's logits budget."""
    budget = LOGITS_CHUNK_BYTES.get(device.type, LOGITS_CHUNK_BYTES["cuda"])
    return max(1, min(n_rows, budget // (4 * max(vocab, 1))))


# --------------------------------------------------------------------------- the in-place step
@triton.jit
def _logits_to_grad_kernel(
    logits_ptr, target_ptr, row_scale_ptr, loss_ptr, lse_ptr,
    n_cols, stride_logits, ignore_index, label_smoothing,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One row of fp32 logits: writes its loss and lse, and (WRITE_GRAD) overwrites it with dz * row_scale."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits
    # Pass 1: online max and sum of exp, and the plain sum for the smoothing term.
    running_max = -float("inf")
    sum_exp = 0.0
    sum_logits = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < n_cols, other=-float("inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        sum_exp = sum_exp * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        sum_logits += tl.sum(tl.where(cols < n_cols, z, 0.0), axis=0)
        running_max = new_max
    lse = running_max + tl.log(sum_exp)

    target = tl.load(target_ptr + row)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < n_cols)
    # An out-of-range target reads nothing: its row gets a nan loss and a nan gradient.
    z_target = tl.load(row_ptr + target, mask=in_range, other=float("nan"))
    loss = lse - (1.0 - label_smoothing) * z_target - label_smoothing * sum_logits / n_cols
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
    tl.store(lse_ptr + row, lse)
    if WRITE_GRAD:
        scale = tl.load(row_scale_ptr + row)
        scale = tl.where(ignored, 0.0, tl.where(in_range, scale, float("nan")))
        # The block barrier is not needed: each element is read and written by the same thread.
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            z = tl.load(row_ptr + cols, mask=mask, other=0.0)
            dz = tl.exp(z - lse) - label_smoothing / n_cols - tl.where(cols == target, 1.0 - label_smoothing, 0.0)
            tl.store(row_ptr + cols, dz * scale, mask=mask)


def _candidates(default: dict, target: str, fields: dict) -> list[dict]:
    found = [default]
    for block_v in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            config = {"BLOCK_V": block_v, "num_warps": warps}
            if config != default:
                found.append(config)
    return found


TUNING = _triton.Tuning("cross_entropy_step", "{n_cols}:{grad}", _candidates)


def _config(logits: Tensor, write_grad: bool) -> dict:
    block_v = min(triton.next_power_of_2(logits.shape[1]), 4096)
    target = _triton.target_of(logits.device)
    if target == "interpreter":  # small enough that the tests' vocabularies take several loop steps
        return {"BLOCK_V": min(block_v, 2048), "num_warps": 8}
    return TUNING.config(target, {"BLOCK_V": block_v, "num_warps": 8}, n_cols=logits.shape[1],
                         grad="grad" if write_grad else "loss")


def logits_to_grad_triton(logits, target, row_scale, ignore_index, label_smoothing, write_grad):
    n_rows, n_cols = logits.shape
    loss = _triton.new_output((n_rows,), torch.float32, logits.device)
    lse = _triton.new_output((n_rows,), torch.float32, logits.device)
    cfg = _config(logits, write_grad)
    _triton.launch(
        _logits_to_grad_kernel, (n_rows,), logits.device, num_warps=cfg["num_warps"],
        logits_ptr=logits, target_ptr=target, row_scale_ptr=row_scale if write_grad else loss,
        loss_ptr=loss, lse_ptr=lse, n_cols=n_cols, stride_logits=logits.stride(0),
        ignore_index=ignore_index, label_smoothing=label_smoothing, WRITE_GRAD=write_grad, BLOCK_V=cfg["BLOCK_V"])
    return loss, lse, logits


def _logits_to_grad_native(logits, target, row_scale, ignore_index, label_smoothing, write_grad, dz_buffer):
    """The step on the CPU: the extension's kernel (csrc/cpu/cross_entropy.cpp), dz into dz_buffer's first rows
    (bf16), or without one in place (fp32)."""
    ops = _native.ops()
    if not write_grad:
        return *ops.cross_entropy_step(logits, target, None, ignore_index, label_smoothing, None), logits
    dz = logits if dz_buffer is None else dz_buffer[:logits.shape[0]]
    return *ops.cross_entropy_step(logits, target, row_scale, ignore_index, label_smoothing, dz), dz


# --------------------------------------------------------------------------- the chunk loop
class _GpuProducts:
    """The chunk loop's three matmuls on a GPU: operands in the input dtype, fp32 accumulation (cuBLAS); dz rounded
    to the input dtype for them."""

    dz_buffer = None  # where the CPU step writes a 16-bit dz (else in place)

    def __init__(self, weight: Tensor, want_dweight: bool, chunk: int):
        self.weight = weight
        self.dz_dtype = weight.dtype
        self.dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dweight else None

    def logits(self, h: Tensor) -> Tensor:
        return _mm(h, self.weight.T)

    def dhidden(self, dz: Tensor) -> Tensor:  # rounded to dz's dtype once, from fp32 accumulation
        return torch.mm(dz, self.weight)

    def add_dweight(self, dz: Tensor, h: Tensor) -> None:
        _mm(dz.T, h, accumulate=self.dw)

    def dweight(self) -> Tensor:
        return self.dw


class _CpuFp32Products(_GpuProducts):
    """On the CPU without the bf16 products: fp32 operands (torch has no 16-bit matmul with an fp32 output there),
    a 16-bit weight upcast once per call; dz stays fp32. On the CPU the chunk's logits (and dz) go to buffers reused
    by every chunk: fresh ones per chunk cost their page faults each time."""

    def __init__(self, weight: Tensor, want_dweight: bool, chunk: int):
        super().__init__(weight.float(), want_dweight, chunk)
        self.logits_buffer = weight.new_empty((chunk, weight.shape[0]), dtype=torch.float32)

    def logits(self, h: Tensor) -> Tensor:
        return torch.mm(h.float(), self.weight.T, out=self.logits_buffer[:h.shape[0]])

    def add_dweight(self, dz: Tensor, h: Tensor) -> None:
        super().add_dweight(dz, h.float())


class _CpuBf16Products:
    """On the CPU for bf16 operands: the extension's bf16 products with fp32 output (oneDNN's micro-kernel), their
    right-hand operands packed in pairs once per call (the weight, both ways: 2x its size, as its fp32 copy would
    be) or once per chunk (dz); dz rounded to bf16 as on a GPU. dW is accumulated transposed (H, V): its product
    then takes h^T, a small transpose, as its left operand and dz, packed, as its right one."""

    def __init__(self, weight: Tensor, want_dweight: bool, chunk: int):
        self.ops = _native.ops()
        self.weight_t_pairs = self.ops.pack_pairs(weight.T)
        self.weight_pairs = self.ops.pack_pairs(weight)
        self.dz_dtype = torch.bfloat16
        # Written by the first chunk's product, not zeroed first (one pass fewer over V x H).
        self.dw_t = weight.new_empty(weight.shape[::-1], dtype=torch.float32) if want_dweight else None
        self.dw_chunks = 0
        self.logits_buffer = weight.new_empty((chunk, weight.shape[0]), dtype=torch.float32)
        self.dz_buffer = weight.new_empty((chunk, weight.shape[0]))

    def _mm(self, a: Tensor, b_pairs: Tensor, out: Tensor | None = None, accumulate: bool = False) -> Tensor:
        if out is None:
            out = a.new_empty((a.shape[0], b_pairs.shape[1]), dtype=torch.float32)
        self.ops.bf16_matmul(a, b_pairs, out, accumulate)
        return out

    def logits(self, h: Tensor) -> Tensor:
        return self._mm(h, self.weight_t_pairs, out=self.logits_buffer[:h.shape[0]])

    def dhidden(self, dz: Tensor) -> Tensor:
        return self._mm(dz, self.weight_pairs)

    def add_dweight(self, dz: Tensor, h: Tensor) -> None:
        self._mm(h.T.contiguous(), self.ops.pack_pairs(dz), out=self.dw_t, accumulate=self.dw_chunks > 0)
        self.dw_chunks += 1

    def dweight(self) -> Tensor:
        return (self.dw_t if self.dw_chunks else self.dw_t.zero_()).T


def _products(hidden: Tensor, weight: Tensor, want_dweight: bool, chunk: int):
    if hidden.is_cuda:
        return _GpuProducts(weight, want_dweight, chunk)
    if weight.dtype == torch.bfloat16 and _native.available() and _native.ops().bf16_matmul_available():
        return _CpuBf16Products(weight, want_dweight, chunk)
    return _CpuFp32Products(weight, want_dweight, chunk)


def _mm(a: Tensor, b: Tensor, accumulate: Tensor | None = None) -> Tensor:
    """a @ b in fp32 (16-bit operands: fp32 accumulation and output); with ``accumulate``, added into it."""
    if a.dtype == torch.float32:
        return torch.mm(a, b) if accumulate is None else accumulate.addmm_(a, b)
    if accumulate is None:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.addmm(accumulate, a, b, out_dtype=torch.float32, out=accumulate)


def _row_scale(target: Tensor, ignore_index: int, reduction: str, grad_loss: Tensor | None = None) -> Tensor:
    """What each row's dz is multiplied by: d(loss)/d(loss_i) (the kernel zeroes the ignored rows)."""
    if reduction == "none":
        return grad_loss.reshape(-1).float().contiguous()
    scale = torch.ones(target.shape, dtype=torch.float32, device=target.device)
    if reduction == "mean":  # every row ignored: zero gradients, as torch
        scale /= (target != ignore_index).sum().clamp(min=1)
    return scale


def _chunked(hidden, weight, target, bias, row_scale, ignore_index, label_smoothing,
             grad_hidden, grad_weight, grad_bias, backend):
    """The loss per row (N,) fp32, and the gradients asked for (None for the others), each row's dz
    scaled by row_scale (N,): dhidden in hidden's dtype, dweight and dbias in fp32."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    bias_f = bias.float() if bias is not None else None
    write_grad = grad_hidden or grad_weight or grad_bias
    loss = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    dhidden = torch.empty_like(hidden) if grad_hidden else None
    dbias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if grad_bias else None
    size = chunk_rows(n_rows, vocab, hidden.device)
    products = _products(hidden, weight, grad_weight, size)
    # The native step writes dz in the products' dtype, except that dbias sums the fp32 dz.
    step = pick(backend, triton=logits_to_grad_triton, reference=None,
                native=functools.partial(_logits_to_grad_native, dz_buffer=None if grad_bias else products.dz_buffer))
    for start in range(0, n_rows, size):
        rows = slice(start, min(start + size, n_rows))
        h = hidden[rows]
        logits = products.logits(h)
        if bias_f is not None:
            logits += bias_f
        loss[rows], _, dz = step(logits, target[rows], row_scale[rows] if write_grad else None, ignore_index,
                                 label_smoothing, write_grad)
        if not write_grad:
            continue
        if grad_bias:
            dbias += dz.sum(0)
        dz = dz.to(products.dz_dtype)
        if grad_hidden:  # rounded to hidden's dtype once, from fp32 accumulation
            dhidden[rows] = products.dhidden(dz)
        if grad_weight:
            products.add_dweight(dz, h)
    dweight = products.dweight() if grad_weight else None
    return loss, dhidden, dweight, dbias


def _reduce(loss: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":  # 0 / 0 = nan when every row is ignored, as torch
        return loss.sum() / (target != ignore_index).sum()
    return loss


def _empty(t: Tensor) -> Tensor:
    """The placeholder of a gradient not asked for (an op returns tensors only)."""
    return t.new_empty(0)


def _as_outputs(grads, wanted, hidden, weight, bias) -> tuple[Tensor, Tensor, Tensor]:
    """(dhidden, dweight, dbias) in their inputs' dtypes and contiguous, the ones not asked for as placeholders."""
    likes = (hidden, weight, bias if bias is not None else weight)
    return tuple(grad.to(like.dtype, memory_format=torch.contiguous_format) if want else _empty(like)
                 for grad, want, like in zip(grads, wanted, likes))


# --------------------------------------------------------------------------- torch ops
@torch.library.custom_op("llama_kernels::fused_linear_cross_entropy", mutates_args=())
def _cross_entropy_op(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, ignore_index: int, reduction: str,
    label_smoothing: float, grad_hidden: bool, grad_weight: bool, grad_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loss and, for "mean" and "sum", the gradients asked for (of the loss itself; empty for the others)."""
    if reduction == "none":  # the backward recomputes (see the module's docstring)
        grad_hidden = grad_weight = grad_bias = False
    forward = pick(backend, triton=_forward_chunked, native=_forward_chunked, reference=_forward_reference)
    loss, *grads = forward(hidden, weight, target, bias, ignore_index, reduction, label_smoothing,
                           grad_hidden, grad_weight, grad_bias, backend)
    return loss, *_as_outputs(grads, (grad_hidden, grad_weight, grad_bias), hidden, weight, bias)


def _forward_chunked(hidden, weight, target, bias, ignore_index, reduction, label_smoothing,
                     grad_hidden, grad_weight, grad_bias, backend):
    row_scale = _row_scale(target, ignore_index, reduction) if reduction != "none" else None
    loss, *grads = _chunked(hidden, weight, target, bias, row_scale, ignore_index, label_smoothing,
                            grad_hidden, grad_weight, grad_bias, backend)
    return _reduce(loss, target, ignore_index, reduction), *grads


def _forward_reference(hidden, weight, target, bias, ignore_index, reduction, label_smoothing,
                       grad_hidden, grad_weight, grad_bias, backend):
    """The logits materialized: the oracle, also as a backend."""
    loss = reference.linear_cross_entropy(hidden, weight, target, bias, ignore_index, reduction, label_smoothing)
    grads = (None, None, None)
    if grad_hidden or grad_weight or grad_bias:
        grads = reference.linear_cross_entropy_backward(
            torch.ones((), device=hidden.device), hidden, weight, target, bias, ignore_index, reduction,
            label_smoothing)
    return loss, *grads


@torch.library.custom_op("llama_kernels::fused_linear_cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(
    grad_loss: Tensor, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, ignore_index: int,
    label_smoothing: float, grad_hidden: bool, grad_weight: bool, grad_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of reduction="none" for a per-row loss gradient: the chunks' logits recomputed."""
    backward = pick(backend, triton=_backward_chunked, native=_backward_chunked, reference=_backward_reference)
    grads = backward(grad_loss, hidden, weight, target, bias, ignore_index, label_smoothing, grad_hidden,
                     grad_weight, grad_bias, backend)
    return _as_outputs(grads, (grad_hidden, grad_weight, grad_bias), hidden, weight, bias)


def _backward_chunked(grad_loss, hidden, weight, target, bias, ignore_index, label_smoothing, grad_hidden,
                      grad_weight, grad_bias, backend):
    _, *grads = _chunked(hidden, weight, target, bias, _row_scale(target, ignore_index, "none", grad_loss),
                         ignore_index, label_smoothing, grad_hidden, grad_weight, grad_bias, backend)
    return grads


def _backward_reference(grad_loss, hidden, weight, target, bias, ignore_index, label_smoothing, grad_hidden,
                        grad_weight, grad_bias, backend):
    return reference.linear_cross_entropy_backward(grad_loss, hidden, weight, target, bias, ignore_index, "none",
                                                   label_smoothing)


def _fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
    bias_like = bias if bias is not None else weight
    return tuple(torch.empty_like(like) if want else _empty(like) for want, like in
                 ((grad_hidden, hidden), (grad_weight, weight), (grad_bias and bias is not None, bias_like)))


@_cross_entropy_op.register_fake
def _(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, grad_hidden, grad_weight, grad_bias,
      backend):
    loss = hidden.new_empty(target.shape if reduction == "none" else (), dtype=torch.float32)
    if reduction == "none":
        grad_hidden = grad_weight = grad_bias = False
    return loss, *_fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias)


@_cross_entropy_backward_op.register_fake
def _(grad_loss, hidden, weight, target, bias, ignore_index, label_smoothing, grad_hidden, grad_weight, grad_bias,
      backend):
    return _fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias)


def _setup_context(ctx, inputs, output):
    hidden, weight, target, bias, ctx.ignore_index, ctx.reduction, ctx.label_smoothing, *flags, ctx.backend = inputs
    ctx.flags = tuple(flags)
    ctx.has_bias = bias is not None
    if ctx.reduction == "none":
        ctx.save_for_backward(hidden, weight, target, bias)
    else:
        ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_loss, *_):
    if ctx.reduction == "none":
        hidden, weight, target, bias = ctx.saved_tensors
        grads = torch.ops.llama_kernels.fused_linear_cross_entropy_backward(
            grad_loss, hidden, weight, target, bias, ctx.ignore_index, ctx.label_smoothing, *ctx.flags, ctx.backend)
    else:  # the forward's gradients of the loss, times the scalar upstream gradient
        grads = [grad * grad_loss for grad in ctx.saved_tensors]
    dhidden, dweight, dbias = (grad if want else None for grad, want in zip(grads, ctx.flags))
    return dhidden, dweight, None, dbias if ctx.has_bias else None, None, None, None, None, None, None, None


_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function
def fused_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, backend: str | None = None,
) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, target, ...)`` computed in fp32, without the logits.

    hidden: (..., H) fp16, bf16 or fp32 (e.g. a language model's last hidden states, shifted);
    weight: (V, H), bias: (V,) or None, both in hidden's dtype (e.g. ``lm_head.weight``);
    target: hidden.shape[:-1] class indices (int32 or int64), ``ignore_index`` for rows without a loss.
    Returns an fp32 scalar for "mean" (over the rows not ignored; nan if none is) and "sum", of
    target's shape for "none". ``label_smoothing`` as torch defines it. Differentiable in hidden,
    weight and bias; deterministic. Memory beyond the gradients: one chunk of fp32 logits
    (``chunk_rows``). backend: None picks Triton's step for CUDA tensors and the chunked torch
    loop ("native") for CPU tensors; "reference" materializes the logits.
    """
    check_tensor("hidden", hidden)
    check_tensor("weight", weight, ndim=2)
    check_tensor("target", target, dtypes=(torch.int64, torch.int32))
    if hidden.dim() < 2:
        raise ValueError(f"hidden: expected (..., H) with at least 2 dimensions, got shape {tuple(hidden.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected (V, {hidden.shape[-1]}) to match hidden's width, "
                         f"got {tuple(weight.shape)}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target: expected shape {tuple(hidden.shape[:-1])} (hidden's without H), "
                         f"got {tuple(target.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},) to match weight's rows, "
                             f"got {tuple(bias.shape)}")
    check_same_dtype(hidden=hidden, weight=weight, bias=bias)
    check_same_device(hidden=hidden, weight=weight, target=target, bias=bias)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a float in [0, 1], got {label_smoothing!r}")
    if weight.shape[0] == 0:
        raise ValueError("weight: expected at least one class (V >= 1), got shape (0, H)")
    target = target.reshape(-1).long()
    # On a GPU checking would sync, and a compiled graph cannot branch on data: there such a row's loss is nan.
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (target != ignore_index) & ((target < 0) | (target >= weight.shape[0]))
        if bad.any():
            raise ValueError(f"target: expected class indices in [0, {weight.shape[0]}) or ignore_index="
                             f"{ignore_index}, got {target[bad][0].item()}")
    backend = resolve_backend(hidden, backend, "fused_linear_cross_entropy")
    wants_grad = torch.is_grad_enabled()
    flags = [wants_grad and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    loss, *_ = torch.ops.llama_kernels.fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, target, bias, ignore_index, reduction, float(label_smoothing),
        *flags, backend)
    return loss.view(hidden.shape[:-1]) if reduction == "none" else loss
