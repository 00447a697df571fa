"""What several ops share, imported by these names: kernel pieces and argument checks.

- Triton: the operand cast of ``tl.dot`` under the interpreter (``mma``) and the dot-precision
  rule (``dot_precision``); the attention block loop (``attend_blocks``: the online softmax over
  key/value blocks, the flash attention forward's and decoding's) with its loads, and its
  epilogue (``finish_softmax``: o and the lse).
- Python: the checks of q/k/v, head counts, head_dim and inv_freq, the softmax scale, and the
  (rows, N) view of a tensor whose rows a kernel walks with one stride.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._checks import check_same_device, check_same_dtype, check_tensor

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
LOG2E = tl.constexpr(1.4426950408889634)
HEAD_DIMS = (64, 128)  # what the attention kernels are built for


# --------------------------------------------------------------------------- Triton pieces
def dot_precision(dtype: torch.dtype) -> str:
    """The DOT_PRECISION constexpr: fp32 inputs are multiplied exactly, not in tf32 (fp32 is asked for precision)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def mma(x):
    """An operand of tl.dot: the interpreter holds bf16 as raw bits, so it multiplies in fp32."""
    if INTERPRET:
        x = x.to(tl.float32)
    return x


@triton.jit
def tile_ptrs(base_ptr, batch, start, head, rows, stride_b, stride_s, stride_h, HEAD_DIM: tl.constexpr):
    """Pointers to rows `rows` (relative to the sequence start) of one head: [len(rows), HEAD_DIM]."""
    # 64-bit: (start + row) * stride passes 2^31 at 100k tokens with a few batches.
    base = base_ptr + batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h
    return base + (start + rows).to(tl.int64)[:, None] * stride_s + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def load_tile(base_ptr, batch, start, head, rows, length, stride_b, stride_s, stride_h, HEAD_DIM: tl.constexpr):
    """Rows `rows` of one head as a tl.dot operand; rows at or past `length` read as zeros."""
    ptrs = tile_ptrs(base_ptr, batch, start, head, rows, stride_b, stride_s, stride_h, HEAD_DIM)
    return mma(tl.load(ptrs, mask=(rows < length)[:, None], other=0.0))


@triton.jit
def load_block(src, batch, start, head, first_row, length, stride_b, stride_s, stride_h,
               HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, TMA: tl.constexpr,
               block_table=None, PAGE_SIZE: tl.constexpr = 0):
    """Rows first_row .. first_row + BLOCK of one head (of q, k, v or do) as a tl.dot operand: through a
    (B, S, H, D) tensor descriptor when TMA (dense layouts: rows past the sequence are outside it and read as
    zeros), else through pointers. PAGE_SIZE > 0: src is a pool of pages (stride_b the page stride) and row p
    is row p % PAGE_SIZE of page block_table[p // PAGE_SIZE] (block_table: the sequence's row of the table;
    first_row is a multiple of BLOCK, so a block within one page needs one entry)."""
    if TMA:
        tile = mma(src.load([batch, first_row, head, 0]).reshape(BLOCK, HEAD_DIM))
    elif PAGE_SIZE > 0:
        rows = first_row + tl.arange(0, BLOCK)
        if PAGE_SIZE >= BLOCK:
            page = tl.load(block_table + first_row // PAGE_SIZE)
            tile = load_tile(src, page, -(first_row // PAGE_SIZE * PAGE_SIZE), head, rows, length, stride_b,
                             stride_s, stride_h, HEAD_DIM)
        else:  # a page per row, never an entry past the sequence's pages
            in_sequence = rows < length
            pages = tl.load(block_table + rows // PAGE_SIZE, mask=in_sequence, other=0).to(tl.int64)
            ptrs = (src + pages[:, None] * stride_b + head.to(tl.int64) * stride_h
                    + (rows % PAGE_SIZE).to(tl.int64)[:, None] * stride_s + tl.arange(0, HEAD_DIM)[None, :])
            tile = mma(tl.load(ptrs, mask=in_sequence[:, None], other=0.0))
    else:
        tile = load_tile(src, batch, start, head, first_row + tl.arange(0, BLOCK), length, stride_b, stride_s,
                         stride_h, HEAD_DIM)
    return tile


@triton.jit
def attend_blocks(
    acc, l_i, m_i, q, k_src, v_src, batch, k_start, kv_head, len_k, rows, first, last, diag, qk_scale,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TMA: tl.constexpr = False, block_table=None, PAGE_SIZE: tl.constexpr = 0,
):
    """Online softmax over key blocks [first, last): unmasked blocks need no per-element test.
    k_src and v_src are pointers, or tensor descriptors when TMA, or pools of pages when PAGE_SIZE > 0
    (see load_block)."""
    for n in range(first, last, BLOCK_N):
        cols = n + tl.arange(0, BLOCK_N)
        k = load_block(k_src, batch, k_start, kv_head, n, len_k, stride_kb, stride_ks, stride_kh, HEAD_DIM,
                       BLOCK_N, TMA, block_table, PAGE_SIZE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2 units
        if MASKED:
            visible = (cols < len_k)[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + diag)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no NaN
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = load_block(v_src, batch, k_start, kv_head, n, len_k, stride_vb, stride_vs, stride_vh, HEAD_DIM,
                       BLOCK_N, TMA, block_table, PAGE_SIZE)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def finish_softmax(acc, l_i, m_i):
    """(o, lse) of an online softmax: lse in natural log; a row that saw no key gets zeros and an lse of -inf."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) / LOG2E)
    return o, lse


# --------------------------------------------------------------------------- checks
def check_head_dim(name: str, head_dim: int) -> None:
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"{name}: expected head_dim 64 or 128, got {head_dim}")


def check_kv_heads(name: str, n_kv_heads: int, n_q_heads: int) -> None:
    """GQA: the key/value head count divides the query head count."""
    if n_kv_heads == 0 or n_q_heads % n_kv_heads:
        raise ValueError(f"{name}: expected a head count that divides q's {n_q_heads} heads, got {n_kv_heads}")


def check_last_dim_contiguous(**tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name}: expected the last dimension contiguous (stride 1), got stride {t.stride(-1)}")


def check_qkv(q, k, v, ndim: int) -> None:
    """q, k, v of an attention: (B, S, H, D) when ndim is 4, packed (total, H, D) when 3."""
    names = "(B, S, H, D)" if ndim == 4 else "(total, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=ndim)
    check_last_dim_contiguous(q=q, k=k, v=v)
    check_same_dtype(q=q, k=k, v=v)
    check_same_device(q=q, k=k, v=v)
    if v.shape != k.shape:
        raise ValueError(f"v: expected k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if ndim == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"k: expected batch size {q.shape[0]} as q's, got {k.shape[0]} (layout {names})")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k: expected head_dim {q.shape[-1]} as q's, got {k.shape[-1]}")
    check_head_dim("q", q.shape[-1])
    check_kv_heads("k", k.shape[-2], q.shape[-2])


def check_inv_freq(inv_freq, head_dim: int, like: Tensor) -> None:
    """inv_freq (D/2,) in fp32 or fp64, on the device of ``like`` (q)."""
    check_tensor("inv_freq", inv_freq, dtypes=(torch.float32, torch.float64), ndim=1)
    if inv_freq.shape[0] != head_dim // 2:
        raise ValueError(f"inv_freq: expected shape (D/2,) = ({head_dim // 2},), got {tuple(inv_freq.shape)}")
    check_same_device(q=like, inv_freq=inv_freq)


def resolve_softmax_scale(value, head_dim: int) -> float:
    """The softmax scale asked for, checked; 1 / sqrt(head_dim) for None."""
    if value is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"softmax_scale: expected a positive float or None, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- layouts
def as_rows(t: Tensor, n_cols: int) -> Tensor:
    """(..., N) as a (rows, N) view with a row stride, copying only when no such view exists."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, n_cols)
    except RuntimeError:
        return t.reshape(-1, n_cols)
