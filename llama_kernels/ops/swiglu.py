"""SwiGLU, ``silu(gate) * up`` (Llama's feed-forward activation): Triton kernels, launchers, torch op.

Math, elementwise, in fp32 whatever the storage dtype, each output rounded once:
    y = gate * s * up,  s = sigmoid(gate)
    dgate = dy * up * s * (1 + gate * (1 - s)),  dup = dy * gate * s
Nothing is saved but gate and up (s is recomputed in the backward). Each direction is one
kernel: the forward reads gate and up and writes y; the backward reads dy, gate and up and
writes dgate and dup, the floor for each.

gate and up may be strided: the halves of one fused projection (``gate, up = gu.chunk(2, -1)``)
are read in place through their row stride. CPU tensors run the C++ kernels of the native
extension (csrc/cpu/swiglu.cpp, the same math), or the reference where it is not built.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _native, reference
from .._checks import check_same_device, check_same_dtype, check_tensor, dtype_name
from . import _triton
from ._backend import pick, resolve_backend
from ._shared import as_rows


# --------------------------------------------------------------------------- kernels
@triton.jit
def _tile(n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (rows, cols, mask) tile; rows are 64-bit (rows * stride passes 2^31)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return rows.to(tl.int64)[:, None], cols[None, :], mask


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, y_ptr, n_rows, n_cols, stride_gate, stride_up,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, cols, mask = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    # Upcast as loaded: no arithmetic in 16-bit types (the interpreter computes bf16 wrongly).
    g = tl.load(gate_ptr + rows * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + rows * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n_rows, n_cols,
                       stride_dy, stride_gate, stride_up,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, cols, mask = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    dy = tl.load(dy_ptr + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + rows * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dgate = dy * u * s * (1.0 + g * (1.0 - s))
    dup = dy * g * s
    tl.store(dgate_ptr + rows * n_cols + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + rows * n_cols + cols, dup.to(dup_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- configs and launchers
def _candidates(default: dict, target: str, fields: dict) -> list[dict]:
    """The default's columns, 1-16 rows a program, 4 or 8 warps: 4-32 elements a thread."""
    found = [default]
    for block_m in (1, 2, 4, 8, 16):
        for warps in (4, 8):
            config = {"BLOCK_M": block_m, "BLOCK_N": default["BLOCK_N"], "num_warps": warps}
            if 4 <= block_m * default["BLOCK_N"] // (32 * warps) <= 32 and config != default:
                found.append(config)
    return found


FORWARD_TUNING = _triton.Tuning("swiglu_fwd", "{n_cols}:{dtype}", _candidates)
BACKWARD_TUNING = _triton.Tuning("swiglu_bwd", "{n_cols}:{dtype}", _candidates)


def _config(tuning: _triton.Tuning, t: Tensor, n_rows: int, n_cols: int) -> dict:
    """Tiles of BLOCK_M rows x BLOCK_N columns: big and few under the interpreter (~8 ms a program), about
    2048 elements a program on a GPU, 8 warps (with 4 the bf16 backward spills on sm_80)."""
    target = _triton.target_of(t.device)
    if target == "interpreter":
        block_n = min(triton.next_power_of_2(n_cols), 16384)
        block_m = min(max(1, 65536 // block_n), triton.next_power_of_2(n_rows))
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4}
    block_n = min(triton.next_power_of_2(n_cols), 1024)
    default = {"BLOCK_M": max(1, 2048 // block_n), "BLOCK_N": block_n, "num_warps": 8}
    return tuning.config(target, default, n_cols=n_cols, dtype=dtype_name(t.dtype))



def forward_triton(gate: Tensor, up: Tensor) -> Tensor:
    n_cols = gate.shape[-1]
    y = _triton.new_output(gate.shape, gate.dtype, gate.device)
    if y.numel() == 0:
        return y
    gate2, up2 = as_rows(gate, n_cols), as_rows(up, n_cols)
    cfg = _config(FORWARD_TUNING, gate, gate2.shape[0], n_cols)
    _triton.launch(
        _swiglu_fwd_kernel, (triton.cdiv(gate2.shape[0], cfg["BLOCK_M"]), triton.cdiv(n_cols, cfg["BLOCK_N"])),
        gate.device, num_warps=cfg["num_warps"],
        gate_ptr=gate2, up_ptr=up2, y_ptr=y, n_rows=gate2.shape[0], n_cols=n_cols,
        stride_gate=gate2.stride(0), stride_up=up2.stride(0), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
    return y


def backward_triton(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    n_cols = gate.shape[-1]
    dgate = _triton.new_output(gate.shape, gate.dtype, gate.device)
    dup = _triton.new_output(up.shape, up.dtype, up.device)
    if dgate.numel() == 0:
        return dgate, dup
    dy2, gate2, up2 = as_rows(dy, n_cols), as_rows(gate, n_cols), as_rows(up, n_cols)
    cfg = _config(BACKWARD_TUNING, gate, gate2.shape[0], n_cols)
    _triton.launch(
        _swiglu_bwd_kernel, (triton.cdiv(gate2.shape[0], cfg["BLOCK_M"]), triton.cdiv(n_cols, cfg["BLOCK_N"])),
        gate.device, num_warps=cfg["num_warps"],
        dy_ptr=dy2, gate_ptr=gate2, up_ptr=up2, dgate_ptr=dgate, dup_ptr=dup, n_rows=gate2.shape[0], n_cols=n_cols,
        stride_dy=dy2.stride(0), stride_gate=gate2.stride(0), stride_up=up2.stride(0),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
    return dgate, dup


# --------------------------------------------------------------------------- the C++ kernels
def forward_native(gate: Tensor, up: Tensor) -> Tensor:
    """The C++ kernel over the (rows, N) views (the halves of a fused projection are such views: no copy)."""
    if gate.numel() == 0:  # no (rows, N) view of an empty tensor to hand over; nothing to compute
        return torch.empty_like(gate, memory_format=torch.contiguous_format)
    n_cols = gate.shape[-1]
    return _native.ops().swiglu(as_rows(gate, n_cols), as_rows(up, n_cols)).view(gate.shape)


def backward_native(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    if gate.numel() == 0:
        return (torch.empty_like(gate, memory_format=torch.contiguous_format),
                torch.empty_like(up, memory_format=torch.contiguous_format))
    n_cols = gate.shape[-1]
    dgate, dup = _native.ops().swiglu_backward(as_rows(dy, n_cols), as_rows(gate, n_cols), as_rows(up, n_cols))
    return dgate.view(gate.shape), dup.view(up.shape)


# --------------------------------------------------------------------------- torch ops
@torch.library.custom_op("llama_kernels::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor, backend: str) -> Tensor:
    return pick(backend, triton=forward_triton, native=forward_native, reference=reference.swiglu)(gate, up)


@torch.library.custom_op("llama_kernels::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: Tensor, gate: Tensor, up: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    dy = dy.contiguous()  # autograd may hand over stride-0 expanded gradients
    backward = pick(backend, triton=backward_triton, native=backward_native, reference=reference.swiglu_backward)
    return backward(dy, gate, up)


@_swiglu_op.register_fake
def _(gate, up, backend):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@_swiglu_backward_op.register_fake
def _(dy, gate, up, backend):
    return (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
            torch.empty(up.shape, dtype=up.dtype, device=up.device))


def _setup_context(ctx, inputs, output):
    gate, up, ctx.backend = inputs
    ctx.save_for_backward(gate, up)


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = torch.ops.llama_kernels.swiglu_backward(dy, gate, up, ctx.backend)
    return dgate, dup, None


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function
def swiglu(gate: Tensor, up: Tensor, *, backend: str | None = None) -> Tensor:
    """``silu(gate) * up``, one kernel forward and one backward, computed in fp32 and rounded once.

    gate, up: the same shape and dtype (fp16, bf16 or fp32), any shape; strided views are read in
        place, e.g. the halves of one fused gate/up projection, ``gate, up = gu.chunk(2, -1)``.
    Returns a contiguous tensor of gate's shape and dtype. Differentiable in both.
    backend: None picks Triton for CUDA tensors and the C++ kernel for CPU tensors (the reference,
        torch ops, without the extension); "triton", "native" or "reference" force one.
    """
    check_tensor("gate", gate)
    check_tensor("up", up)
    if gate.dim() < 1:
        raise ValueError(f"gate: expected at least 1 dimension, got shape {tuple(gate.shape)}")
    if up.shape != gate.shape:
        raise ValueError(f"up: expected gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    check_same_dtype(gate=gate, up=up)
    check_same_device(gate=gate, up=up)
    return torch.ops.llama_kernels.swiglu(gate, up, resolve_backend(gate, backend, "swiglu"))
