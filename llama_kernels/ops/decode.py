"""Decoding over a KV cache: split-KV flash decoding, with the cache append and RoPE in the same call.

One decoding step reads the whole cache once; with a program per (batch, head)
a batch-1 step at 100k tokens would keep a handful of multiprocessors busy.
Here the cached sequence is cut into ``num_splits`` ranges, each program
attends over one range for all query heads of one GQA group (so every cached
key and value is read once per step, not once per query head), writes a
partial output with its log-sum-exp, and a merge kernel combines the ranges by
log-sum-exp. The attention over a range is the flash attention forward's own
online softmax (``_shared.attend_blocks``), the group's query heads packed as
rows.

``flash_attention_with_kvcache`` first rotates q and the new k at their
positions (cache_seqlens[b] + i) and writes the rotated k and the new v into the
caches at those positions, all in one launch of the RoPE kernel (its APPEND_KV
mode; without RoPE the same kernel copies, at angle zero). Nothing synchronizes
with the host and no allocation depends on the data, so CUDA graphs can capture
a step: three launches (RoPE + append, splits, merge). The caller advances
cache_seqlens, as with flash-attn. A cache_seqlens the cache cannot hold is
caught in the kernels (no write outside the caches, NaN for that sequence), not
on the host: a host check would sync every step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _native, reference
from .._checks import (check_no_self_overlap, check_real, check_same_device, check_same_dtype, check_tensor,
                       dtype_name, values_readable)
from ..rope_scaling import rope_inv_freq
from . import _triton
from ._backend import pick, resolve_backend
from ._shared import (LOG2E, attend_blocks, check_head_dim, check_inv_freq, check_kv_heads,
                      check_last_dim_contiguous, dot_precision, finish_softmax, mma, resolve_softmax_scale)
from .rope import rope_triton, rotate

MAX_ROWS = 128  # packed (query, group member) rows per program
PAGES_PER_CHECK = 128  # block table entries a split checks at a time (a paged cache)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, seqlens_k_ptr, o_split_ptr, lse_split_ptr, block_table_ptr,
    seqlen_q, n_q_heads, n_kv_heads, group, num_splits, qk_scale, cache_slots, min_len_k, stride_table_b, n_pages,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_PAGES: tl.constexpr,
):
    # PAGE_SIZE > 0: the caches are pools of n_pages pages (stride_kb, stride_vb: a page's stride) and position p
    # of the sequence is row p % PAGE_SIZE of page block_table[batch, p // PAGE_SIZE].
    # Flat grid: the split fastest, then the block of packed rows, then (batch, key/value head).
    split = tl.program_id(0) % num_splits
    rest = tl.program_id(0) // num_splits
    n_row_blocks = tl.cdiv(seqlen_q * group, BLOCK_M)
    row_block, batch_head = rest % n_row_blocks, rest // n_row_blocks
    batch, kv_head = batch_head // n_kv_heads, batch_head % n_kv_heads

    packed = row_block * BLOCK_M + tl.arange(0, BLOCK_M)  # row = query * group + member
    query, head = packed // group, kv_head * group + packed % group
    row_mask = query < seqlen_q
    q_ptrs = (q_ptr + batch.to(tl.int64) * stride_qb + query.to(tl.int64)[:, None] * stride_qs
              + head.to(tl.int64)[:, None] * stride_qh + tl.arange(0, HEAD_DIM)[None, :])
    q = mma(tl.load(q_ptrs, mask=row_mask[:, None], other=0.0))

    len_k = tl.load(seqlens_k_ptr + batch)
    # A length the cache cannot hold (past its cache_slots rows, or under the min_len_k tokens just appended):
    # read nothing and report the row as NaN. Checking here, not on the host, keeps a step free of syncs.
    bad_len = (len_k > cache_slots) | (len_k < min_len_k)
    len_k = tl.where(bad_len, 0, len_k)
    # The splits share the sequence's length, not the cache's: a cache allocated for 100k tokens and holding 16k
    # still keeps every split busy.
    split_size = tl.cdiv(tl.cdiv(len_k, num_splits), BLOCK_N) * BLOCK_N
    first = split * split_size
    last = tl.minimum(len_k, first + split_size)
    table_row = block_table_ptr + batch.to(tl.int64) * stride_table_b
    if PAGE_SIZE > 0:
        # A page outside the pool: read nothing, NaN for the split (so for the sequence, through the merge).
        first_page, end_page = first // PAGE_SIZE, tl.cdiv(last, PAGE_SIZE)
        outside = tl.zeros([BLOCK_PAGES], dtype=tl.int32)
        for p in range(first_page, end_page, BLOCK_PAGES):
            entries = p + tl.arange(0, BLOCK_PAGES)
            page = tl.load(table_row + entries, mask=entries < end_page, other=0)
            outside = tl.maximum(outside, ((page < 0) | (page >= n_pages)).to(tl.int32))
        bad_len = bad_len | (tl.max(outside, axis=0) > 0)
        last = tl.where(bad_len, first, last)
    diag = len_k - seqlen_q  # bottom-right: query i sees keys j <= i + diag
    full_blocks_end = last // BLOCK_N * BLOCK_N
    if CAUSAL:  # keys query 0 sees are seen by every query
        full_blocks_end = tl.minimum(full_blocks_end, tl.maximum(diag + 1, 0) // BLOCK_N * BLOCK_N)
    full_blocks_end = tl.maximum(full_blocks_end, first)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = attend_blocks(
        acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, batch, 0, kv_head, len_k, query, first, full_blocks_end, diag,
        qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        False, CAUSAL, HEAD_DIM, BLOCK_N, DOT_PRECISION, False, table_row, PAGE_SIZE)
    acc, l_i, m_i = attend_blocks(
        acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, batch, 0, kv_head, len_k, query, full_blocks_end, last, diag,
        qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        True, CAUSAL, HEAD_DIM, BLOCK_N, DOT_PRECISION, False, table_row, PAGE_SIZE)

    o_part, lse_part = finish_softmax(acc, l_i, m_i)  # an empty range: zeros and -inf, weightless in the merge
    # Partial results, (B, Hq, Sq, num_splits, [D]) fp32: row r = (batch * Hq + head) * Sq + query.
    split_row = ((batch * n_q_heads + head).to(tl.int64) * seqlen_q + query) * num_splits + split
    o_part = tl.where(bad_len, float("nan"), o_part)
    tl.store(o_split_ptr + split_row[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], o_part,
             mask=row_mask[:, None])
    tl.store(lse_split_ptr + split_row, tl.where(bad_len, float("nan"), lse_part), mask=row_mask)


@triton.jit
def _merge_splits_kernel(
    o_split_ptr, lse_split_ptr, o_ptr, lse_ptr, seqlen_q, n_q_heads, num_splits,
    stride_ob, stride_os, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    """One output row: the splits' outputs weighted by exp(lse_split - lse)."""
    row = tl.program_id(0).to(tl.int64)  # (batch * Hq + head) * Sq + query
    query, head, batch = row % seqlen_q, (row // seqlen_q) % n_q_heads, row // (seqlen_q * n_q_heads)
    splits = tl.arange(0, BLOCK_SPLITS)
    lse_split = tl.load(lse_split_ptr + row * num_splits + splits, mask=splits < num_splits, other=float("-inf"))
    lse_max = tl.max(lse_split, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp(lse_split - lse_max)
    total = tl.sum(weights, axis=0)
    d = tl.arange(0, HEAD_DIM)
    o_split = tl.load(o_split_ptr + (row * num_splits + splits)[:, None] * HEAD_DIM + d[None, :],
                      mask=(splits < num_splits)[:, None], other=0.0)
    o = tl.sum(weights[:, None] * o_split, axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(o_ptr + batch * stride_ob + query * stride_os + head * stride_oh + d, o.to(o_ptr.dtype.element_ty))
    tl.store(lse_ptr + row, tl.where(total == 0.0, float("-inf"), lse_max + tl.log(tl.where(total == 0.0, 1.0, total))))


# --------------------------------------------------------------------------- launcher
def _num_splits(requested: int, q: Tensor, batch: int, n_kv_heads: int, cache_len: int, block_n: int) -> int:
    """Enough programs to fill the card twice over, never a split shorter than a key block."""
    if requested > 0:
        return requested
    target_programs = _triton.program_budget(q.device)
    return max(1, min(triton.cdiv(target_programs, batch * n_kv_heads), triton.cdiv(cache_len, block_n), 128))


def _candidates(default: dict, target: str, fields: dict) -> list[dict]:
    found = [default]
    for block_n in (32, 64, 128):
        for warps in (2, 4, 8):
            for num_stages in (1, 2, 3):
                config = {"BLOCK_M": default["BLOCK_M"], "BLOCK_N": block_n, "num_warps": warps,
                          "num_stages": num_stages}
                if config not in found:
                    found.append(config)
    return found


TUNING = _triton.Tuning("decode", "{head_dim}:{dtype}:{block_m}", _candidates)


def _config(q: Tensor, rows: int) -> dict:
    block_m = min(MAX_ROWS, max(16, triton.next_power_of_2(rows)))
    target = _triton.target_of(q.device)
    if target == "interpreter":
        return {"BLOCK_M": block_m, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    # 64 rows and more: 8 warps, or the paged form's registers spill on sm_80
    default = {"BLOCK_M": block_m, "BLOCK_N": 64, "num_warps": 4 if block_m < 64 else 8, "num_stages": 2}
    config = TUNING.config(target, default, head_dim=q.shape[-1], dtype=dtype_name(q.dtype), block_m=block_m)
    return {**config, "BLOCK_M": block_m}


def decode_triton(q, k_cache, v_cache, seqlens_k, min_len_k, causal, softmax_scale, num_splits, block_table=None):
    batch, seqlen_q, n_q_heads, head_dim = q.shape
    page_size = k_cache.shape[1] if block_table is not None else 0
    cache_len = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)  # per sequence
    n_kv_heads = k_cache.shape[2]
    group = n_q_heads // n_kv_heads
    cfg = _config(q, seqlen_q * group)
    num_splits = _num_splits(num_splits, q, batch, n_kv_heads, cache_len, cfg["BLOCK_N"])
    o_split = _triton.new_output((batch, n_q_heads, seqlen_q, num_splits, head_dim), torch.float32, q.device)
    lse_split = _triton.new_output((batch, n_q_heads, seqlen_q, num_splits), torch.float32, q.device)
    n_row_blocks = triton.cdiv(seqlen_q * group, cfg["BLOCK_M"])
    _triton.launch(
        _decode_split_kernel, (num_splits * n_row_blocks * batch * n_kv_heads,), q.device,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        q_ptr=q, k_cache_ptr=k_cache, v_cache_ptr=v_cache, seqlens_k_ptr=seqlens_k,
        o_split_ptr=o_split, lse_split_ptr=lse_split,
        block_table_ptr=block_table if block_table is not None else seqlens_k,
        seqlen_q=seqlen_q, n_q_heads=n_q_heads, n_kv_heads=n_kv_heads, group=group, num_splits=num_splits,
        qk_scale=softmax_scale * LOG2E.value, cache_slots=cache_len, min_len_k=min_len_k,
        stride_table_b=block_table.stride(0) if block_table is not None else 0, n_pages=k_cache.shape[0],
        **_triton.strides("q", q, "bsh"), **_triton.strides("k", k_cache, "bsh"),
        **_triton.strides("v", v_cache, "bsh"),  # head_dim's stride is 1, checked
        CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        DOT_PRECISION=dot_precision(q.dtype), PAGE_SIZE=page_size, BLOCK_PAGES=PAGES_PER_CHECK,
    )
    o = _triton.new_output(q.shape, q.dtype, q.device)
    lse = _triton.new_output((batch, n_q_heads, seqlen_q), torch.float32, q.device)
    _triton.launch(
        # a warp per 1024 partial values (up to 8): the splits' rows stay in registers
        _merge_splits_kernel, (batch * n_q_heads * seqlen_q,), q.device,
        num_warps=min(8, max(1, triton.next_power_of_2(num_splits) * head_dim // 1024)),
        o_split_ptr=o_split, lse_split_ptr=lse_split, o_ptr=o, lse_ptr=lse,
        seqlen_q=seqlen_q, n_q_heads=n_q_heads, num_splits=num_splits,
        stride_ob=o.stride(0), stride_os=o.stride(1), stride_oh=o.stride(2),
        HEAD_DIM=head_dim, BLOCK_SPLITS=triton.next_power_of_2(num_splits),
    )
    return o, lse


def _decode_native(q, k_cache, v_cache, seqlens_k, min_len_k, causal, softmax_scale, num_splits, block_table=None):
    """The extension's C++ kernel (one pass per (batch, key/value head); lengths and pages checked on the host)."""
    return _native.ops().attention_kvcache(q, k_cache, v_cache, seqlens_k, causal, softmax_scale, block_table)


def _decode_reference(q, k_cache, v_cache, seqlens_k, min_len_k, causal, softmax_scale, num_splits,
                      block_table=None):
    o, lse = torch.empty_like(q), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    for b, length in enumerate(seqlens_k.tolist()):
        if block_table is None:
            k_b, v_b = k_cache[b, :length], v_cache[b, :length]
        else:
            k_b, v_b = (reference.gather_pages(pool, block_table[b], length) for pool in (k_cache, v_cache))
        o_b, lse_b = reference.attention(q[b:b + 1], k_b[None], v_b[None], causal, softmax_scale, return_lse=True)
        o[b], lse[b] = o_b[0], lse_b[0]
    return o, lse


# --------------------------------------------------------------------------- torch op
def _rotate_and_append(q, k_cache, v_cache, cache_seqlens, k, v, inv_freq, interleaved, backend, block_table):
    """q rotated at its positions, and the new k (rotated) and v written into the caches there; returns q."""
    batch, seqlen_q = q.shape[:2]
    positions = cache_seqlens.long()[:, None] + torch.arange(seqlen_q, device=q.device)  # (B, Sq)
    if k is not None and backend == "triton":
        # One kernel: q rotated, the new k rotated into k_cache and v copied into v_cache at their positions
        # (never outside the caches). Without RoPE the same kernel at angle zero (cos 1, sin 0) copies exactly.
        angles = inv_freq if inv_freq is not None else q.new_zeros(q.shape[-1] // 2, dtype=torch.float32)
        q_rotated = _triton.new_output(q.shape, q.dtype, q.device)
        rope_triton(q, k, q_rotated, k_cache, positions, 0, angles, 1.0, interleaved, False, v=v, v_out=v_cache,
                    block_table=block_table)
        torch.autograd.graph.increment_version((k_cache, v_cache))  # a kernel's writes: torch does not see them
        return q_rotated
    if inv_freq is not None:  # rotate q, and the new k, at their positions; an empty k when there is none
        k_new = k if k is not None else q[:, :, :0]
        q_rotated, k_rotated = torch.empty_like(q), torch.empty_like(k_new)
        rotate(backend)(q, k_new, q_rotated, k_rotated, positions, 0, inv_freq, 1.0, interleaved, False)
        q, k = q_rotated, (k_rotated if k is not None else None)
    if k is not None:  # the (batch entry or page, row) of each new token
        if block_table is None:
            slots = torch.arange(batch, device=q.device)[:, None].expand(batch, seqlen_q), positions
        else:
            page_size = k_cache.shape[1]
            slots = block_table.gather(1, positions // page_size).long(), positions % page_size
        k_cache[slots] = k
        v_cache[slots] = v
    return q


# Defined through torch.library's low-level API rather than custom_op: custom_op bumps a mutating op's version
# counters in a Python kernel that walks the 13-argument schema on every call (50 us a decoding step, 0.2 ms once
# the step's kernel has streamed the cache through the CPU's caches). The append bumps the caches' versions: the
# Triton one explicitly, the others through torch's index_put_.
torch.library.define(
    "llama_kernels::flash_attention_with_kvcache",
    "(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k, Tensor? v, Tensor? inv_freq, "
    "bool interleaved, bool causal, float softmax_scale, SymInt num_splits, str backend, Tensor? block_table=None) "
    "-> (Tensor, Tensor)")


@torch.library.impl("llama_kernels::flash_attention_with_kvcache", "default")
def _kvcache_op(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, k: Tensor | None, v: Tensor | None,
    inv_freq: Tensor | None, interleaved: bool, causal: bool, softmax_scale: float, num_splits: int, backend: str,
    block_table: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    batch, seqlen_q = q.shape[:2]
    if batch == 0:  # nothing to attend (and no split count for no programs)
        return torch.empty_like(q), q.new_empty((0, q.shape[2], seqlen_q), dtype=torch.float32)
    if k is not None or inv_freq is not None:
        q = _rotate_and_append(q, k_cache, v_cache, cache_seqlens, k, v, inv_freq, interleaved, backend, block_table)
    appended = seqlen_q if k is not None else 0
    seqlens_k = cache_seqlens + appended if appended else cache_seqlens
    attend = pick(backend, triton=decode_triton, native=_decode_native, reference=_decode_reference)
    return attend(q, k_cache, v_cache, seqlens_k, appended, causal, softmax_scale, num_splits, block_table)


@torch.library.register_fake("llama_kernels::flash_attention_with_kvcache")
def _(q, k_cache, v_cache, cache_seqlens, k, v, inv_freq, interleaved, causal, softmax_scale, num_splits, backend,
      block_table=None):
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


# --------------------------------------------------------------------------- public function
PAGE_SIZES = tuple(2**i for i in range(4, 9))  # 16 .. 256


def _check_block_table_shape(block_table: Tensor, k_cache: Tensor, batch: int, head_dim: int) -> None:
    if block_table.shape[0] != batch or block_table.shape[1] < 1:
        raise ValueError(f"block_table: expected shape (B, max_blocks_per_seq) with B = {batch} and at least one "
                         f"block, got {tuple(block_table.shape)}")
    num_blocks, block_size = k_cache.shape[:2]
    if num_blocks < 1 or block_size not in PAGE_SIZES or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache: expected a pool (num_blocks, block_size, Hk, D) with a block table: num_blocks "
                         f">= 1, block_size in {PAGE_SIZES} and D = {head_dim}, got {tuple(k_cache.shape)}")


def _check_block_table_entries(block_table: Tensor, cache_seqlens: Tensor, appended: int, k_cache: Tensor) -> None:
    """On the host: each sequence's table holds its pages, and those (no other entry) lie in the pool."""
    num_blocks, block_size = k_cache.shape[:2]
    if (cache_seqlens < 0).any():
        raise ValueError(f"cache_seqlens: expected values >= 0, got {cache_seqlens.tolist()}")
    used = (cache_seqlens.long() + appended + block_size - 1) // block_size  # (B,) pages per sequence
    too_short = (used > block_table.shape[1]).nonzero()
    if len(too_short):
        b = int(too_short[0])
        raise ValueError(f"block_table: expected at least {int(used[b])} blocks for sequence {b} (cache_seqlens[{b}] "
                         f"= {int(cache_seqlens[b])} plus {appended} new tokens in blocks of {block_size}), got "
                         f"{block_table.shape[1]} per sequence")
    in_use = torch.arange(block_table.shape[1], device=block_table.device) < used[:, None]
    outside = (in_use & ((block_table < 0) | (block_table >= num_blocks))).nonzero()
    if len(outside):
        b, i = outside[0].tolist()
        raise ValueError(f"block_table: expected the blocks of each sequence's positions in [0, {num_blocks}) (the "
                         f"pool's blocks), got block_table[{b}, {i}] = {int(block_table[b, i])}")


def flash_attention_with_kvcache(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, k: Tensor | None = None,
    v: Tensor | None = None, rope_theta: float | None = None, inv_freq: Tensor | None = None,
    interleaved: bool = False, causal: bool = True, softmax_scale: float | None = None, num_splits: int = 0,
    return_lse: bool = False, *, backend: str | None = None, block_table: Tensor | None = None,
):
    """Attention of new queries over a KV cache, appending new keys and values first (flash-attn's API).

    q: (B, Sq, Hq, D), Sq >= 1 (1 to decode; more for chunked prefill or speculative tokens).
    k_cache, v_cache: (B, S_max, Hk, D), preallocated; Hq a multiple of Hk; D 64 or 128.
    block_table: a paged cache (FlashAttention-2's layout): int32 (B, max_blocks_per_seq), and k_cache, v_cache
        pools (num_blocks, block_size, Hk, D), block_size a power of two from 16 to 256; position p of sequence b
        lives at [block_table[b, p // block_size], p % block_size], and S_max below is max_blocks_per_seq *
        block_size. Entries past a sequence's ceil((cache_seqlens[b] + new tokens) / block_size) blocks are
        never read (pad with anything). Sequences may share pages they read; two appending into one slot race.
        A table of another dtype or shape is a ValueError naming block_table on every device.
    cache_seqlens: int32 (B,), the tokens already cached per sequence (they may differ; 0 is fine).
    k, v: (B, Sq, Hk, D) new keys and values, written into the caches at cache_seqlens[b]... in place.
    rope_theta or inv_freq: if given, q and the new k are rotated at positions cache_seqlens[b] + i
        (interleaved: Meta's layout) before anything else; the cache then holds rotated keys.
    causal: query i sees keys j <= i + L - Sq, L = the attended length (bottom-right).
    num_splits: 0 picks the split count from batch, heads, cache size and the card; any value gives
        the same result within rounding.
    Returns o (B, Sq, Hq, D), or (o, lse) with lse (B, Hq, Sq) fp32, which merges with
    ``flash_attention``'s. Inference only: with grad mode on, a tensor that requires grad is refused
    (there is no backward, and the caches are written in place). The caller advances cache_seqlens.
    Autocast: no autocast rule and no casts (a cast cache would be a copy, and the append would be
    lost): q, the caches and k, v must share one dtype, e.g. caches allocated in the autocast dtype.
    cache_seqlens outside 0 <= cache_seqlens[b] <= S_max - (Sq if appending else 0), or a block table
    entry that a sequence uses outside [0, num_blocks): on the CPU, and with backend="reference", a
    ValueError naming cache_seqlens, or block_table (a table too short for cache_seqlens[b] plus the new
    tokens, an entry outside the pool), before anything is written (reading them costs nothing there); on a
    GPU the kernels check them without a host sync, write nothing outside the caches (the pool) and return
    NaN in that sequence's o and lse (its new tokens may still land in the slots that are valid).
    """
    check_tensor("q", q, ndim=4)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if t is not None:
            check_tensor(name, t, ndim=4)
    check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1)
    check_same_dtype(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    if block_table is not None:  # any fault of a table (dtype, shape, entries): a ValueError, one exception to catch
        check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2, dtype_error=ValueError)
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, k=k, v=v,
                      block_table=block_table)
    batch, seqlen_q, n_q_heads, head_dim = q.shape
    if seqlen_q < 1:
        raise ValueError(f"q: expected at least one query (Sq >= 1), got shape {tuple(q.shape)}")
    check_head_dim("q", head_dim)
    if block_table is None and (k_cache.shape[0] != batch or k_cache.shape[3] != head_dim):
        raise ValueError(f"k_cache: expected (B, S_max, Hk, D) with B = {batch} and D = {head_dim}, "
                         f"got {tuple(k_cache.shape)}")
    if block_table is not None:
        _check_block_table_shape(block_table, k_cache, batch, head_dim)
    check_kv_heads("k_cache", k_cache.shape[2], n_q_heads)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"cache_seqlens: expected shape (B,) = ({batch},), got {tuple(cache_seqlens.shape)}")
    if (k is None) != (v is None):
        raise ValueError("k, v: expected both new keys and new values, or neither")
    if k is not None:
        expected = (batch, seqlen_q, k_cache.shape[2], head_dim)
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != expected:
                raise ValueError(f"{name}: expected shape (B, Sq, Hk, D) = {expected}, got {tuple(t.shape)}")
    check_last_dim_contiguous(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    if k is not None:  # appended to: the caches are written
        check_no_self_overlap("k_cache", k_cache)
        check_no_self_overlap("v_cache", v_cache)
    if torch.is_grad_enabled():
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
            if t is not None and t.requires_grad:
                raise ValueError(f"{name}: expected a tensor that does not require grad: flash_attention_with_kvcache "
                                 "is inference-only (no backward; the caches are written in place); call it under "
                                 "torch.no_grad() or pass detached tensors")
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0:
        raise ValueError(f"num_splits: expected an int >= 0 (0: automatic), got {num_splits!r}")
    if rope_theta is not None and inv_freq is not None:
        raise ValueError("rope_theta, inv_freq: expected at most one of them")
    if rope_theta is not None:
        inv_freq = rope_inv_freq(head_dim, check_real("rope_theta", rope_theta, above=1), device=q.device)
    elif inv_freq is not None:
        check_inv_freq(inv_freq, head_dim, q)
    backend = resolve_backend(q, backend, "flash_attention_with_kvcache")
    # On a GPU reading cache_seqlens syncs every step (with it, batch-1 steps ran at 18-29% of the copy bandwidth
    # on an H100); the Triton kernels check it there. The reference path reads it anyway.
    tables = (cache_seqlens,) if block_table is None else (cache_seqlens, block_table)
    if values_readable(*tables) and (not q.is_cuda or backend == "reference"):
        appended = seqlen_q if k is not None else 0
        if block_table is not None:
            _check_block_table_entries(block_table, cache_seqlens, appended, k_cache)
        elif batch:
            lengths = cache_seqlens.tolist()  # one read: min() and max() as tensor ops cost more on the CPU
            if min(lengths) < 0 or max(lengths) + appended > k_cache.shape[1]:
                raise ValueError(f"cache_seqlens: expected 0 <= cache_seqlens[b] and cache_seqlens[b] + {appended} "
                                 f"(new tokens) <= k_cache's S_max = {k_cache.shape[1]}, got {lengths}")
    scale = resolve_softmax_scale(softmax_scale, head_dim)
    o, lse = torch.ops.llama_kernels.flash_attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens, k, v, inv_freq.contiguous() if inv_freq is not None else None,
        bool(interleaved), bool(causal), scale, num_splits, backend,
        block_table.contiguous() if block_table is not None else None)
    return (o, lse) if return_lse else o
