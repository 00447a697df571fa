"""Context parallelism: ring attention over torch.distributed, and the sequence layouts it shards by.

    from llama_kernels.distributed import ring_attention, shard, unshard, positions
    q_local = shard(q, 1, rank, world, "zigzag")          # (B, S / world, H, D)
    pos = positions(q_local.shape[1], rank, world, "zigzag")  # global positions, for RoPE
    o_local = ring_attention(q_local, k_local, v_local, causal=True, layout="zigzag")
    o = unshard(o_local, 1, world, "zigzag")              # the whole sequence (all_gather)
"""

from .ring import LAYOUTS, positions, ring_attention, shard, unshard, unshard_shards

__all__ = ["ring_attention", "shard", "unshard", "unshard_shards", "positions", "LAYOUTS"]
