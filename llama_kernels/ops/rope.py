"""Rotary position embedding over q and k in one launch: Triton kernel, launcher, torch ops.

Each program takes BLOCK_S tokens of one sequence, computes their angles
``position * inv_freq`` and cos/sin once, and rotates every head of q and then of
k with them: the angles cost nothing next to the memory traffic, and no cos/sin
table is materialized (at 100k positions it would be as large as q itself).

Angles follow inv_freq's dtype. float32 (default) is Meta's and Hugging Face's
computation bit for bit: fl32(fl32(position) * inv_freq), then cos and sin of
that; up to position 100,000 the angle is off by up to 7.2e-3 rad. float64
(``precise=True``) forms the angle in fp64 and reduces it to [-pi, pi] before
the fp32 cos/sin, good to ~1e-7 at any position, at the cost of a few fp64
operations per token and frequency (shared by all heads).

The backward is the same rotation by minus the angle (``inverse=True``), scaled
by the same attention factor, so the op is its own gradient.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _native, reference
from .._checks import (check_no_self_overlap, check_real, check_same_device, check_same_dtype, check_tensor,
                       dtype_name)
from ..rope_scaling import rope_inv_freq
from . import _triton
from ._backend import pick, resolve_backend
from ._shared import check_inv_freq, check_kv_heads

TWO_PI = tl.constexpr(2 * math.pi)


# --------------------------------------------------------------------------- kernel
@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, x_token_offsets, out_token_offsets, token_mask,
    n_heads, half_dim, stride_xh, stride_xd, stride_oh, stride_od,
    cos, sin,
    INTERLEAVED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Rotate all heads of BLOCK_S tokens of one tensor, BLOCK_H heads at a time."""
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    x_tok = x_ptr + x_token_offsets[:, None, None]
    out_tok = out_ptr + out_token_offsets[:, None, None]
    for head_start in range(0, n_heads, BLOCK_H):
        heads = head_start + tl.arange(0, BLOCK_H)
        head_mask = token_mask[:, None, None] & (heads < n_heads)[None, :, None]
        heads = heads.to(tl.int64)[None, :, None]
        x_base = x_tok + heads * stride_xh
        out_base = out_tok + heads * stride_oh
        if INTERLEAVED:
            # Meta's pairs (x[2i], x[2i+1]): load the contiguous head, split the pairs in registers.
            d = tl.arange(0, 2 * BLOCK_HALF)[None, None, :]
            mask = head_mask & (d < 2 * half_dim)
            x = tl.load(x_base + d * stride_xd, mask=mask, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, [BLOCK_S, BLOCK_H, BLOCK_HALF, 2]))
            out = tl.join(x1 * cos - x2 * sin, x1 * sin + x2 * cos)
            out = tl.reshape(out, [BLOCK_S, BLOCK_H, 2 * BLOCK_HALF])
            tl.store(out_base + d * stride_od, out.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            # Hugging Face's pairs (x[i], x[i + D/2]): two contiguous halves.
            i = tl.arange(0, BLOCK_HALF)[None, None, :]
            mask = head_mask & (i < half_dim)
            x1 = tl.load(x_base + i * stride_xd, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_base + (i + half_dim) * stride_xd, mask=mask, other=0.0).to(tl.float32)
            out1 = (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty)
            out2 = (x1 * sin + x2 * cos).to(out_ptr.dtype.element_ty)
            tl.store(out_base + i * stride_od, out1, mask=mask)
            tl.store(out_base + (i + half_dim) * stride_od, out2, mask=mask)


@triton.jit
def _copy_heads(
    x_ptr, out_ptr, x_token_offsets, out_token_offsets, token_mask,
    n_heads, head_dim, stride_xh, stride_xd, stride_oh, stride_od,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Copy all heads of BLOCK_S tokens of one tensor, BLOCK_H heads at a time."""
    d = tl.arange(0, BLOCK_D)[None, None, :]
    for head_start in range(0, n_heads, BLOCK_H):
        heads = head_start + tl.arange(0, BLOCK_H)
        mask = token_mask[:, None, None] & (heads < n_heads)[None, :, None] & (d < head_dim)
        heads = heads.to(tl.int64)[None, :, None]
        x = tl.load(x_ptr + x_token_offsets[:, None, None] + heads * stride_xh + d * stride_xd, mask=mask)
        tl.store(out_ptr + out_token_offsets[:, None, None] + heads * stride_oh + d * stride_od,
                 x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, v_ptr, v_out_ptr, positions_ptr, inv_freq_ptr,
    seqlen, n_q_heads, n_k_heads, half_dim,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_qob, stride_qos, stride_qoh, stride_qod,
    stride_kob, stride_kos, stride_koh, stride_kod,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_vob, stride_vos, stride_voh, stride_vod,
    stride_pos_b, stride_pos_s, position_offset, attention_factor, cache_slots,
    block_table_ptr, stride_table_b, n_pages,
    HAS_POSITIONS: tl.constexpr, INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr, APPEND_KV: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    """Rotate q and k. APPEND_KV (decoding): the rotated k, and v unrotated, go into caches at their positions;
    a position outside the cache's cache_slots rows is not written (the decode kernel reports that row as NaN).
    PAGE_SIZE > 0: the caches are pools of n_pages pages and position p goes to row p % PAGE_SIZE of page
    block_table[batch, p // PAGE_SIZE] (cache_slots: the table's pages times PAGE_SIZE); an entry outside the
    pool is not written to."""
    # One flat grid axis (the second axis stops at 65,535, too few for large batches).
    token_blocks = tl.cdiv(seqlen, BLOCK_S)
    batch = (tl.program_id(0) // token_blocks).to(tl.int64)
    tokens = (tl.program_id(0) % token_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    token_mask = tokens < seqlen
    tokens = tokens.to(tl.int64)  # 64-bit offsets: tokens * stride passes 2^31 at long contexts

    if HAS_POSITIONS:
        pos = tl.load(positions_ptr + batch * stride_pos_b + tokens * stride_pos_s, mask=token_mask, other=0)
    else:
        pos = tokens + position_offset
    pairs = tl.arange(0, BLOCK_HALF)
    inv_freq = tl.load(inv_freq_ptr + pairs, mask=pairs < half_dim, other=0.0)
    angle = pos.to(inv_freq.dtype)[:, None] * inv_freq[None, :]
    if inv_freq.dtype == tl.float64:
        angle -= TWO_PI * tl.floor(angle / TWO_PI + 0.5)  # exact-enough reduction before the fp32 cos/sin
    angle = angle.to(tl.float32)
    cos = tl.cos(angle) * attention_factor
    sin = tl.sin(angle) * attention_factor
    if INVERSE:
        sin = -sin

    _rotate_heads(
        q_ptr, q_out_ptr, batch * stride_qb + tokens * stride_qs, batch * stride_qob + tokens * stride_qos,
        token_mask, n_q_heads, half_dim, stride_qh, stride_qd, stride_qoh, stride_qod, cos, sin,
        INTERLEAVED, BLOCK_S, BLOCK_H, BLOCK_HALF,
    )
    out_rows, out_tokens, out_mask = batch, tokens, token_mask  # out_rows: the batch entry, or the page
    if APPEND_KV:  # a cache's slot is the token's position
        out_tokens, out_mask = pos.to(tl.int64), token_mask & (pos >= 0) & (pos < cache_slots)
        if PAGE_SIZE > 0:
            page = tl.load(block_table_ptr + batch * stride_table_b + out_tokens // PAGE_SIZE, mask=out_mask, other=-1)
            out_mask = out_mask & (page >= 0) & (page < n_pages)
            out_rows, out_tokens = page.to(tl.int64), out_tokens % PAGE_SIZE
    _rotate_heads(
        k_ptr, k_out_ptr, batch * stride_kb + tokens * stride_ks, out_rows * stride_kob + out_tokens * stride_kos,
        out_mask, n_k_heads, half_dim, stride_kh, stride_kd, stride_koh, stride_kod, cos, sin,
        INTERLEAVED, BLOCK_S, BLOCK_H, BLOCK_HALF,
    )
    if APPEND_KV:
        _copy_heads(
            v_ptr, v_out_ptr, batch * stride_vb + tokens * stride_vs, out_rows * stride_vob + out_tokens * stride_vos,
            out_mask, n_k_heads, 2 * half_dim, stride_vh, stride_vd, stride_voh, stride_vod, BLOCK_H, 2 * BLOCK_HALF,
        )


# --------------------------------------------------------------------------- launcher
def _candidates(default: dict, target: str, fields: dict) -> list[dict]:
    """16 elements of each half-head a thread (the default's), spread over tokens and heads differently."""
    max_heads = max(fields["n_q_heads"], fields["n_kv_heads"])
    block_half = default.get("BLOCK_HALF", 64)
    found = [{key: default[key] for key in ("BLOCK_S", "BLOCK_H", "num_warps")}]
    for warps in (2, 4, 8):
        for block_s in (1, 2, 4, 8, 16):
            block_h = 16 * 32 * warps // (block_s * block_half)
            config = {"BLOCK_S": block_s, "BLOCK_H": block_h, "num_warps": warps}
            if 1 <= block_h <= triton.next_power_of_2(max_heads) and config not in found:
                found.append(config)
    return found


TUNING = _triton.Tuning("rope", "{n_q_heads}/{n_kv_heads}/{head_dim}:{dtype}:{layout}", _candidates)


def _config(q: Tensor, k: Tensor, interleaved: bool) -> dict:
    batch, seqlen, n_q_heads, head_dim = q.shape
    block_half = triton.next_power_of_2(head_dim // 2)
    block_h_all = triton.next_power_of_2(max(n_q_heads, k.shape[2]))
    target = _triton.target_of(q.device)
    if target == "interpreter":  # few programs (each costs the interpreter the same); still forceable, for the tests
        block_s = min(triton.next_power_of_2(seqlen), 16)
        block_h = min(block_h_all, max(1, 65536 // (block_s * block_half)))
        default = {"BLOCK_S": block_s, "BLOCK_H": block_h, "BLOCK_HALF": block_half, "num_warps": 4}
    else:
        default = gpu_default(block_half, block_h_all)
    config = TUNING.config(target, default, n_q_heads=n_q_heads, n_kv_heads=k.shape[2], head_dim=head_dim,
                           dtype=dtype_name(q.dtype), layout="interleaved" if interleaved else "half")
    return {**config, "BLOCK_HALF": block_half}


def gpu_default(block_half: int, block_h_all: int) -> dict:
    """The config on a card that has not measured its own: two tokens a program, 16 elements a thread."""
    return {"BLOCK_S": 2, "BLOCK_H": min(block_h_all, max(1, 1024 // block_half)), "BLOCK_HALF": block_half,
            "num_warps": 4}


def rope_triton(q, k, q_out, k_out, positions, position_offset, inv_freq, attention_factor, interleaved, inverse,
                 v=None, v_out=None, block_table=None):
    """Rotate q into q_out and k into k_out. With v and v_out (decoding's append; positions required), k_out and
    v_out are caches: token (b, i) of k (rotated) and of v lands at row positions[b, i] if the cache has it; with
    a block_table (B, pages per sequence) they are pools of pages (num_pages, page_size, Hk, D) and the row is
    row positions[b, i] % page_size of page block_table[b, positions[b, i] // page_size]."""
    batch, seqlen, n_q_heads, head_dim = q.shape
    if q.numel() == 0 and k.numel() == 0:
        return
    if positions is not None:
        stride_pos_b, stride_pos_s = (positions.stride(0), positions.stride(1)) if positions.dim() == 2 else (0, positions.stride(0))
    else:
        stride_pos_b = stride_pos_s = 0
    cfg = _config(q, k, interleaved)
    _triton.launch(
        _rope_kernel, (batch * triton.cdiv(seqlen, cfg["BLOCK_S"]),), q.device,
        num_warps=cfg["num_warps"],
        q_ptr=q, k_ptr=k, q_out_ptr=q_out, k_out_ptr=k_out,
        v_ptr=v if v is not None else k, v_out_ptr=v_out if v_out is not None else k_out,
        positions_ptr=positions if positions is not None else inv_freq, inv_freq_ptr=inv_freq,
        seqlen=seqlen, n_q_heads=n_q_heads, n_k_heads=k.shape[2], half_dim=head_dim // 2,
        **_triton.strides("q", q), **_triton.strides("k", k),
        **_triton.strides("qo", q_out), **_triton.strides("ko", k_out),
        **_triton.strides("v", v if v is not None else k), **_triton.strides("vo", v_out if v_out is not None else k_out),
        stride_pos_b=stride_pos_b, stride_pos_s=stride_pos_s,
        position_offset=position_offset, attention_factor=attention_factor,
        cache_slots=(k_out.shape[1] * (block_table.shape[1] if block_table is not None else 1)) if v is not None else 0,
        block_table_ptr=block_table if block_table is not None else inv_freq,
        stride_table_b=block_table.stride(0) if block_table is not None else 0, n_pages=k_out.shape[0],
        HAS_POSITIONS=positions is not None, INTERLEAVED=interleaved, INVERSE=inverse, APPEND_KV=v is not None,
        BLOCK_S=cfg["BLOCK_S"], BLOCK_H=cfg["BLOCK_H"], BLOCK_HALF=cfg["BLOCK_HALF"],
        PAGE_SIZE=k_out.shape[1] if block_table is not None else 0,
    )


def _rope_reference(q, k, q_out, k_out, positions, position_offset, inv_freq, attention_factor, interleaved,
                    inverse):
    batch, seqlen = q.shape[:2]
    pos = reference.rope_positions(positions if positions is not None else position_offset, batch, seqlen, q.device)
    # Rotating by minus the angle is rotating at minus the position: the negation is exact.
    q_rotated, k_rotated = reference.apply_rope(q, k, -pos if inverse else pos, inv_freq, interleaved, attention_factor)
    q_out.copy_(q_rotated)
    k_out.copy_(k_rotated)


def _contiguous_heads(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rope_extension(q, k, q_out, k_out, positions, position_offset, inv_freq, attention_factor, interleaved,
                    inverse):
    """The extension's kernel (C++ on CPU tensors, CUDA on CUDA tensors); q_out, k_out may be q, k (in place).
    The kernel takes heads with a contiguous last dim: other layouts go through a copy (copied back in place)."""
    batch, seqlen = q.shape[:2]
    pos = reference.rope_positions(positions if positions is not None else position_offset, batch, seqlen, q.device)
    inplace = q_out is q
    q_in, k_in = _contiguous_heads(q), _contiguous_heads(k)
    q_dst, k_dst = (q_in, k_in) if inplace else (q_out, k_out)
    _native.ops().rope(q_dst, k_dst, q_in, k_in, pos.long(), inv_freq, attention_factor, interleaved, inverse)
    for t, rotated in ((q, q_in), (k, k_in)):
        if inplace and rotated is not t:
            t.copy_(rotated)


def rotate(backend: str):
    """rotate(q, k, q_out, k_out, ...): q_out, k_out may be q, k (in place). Called by the ops below, and by another
    op's body (the KV-cache op's), which is past the dispatcher already."""
    return pick(backend, triton=rope_triton, extension=_rope_extension, reference=_rope_reference)


# --------------------------------------------------------------------------- torch ops
@torch.library.custom_op("llama_kernels::rope", mutates_args=())
def _rope_op(
    q: Tensor, k: Tensor, positions: Tensor | None, position_offset: int, inv_freq: Tensor,
    attention_factor: float, interleaved: bool, inverse: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    q_out, k_out = _triton.new_output(q.shape, q.dtype, q.device), _triton.new_output(k.shape, k.dtype, k.device)
    rotate(backend)(q, k, q_out, k_out, positions, position_offset, inv_freq, attention_factor, interleaved, inverse)
    return q_out, k_out


@torch.library.custom_op("llama_kernels::rope_", mutates_args=("q", "k"))
def _rope_inplace_op(
    q: Tensor, k: Tensor, positions: Tensor | None, position_offset: int, inv_freq: Tensor,
    attention_factor: float, interleaved: bool, inverse: bool, backend: str,
) -> None:
    rotate(backend)(q, k, q, k, positions, position_offset, inv_freq, attention_factor, interleaved, inverse)


@_rope_op.register_fake
def _(q, k, positions, position_offset, inv_freq, attention_factor, interleaved, inverse, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, _, positions, *ctx.args = inputs
    ctx.save_for_backward(positions)


def _backward(ctx, dq, dk):
    (positions,) = ctx.saved_tensors
    position_offset, inv_freq, attention_factor, interleaved, inverse, backend = ctx.args
    dq, dk = torch.ops.llama_kernels.rope(
        dq.contiguous(), dk.contiguous(), positions, position_offset, inv_freq,
        attention_factor, interleaved, not inverse, backend,
    )
    return dq, dk, None, None, None, None, None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function
@functools.lru_cache(maxsize=64)
def _cached_inv_freq(head_dim: int, theta: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return rope_inv_freq(head_dim, theta, dtype=dtype, device=device)


def apply_rope(
    q: Tensor,
    k: Tensor,
    positions: Tensor | int | None = None,
    theta: float = 1e6,
    inv_freq: Tensor | None = None,
    interleaved: bool = False,
    inplace: bool = False,
    *,
    attention_factor: float = 1.0,
    precise: bool = False,
    backend: str | None = None,
):
    """Rotate q and k by their positions' angles, both in one kernel launch.

    q: (B, S, Hq, D) and k: (B, S, Hk, D), fp16/bf16/fp32, same dtype; Hq a multiple
        of Hk; D even; any strides (views of a fused qkv projection work in place).
    positions: None (0..S-1), an int offset (offset..offset+S-1), or an integer
        tensor of shape (S,) or (B, S) (packed sequences, KV-cache offsets).
    theta: the RoPE base, used when inv_freq is None (1e6 for Code Llama, 1e4 for Llama 2).
    inv_freq: (D/2,) float32 or float64, e.g. from ``rope_inv_freq`` with a scaling
        dict; the angle is computed in its dtype.
    interleaved: True for Meta's checkpoints' pairs (x[2i], x[2i+1]); False for
        Hugging Face's half-split pairs (x[i], x[i + D/2]).
    inplace: write the result into q and k (no autograd) and return them.
    attention_factor: multiplies cos and sin (YaRN: ``rope_attention_factor``).
    precise: when inv_freq is None, compute it and the angles in float64.
    Returns (q_rotated, k_rotated). Differentiable in q and k when not in place.
    Autocast: no autocast rule; q and k keep their dtype (both come from linears: the autocast dtype),
        as HF's unpatched rotation does, and must share it.
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_same_dtype(q=q, k=k)
    check_same_device(q=q, k=k)
    batch, seqlen, n_q_heads, head_dim = q.shape
    if k.shape[:2] != q.shape[:2]:
        raise ValueError(f"k: expected batch and sequence sizes {tuple(q.shape[:2])} as q's, got {tuple(k.shape[:2])}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k: expected head_dim {head_dim} as q's, got {k.shape[3]}")
    if head_dim % 2 or head_dim == 0:
        raise ValueError(f"q: expected an even head_dim, got {head_dim}")
    check_kv_heads("k", k.shape[2], n_q_heads)

    position_offset = 0
    if isinstance(positions, bool) or not (positions is None or isinstance(positions, (int, Tensor))):
        raise TypeError(f"positions: expected None, an int or an integer tensor, got {type(positions).__name__}")
    if isinstance(positions, int):
        position_offset, positions = positions, None
        # Every position, and its negation (the backward's), must be an int64.
        if not -(2**63 - 1) <= position_offset <= 2**63 - 1 - max(seqlen - 1, 0):
            raise ValueError(f"positions: expected an int offset such that offset..offset+S-1 fit int64, "
                             f"got {position_offset}")
    elif positions is not None:
        check_tensor("positions", positions, dtypes=(torch.int32, torch.int64), ndim=(1, 2))
        expected = (seqlen,) if positions.dim() == 1 else (batch, seqlen)
        if tuple(positions.shape) != expected:
            raise ValueError(f"positions: expected shape (S,) = ({seqlen},) or (B, S) = ({batch}, {seqlen}), got {tuple(positions.shape)}")
        check_same_device(q=q, positions=positions)

    if inv_freq is None:
        theta = check_real("theta", theta, above=1)
        dtype = torch.float64 if precise else torch.float32
        if torch.compiler.is_compiling():
            inv_freq = rope_inv_freq(head_dim, theta, dtype=dtype, device=q.device)
        else:
            inv_freq = _cached_inv_freq(head_dim, theta, dtype, q.device)
    else:
        check_inv_freq(inv_freq, head_dim, q)
        if precise and inv_freq.dtype != torch.float64:
            raise TypeError("inv_freq: precise=True needs float64 inv_freq, e.g. rope_inv_freq(..., dtype=torch.float64)")
    inv_freq = inv_freq.contiguous()

    backend = resolve_backend(q, backend, "rope")
    args = (positions, position_offset, inv_freq, check_real("attention_factor", attention_factor), bool(interleaved),
            False, backend)
    if inplace:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            raise ValueError("inplace: in-place RoPE has no autograd; q or k requires grad, use inplace=False")
        check_no_self_overlap("q", q)
        check_no_self_overlap("k", k)
        torch.ops.llama_kernels.rope_(q, k, *args)
        return q, k
    q_out, k_out = torch.ops.llama_kernels.rope(q, k, *args)
    return q_out, k_out
