"""A paged KV cache: per layer one pool of fixed-size blocks, lent to sequences as they grow.

A contiguous ``KVCache`` reserves ``max_seq_len`` slots for every sequence, so a batch of mixed lengths holds
mostly empty slots. Here each layer's keys and values are a pool (num_blocks, block_size, Hk, D), and a sequence
owns a list of blocks: its position p lives at [blocks[p // block_size], p % block_size], FlashAttention-2's
layout, which ``flash_attention_with_kvcache(..., block_table=...)`` reads. Sequences join (``allocate``), grow
(``extend``, or a forward's ``reserve``) and leave (``free``) between steps, and ``set_batch`` chooses which of them
the next forwards run over, one row of tokens each: the building block of continuous batching.

    cache = model.new_paged_cache(num_blocks=256, block_size=16)
    a = cache.allocate()                   # a new, empty sequence
    cache.set_batch([a])
    logits = model(prompt_a, cache=cache)  # its prefill: pages are taken as the tokens need them
    b = cache.allocate()
    cache.set_batch([b]); model(prompt_b, cache=cache)
    cache.set_batch([a, b])                # b joins: one token each per step from here
    cache.set_batch([b]); cache.free(a)    # a leaves: its blocks go back to the pool
    cache.set_batch([]); cache.free(b)

All bookkeeping (block lists, lengths) is on the host, so a step reads nothing from the device. The tensors the
kernel takes live in buffers sized for ``max_batch_size`` sequences: a batch of B uses their first B rows, so their
storage never moves and a step captured in a CUDA graph for batch size B stays valid as the batch changes. The
host writes a table entry when it hands a sequence a block; the device advances ``seqlens`` (inside the step, so
that a captured step advances it on replay), the host its own copy of the lengths (``advance``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_positive_int

BLOCK_SIZES = tuple(2**n for n in range(4, 9))  # 16 .. 256: what the kernels take


class PagedKVCache:
    """Per-layer pools ``k[i]``, ``v[i]`` (num_blocks, block_size, Hk, D) and per-sequence block lists.

    max_batch_size: the most sequences one batch (``set_batch``) holds; max_blocks_per_seq: the block table's width,
    so a sequence holds at most max_blocks_per_seq * block_size tokens (``max_seq_len``).
    ``CodeLlama.new_paged_cache`` makes one in the model's dtype and on its device.
    """

    def __init__(self, k: list[Tensor], v: list[Tensor], *, max_batch_size: int, max_blocks_per_seq: int):
        if not k or len(k) != len(v):
            raise ValueError(f"k, v: expected one pool per layer in each, got {len(k)} and {len(v)}")
        shape = tuple(k[0].shape)
        if len(shape) != 4 or shape[1] not in BLOCK_SIZES:
            raise ValueError(f"k: expected pools (num_blocks, block_size, Hk, D) with block_size in {BLOCK_SIZES}, "
                             f"got {shape}")
        for name, pools in (("k", k), ("v", v)):
            for i, pool in enumerate(pools):
                if tuple(pool.shape) != shape or pool.dtype != k[0].dtype or pool.device != k[0].device:
                    raise ValueError(f"{name}[{i}]: expected k[0]'s shape {shape}, dtype and device, got "
                                     f"{tuple(pool.shape)} {pool.dtype} on {pool.device}")
        self.k, self.v = k, v
        device = k[0].device
        self._table = torch.zeros((check_positive_int("max_batch_size", max_batch_size),
                                   check_positive_int("max_blocks_per_seq", max_blocks_per_seq)),
                                  dtype=torch.int32, device=device)
        self._seqlens = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        self._free = list(range(shape[0] - 1, -1, -1))  # pop() hands out the lowest block first
        self._blocks: dict[int, list[int]] = {}  # sequence id -> its blocks, in position order
        self._lengths: dict[int, int] = {}  # sequence id -> the tokens it holds
        self._next_id = 0
        self._batch: list[int] = []

    # ------------------------------------------------------------------ sizes
    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[1]

    @property
    def max_batch_size(self) -> int:
        return self._table.shape[0]

    @property
    def max_seq_len(self) -> int:
        return self._table.shape[1] * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        """The blocks ``tokens`` tokens fill."""
        return -(-tokens // self.block_size)

    # ------------------------------------------------------------------ sequences
    @property
    def sequences(self) -> list[int]:
        """The live sequences' ids, in the order they joined."""
        return list(self._blocks)

    def length(self, seq: int) -> int:
        return self._lengths[self._check_live(seq)]

    def blocks(self, seq: int) -> list[int]:
        return list(self._blocks[self._check_live(seq)])

    def allocate(self, tokens: int = 0) -> int:
        """A new, empty sequence with room for ``tokens`` tokens; returns its id."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens: expected an int >= 0, got {tokens!r}")
        self._check_room("tokens", f"a new sequence of {tokens} tokens", tokens, self.blocks_for(tokens))
        seq, self._next_id = self._next_id, self._next_id + 1
        self._blocks[seq], self._lengths[seq] = [], 0
        self._take(seq, self.blocks_for(tokens))
        return seq

    def extend(self, seq: int, tokens: int) -> None:
        """Room for ``tokens`` more tokens after what ``seq`` holds (blocks taken from the pool as needed)."""
        self._check_live(seq)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens: expected an int >= 0, got {tokens!r}")
        needed = self.blocks_for(self._lengths[seq] + tokens) - len(self._blocks[seq])
        self._check_room("tokens", f"{tokens} more tokens for sequence {seq}", self._lengths[seq] + tokens, needed)
        self._take(seq, needed)

    def free(self, seq: int) -> None:
        """``seq`` leaves: its blocks go back to the pool (their contents are left as they are)."""
        self._check_live(seq)
        if seq in self._batch:
            raise ValueError(f"seq: sequence {seq} is in the running batch {self._batch}; set_batch without it "
                             "first")
        self._free.extend(reversed(self._blocks.pop(seq)))
        del self._lengths[seq]

    def set_batch(self, seqs: list[int]) -> None:
        """The sequences the next forwards run over: row b of their tokens continues ``seqs[b]``."""
        seqs = list(seqs)
        if len(seqs) > self.max_batch_size or len(set(seqs)) != len(seqs):
            raise ValueError(f"seqs: expected at most max_batch_size = {self.max_batch_size} distinct live "
                             f"sequences, got {seqs}")
        for seq in seqs:
            self._check_live(seq)
        self._batch = seqs
        table = torch.zeros((len(seqs), self._table.shape[1]), dtype=torch.int32)  # entries past its blocks: unread
        for row, seq in enumerate(seqs):
            table[row, :len(self._blocks[seq])] = torch.tensor(self._blocks[seq], dtype=torch.int32)
        self._table[:len(seqs)].copy_(table)
        self._seqlens[:len(seqs)].copy_(torch.tensor([self._lengths[seq] for seq in seqs], dtype=torch.int32))

    @property
    def batch(self) -> list[int]:
        return list(self._batch)

    # ------------------------------------------------------------------ what the model reads
    @property
    def block_table(self) -> Tensor:
        """(B, max_blocks_per_seq) int32 on the pools' device: the batch's block lists, one row per sequence."""
        return self._table[:len(self._batch)]

    @property
    def seqlens(self) -> Tensor:
        """(B,) int32 on the pools' device: the tokens each sequence of the batch holds."""
        return self._seqlens[:len(self._batch)]

    @property
    def filled(self) -> int:
        """The longest sequence of the batch (host)."""
        return max(self._lengths[seq] for seq in self._batch) if self._batch else 0

    def reserve(self, tokens: int) -> None:
        """Before a forward of ``tokens`` new tokens per sequence: room for them in every sequence of the batch,
        taken all or nothing (a refusal leaves the cache as it was)."""
        if not self._batch:
            raise ValueError("cache: expected a batch of sequences to run over; call set_batch(seqs) first")
        needs = {seq: self.blocks_for(self._lengths[seq] + tokens) - len(self._blocks[seq]) for seq in self._batch}
        longest = max(self._lengths[seq] for seq in self._batch) + tokens
        self._check_room("tokens", f"{tokens} more tokens for each of sequences {self._batch}", longest,
                         sum(needs.values()))
        for seq, needed in needs.items():
            self._take(seq, needed)

    def advance(self, tokens: int) -> None:
        """After a forward: the host's lengths follow the device's (which the forward itself advanced)."""
        for seq in self._batch:
            self._lengths[seq] += tokens

    def truncate(self, lengths: list[int]) -> None:
        """Each sequence of the batch back to ``lengths[b]`` tokens (at most what it holds; its blocks are kept):
        the next tokens overwrite what followed, as after a padded prefill."""
        if len(lengths) != len(self._batch) or any(not 0 <= n <= self._lengths[seq]
                                                   for n, seq in zip(lengths, self._batch)):
            raise ValueError(f"lengths: expected one length per sequence of the batch, each at most what it holds "
                             f"({[self._lengths[seq] for seq in self._batch]}), got {lengths}")
        for n, seq in zip(lengths, self._batch):
            self._lengths[seq] = n
        self.seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))

    # ------------------------------------------------------------------ internals
    def _check_live(self, seq) -> int:
        if seq not in self._blocks:
            raise ValueError(f"seq: expected a live sequence id (one of {self.sequences}), got {seq!r}")
        return seq

    def _check_room(self, name: str, what: str, longest: int, blocks: int) -> None:
        if longest > self.max_seq_len:
            raise ValueError(f"{name}: {what} would hold {longest} tokens, past the block table's "
                             f"max_seq_len = {self.max_seq_len} (max_blocks_per_seq * block_size)")
        if blocks > len(self._free):
            raise ValueError(f"{name}: {what}: {blocks} more blocks of {self.block_size} tokens needed, but the "
                             f"pool has {len(self._free)} free of num_blocks = {self.num_blocks}; free finished "
                             f"sequences or make a larger pool")

    def _take(self, seq: int, count: int) -> None:
        """``count`` blocks from the pool onto the end of ``seq``'s list, and into its table row if it is in the
        batch (a few int32 copies to the device, only when a sequence crosses into a new block)."""
        if count <= 0:
            return
        new = [self._free.pop() for _ in range(count)]
        first = len(self._blocks[seq])
        self._blocks[seq].extend(new)
        if seq in self._batch:
            row = self._batch.index(seq)
            self._table[row, first:first + count].copy_(torch.tensor(new, dtype=torch.int32))
