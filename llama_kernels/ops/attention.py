"""Flash attention (forward and backward, GQA, packed sequences): Triton kernels, launchers, torch ops.

Exact softmax attention in O(N) memory (FlashAttention-2's schedule):
- forward: a program owns BLOCK_M queries of one (batch, query head) and streams
  the key/value blocks through an online softmax in the exp2 domain (the softmax
  scale folded into one multiply); blocks every query sees entirely run without
  a mask, the blocks on the causal diagonal apart with one. It writes O and the
  log-sum-exp (natural log, fp32), all the backward needs besides q, k, v.
- backward: dk and dv by a program per (key block, key/value head) that loops over
  every query head of its GQA group, so the group's reduction happens in
  registers: no atomics, no expanded k/v, and the result is deterministic by
  construction; dq by a program per query block. P is recomputed from the lse.
  That is seven block products where five suffice: with ``deterministic=False``
  a config may ask for ATOMIC_DQ, the dk/dv pass then adding each key block's
  share of dq into an fp32 buffer by atomic adds (FlashAttention-2's schedule;
  the order of the adds, so the last bits of dq, vary between runs). Off unless
  the GPU check measured it faster (ops/tuned_configs.json).
Causal masking is bottom-right aligned (query i sees keys j <= i + Sk - Sq, as in
flash-attn >= 2.1); a query that sees no key gets zeros and an lse of -inf.

Dense (B, S, H, D) and packed (total, H, D) inputs share the kernels: a packed
tensor is a batch of one with no batch stride, and each program finds its
sequence's start and length in cu_seqlens.

On sm_90 a config may ask for TMA: the blocks a kernel's loop streams (k and v
in the forward and for dq, q and do for dk/dv) copied by Hopper's tensor memory
accelerator through (B, S, H, D) tensor descriptors of a dense layout, which
frees the registers that address them (forward 128x128 tiles: 240 -> 209). Off
unless the GPU check measured it faster (ops/tuned_configs.json).
(Triton 3.6's warp specialization of the key loop is no option on sm_90: with 4
warps its pass fails on this kernel, with 8 it leaves the loop as it is.)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import _native, reference
from .._checks import check_same_device, check_tensor, dtype_name, values_readable
from . import _triton
from ._backend import pick, resolve_backend
from ._shared import (LOG2E, attend_blocks, check_qkv, dot_precision, finish_softmax, load_block, load_tile,
                      resolve_softmax_scale, tile_ptrs)


# --------------------------------------------------------------------------- programs and sequences
@triton.jit
def _sequence(cu_seqlens_ptr, batch, seqlen, VARLEN: tl.constexpr):
    """(start, length) of this batch entry's sequence: from cu_seqlens when packed, else (0, seqlen)."""
    if VARLEN:
        start = tl.load(cu_seqlens_ptr + batch)
        length = tl.load(cu_seqlens_ptr + batch + 1) - start
    else:
        start = 0
        length = seqlen
    return start, length


@triton.jit
def _query_block(tile, cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqlen_q, seqlen_k, n_q_heads, group,
                 VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, HEAVIEST_FIRST: tl.constexpr):
    """What the tile (a block of queries) works on: its (batch, head, key/value head), both sequences' (start,
    length), and the block's first query."""
    block, batch, head = _program(tile, seqlen_q, n_q_heads, BLOCK_M, HEAVIEST_FIRST)
    q_start, len_q = _sequence(cu_seqlens_q_ptr, batch, seqlen_q, VARLEN)
    k_start, len_k = _sequence(cu_seqlens_k_ptr, batch, seqlen_k, VARLEN)
    return batch, head, head // group, q_start, len_q, k_start, len_k, block * BLOCK_M


@triton.jit
def _program(tile, seqlen, n_heads, BLOCK: tl.constexpr, HEAVIEST_FIRST: tl.constexpr):
    """(block, batch, head) of a tile of a flat grid, blocks of one (batch, head) consecutive (they share its k and
    v in L2); one axis, because the second stops at 65,535 (batch x heads can pass it). HEAVIEST_FIRST (causal
    query blocks, whose work grows with their index) takes a head's blocks last to first, so that the grid's last
    wave holds short programs."""
    n_blocks = tl.cdiv(seqlen, BLOCK)
    batch_head = tile // n_blocks
    block = tile % n_blocks
    if HEAVIEST_FIRST:
        block = n_blocks - 1 - block
    return block, batch_head // n_heads, batch_head % n_heads


# --------------------------------------------------------------------------- forward
@triton.jit
def _fwd_kernel(
    q_ptr, k_src, v_src, o_ptr, lse_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    seqlen_q, seqlen_k, n_q_heads, group, qk_scale, n_tiles,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
    stride_lse_b, stride_lse_h,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr, HEAVIEST_FIRST: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """A query block per program, or with PERSISTENT a grid of about one program per SM, each taking the tiles
    pid, pid + grid, ... of n_tiles in turn."""
    if PERSISTENT:
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            _fwd_tile(
                tile, q_ptr, k_src, v_src, o_ptr, lse_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
                seqlen_q, seqlen_k, n_q_heads, group, qk_scale,
                stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                stride_ob, stride_os, stride_oh, stride_lse_b, stride_lse_h,
                CAUSAL, VARLEN, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, TMA, HEAVIEST_FIRST)
    else:
        _fwd_tile(
            tl.program_id(0), q_ptr, k_src, v_src, o_ptr, lse_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
            seqlen_q, seqlen_k, n_q_heads, group, qk_scale,
            stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            stride_ob, stride_os, stride_oh, stride_lse_b, stride_lse_h,
            CAUSAL, VARLEN, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, TMA, HEAVIEST_FIRST)


@triton.jit
def _fwd_tile(
    tile, q_ptr, k_src, v_src, o_ptr, lse_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    seqlen_q, seqlen_k, n_q_heads, group, qk_scale,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_lse_b, stride_lse_h,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr, HEAVIEST_FIRST: tl.constexpr,
):
    batch, head, kv_head, q_start, len_q, k_start, len_k, m0 = _query_block(
        tile, cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqlen_q, seqlen_k, n_q_heads, group, VARLEN, BLOCK_M,
        HEAVIEST_FIRST)
    if m0 < len_q:  # packed: this sequence may be shorter than the grid's longest
        rows = m0 + tl.arange(0, BLOCK_M)
        q_mask = (rows < len_q)[:, None]
        q = load_tile(q_ptr, batch, q_start, head, rows, len_q, stride_qb, stride_qs, stride_qh, HEAD_DIM)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        diag = len_k - len_q  # bottom-right: query i sees keys j <= i + diag
        full_blocks_end = len_k // BLOCK_N * BLOCK_N
        last = len_k
        if CAUSAL:
            # Keys the block's first query sees are seen by all of its queries.
            full_blocks_end = tl.minimum(full_blocks_end, tl.maximum(m0 + diag + 1, 0) // BLOCK_N * BLOCK_N)
            last = tl.minimum(len_k, m0 + BLOCK_M + diag)
        acc, l_i, m_i = attend_blocks(
            acc, l_i, m_i, q, k_src, v_src, batch, k_start, kv_head, len_k, rows, 0, full_blocks_end, diag,
            qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            False, CAUSAL, HEAD_DIM, BLOCK_N, DOT_PRECISION, TMA)
        acc, l_i, m_i = attend_blocks(
            acc, l_i, m_i, q, k_src, v_src, batch, k_start, kv_head, len_k, rows, full_blocks_end, last, diag,
            qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            True, CAUSAL, HEAD_DIM, BLOCK_N, DOT_PRECISION, TMA)

        o, lse = finish_softmax(acc, l_i, m_i)
        tl.store(tile_ptrs(o_ptr, batch, q_start, head, rows, stride_ob, stride_os, stride_oh, HEAD_DIM),
                 o.to(o_ptr.dtype.element_ty), mask=q_mask)
        lse_ptrs = lse_ptr + batch.to(tl.int64) * stride_lse_b + head.to(tl.int64) * stride_lse_h + q_start + rows
        tl.store(lse_ptrs, lse, mask=rows < len_q)


# --------------------------------------------------------------------------- backward
@triton.jit
def _bwd_probabilities(q, k, lse, rows, cols, len_q, len_k, diag, qk_scale,
                       CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """P recomputed from the forward's lse, zero where masked: [BLOCK_M, BLOCK_N]."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    visible = (rows < len_q)[:, None] & (cols < len_k)[None, :]
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + diag)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # rows that saw nothing: all masked below
    # Masked before the exp2, so that no masked score can overflow on its way to zero.
    return tl.math.exp2(tl.where(visible, s - lse[:, None] * LOG2E, float("-inf")))


@triton.jit
def _bwd_delta_kernel(
    o_ptr, do_ptr, dlse_ptr, delta_ptr, n_rows, n_heads,
    stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh, stride_lse_b, stride_lse_h,
    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse for BLOCK_ROWS rows of one (batch, head), in fp32; delta and dlse are
    contiguous in the lse layout."""
    n_blocks = tl.cdiv(n_rows, BLOCK_ROWS)
    row_block, batch_head = tl.program_id(0) % n_blocks, tl.program_id(0) // n_blocks
    batch, head = batch_head // n_heads, batch_head % n_heads
    rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    mask = rows < n_rows
    dims = tl.arange(0, HEAD_DIM)[None, :]
    o = tl.load(o_ptr + batch.to(tl.int64) * stride_ob + rows.to(tl.int64)[:, None] * stride_os
                + head.to(tl.int64) * stride_oh + dims, mask=mask[:, None], other=0.0)
    do = tl.load(do_ptr + batch.to(tl.int64) * stride_dob + rows.to(tl.int64)[:, None] * stride_dos
                 + head.to(tl.int64) * stride_doh + dims, mask=mask[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    lse_offsets = batch.to(tl.int64) * stride_lse_b + head.to(tl.int64) * stride_lse_h + rows
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + lse_offsets, mask=mask, other=0.0)
    tl.store(delta_ptr + lse_offsets, delta, mask=mask)


@triton.jit
def _bwd_dkdv_kernel(
    q_src, k_ptr, v_ptr, do_src, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_acc_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    seqlen_q, seqlen_k, n_kv_heads, group, softmax_scale, qk_scale, n_tiles,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, stride_dq_accb, stride_dq_accs,
    stride_dq_acch, stride_lse_b, stride_lse_h,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, SPLIT_DIAGONAL: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """A key block per program, or with PERSISTENT a grid of about one program per SM, each taking the tiles pid,
    pid + grid, ... of n_tiles in turn (causal: a key block's work shrinks with its index, so either grid runs
    the heaviest first)."""
    if PERSISTENT:
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            _bwd_dkdv_tile(
                tile, q_src, k_ptr, v_ptr, do_src, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_acc_ptr, cu_seqlens_q_ptr,
                cu_seqlens_k_ptr, seqlen_q, seqlen_k, n_kv_heads, group, softmax_scale, qk_scale,
                stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh,
                stride_dvb, stride_dvs, stride_dvh, stride_dq_accb, stride_dq_accs, stride_dq_acch,
                stride_lse_b, stride_lse_h,
                CAUSAL, VARLEN, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, TMA, ATOMIC_DQ, SPLIT_DIAGONAL)
    else:
        _bwd_dkdv_tile(
            tl.program_id(0), q_src, k_ptr, v_ptr, do_src, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_acc_ptr,
            cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqlen_q, seqlen_k, n_kv_heads, group, softmax_scale, qk_scale,
            stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh,
            stride_dvb, stride_dvs, stride_dvh, stride_dq_accb, stride_dq_accs, stride_dq_acch,
            stride_lse_b, stride_lse_h,
            CAUSAL, VARLEN, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, TMA, ATOMIC_DQ, SPLIT_DIAGONAL)


@triton.jit
def _bwd_dkdv_tile(
    tile, q_src, k_ptr, v_ptr, do_src, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_acc_ptr, cu_seqlens_q_ptr,
    cu_seqlens_k_ptr, seqlen_q, seqlen_k, n_kv_heads, group, softmax_scale, qk_scale,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, stride_dq_accb, stride_dq_accs,
    stride_dq_acch, stride_lse_b, stride_lse_h,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, SPLIT_DIAGONAL: tl.constexpr,
):
    """dk, dv of a key block; q_src and do_src are pointers, or tensor descriptors when TMA. With ATOMIC_DQ, also
    this key block's share of dq, added into the fp32 dq_acc (zeroed by the caller)."""
    block, batch, kv_head = _program(tile, seqlen_k, n_kv_heads, BLOCK_N, False)
    q_start, len_q = _sequence(cu_seqlens_q_ptr, batch, seqlen_q, VARLEN)
    k_start, len_k = _sequence(cu_seqlens_k_ptr, batch, seqlen_k, VARLEN)
    n0 = block * BLOCK_N
    if n0 < len_k:  # packed: this sequence may be shorter than the grid's longest
        cols = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (cols < len_k)[:, None]
        k = load_tile(k_ptr, batch, k_start, kv_head, cols, len_k, stride_kb, stride_ks, stride_kh, HEAD_DIM)
        v = load_tile(v_ptr, batch, k_start, kv_head, cols, len_k, stride_vb, stride_vs, stride_vh, HEAD_DIM)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        diag = len_k - len_q
        first = 0
        if CAUSAL:  # queries before n0 - diag see none of these keys
            first = tl.maximum(n0 - diag, 0) // BLOCK_M * BLOCK_M

        # SPLIT_DIAGONAL: the query blocks from `unmasked` on see every key of the block, and skip the causal mask
        unmasked = first
        if CAUSAL and SPLIT_DIAGONAL:
            unmasked = tl.maximum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M, first)
        for member in range(0, group):  # the GQA group's query heads, reduced here
            head = kv_head * group + member
            lse_row = lse_ptr + batch.to(tl.int64) * stride_lse_b + head.to(tl.int64) * stride_lse_h + q_start
            delta_row = delta_ptr + batch.to(tl.int64) * stride_lse_b + head.to(tl.int64) * stride_lse_h + q_start
            if CAUSAL and SPLIT_DIAGONAL:
                dk, dv = _dkdv_blocks(
                    dk, dv, k, v, q_src, do_src, lse_row, delta_row, dq_acc_ptr, batch, q_start, head, cols, first,
                    unmasked, len_q, len_k, diag, qk_scale, softmax_scale, stride_qb, stride_qs, stride_qh,
                    stride_dob, stride_dos, stride_doh, stride_dq_accb, stride_dq_accs, stride_dq_acch,
                    True, HEAD_DIM, BLOCK_M, DOT_PRECISION, TMA, ATOMIC_DQ)
            dk, dv = _dkdv_blocks(
                dk, dv, k, v, q_src, do_src, lse_row, delta_row, dq_acc_ptr, batch, q_start, head, cols, unmasked,
                len_q, len_q, len_k, diag, qk_scale, softmax_scale, stride_qb, stride_qs, stride_qh,
                stride_dob, stride_dos, stride_doh, stride_dq_accb, stride_dq_accs, stride_dq_acch,
                CAUSAL and not SPLIT_DIAGONAL, HEAD_DIM, BLOCK_M, DOT_PRECISION, TMA, ATOMIC_DQ)

        dk *= softmax_scale
        tl.store(tile_ptrs(dk_ptr, batch, k_start, kv_head, cols, stride_dkb, stride_dks, stride_dkh, HEAD_DIM),
                 dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(tile_ptrs(dv_ptr, batch, k_start, kv_head, cols, stride_dvb, stride_dvs, stride_dvh, HEAD_DIM),
                 dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v, q_src, do_src, lse_row, delta_row, dq_acc_ptr, batch, q_start, head, cols, m_first, m_end,
    len_q, len_k, diag, qk_scale, softmax_scale, stride_qb, stride_qs, stride_qh, stride_dob, stride_dos, stride_doh,
    stride_dq_accb, stride_dq_accs, stride_dq_acch,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    """dk, dv (and with ATOMIC_DQ dq's shares) of a key block over one query head's blocks m_first .. m_end; CAUSAL
    masks them (the sequences' ends are masked either way)."""
    for m in range(m_first, m_end, BLOCK_M):
        rows = m + tl.arange(0, BLOCK_M)
        q = load_block(q_src, batch, q_start, head, m, len_q, stride_qb, stride_qs, stride_qh, HEAD_DIM, BLOCK_M, TMA)
        do = load_block(do_src, batch, q_start, head, m, len_q, stride_dob, stride_dos, stride_doh, HEAD_DIM, BLOCK_M,
                        TMA)
        lse = tl.load(lse_row + rows, mask=rows < len_q, other=0.0)
        delta = tl.load(delta_row + rows, mask=rows < len_q, other=0.0)
        p = _bwd_probabilities(q, k, lse, rows, cols, len_q, len_k, diag, qk_scale, CAUSAL, DOT_PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION) * softmax_scale
            tl.atomic_add(tile_ptrs(dq_acc_ptr, batch, q_start, head, rows, stride_dq_accb, stride_dq_accs,
                                    stride_dq_acch, HEAD_DIM), dq, mask=(rows < len_q)[:, None])
    return dk, dv


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_src, v_src, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    seqlen_q, seqlen_k, n_q_heads, group, softmax_scale, qk_scale,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lse_b, stride_lse_h,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
    HEAVIEST_FIRST: tl.constexpr,
):
    """dq of a query block; k_src and v_src are pointers, or tensor descriptors when TMA."""
    batch, head, kv_head, q_start, len_q, k_start, len_k, m0 = _query_block(
        tl.program_id(0), cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqlen_q, seqlen_k, n_q_heads, group, VARLEN, BLOCK_M,
        HEAVIEST_FIRST)
    if m0 >= len_q:  # packed: this sequence is shorter than the grid's longest
        return
    rows = m0 + tl.arange(0, BLOCK_M)
    q_mask = (rows < len_q)[:, None]
    q = load_tile(q_ptr, batch, q_start, head, rows, len_q, stride_qb, stride_qs, stride_qh, HEAD_DIM)
    do = load_tile(do_ptr, batch, q_start, head, rows, len_q, stride_dob, stride_dos, stride_doh, HEAD_DIM)
    row_offset = batch.to(tl.int64) * stride_lse_b + head.to(tl.int64) * stride_lse_h + q_start + rows
    lse = tl.load(lse_ptr + row_offset, mask=rows < len_q, other=0.0)
    delta = tl.load(delta_ptr + row_offset, mask=rows < len_q, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    diag = len_k - len_q
    last = len_k
    if CAUSAL:
        last = tl.minimum(len_k, m0 + BLOCK_M + diag)
    for n in range(0, last, BLOCK_N):
        cols = n + tl.arange(0, BLOCK_N)
        k = load_block(k_src, batch, k_start, kv_head, n, len_k, stride_kb, stride_ks, stride_kh, HEAD_DIM,
                        BLOCK_N, TMA)
        v = load_block(v_src, batch, k_start, kv_head, n, len_k, stride_vb, stride_vs, stride_vh, HEAD_DIM,
                        BLOCK_N, TMA)
        p = _bwd_probabilities(q, k, lse, rows, cols, len_q, len_k, diag, qk_scale, CAUSAL, DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    dq *= softmax_scale
    tl.store(tile_ptrs(dq_ptr, batch, q_start, head, rows, stride_dqb, stride_dqs, stride_dqh, HEAD_DIM),
             dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------- configs and launchers
# Defaults that compile without spills (python -m llama_kernels.aot), by (kernel, target, head_dim),
# None matching any; the GPU check's sweep replaces them with measured winners (tuned_configs.json).
_DEFAULT_CONFIGS = {
    ("attention_fwd", "sm90", None): {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    ("attention_fwd", None, None): {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
    # dk and dv accumulate in registers: pipelining more than one stage spills them
    ("attention_bwd_dkdv", "sm80", 64): {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1},
    ("attention_bwd_dkdv", None, None): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 1},
    ("attention_bwd_dq", None, None): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
}


def _candidates(default: dict, target: str, fields: dict, forward: bool, variants: tuple[dict, ...]) -> list[dict]:
    """Tiles around the default: the forward's (M 64/128 x N 32/64/128), the backward's (M 32/64 x N 32/64/128).
    On sm_90 the kernels' TMA forms come right after the default: never measured yet, they are what a sweep cut
    short by the budget should not miss (on sm_80 descriptors only add registers: no candidates there). The
    kernel's variants come on the first TMA tile on sm_90 (descriptors free the registers they take: dk/dv's split
    diagonal spills in pointer form there), on the default elsewhere: HEAVIEST_FIRST (causal query blocks last to
    first), PERSISTENT (about a program per SM), SPLIT_DIAGONAL (dk/dv's causal mask only on the query blocks it
    cuts); a non-causal launch ignores the causal ones."""
    found = [default]
    if target != "sm90":
        found += [{**default, **variant} for variant in variants]
    if target == "sm90":
        # (BLOCK_M, BLOCK_N, warps, stages) that compile clean in their TMA form (python -m llama_kernels.aot)
        tma_tiles = (((128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 3)) if forward
                     else ((default["BLOCK_M"], default["BLOCK_N"], default["num_warps"], default["num_stages"]),
                           (64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2)))
        tma_configs = [{"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": num_stages,
                        "TMA": True} for block_m, block_n, warps, num_stages in tma_tiles]
        found += [config for config in tma_configs if config not in found]
        found += [{**tma_configs[0], **variant} for variant in variants]
    for block_m in (64, 128) if forward else (32, 64):
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for num_stages in (2, 3, 4) if forward else (1, 2):
                    config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": num_stages}
                    # 128-row tiles need 8 warps (4 spill); 4 stages of 128-column tiles overflow shared memory
                    if (block_m == 128 and warps == 4) or (num_stages == 4 and block_n == 128) or config in found:
                        continue
                    found.append(config)
    return found


HEAVIEST_FIRST, PERSISTENT, SPLIT_DIAGONAL = {"HEAVIEST_FIRST": True}, {"PERSISTENT": True}, {"SPLIT_DIAGONAL": True}
FORWARD_TUNING = _triton.Tuning("attention_fwd", "{head_dim}:{dtype}", functools.partial(
    _candidates, forward=True, variants=(HEAVIEST_FIRST, PERSISTENT, {**HEAVIEST_FIRST, **PERSISTENT})))
DKDV_TUNING = _triton.Tuning("attention_bwd_dkdv", "{head_dim}:{dtype}", functools.partial(
    _candidates, forward=False, variants=(SPLIT_DIAGONAL, PERSISTENT)))
DQ_TUNING = _triton.Tuning("attention_bwd_dq", "{head_dim}:{dtype}",
                           functools.partial(_candidates, forward=False, variants=(HEAVIEST_FIRST,)))


def atomic_dq_config(target: str, head_dim: int) -> dict:
    """The atomic-dq pass's first candidate: the dk/dv pass's default tile, which compiles without spills with
    the extra fp32 dq tile in registers on sm_80 and sm_90 at D 64 and 128 (the measured sm_90 tile, 64x64 with 4
    warps and 2 stages, spills 1 KB with it)."""
    return {**_default_config(DKDV_TUNING.kernel, target, head_dim), "ATOMIC_DQ": True}


def _any_order_candidates(default: dict, target: str, fields: dict) -> list[dict]:
    """The default (DKDV_TUNING's config, ATOMIC_DQ off), the spill-free atomic tile, then the dk/dv pass's tiles
    each without and with ATOMIC_DQ: the atomic schedule early in a sweep cut short by its budget."""
    tiles = _candidates({k: v for k, v in default.items() if k != "ATOMIC_DQ"}, target, fields, forward=False,
                        variants=())
    found = [default, atomic_dq_config(target, fields["head_dim"])]
    for config in ({**tile, "ATOMIC_DQ": atomic} for tile in tiles for atomic in (False, True)):
        if config not in found:
            found.append(config)
    return found


def _delta_candidates(default: dict, target: str, fields: dict) -> list[dict]:
    return [default] + [{"BLOCK_ROWS": rows, "num_warps": warps} for rows in (16, 32, 64, 128) for warps in (2, 4, 8)
                        if {"BLOCK_ROWS": rows, "num_warps": warps} != default]


DELTA_DEFAULT = {"BLOCK_ROWS": 32, "num_warps": 4}  # 32 rows x D 128 in bf16: two 8 KB tiles
DELTA_TUNING = _triton.Tuning("attention_bwd_delta", "{head_dim}", _delta_candidates)


# deterministic=False: the dk/dv pass's config, ATOMIC_DQ included; its default is DKDV_TUNING's with ATOMIC_DQ off.
ANY_ORDER_TUNING = _triton.Tuning("attention_bwd_any_order", "{head_dim}:{dtype}", _any_order_candidates)


def _config(tuning: _triton.Tuning, q: Tensor, head_dim: int, default: dict | None = None) -> dict:
    """The launch config: ``default``, else the table's default for (kernel, target, head_dim); measured winners
    and forced configs (tests, the sweep) replace it. Under the interpreter the default is one small tile."""
    target = _triton.target_of(q.device)
    if default is None:
        default = _default_config(tuning.kernel, target, head_dim)
    return tuning.config(target, default, head_dim=head_dim, dtype=dtype_name(q.dtype))


def _default_config(kernel: str, target: str, head_dim: int) -> dict:
    if target == "interpreter":
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    return next(_DEFAULT_CONFIGS[key] for key in ((kernel, target, head_dim), (kernel, target, None),
                                                  (kernel, None, None)) if key in _DEFAULT_CONFIGS)


class Layout:
    """Dense (B, S, H, D) or packed (total, H, D) tensors, as the kernels see them: (batch, seq, head)."""

    def __init__(self, q: Tensor, k: Tensor, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int):
        self.varlen = cu_seqlens_q is not None
        self.n_q_heads, self.n_kv_heads, self.head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
        if self.varlen:
            self.batch, self.seqlen_q, self.seqlen_k = cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k
            self.cu_q, self.cu_k = cu_seqlens_q, cu_seqlens_k
            self.lse_shape = (self.n_q_heads, q.shape[0])
        else:
            self.batch, self.seqlen_q, self.seqlen_k = q.shape[0], q.shape[1], k.shape[1]
            self.cu_q = self.cu_k = q  # not read: any pointer will do
            self.lse_shape = (self.batch, self.n_q_heads, self.seqlen_q)

    def strides(self, name: str, t: Tensor) -> dict:
        """stride_{name}b, s, h: a packed tensor is one batch entry with no batch stride (head_dim's stride is 1)."""
        if self.varlen:
            return {f"stride_{name}b": 0, **_triton.strides(name, t, "sh")}
        return _triton.strides(name, t, "bsh")

    def lse_strides(self, lse: Tensor) -> dict:
        b, h = (0, lse.stride(0)) if self.varlen else lse.stride()[:2]
        return {"stride_lse_b": b, "stride_lse_h": h}

    def common(self, causal: bool, dtype: torch.dtype, config: dict) -> dict:
        return {
            "cu_seqlens_q_ptr": self.cu_q, "cu_seqlens_k_ptr": self.cu_k,
            "seqlen_q": self.seqlen_q, "seqlen_k": self.seqlen_k, "group": self.n_q_heads // self.n_kv_heads,
            "CAUSAL": causal, "VARLEN": self.varlen, "HEAD_DIM": self.head_dim,
            "BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"],
            "DOT_PRECISION": dot_precision(dtype),
        }


def _tma_ready(layout: Layout, *tensors: Tensor) -> bool:
    """Whether tensor descriptors can address these tensors: a dense layout (a descriptor's rows past a packed
    sequence would be the next sequence's), 16-byte aligned bases and strides, contiguous heads."""
    return not layout.varlen and all(
        t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
        for t in tensors)


def _sources(cfg: dict, layout: Layout, block: int, *tensors: Tensor) -> tuple[bool, list]:
    """(TMA, the kernel's sources): tensor descriptors of blocks of `block` rows when the config asks for TMA and
    the tensors allow it, else the tensors themselves (pointer loads)."""
    tma = cfg.get("TMA", False) and _tma_ready(layout, *tensors)
    return tma, [TensorDescriptor.from_tensor(t, [1, block, 1, layout.head_dim]) if tma else t for t in tensors]


def _tile_grid(n_tiles: int, cfg: dict, device: torch.device) -> tuple[int]:
    """A program per tile, or with PERSISTENT about one per SM, each looping over its share of the tiles."""
    return (min(n_tiles, _triton.program_budget(device, 1)) if cfg.get("PERSISTENT", False) else n_tiles,)


def forward_triton(q, k, v, layout: Layout, causal: bool, softmax_scale: float):
    o = _triton.new_output(q.shape, q.dtype, q.device)
    lse = _triton.new_output(layout.lse_shape, torch.float32, q.device)
    cfg = _config(FORWARD_TUNING, q, layout.head_dim)
    tma, (k_src, v_src) = _sources(cfg, layout, cfg["BLOCK_N"], k, v)
    n_tiles = triton.cdiv(layout.seqlen_q, cfg["BLOCK_M"]) * layout.batch * layout.n_q_heads
    _triton.launch(
        _fwd_kernel, _tile_grid(n_tiles, cfg, q.device), q.device,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        q_ptr=q, k_src=k_src, v_src=v_src, o_ptr=o, lse_ptr=lse, n_q_heads=layout.n_q_heads, n_tiles=n_tiles,
        TMA=tma, HEAVIEST_FIRST=causal and cfg.get("HEAVIEST_FIRST", False), PERSISTENT=cfg.get("PERSISTENT", False),
        qk_scale=softmax_scale * LOG2E.value,
        **layout.strides("q", q), **layout.strides("k", k), **layout.strides("v", v), **layout.strides("o", o),
        **layout.lse_strides(lse), **layout.common(causal, q.dtype, cfg),
    )
    return o, lse


def delta_triton(do: Tensor, o: Tensor, dlse: Tensor | None, layout: Layout) -> Tensor:
    """delta = rowsum(dO * O) - dlse, the row term of dS = P * (dP - delta): fp32 in the lse layout (dlse's), without
    fp32 copies of O's size."""
    delta = _triton.new_output(layout.lse_shape, torch.float32, o.device)
    dlse = dlse.contiguous() if dlse is not None else None  # the kernel reads it at delta's offsets
    # a packed tensor is one batch entry whose rows are every sequence's tokens
    batch, n_rows = (1, o.shape[0]) if layout.varlen else (layout.batch, layout.seqlen_q)
    cfg = DELTA_TUNING.config(_triton.target_of(o.device), DELTA_DEFAULT, head_dim=layout.head_dim)
    _triton.launch(
        _bwd_delta_kernel, (triton.cdiv(n_rows, cfg["BLOCK_ROWS"]) * layout.n_q_heads * batch,), o.device,
        num_warps=cfg["num_warps"], o_ptr=o, do_ptr=do, dlse_ptr=dlse if dlse is not None else delta, delta_ptr=delta,
        n_rows=n_rows, n_heads=layout.n_q_heads, HAS_DLSE=dlse is not None, HEAD_DIM=layout.head_dim,
        BLOCK_ROWS=cfg["BLOCK_ROWS"], **layout.strides("o", o), **layout.strides("do", do), **layout.lse_strides(delta),
    )
    return delta


def backward_triton(do, q, k, v, o, lse, dlse, layout: Layout, causal: bool, softmax_scale: float,
                    deterministic: bool = True):
    delta = delta_triton(do, o, dlse, layout)
    dk = _triton.new_output(k.shape, k.dtype, k.device)
    dv = _triton.new_output(v.shape, v.dtype, v.device)
    shared = dict(
        lse_ptr=lse, delta_ptr=delta, softmax_scale=softmax_scale, qk_scale=softmax_scale * LOG2E.value,
        **layout.strides("q", q), **layout.strides("k", k), **layout.strides("v", v), **layout.strides("do", do),
        **layout.lse_strides(lse),
    )
    # Each kernel's loop streams blocks of two operands, which TMA may load: q and do for dk/dv, k and v for dq.
    cfg = _config(DKDV_TUNING, q, layout.head_dim)
    if not deterministic:
        cfg = _config(ANY_ORDER_TUNING, q, layout.head_dim, default={**cfg, "ATOMIC_DQ": False})
    atomic_dq = cfg.get("ATOMIC_DQ", False)
    # dq's fp32 sum of the key blocks' shares with ATOMIC_DQ; otherwise dq itself, written by its own pass
    dq = (torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic_dq
          else _triton.new_output(q.shape, q.dtype, q.device))
    tma, (q_src, do_src) = _sources(cfg, layout, cfg["BLOCK_M"], q, do)
    n_tiles = triton.cdiv(layout.seqlen_k, cfg["BLOCK_N"]) * layout.batch * layout.n_kv_heads
    _triton.launch(
        _bwd_dkdv_kernel, _tile_grid(n_tiles, cfg, q.device), q.device,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **shared, **layout.common(causal, q.dtype, cfg),
        n_tiles=n_tiles, PERSISTENT=cfg.get("PERSISTENT", False), SPLIT_DIAGONAL=cfg.get("SPLIT_DIAGONAL", False),
        q_src=q_src, k_ptr=k, v_ptr=v, do_src=do_src, TMA=tma, ATOMIC_DQ=atomic_dq, dq_acc_ptr=dq,
        **layout.strides("dq_acc", dq),
        dk_ptr=dk, dv_ptr=dv, n_kv_heads=layout.n_kv_heads, **layout.strides("dk", dk), **layout.strides("dv", dv),
    )
    if atomic_dq:
        return dq.to(q.dtype), dk, dv
    cfg = _config(DQ_TUNING, q, layout.head_dim)
    tma, (k_src, v_src) = _sources(cfg, layout, cfg["BLOCK_N"], k, v)
    _triton.launch(
        _bwd_dq_kernel, (triton.cdiv(layout.seqlen_q, cfg["BLOCK_M"]) * layout.batch * layout.n_q_heads,), q.device,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **shared, **layout.common(causal, q.dtype, cfg),
        q_ptr=q, k_src=k_src, v_src=v_src, do_ptr=do, TMA=tma,
        HEAVIEST_FIRST=causal and cfg.get("HEAVIEST_FIRST", False),
        dq_ptr=dq, n_q_heads=layout.n_q_heads, **layout.strides("dq", dq),
    )
    return dq, dk, dv


def _sequences(layout: Layout):
    """(q slice, k slice) of each packed sequence, from cu_seqlens read on the host (the CPU paths only)."""
    cu_q, cu_k = layout.cu_q.tolist(), layout.cu_k.tolist()
    return [(slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])) for b in range(layout.batch)]


def _forward_dense(attend, q, k, v, layout: Layout, causal: bool, softmax_scale: float):
    """attend(q, k, v, causal, scale) -> (o, lse) over dense tensors, once, or per packed sequence."""
    if not layout.varlen:
        return attend(q, k, v, causal, softmax_scale)
    o, lse = torch.empty_like(q), q.new_empty(layout.lse_shape, dtype=torch.float32)
    for sq, sk in _sequences(layout):
        o_b, lse_b = attend(q[None, sq], k[None, sk], v[None, sk], causal, softmax_scale)
        o[sq], lse[:, sq] = o_b[0], lse_b[0]
    return o, lse


def _backward_dense(grads_of, do, q, k, v, o, lse, dlse, layout: Layout, causal: bool, softmax_scale: float):
    """grads_of(do, q, k, v, o, lse, dlse, causal, scale) -> (dq, dk, dv) over dense tensors, once, or per packed
    sequence (lse and dlse (Hq, total) then, (B, Hq, S) per sequence)."""
    if not layout.varlen:
        return grads_of(do, q, k, v, o, lse, dlse, causal, softmax_scale)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for sq, sk in _sequences(layout):
        dlse_b = dlse[None, :, sq].contiguous() if dlse is not None else None
        grads = grads_of(do[None, sq], q[None, sq], k[None, sk], v[None, sk], o[None, sq],
                         lse[None, :, sq].contiguous(), dlse_b, causal, softmax_scale)
        dq[sq], dk[sk], dv[sk] = (g[0] for g in grads)
    return dq, dk, dv


def _attention_reference(q, k, v, causal: bool, softmax_scale: float):
    o, lse = reference.attention(q, k, v, causal, softmax_scale, return_lse=True)
    return o, lse.float()


def _grads_reference(do, q, k, v, o, lse, dlse, causal: bool, softmax_scale: float):
    return reference.attention_backward(do, q, k, v, causal, softmax_scale, dlse)


def _attention_native(q, k, v, causal: bool, softmax_scale: float):
    """The extension's C++ forward."""
    return _native.ops().attention(q, k, v, causal, softmax_scale)


def _grads_native(do, q, k, v, o, lse, dlse, causal: bool, softmax_scale: float):
    """The extension's C++ backward: FlashAttention-2's, P recomputed from the lse."""
    return _native.ops().attention_backward(do, q, k, v, o, lse, dlse, causal, softmax_scale)


# --------------------------------------------------------------------------- torch ops
@torch.library.custom_op("llama_kernels::flash_attention_forward", mutates_args=())
def _forward_op(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, causal: bool, softmax_scale: float, deterministic: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    """deterministic is the backward's (saved for it)."""
    layout = Layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    forward = pick(backend, triton=forward_triton, native=functools.partial(_forward_dense, _attention_native),
                   reference=functools.partial(_forward_dense, _attention_reference))
    return forward(q, k, v, layout, causal, softmax_scale)


@torch.library.custom_op("llama_kernels::flash_attention_backward", mutates_args=())
def _backward_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dlse: Tensor | None,
    cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
    causal: bool, softmax_scale: float, deterministic: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """deterministic=False lets the Triton backward add dq's shares in any order; the CPU paths have one order."""
    layout = Layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if backend == "triton":
        return backward_triton(do, q, k, v, o, lse, dlse, layout, causal, softmax_scale, deterministic)
    grads_of = pick(backend, triton=None, native=_grads_native, reference=_grads_reference)
    return _backward_dense(grads_of, do, q, k, v, o, lse, dlse, layout, causal, softmax_scale)


@_forward_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, deterministic,
      backend):
    layout = Layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return torch.empty_like(q), q.new_empty(layout.lse_shape, dtype=torch.float32)


@_backward_op.register_fake
def _(do, q, k, v, o, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
      deterministic, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens_q, cu_seqlens_k)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.llama_kernels.flash_attention_backward(
        do.contiguous(), q, k, v, o, lse, dlse.contiguous(), cu_seqlens_q, cu_seqlens_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public functions
def _autocast(q, k, v):
    """q, k and v in the autocast dtype when autocast is on for their device (as SDPA under autocast: inputs from
    linears are in it already, an fp32 one is cast); as they are otherwise. Autograd records the casts."""
    device_type = q.device.type if isinstance(q, Tensor) else None
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in (q, k, v))
    return q, k, v


def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = True, softmax_scale: float | None = None,
    return_lse: bool = False, deterministic: bool = False, *, backend: str | None = None,
):
    """Exact softmax attention in O(N) memory, flash-attn's layout.

    q: (B, Sq, Hq, D); k, v: (B, Sk, Hk, D) with Hq a multiple of Hk (GQA and MQA read
        k and v once per group, never expanded); D 64 or 128; fp16, bf16 or fp32.
    causal: query i sees keys j <= i + Sk - Sq (bottom-right aligned, flash-attn >= 2.1);
        a query that sees no key gets zeros (and an lse of -inf).
    softmax_scale: defaults to 1 / sqrt(D).
    return_lse: also return the log-sum-exp (B, Hq, Sq), fp32, natural log (differentiable).
    deterministic: True: the backward gives the same bits every run (no atomics). False (flash-attn's
        default): on a GPU whose measured table chose it, dq is summed by fp32 atomic adds in the dk/dv pass
        (fewer products, the last bits of dq varying between runs); elsewhere the same as True.
    Autocast: q, k and v are cast to the autocast dtype (as SDPA is); o has it, lse stays fp32.
    Returns o (B, Sq, Hq, D), or (o, lse).
    """
    q, k, v = _autocast(q, k, v)
    check_qkv(q, k, v, ndim=4)
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    backend = resolve_backend(q, backend, "flash_attention")
    o, lse = torch.ops.llama_kernels.flash_attention_forward(q, k, v, None, None, 0, 0, bool(causal), scale,
                                                             bool(deterministic), backend)
    return (o, lse) if return_lse else o


def flash_attention_varlen(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, causal: bool = True, softmax_scale: float | None = None, return_lse: bool = False,
    deterministic: bool = False, *, backend: str | None = None,
):
    """Flash attention over packed sequences of different lengths.

    q: (total_q, Hq, D); k, v: (total_k, Hk, D); sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]
    and k, v[cu_seqlens_k[b]:cu_seqlens_k[b+1]]; cu_seqlens int32 (batch + 1,), starting at 0,
    non-decreasing. max_seqlen_q/k: at least the longest sequence (sizes the grid; a value past the
    total token count is taken as that count).
    lse: (Hq, total_q). Otherwise as ``flash_attention``.
    """
    q, k, v = _autocast(q, k, v)
    check_qkv(q, k, v, ndim=3)
    max_seqlens = []
    for name, cu, total, max_len in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                     ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        check_tensor(name, cu, dtypes=(torch.int32,), ndim=1)
        check_same_device(q=q, **{name: cu})
        if cu.shape != cu_seqlens_q.shape or cu.shape[0] < 2:
            raise ValueError(f"{name}: expected shape (batch + 1,) with batch >= 1, the same for q and k, "
                             f"got {tuple(cu.shape)}")
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 0:
            raise TypeError(f"max_seqlen_{name[-1]}: expected a non-negative int, got {max_len!r}")
        max_seqlens.append(min(max_len, total))  # the grid covers max_len queries: no sequence is longer than total
        if values_readable(cu):  # reads the offsets on the host: skipped in compiled graphs and for meta tensors
            lengths = cu[1:] - cu[:-1]
            if cu[0].item() != 0 or cu[-1].item() != total or (lengths < 0).any().item():
                raise ValueError(f"{name}: expected non-decreasing offsets from 0 to {total}, got {cu.tolist()}")
            if lengths.max().item() > max_len:
                raise ValueError(f"max_seqlen_{name[-1]}: expected at least the longest sequence "
                                 f"({lengths.max().item()}), got {max_len}")
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    backend = resolve_backend(q, backend, "flash_attention_varlen")
    # The kernels index cu_seqlens as contiguous memory: the host checks above read the same values.
    o, lse = torch.ops.llama_kernels.flash_attention_forward(
        q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), *max_seqlens, bool(causal), scale,
        bool(deterministic), backend)
    return (o, lse) if return_lse else o
