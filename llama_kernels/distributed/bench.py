"""Ring attention's measured overlap: the ring against the same attention blocks without communication.

    python -m llama_kernels.distributed.bench [--seqlen 4096] [--heads 32/8] [--head-dim 128]
        [--layout zigzag] [--causal] [--dtype bfloat16] [--backward] [--reps 5] [--world N] [--json PATH]
    torchrun --nproc-per-node 8 -m llama_kernels.distributed.bench --causal --backward

Under torchrun (RANK and WORLD_SIZE set) it uses that process group (nccl on CUDA, gloo
on CPU); otherwise it spawns ``--world`` local CPU processes over gloo (a file rendezvous).
``--seqlen`` is the whole sequence; each rank holds ``seqlen / world`` tokens.

Per rank it times ``ring_attention`` (the forward; with ``--backward`` also forward plus
backward) on random local shards, and "compute": the identical sequence of per-step
flash attention blocks (the ring's own ``step_plan``) and log-sum-exp merges (and, backward, the
block gradients and accumulations) on locally generated key/value blocks of the same
shapes, with no send or receive. Each figure is the median of ``--reps`` after one warm-up,
a barrier before and after each timed call (CUDA-synchronized on GPU). Overlap efficiency
= t_compute / t_ring: 1 means the transfers are hidden completely. The "max" row takes the
slowest rank's times (the ring waits for it). Bandwidths: bytes this rank sends per call
over t_ring (what the ring sustained), and over t_compute (what the link must sustain to
hide the transfers behind the blocks).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..ops._backend import resolve_backend
from ..ops._shared import resolve_softmax_scale
from .ring import attend_step, gradient_step, ring_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PASSES = ("fwd", "fwd_bwd")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llama_kernels.distributed.bench", description=__doc__.split("\n")[0])
    p.add_argument("--seqlen", type=int, default=4096, help="the whole sequence length (over all ranks)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", default="32/8", help="query heads / key-value heads, e.g. 32/8")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layout", default="zigzag", choices=("contiguous", "zigzag"))
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--backward", action="store_true", help="also time forward + backward")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--world", type=int, default=2, help="local gloo processes to spawn (without torchrun)")
    p.add_argument("--backend", default=None, help="flash attention backend of every block (default: its default)")
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)
    try:
        hq, hk = (int(x) for x in args.heads.split("/"))
    except ValueError:
        p.error(f"--heads: expected Hq/Hk, e.g. 32/8, got {args.heads!r}")
    if hk < 1 or hq % hk:
        p.error(f"--heads: Hk must divide Hq, got {args.heads!r}")
    args.n_heads, args.n_kv_heads = hq, hk
    if args.reps < 1 or args.world < 1:
        p.error("--reps and --world must be positive")
    return args


# --------------------------------------------------------------------------- the blocks without communication
def _compute_forward(q, kv_blocks, rank, world, causal, scale, layout, backend):
    """ring's forward with kv_blocks[step] in place of the block received at each step."""
    batch, seqlen, n_heads, head_dim = q.shape
    o_acc = q.new_zeros((batch, seqlen, n_heads, head_dim), dtype=torch.float32)
    lse_acc = q.new_full((batch, n_heads, seqlen), float("-inf"), dtype=torch.float32)
    for step in range(world):
        attend_step(q, kv_blocks[step], rank, (rank - step) % world, causal, scale, layout, backend, o_acc, lse_acc)
    return o_acc.to(q.dtype), lse_acc


def _compute_backward(do, q, o, lse, kv_blocks, rank, world, causal, scale, layout, backend):
    """ring's backward with kv_blocks[step] in place of the received blocks and zeros for the travelling dk/dv."""
    dlse = torch.zeros_like(lse)
    dq = torch.zeros_like(q, dtype=torch.float32)
    incoming = torch.zeros_like(kv_blocks[0], dtype=torch.float32)  # stands for the accumulator received
    for step in range(world):
        block = gradient_step(do, q, o, lse, dlse, kv_blocks[step], rank, (rank - step) % world, causal, scale,
                               layout, backend, dq)
        if step:
            block += incoming
    return dq.to(q.dtype), block[0].to(q.dtype), block[1].to(q.dtype)


# --------------------------------------------------------------------------- timing
def _timed(fn, reps, device) -> float:
    """Median seconds of fn() over reps, after one warm-up, each between barriers."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    times = []
    for _ in range(reps):
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        dist.barrier()
    return statistics.median(times)


def run_rank(args, rank: int, world: int, device: torch.device) -> dict | None:
    """Measure on this rank (the process group initialized); rank 0 gets the result, the others None."""
    dtype = DTYPES[args.dtype]
    n_chunks = world if args.layout == "contiguous" else 2 * world
    if args.seqlen % n_chunks:
        raise ValueError(f"--seqlen {args.seqlen} must divide into {n_chunks} chunks ({args.layout}, {world} ranks)")
    s_local = args.seqlen // world
    gen = torch.Generator(device=device).manual_seed(1000 + rank)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    b, hq, hk, d = args.batch, args.n_heads, args.n_kv_heads, args.head_dim
    q, k, v, do = rand(b, s_local, hq, d), rand(b, s_local, hk, d), rand(b, s_local, hk, d), rand(b, s_local, hq, d)
    backend = resolve_backend(q, args.backend, "flash_attention")
    scale = resolve_softmax_scale(None, d)
    kv_blocks = [torch.stack([k, v])] + [torch.stack([rand(b, s_local, hk, d), rand(b, s_local, hk, d)])
                                         for _ in range(world - 1)]
    ring_attention(q, k, v, causal=args.causal, layout=args.layout, backend=backend)  # checks the shapes agree once

    def ring_fwd():
        with torch.no_grad():
            ring_attention(q, k, v, causal=args.causal, layout=args.layout, check_shapes=False, backend=backend)

    def ring_fwd_bwd():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o = ring_attention(*leaves, causal=args.causal, layout=args.layout, check_shapes=False, backend=backend)
        o.backward(do)

    def compute_fwd():
        with torch.no_grad():
            return _compute_forward(q, kv_blocks, rank, world, args.causal, scale, args.layout, backend)

    def compute_fwd_bwd():
        with torch.no_grad():
            o, lse = compute_fwd()
            _compute_backward(do, q, o, lse, kv_blocks, rank, world, args.causal, scale, args.layout, backend)

    kv_bytes = 2 * b * s_local * hk * d * dtype.itemsize  # k and v of one block: one ring message
    acc_bytes = 2 * b * s_local * hk * d * 4  # the fp32 dk/dv accumulator travelling in the backward
    sent = {"fwd": (world - 1) * kv_bytes, "fwd_bwd": 2 * (world - 1) * kv_bytes + world * acc_bytes}
    timings = {"fwd": (_timed(ring_fwd, args.reps, device), _timed(compute_fwd, args.reps, device))}
    if args.backward:
        timings["fwd_bwd"] = (_timed(ring_fwd_bwd, args.reps, device), _timed(compute_fwd_bwd, args.reps, device))

    mine = torch.tensor([x for p in PASSES for x in timings.get(p, (0.0, 0.0))], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    if rank:
        return None
    per_rank = [g.tolist() for g in gathered]
    result = {
        "config": {"seqlen": args.seqlen, "seqlen_local": s_local, "batch": b, "n_heads": hq, "n_kv_heads": hk,
                   "head_dim": d, "layout": args.layout, "causal": args.causal, "dtype": args.dtype,
                   "reps": args.reps, "world": world, "backend": backend, "device": str(device),
                   "process_group": dist.get_backend()},
        "bytes_per_step": {"kv": kv_bytes, "dkv_accumulator": acc_bytes},
        "passes": {},
    }
    for i, name in enumerate(PASSES):
        if name not in timings:
            continue
        rows = []
        for r, vals in enumerate(per_rank):
            t_ring, t_compute = vals[2 * i], vals[2 * i + 1]
            rows.append(_row(str(r), t_ring, t_compute, sent[name]))
        t_ring = max(row["t_ring_s"] for row in rows)
        t_compute = max(row["t_compute_s"] for row in rows)
        result["passes"][name] = {"bytes_sent_per_rank": sent[name], "ranks": rows,
                                  "max": _row("max", t_ring, t_compute, sent[name])}
    return result


def _row(rank: str, t_ring: float, t_compute: float, sent: int) -> dict:
    return {"rank": rank, "t_ring_s": t_ring, "t_compute_s": t_compute,
            "efficiency": t_compute / t_ring if t_ring > 0 else math.nan,
            "gbps_sustained": sent / t_ring / 1e9 if t_ring > 0 else math.nan,
            "gbps_to_hide": sent / t_compute / 1e9 if t_compute > 0 else math.nan}


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"ring attention overlap: S={c['seqlen']} ({c['seqlen_local']}/rank) B={c['batch']} "
             f"H={c['n_heads']}/{c['n_kv_heads']} D={c['head_dim']} {c['layout']} causal={c['causal']} "
             f"{c['dtype']} backend={c['backend']} world={c['world']} ({c['process_group']}, {c['device']})",
             f"k+v per step: {result['bytes_per_step']['kv'] / 2**20:.2f} MiB"
             f"  (backward also dk/dv fp32: {result['bytes_per_step']['dkv_accumulator'] / 2**20:.2f} MiB)"]
    if c["device"] == "cpu":
        lines.append("CPU FIGURES: gloo over loopback on shared cores, not a GPU interconnect")
    header = f"{'pass':8} {'rank':>5} {'t_ring ms':>10} {'t_compute ms':>13} {'efficiency':>11} " \
             f"{'GB/s sust.':>11} {'GB/s to hide':>13}"
    lines.append(header)
    for name, p in result["passes"].items():
        for row in p["ranks"] + [p["max"]]:
            lines.append(f"{name:8} {row['rank']:>5} {row['t_ring_s'] * 1e3:10.3f} {row['t_compute_s'] * 1e3:13.3f} "
                         f"{row['efficiency']:11.3f} {row['gbps_sustained']:11.3f} {row['gbps_to_hide']:13.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- launching
def _spawned(rank, world, rendezvous_file, args, out_path):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{rendezvous_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        result = run_rank(args, rank, world, torch.device("cpu"))
        if result is not None:
            with open(out_path, "w") as f:
                json.dump(result, f)
    except BaseException:
        dist.destroy_process_group()
        raise
    # Done: meet, then leave without tearing the group down. gloo's teardown can race a peer that has already
    # exited ("terminate called without an active exception", SIGABRT) and fail a run whose work is complete.
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def _finish(result: dict, args) -> dict:
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv=None) -> dict | None:
    """Run the benchmark; returns the result on rank 0 (and in the launching process), None on other ranks."""
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        cuda = torch.cuda.is_available()
        if cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        dist.init_process_group("nccl" if cuda else "gloo")
        try:
            result = run_rank(args, dist.get_rank(), dist.get_world_size(), device)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return _finish(result, args) if result is not None else None
    tmp = tempfile.mkdtemp(prefix="ring-bench-")
    out_path = os.path.join(tmp, "result.json")
    mp.spawn(_spawned, args=(args.world, os.path.join(tmp, "rendezvous"), args, out_path), nprocs=args.world)
    with open(out_path) as f:
        return _finish(json.load(f), args)


if __name__ == "__main__":
    main(sys.argv[1:])
