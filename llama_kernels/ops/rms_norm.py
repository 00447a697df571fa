"""RMSNorm, optionally fused with the residual add: Triton kernels, launchers, torch ops.

Math (Meta's ``RMSNorm``, see ``reference.rms_norm``), per row of length N:
    h = x + residual                      (only with a residual; in fp32, rounded to promote(x, residual))
    y = cast(h * rstd, h.dtype) * weight,  rstd = 1 / sqrt(mean(h^2) + eps)
Backward, with n = h * rstd and g = dy * weight (the rounding of n ignored):
    dh = rstd * (g - n * mean(g * n)) (+ the incoming gradient of h)
    dweight = sum over rows of dy * cast(n)
rstd is recomputed in the backward from h, which it loads anyway, so nothing
but h itself is saved. dweight is reduced without atomics: each program sums a
fixed block of rows into its own fp32 partial row and the partials are summed
in a fixed order, so the result is the same on every run.

Rows up to 8192 wide are kept in registers, one tile of BLOCK_M rows x BLOCK_N
(>= N) columns at a time: each element is read once from memory and written
once, the floor for this op. Wider rows are processed in column chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _native, reference
from .._checks import check_same_device, check_tensor, dtype_name
from . import _triton
from ._backend import pick, resolve_backend
from ._shared import as_rows


# --------------------------------------------------------------------------- kernels
# Rows up to MAX_ROW_IN_REGISTERS columns are held in registers (one tile, one
# pass). Wider rows go in ROW_CHUNK-column chunks, two passes: the first sums, the
# second re-reads the row (from L2: the program just read it) and writes.
MAX_ROW_IN_REGISTERS = 8192
ROW_CHUNK = 4096


@triton.jit
def _load_h(x_ptr, residual_ptr, h_ptr, rows, cols, mask, stride_x, stride_residual, stride_h,
            HAS_RESIDUAL: tl.constexpr):
    """The normalized input in fp32: x, or h = x + residual (stored, rounded to h's dtype)."""
    # Every value is upcast as it is loaded: no arithmetic in 16-bit types.
    x = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + rows * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(h_ptr.dtype.element_ty)  # each pointer loads its own dtype; rounded as torch rounds x + r
        tl.store(h_ptr + rows * stride_h + cols, h, mask=mask)
        x = h.to(tl.float32)
    return x


@triton.jit
def _store_y(h, rstd, weight_ptr, y_ptr, h_dtype: tl.constexpr, rows, cols, mask, n_cols, stride_y):
    normed = (h * rstd[:, None]).to(h_dtype).to(tl.float32)  # Meta's .type_as(x) before the weight
    w = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows * stride_y + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, residual_ptr, weight_ptr, y_ptr, h_ptr,
    n_rows, n_cols,
    stride_x, stride_residual, stride_y, stride_h,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = (rows < n_rows)[:, None]
    # 64-bit row offsets: rows * stride passes 2^31 on long, wide inputs.
    rows = rows.to(tl.int64)[:, None]
    h_dtype: tl.constexpr = h_ptr.dtype.element_ty

    if BLOCK_N >= n_cols:  # the row in registers
        cols = tl.arange(0, BLOCK_N)[None, :]
        mask = row_mask & (cols < n_cols)
        h = _load_h(x_ptr, residual_ptr, h_ptr, rows, cols, mask, stride_x, stride_residual, stride_h, HAS_RESIDUAL)
        rstd = tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)
        _store_y(h, rstd, weight_ptr, y_ptr, h_dtype, rows, cols, mask, n_cols, stride_y)
    else:
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)[None, :]
            mask = row_mask & (cols < n_cols)
            h = _load_h(x_ptr, residual_ptr, h_ptr, rows, cols, mask, stride_x, stride_residual, stride_h, HAS_RESIDUAL)
            sum_sq += tl.sum(h * h, axis=1)
        rstd = tl.rsqrt(sum_sq / n_cols + eps)
        # The second pass may read h stored by another thread of this program: a block barrier
        # makes this program's global writes visible to all its threads.
        tl.debug_barrier()
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)[None, :]
            mask = row_mask & (cols < n_cols)
            if HAS_RESIDUAL:
                h = tl.load(h_ptr + rows * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                h = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            _store_y(h, rstd, weight_ptr, y_ptr, h_dtype, rows, cols, mask, n_cols, stride_y)


@triton.jit
def _rms_norm_bwd_chunk(
    dy_ptr, dh_ptr, h_ptr, dx_ptr, w, rows, cols, mask, rstd, mean_g_normed,
    stride_dy, stride_dh, stride_h, stride_dx, HAS_DH: tl.constexpr,
):
    """Writes dx for one tile; returns the tile's dweight contribution, summed over its rows."""
    h = tl.load(h_ptr + rows * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    normed = h * rstd[:, None]
    dh = rstd[:, None] * (dy * w - normed * mean_g_normed[:, None])
    if HAS_DH:
        dh += tl.load(dh_ptr + rows * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + rows * stride_dx + cols, dh.to(dx_ptr.dtype.element_ty), mask=mask)
    return tl.sum(dy * normed.to(h_ptr.dtype.element_ty).to(tl.float32), axis=0)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, dh_ptr, h_ptr, weight_ptr, dx_ptr, dweight_partial_ptr,
    n_rows, n_cols, rows_per_program,
    stride_dy, stride_dh, stride_h, stride_dx,
    eps,
    HAS_DH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    dweight_row = dweight_partial_ptr + pid.to(tl.int64) * n_cols
    first_row = pid * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, n_rows)

    if BLOCK_N >= n_cols:  # the row in registers; dweight accumulates in registers
        cols = tl.arange(0, BLOCK_N)[None, :]
        w = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        dweight = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row_start in range(first_row, last_row, BLOCK_M):
            rows = row_start + tl.arange(0, BLOCK_M)
            mask = (rows < last_row)[:, None] & (cols < n_cols)
            rows = rows.to(tl.int64)[:, None]
            h = tl.load(h_ptr + rows * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)
            mean_g_normed = tl.sum(dy * w * h, axis=1) * rstd / n_cols
            dweight += _rms_norm_bwd_chunk(
                dy_ptr, dh_ptr, h_ptr, dx_ptr, w, rows, cols, mask, rstd, mean_g_normed,
                stride_dy, stride_dh, stride_h, stride_dx, HAS_DH)
        tl.store(dweight_row + cols, dweight[None, :], mask=cols < n_cols)
    else:  # chunks; this program's own partial row of dweight accumulates in memory
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            tl.store(dweight_row + cols, tl.zeros([BLOCK_N], dtype=tl.float32), mask=cols < n_cols)
        for row_start in range(first_row, last_row, BLOCK_M):
            rows = row_start + tl.arange(0, BLOCK_M)
            row_mask = (rows < last_row)[:, None]
            rows = rows.to(tl.int64)[:, None]
            sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
            sum_gh = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)[None, :]
                mask = row_mask & (cols < n_cols)
                h = tl.load(h_ptr + rows * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
                sum_sq += tl.sum(h * h, axis=1)
                sum_gh += tl.sum(dy * w * h, axis=1)
            rstd = tl.rsqrt(sum_sq / n_cols + eps)
            mean_g_normed = sum_gh * rstd / n_cols
            for start in range(0, n_cols, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = row_mask & (cols < n_cols)[None, :]
                w = tl.load(weight_ptr + cols[None, :], mask=cols[None, :] < n_cols, other=0.0).to(tl.float32)
                contribution = _rms_norm_bwd_chunk(
                    dy_ptr, dh_ptr, h_ptr, dx_ptr, w, rows, cols[None, :], mask, rstd, mean_g_normed,
                    stride_dy, stride_dh, stride_h, stride_dx, HAS_DH)
                # Barriers around the read-modify-write: a replicated element may be stored by one
                # thread of the program and read back by another.
                tl.debug_barrier()
                dweight = tl.load(dweight_row + cols, mask=cols < n_cols, other=0.0)
                tl.store(dweight_row + cols, dweight + contribution, mask=cols < n_cols)
                tl.debug_barrier()


# --------------------------------------------------------------------------- configs
def _candidates(default: dict, target: str, fields: dict) -> list[dict]:
    """Tiles of whole rows (BLOCK_N = the row's power of two: chunked rows re-read memory), 8-64 elements a thread:
    from one warp for many rows to 16 warps for one."""
    block_n = default["BLOCK_N"]
    found = [default]
    for block_m in (1, 2, 4, 8, 16, 32):
        for warps in (1, 2, 4, 8, 16):
            config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps}
            if 8 <= block_m * block_n // (32 * warps) <= 64 and config != default:
                found.append(config)
    return found


FORWARD_TUNING = _triton.Tuning("rms_norm_fwd", "{n_cols}:{dtype}", _candidates)
BACKWARD_TUNING = _triton.Tuning("rms_norm_bwd", "{n_cols}:{dtype}", _candidates)


def _config(tuning: _triton.Tuning, x: Tensor, n_rows: int, n_cols: int) -> dict:
    """BLOCK_N covers the row up to MAX_ROW_IN_REGISTERS; BLOCK_M rows share a program when rows are short."""
    block_n = triton.next_power_of_2(n_cols) if n_cols <= MAX_ROW_IN_REGISTERS else ROW_CHUNK
    target = _triton.target_of(x.device)
    if target == "interpreter":  # few programs (each costs the interpreter the same); still forceable, for the tests
        block_m = min(max(1, 65536 // block_n), triton.next_power_of_2(max(n_rows, 1)))
        default = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4}
    else:
        default = gpu_default(block_n)
    return tuning.config(target, default, n_cols=n_cols, dtype=dtype_name(x.dtype))


def gpu_default(block_n: int) -> dict:
    """The config of rows of BLOCK_N on a card that has not measured its own."""
    block_m = max(1, min(16, 2048 // block_n))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": min(max((block_m * block_n) // 512, 4), 16)}


# --------------------------------------------------------------------------- launchers
def _h_dtype(x: Tensor, residual: Tensor | None) -> torch.dtype:
    """The dtype of h = x + residual (torch's promotion: under autocast a bf16 x meets an fp32 residual stream)."""
    return torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype


def forward_triton(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float):
    n_cols = x.shape[-1]
    h_dtype = _h_dtype(x, residual)
    y = _triton.new_output(x.shape, torch.promote_types(h_dtype, weight.dtype), x.device)
    h = _triton.new_output(x.shape, h_dtype, x.device) if residual is not None else None
    if x.numel() == 0:
        return y, h
    x2 = as_rows(x, n_cols)
    n_rows = x2.shape[0]
    r2 = as_rows(residual, n_cols) if residual is not None else x2
    h2 = h.view(-1, n_cols) if h is not None else x2  # h_ptr also gives the kernel h's dtype
    cfg = _config(FORWARD_TUNING, x, n_rows, n_cols)
    _triton.launch(
        _rms_norm_fwd_kernel, (triton.cdiv(n_rows, cfg["BLOCK_M"]),), x.device,
        num_warps=cfg["num_warps"],
        x_ptr=x2, residual_ptr=r2, weight_ptr=weight.contiguous(), y_ptr=y.view(-1, n_cols), h_ptr=h2,
        n_rows=n_rows, n_cols=n_cols,
        stride_x=x2.stride(0), stride_residual=r2.stride(0), stride_y=n_cols, stride_h=h2.stride(0),
        eps=eps, HAS_RESIDUAL=residual is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
    )
    return y, h


def backward_triton(dy: Tensor, dh: Tensor | None, h: Tensor, weight: Tensor, eps: float):
    n_cols = h.shape[-1]
    dx = _triton.new_output(h.shape, h.dtype, h.device)
    h2, dy2 = as_rows(h, n_cols), as_rows(dy, n_cols)
    dh2 = as_rows(dh, n_cols) if dh is not None else dy2
    n_rows = h2.shape[0]
    cfg = _config(BACKWARD_TUNING, h, n_rows, n_cols)
    n_tiles = triton.cdiv(n_rows, cfg["BLOCK_M"])
    n_programs = min(n_tiles, _triton.program_budget(h.device))
    rows_per_program = triton.cdiv(n_tiles, n_programs) * cfg["BLOCK_M"]
    n_programs = triton.cdiv(n_rows, rows_per_program)
    dweight_partial = _triton.new_output((n_programs, n_cols), torch.float32, h.device)
    _triton.launch(
        _rms_norm_bwd_kernel, (n_programs,), h.device,
        num_warps=cfg["num_warps"],
        dy_ptr=dy2, dh_ptr=dh2, h_ptr=h2, weight_ptr=weight.contiguous(), dx_ptr=dx.view(-1, n_cols),
        dweight_partial_ptr=dweight_partial,
        n_rows=n_rows, n_cols=n_cols, rows_per_program=rows_per_program,
        stride_dy=dy2.stride(0), stride_dh=dh2.stride(0), stride_h=h2.stride(0), stride_dx=n_cols,
        eps=eps, HAS_DH=dh is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
    )
    return dx, dweight_partial.sum(0).to(weight.dtype)


def _extension_weight(x: Tensor, weight: Tensor) -> Tensor:
    """The weight as the C++/CUDA kernels take it: contiguous, in x's dtype or fp32. A weight of another dtype is
    cast to promote(x, weight), which is exact and is what the product y = normed * weight promotes it to anyway."""
    return weight.to(torch.promote_types(x.dtype, weight.dtype)).contiguous()


def _forward_extension(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float):
    """The extension's kernel (C++ on CPU tensors, CUDA on CUDA tensors) over the (rows, N) view. The kernel takes
    x and residual in one dtype: of different dtypes, both are cast (exactly) to h's, where the sum is formed."""
    if x.numel() == 0:  # no (rows, N) view of an empty x to hand over; nothing to compute
        y = x.new_empty(x.shape, dtype=torch.promote_types(_h_dtype(x, residual), weight.dtype))
        return y, x.new_empty(x.shape, dtype=_h_dtype(x, residual)) if residual is not None else None
    n_cols = x.shape[-1]
    if residual is not None and residual.dtype != x.dtype:
        x, residual = x.to(_h_dtype(x, residual)), residual.to(_h_dtype(x, residual))
    rows = as_rows(residual, n_cols) if residual is not None else None
    y, h = _native.ops().rms_norm(as_rows(x, n_cols), rows, _extension_weight(x, weight), eps)
    return y.view(x.shape), h.view(x.shape) if residual is not None else None


def _backward_native(dy: Tensor, dh: Tensor | None, h: Tensor, weight: Tensor, eps: float):
    n_cols = h.shape[-1]
    dx, dweight = _native.ops().rms_norm_backward(
        as_rows(dy, n_cols), as_rows(dh, n_cols) if dh is not None else None, as_rows(h, n_cols),
        _extension_weight(h, weight), eps)
    return dx.view(h.shape), dweight.to(weight.dtype)


def _forward_reference(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float):
    if residual is None:
        return reference.rms_norm(x, weight, eps), None
    return reference.rms_norm(x, weight, eps, residual=residual)


def _backward_reference(dy: Tensor, dh: Tensor | None, h: Tensor, weight: Tensor, eps: float):
    return reference.rms_norm_backward(dy, h, weight, eps, dh)


def _forward(backend: str):
    return pick(backend, triton=forward_triton, extension=_forward_extension, reference=_forward_reference)


# --------------------------------------------------------------------------- torch ops
@torch.library.custom_op("llama_kernels::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float, backend: str) -> Tensor:
    return _forward(backend)(x, None, weight, eps)[0]


@torch.library.custom_op("llama_kernels::rms_norm_residual", mutates_args=())
def _rms_norm_residual_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    return _forward(backend)(x, residual, weight, eps)


@torch.library.custom_op("llama_kernels::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: Tensor, dh: Tensor | None, h: Tensor, weight: Tensor, eps: float, backend: str
) -> tuple[Tensor, Tensor]:
    if h.numel() == 0:  # no (rows, N) view of an empty h for any backend; nothing to compute
        return torch.empty_like(h), torch.zeros_like(weight)
    dy = dy.contiguous()  # autograd may hand over stride-0 expanded gradients
    dh = dh.contiguous() if dh is not None else None
    # The CUDA extension has forward kernels only: Triton's backward serves it.
    backward = pick(backend, triton=backward_triton, native=_backward_native, cuda=backward_triton,
                    reference=_backward_reference)
    return backward(dy, dh, h, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps, backend):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@_rms_norm_residual_op.register_fake
def _(x, residual, weight, eps, backend):
    h_dtype = _h_dtype(x, residual)
    return x.new_empty(x.shape, dtype=torch.promote_types(h_dtype, weight.dtype)), x.new_empty(x.shape, dtype=h_dtype)


@_rms_norm_backward_op.register_fake
def _(dy, dh, h, weight, eps, backend):
    return torch.empty_like(h), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    ctx.has_residual = len(inputs) == 5
    if ctx.has_residual:  # rms_norm_residual(x, residual, weight, eps, backend): the output h is normalized
        x, residual, weight, ctx.eps, ctx.backend = inputs
        ctx.input_dtypes = (x.dtype, residual.dtype)
        ctx.save_for_backward(output[1], weight)
    else:  # rms_norm(x, weight, eps, backend)
        x, weight, ctx.eps, ctx.backend = inputs
        ctx.save_for_backward(x, weight)


def _backward(ctx, dy, dh=None):
    h, weight = ctx.saved_tensors
    dx, dweight = torch.ops.llama_kernels.rms_norm_backward(dy, dh, h, weight, ctx.eps, ctx.backend)
    if ctx.has_residual:  # h = x + residual: both get h's gradient, each in its own dtype
        x_dtype, residual_dtype = ctx.input_dtypes
        return dx.to(x_dtype), dx.to(residual_dtype), dweight, None, None
    return dx, dweight, None, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)
_rms_norm_residual_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function
def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5, residual: Tensor | None = None, *, backend: str | None = None):
    """RMSNorm over the last dimension, as Meta's Llama computes it.

    x: (..., hidden) fp16, bf16 or fp32; any leading dims, rows may be strided.
    weight: (hidden,), in its own dtype; y has dtype promote(x.dtype, weight.dtype)
        (bf16 x with bf16 weight gives bf16, as in Meta's and HF's modules).
    residual: if given (x's shape; fp16, bf16 or fp32, x's dtype or another), one kernel forms
        h = x + residual in fp32, stores it in promote(x.dtype, residual.dtype) and normalizes it:
        returns ``(y, h)``, h being the new residual stream; y has dtype promote(h.dtype, weight.dtype).
    Autocast: no autocast rule; every input keeps its dtype and the results promote as above,
        as HF's unpatched modules do under autocast (a bf16 linear output x added to an fp32
        residual stream gives an fp32 h and y).
    backend: None picks Triton for CUDA tensors and the C++ kernels for CPU tensors (the
        reference without the extension); "triton", "native", "cuda" or "reference" force one.
    Differentiable in x, residual and weight.
    """
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=1)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dimension (..., hidden), got shape {tuple(x.shape)}")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight: expected shape ({x.shape[-1]},) to match x's hidden size, got {tuple(weight.shape)}")
    if residual is not None:
        check_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual: expected x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    check_same_device(x=x, weight=weight, residual=residual)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    backend = resolve_backend(x, backend, "rms_norm")
    if residual is None:
        return torch.ops.llama_kernels.rms_norm(x, weight, float(eps), backend)
    y, h = torch.ops.llama_kernels.rms_norm_residual(x, residual, weight, float(eps), backend)
    return y, h
