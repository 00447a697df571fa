"""Context-parallel (ring) attention over torch.distributed.

Each rank of a process group holds a shard of the sequence: q, k, v of shape
(B, S / world, H, D). The key/value shards travel around the ring (rank r sends to
r + 1 and receives from r - 1) with point-to-point operations; at step i rank r
attends its queries to the key/value block that started on rank (r - i) mod world,
while the transfer of the next block is in flight. Partial outputs merge by
log-sum-exp in fp32.

Layouts (how the global sequence is cut into the ranks' shards):
    "contiguous": world chunks, rank r holds chunk r. Causal work is unbalanced (rank
        world - 1 attends to every block, rank 0 to one).
    "zigzag": 2 * world chunks, rank r holds chunks r and 2 * world - 1 - r (one early,
        one late), so under a causal mask every rank does the same work: at step 0 a
        causal block over its own shard, then per step either its whole shard of queries
        against the first half of the received keys (the block came from an earlier rank)
        or the second half of its queries against all the received keys (a later rank),
        half a shard-by-shard block each time.

Backward: ``_RingAttention`` is an autograd.Function. Its forward saves only this rank's
q, k, v, the merged o and the lse (memory O(S / world), as one flash attention call), and
its backward runs the ring again: the key/value blocks travel as in the forward, and a
fp32 accumulator of their dk/dv travels with each block, returning to its owner after a
full turn (world - 1 key/value transfers plus world transfers of the accumulators). A
block's gradient is the flash backward with the global o and lse (the Triton kernels take
them as given); the other backends recompute their own statistics, so they get the
chain rule through the merge instead (do_i = w_i do, dlse_i = w_i (rowsum(do (o_i - o)) +
dlse), w_i = exp(lse_i - lse)), which costs one block forward more per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops._shared import check_qkv, resolve_softmax_scale
from ..ops._backend import resolve_backend

LAYOUTS = ("contiguous", "zigzag")


# --------------------------------------------------------------------------- layouts
def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def _n_chunks(world_size: int, layout: str) -> int:
    return world_size if layout == "contiguous" else 2 * world_size


def _check_world(rank: int | None, world_size: int) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size):
        raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank!r}")


def _chunk_ids(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    return (rank,) if layout == "contiguous" else (rank, 2 * world_size - 1 - rank)


def shard(x: Tensor, dim: int, rank: int, world_size: int, layout: str = "zigzag") -> Tensor:
    """This rank's shard of a whole sequence x along dim (a new contiguous tensor).

    contiguous: chunk ``rank`` of ``world_size``; zigzag: chunks ``rank`` and
    ``2 * world_size - 1 - rank`` of ``2 * world_size``, concatenated.
    """
    _check_layout(layout)
    _check_world(rank, world_size)
    n = _n_chunks(world_size, layout)
    length = x.shape[dim]
    if length % n:
        raise ValueError(f"x: the sequence length {length} (dim {dim}) must divide into {n} chunks for the "
                         f"{layout!r} layout over {world_size} ranks")
    chunks = x.chunk(n, dim=dim)
    return torch.cat([chunks[c] for c in _chunk_ids(rank, world_size, layout)], dim=dim).contiguous()


def unshard_shards(shards: list[Tensor], dim: int, layout: str = "zigzag") -> Tensor:
    """The whole sequence from every rank's shard (shards[r] is rank r's), the inverse of ``shard``."""
    _check_layout(layout)
    if layout == "contiguous":
        return torch.cat(shards, dim=dim)
    halves = [s.chunk(2, dim=dim) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim=dim)


def unshard(x_local: Tensor, dim: int, world_size: int, layout: str = "zigzag", group=None) -> Tensor:
    """Gather every rank's shard (all_gather over ``group``) and put the whole sequence back in order.

    Not differentiable (a plain all_gather): for evaluation, logging and tests.
    """
    _check_layout(layout)
    _check_world(None, world_size)
    group_size = dist.get_world_size(group)
    if group_size != world_size:
        raise ValueError(f"world_size: expected the group's size {group_size}, got {world_size}")
    if layout == "zigzag" and x_local.shape[dim] % 2:
        raise ValueError(f"x_local: the zigzag layout needs an even local length, got {x_local.shape[dim]} (dim {dim})")
    x_local = x_local.contiguous()
    shards = [torch.empty_like(x_local) for _ in range(world_size)]
    dist.all_gather(shards, x_local, group=group)
    return unshard_shards(shards, dim, layout)


def positions(seqlen_local: int, rank: int, world_size: int, layout: str = "zigzag", *, offset: int = 0,
              device=None) -> Tensor:
    """Global position (int64, shape (seqlen_local,)) of each token of this rank's shard, for RoPE.

    offset: the position of the whole sequence's first token.
    """
    _check_layout(layout)
    _check_world(rank, world_size)
    if not isinstance(seqlen_local, int) or isinstance(seqlen_local, bool) or seqlen_local < 0:
        raise ValueError(f"seqlen_local: expected a non-negative int, got {seqlen_local!r}")
    per_rank = _n_chunks(world_size, layout) // world_size
    if seqlen_local % per_rank:
        raise ValueError(f"seqlen_local: the {layout!r} layout holds {per_rank} chunks per rank, so the local "
                         f"length must divide by {per_rank}, got {seqlen_local}")
    chunk = seqlen_local // per_rank
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device)
                      for c in _chunk_ids(rank, world_size, layout)]) + offset


# --------------------------------------------------------------------------- the blocks
def step_plan(rank: int, src: int, seqlen: int, causal: bool, layout: str):
    """(q rows, k rows, causal) of the block rank attends with src's keys, or None (nothing visible)."""
    everything = slice(0, seqlen)
    if not causal:
        return everything, everything, False
    if src == rank:
        return everything, everything, True  # the local sequence in order: the plain causal mask is right
    half = seqlen // 2
    if layout == "contiguous":
        return (everything, everything, False) if src < rank else None
    # zigzag: an earlier rank's first chunk precedes both of ours, its second follows both;
    # a later rank's chunks both lie between our first and our second.
    return (everything, slice(0, half), False) if src < rank else (slice(half, seqlen), everything, False)


def _fwd_block(q, k, v, causal, scale, backend):
    return torch.ops.llama_kernels.flash_attention_forward(q, k, v, None, None, 0, 0, causal, scale, True, backend)


def _bwd_block(do, q, k, v, o, lse, dlse, causal, scale, backend):
    """(dq, dk, dv) of one block given the merged o and lse and their gradients (see the module's docstring)."""
    if backend == "triton":  # the kernels read P = exp(s - lse) and delta = rowsum(do o) - dlse as given
        return torch.ops.llama_kernels.flash_attention_backward(
            do, q, k, v, o, lse, dlse, None, None, 0, 0, causal, scale, True, backend)
    o_i, lse_i = _fwd_block(q, k, v, causal, scale, backend)
    w = torch.exp(lse_i - lse).nan_to_num_(0.0)  # (B, H, S); -inf - -inf: a row seeing nothing at all
    w_rows = w.transpose(1, 2)[..., None]  # (B, S, H, 1)
    do_f = do.float()
    do_i = (do_f * w_rows).to(do.dtype)
    dlse_i = w * ((do_f * (o_i.float() - o.float())).sum(-1).transpose(1, 2) + dlse)
    return torch.ops.llama_kernels.flash_attention_backward(
        do_i.contiguous(), q, k, v, o_i, lse_i, dlse_i.contiguous(), None, None, 0, 0, causal, scale, True,
        backend)


def attend_step(q, kv, rank, src, causal, scale, layout, backend, o_acc: Tensor, lse_acc: Tensor) -> None:
    """One forward step: q against kv = stack(k, v), the block that started on rank src, merged into o_acc, lse_acc."""
    plan = step_plan(rank, src, q.shape[1], causal, layout)
    if plan is not None:
        rows, cols, block_causal = plan
        o_i, lse_i = _fwd_block(q[:, rows].contiguous(), kv[0][:, cols].contiguous(), kv[1][:, cols].contiguous(),
                                block_causal, scale, backend)
        _merge(o_acc, lse_acc, o_i, lse_i, rows)


def gradient_step(do, q, o, lse, dlse, kv, rank, src, causal, scale, layout, backend, dq: Tensor) -> Tensor:
    """One backward step: adds this block's dq into dq (fp32) and returns its fp32 stack(dk, dv)."""
    block = torch.zeros_like(kv, dtype=torch.float32)
    plan = step_plan(rank, src, q.shape[1], causal, layout)
    if plan is not None:
        rows, cols, block_causal = plan
        dq_i, dk_i, dv_i = _bwd_block(
            do[:, rows].contiguous(), q[:, rows].contiguous(), kv[0][:, cols].contiguous(),
            kv[1][:, cols].contiguous(), o[:, rows].contiguous(), lse[..., rows].contiguous(),
            dlse[..., rows].contiguous(), block_causal, scale, backend)
        dq[:, rows] += dq_i.float()
        block[0][:, cols] += dk_i.float()
        block[1][:, cols] += dv_i.float()
    return block


def _merge(o_acc: Tensor, lse_acc: Tensor, o_i: Tensor, lse_i: Tensor, rows: slice) -> None:
    """o_acc[:, rows], lse_acc[..., rows] (fp32, in place) merged with a block's (o_i, lse_i) by log-sum-exp."""
    o_old, lse_old = o_acc[:, rows], lse_acc[..., rows]
    lse_new = torch.logaddexp(lse_old, lse_i)
    ref = torch.where(torch.isinf(lse_new), torch.zeros_like(lse_new), lse_new)  # both -inf: weights 0, not NaN
    w_old = torch.exp(lse_old - ref).transpose(1, 2)[..., None]
    w_new = torch.exp(lse_i - ref).transpose(1, 2)[..., None]
    o_acc[:, rows] = o_old * w_old + o_i.float() * w_new
    lse_acc[..., rows] = lse_new


# --------------------------------------------------------------------------- communication
class _Ring:
    """Send to the next rank and receive from the previous one, asynchronously, in one group."""

    def __init__(self, group):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.next, self.prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world

    def start(self, send: Tensor, tag: int = 0) -> tuple[Tensor, list]:
        """Post the send of ``send`` and the receive of its like; returns (receive buffer, requests)."""
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, group=self.group, group_peer=self.next, tag=tag),
               dist.P2POp(dist.irecv, recv, group=self.group, group_peer=self.prev, tag=tag)]
        return recv, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(requests: list) -> None:
        for req in requests:
            req.wait()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, layout, backend):
        ring = _Ring(group)
        batch, seqlen, n_heads, head_dim = q.shape
        o_acc = q.new_zeros((batch, seqlen, n_heads, head_dim), dtype=torch.float32)
        lse_acc = q.new_full((batch, n_heads, seqlen), float("-inf"), dtype=torch.float32)
        kv = torch.stack([k, v])  # one message per step; GQA: Hk heads, never expanded
        for step in range(ring.world):
            pending = ring.start(kv) if step + 1 < ring.world else None  # the next block, during this one
            attend_step(q, kv, ring.rank, (ring.rank - step) % ring.world, causal, scale, layout, backend,
                         o_acc, lse_acc)
            if pending is not None:
                kv, requests = pending
                _Ring.wait(requests)
        o = o_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse_acc)
        ctx.args = (group, causal, scale, layout, backend)
        return o, lse_acc

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        group, causal, scale, layout, backend = ctx.args
        ring = _Ring(group)
        do = do.contiguous() if do is not None else torch.zeros_like(o)
        dlse = dlse.float().contiguous() if dlse is not None else torch.zeros_like(lse)
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = torch.stack([k, v])
        dkv_pending = None  # the accumulator of the block this rank holds, on its way here
        for step in range(ring.world):
            pending = ring.start(kv) if step + 1 < ring.world else None
            block = gradient_step(do, q, o, lse, dlse, kv, ring.rank, (ring.rank - step) % ring.world, causal,
                                   scale, layout, backend, dq)
            if dkv_pending is not None:
                dkv, requests = dkv_pending
                _Ring.wait(requests)
                block += dkv
            dkv_pending = ring.start(block, tag=1)  # on to the next rank, which holds this block at the next step
            if pending is not None:
                kv, requests = pending
                _Ring.wait(requests)
        dkv, requests = dkv_pending  # after a full turn: this rank's own block, every rank's share summed
        _Ring.wait(requests)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def _check_shapes_agree(q: Tensor, k: Tensor, group, world: int) -> None:
    """All ranks hold the same shapes and dtype (one all_gather of a few ints; a host sync)."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    mine = [*q.shape, *k.shape, dtypes.index(q.dtype) if q.dtype in dtypes else -1]
    local = torch.tensor(mine, dtype=torch.int64, device=q.device)  # NCCL: a CUDA tensor, as q
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    rows = [tuple(t.tolist()) for t in gathered]
    if any(r != rows[0] for r in rows):
        described = "; ".join(f"rank {i}: q {r[:4]}, k {r[4:8]}, dtype {dtypes[r[8]] if r[8] >= 0 else '?'}"
                              for i, r in enumerate(rows))
        raise ValueError(f"q: the ranks disagree on shapes or dtype ({described})")


def ring_attention(
    q_local: Tensor, k_local: Tensor, v_local: Tensor, group=None, causal: bool = True,
    softmax_scale: float | None = None, layout: str = "zigzag", *, return_lse: bool = False,
    check_shapes: bool = True, backend: str | None = None,
):
    """Context-parallel attention: this rank's shard of flash_attention over the whole sequence.

    q_local: (B, S / world, Hq, D); k_local, v_local: (B, S / world, Hk, D), Hk dividing Hq
        (GQA: k and v travel with Hk heads). Each rank holds the shard ``shard(x, 1, rank,
        world, layout)`` of the whole tensors; the result is the same shard of the output.
    group: the process group of the context-parallel ranks (default: the world).
    causal: the causal mask over global positions (self-attention: the same positions for q and k).
    layout: "zigzag" (balanced causal work; S divides into 2 * world chunks) or "contiguous".
    return_lse: also return this shard's lse (B, Hq, S / world), fp32 (differentiable).
    check_shapes: all_gather the shapes once per call to check that the ranks agree (a host
        sync; turn off in a loop once the shapes are known to agree).
    backend: the flash attention backend of every block (None: flash_attention's default).
    Returns o (B, S / world, Hq, D), or (o, lse). Differentiable in q, k and v.
    """
    check_qkv(q_local, k_local, v_local, ndim=4)
    _check_layout(layout)
    if k_local.shape[1] != q_local.shape[1]:
        raise ValueError(f"k_local: expected q_local's local length {q_local.shape[1]} (self-attention over one "
                         f"sharded sequence), got {k_local.shape[1]}")
    scale = resolve_softmax_scale(softmax_scale, q_local.shape[-1])
    backend = resolve_backend(q_local, backend, "flash_attention")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_attention: torch.distributed is not initialized (init_process_group first)")
    world = dist.get_world_size(group)
    seqlen = q_local.shape[1]
    if layout == "zigzag" and seqlen % 2:
        raise ValueError(f"q_local: the zigzag layout cuts the sequence into 2 * world = {2 * world} chunks, so "
                         f"the local length must be even, got {seqlen}")
    if check_shapes and world > 1:
        _check_shapes_agree(q_local, k_local, group, world)
    o, lse = _RingAttention.apply(q_local, k_local, v_local, group, bool(causal), scale, layout, backend)
    return (o, lse) if return_lse else o
