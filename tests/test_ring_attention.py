"""Ring attention over gloo, several processes on loopback, against single-process flash attention.

Each spawn runs every case in its workers (one process start per world size): the
whole-sequence flash_attention and reference, seeded alike on every rank, give the
oracle; each rank compares its shard of o and of dq, dk, dv. A worker's failure
raises in torch.multiprocessing.spawn, and so in the test.
"""

import datetime
import os
import sys
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llama_kernels import _native, flash_attention, reference
from llama_kernels.distributed import positions, ring_attention, shard, unshard, unshard_shards
from llama_kernels.distributed.ring import step_plan

SPAWN_TIMEOUT_S = 120  # each spawn's bound; the workers' gloo collectives time out at 60 s

TOL = dict(atol=2e-5, rtol=2e-5)




def _case(rank, world, *, causal, layout, n_kv_heads, backend, seqlen, batch=1, n_heads=4, head_dim=64,
          dtype=torch.float32):
    tol = TOL if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    gen = torch.Generator().manual_seed(1234)
    q = torch.randn(batch, seqlen, n_heads, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, seqlen, n_kv_heads, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, seqlen, n_kv_heads, head_dim, generator=gen, dtype=dtype)
    do = torch.randn(batch, seqlen, n_heads, head_dim, generator=gen, dtype=dtype)
    dlse = torch.randn(batch, n_heads, seqlen, generator=gen)

    # the oracle: one process over the whole sequence (flash_attention, and the reference)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref, lse_ref = flash_attention(*full, causal=causal, return_lse=True, backend="reference")
    torch.autograd.backward((o_ref, lse_ref), (do, dlse))
    o_naive = reference.attention(q, k, v, causal)
    torch.testing.assert_close(o_ref, o_naive, **tol)

    def sh(t, dim=1):
        return shard(t, dim, rank, world, layout)

    local = [sh(t).requires_grad_() for t in (q, k, v)]
    o, lse = ring_attention(*local, causal=causal, layout=layout, return_lse=True, backend=backend)
    torch.autograd.backward((o, lse), (sh(do), sh(dlse, 2)))
    what = f"rank {rank}/{world} causal={causal} layout={layout} Hk={n_kv_heads} backend={backend}"
    torch.testing.assert_close(o, sh(o_ref.detach()), **tol, msg=lambda m: f"o, {what}: {m}")
    torch.testing.assert_close(lse, sh(lse_ref.detach(), 2), **tol, msg=lambda m: f"lse, {what}: {m}")
    for name, mine, theirs in zip("qkv", local, full):
        torch.testing.assert_close(mine.grad, sh(theirs.grad), **tol, msg=lambda m: f"d{name}, {what}: {m}")
    # and the gathered output is the whole one
    torch.testing.assert_close(unshard(o.detach(), 1, world, layout), o_ref.detach(), **tol)
    # o alone (no lse gradient) through the default flash_attention API as a loss
    local = [sh(t).requires_grad_() for t in (q, k, v)]
    (ring_attention(*local, causal=causal, layout=layout, backend=backend) * sh(do)).sum().backward()
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    (flash_attention(*full, causal=causal, backend="reference") * do).sum().backward()
    for name, mine, theirs in zip("qkv", local, full):
        torch.testing.assert_close(mine.grad, sh(theirs.grad), **tol, msg=lambda m: f"d{name} (o only), {what}: {m}")


def _errors(rank, world):
    q = torch.randn(1, 6, 4, 64)
    k = torch.randn(1, 6, 2, 64)
    # zigzag needs an even local length
    with pytest.raises(ValueError, match="q_local"):
        ring_attention(q[:, :5], k[:, :5], k[:, :5], layout="zigzag", backend="reference")
    with pytest.raises(ValueError, match="x"):
        shard(torch.randn(1, 6 * world + 1, 4, 64), 1, rank, world, "contiguous")
    with pytest.raises(ValueError, match="layout"):
        ring_attention(q, k, k, layout="striped", backend="reference")
    with pytest.raises(ValueError, match="k_local"):
        ring_attention(q, k[:, :4], k[:, :4], layout="zigzag", backend="reference")
    # ranks disagree on shapes: every rank raises, none hangs
    n = 4 if rank == 0 else 8
    with pytest.raises(ValueError, match="disagree"):
        ring_attention(q[:, :n], k[:, :n], k[:, :n], layout="zigzag", backend="reference")
    with pytest.raises(ValueError, match="disagree"):
        ring_attention(q, k if rank else k[..., :1, :], k if rank else k[..., :1, :], layout="contiguous",
                       backend="reference")


def _worker(rank, world, rendezvous_file, cases, run_errors):
    torch.set_num_threads(1)
    # A file rendezvous, not a TCP port: a free port picked by the parent can be taken before rank 0 binds it.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for case in cases:
            _case(rank, world, **case)
        if run_errors:
            _errors(rank, world)
    except BaseException:
        traceback.print_exc()
        dist.destroy_process_group()
        raise
    _exit_cleanly()


def _exit_cleanly():
    """After every check passed: meet at a barrier, then leave without tearing the group down. gloo's teardown
    races a peer that has already exited (one CI run: 'terminate called without an active exception', SIGABRT,
    after all its checks), which says nothing about the ring."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(world, cases, run_errors=False):
    _spawn_workers(_worker, world, cases, run_errors)


def _spawn_workers(worker, world, *args):
    """Run worker(rank, world, rendezvous_file, *args) on each rank; a worker's exception raises here; past the
    bound, every worker is killed."""
    rendezvous_file = os.path.join(tempfile.mkdtemp(prefix="ring-attention-"), "rendezvous")
    context = mp.spawn(worker, args=(world, rendezvous_file, *args), nprocs=world, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"workers ({world} ranks) still running after {SPAWN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=5)


def _grid(seqlen, backends):
    return [dict(causal=causal, layout=layout, n_kv_heads=n_kv, backend=backend, seqlen=seqlen)
            for backend in backends for layout in ("contiguous", "zigzag") for causal in (True, False)
            for n_kv in (2, 1)]


@pytest.mark.parametrize("world", [2, 4])
def test_ring_matches_single_process(world):
    native = _native.available("cpu")
    cases = _grid(16 * world, ("reference", "native") if native else ("reference",))
    cases.append(dict(causal=True, layout="zigzag", n_kv_heads=2, backend="reference", seqlen=16 * world, batch=2))
    cases.append(dict(causal=True, layout="zigzag", n_kv_heads=1, backend="native" if native else "reference",
                      seqlen=16 * world, dtype=torch.bfloat16))
    _spawn(world, cases, run_errors=(world == 2))


def test_ring_triton_interpreter():
    """The Triton kernels' backward, given the merged o and lse (the GPU path), under the interpreter."""
    from llama_kernels.ops import _triton
    if not _triton.INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1")
    _spawn(2, [dict(causal=causal, layout="zigzag", n_kv_heads=2, backend="triton", seqlen=32)
               for causal in (True, False)])


# ---------------------------------------------------------------- single-process: layouts and plans
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_positions_roundtrip(layout, world):
    x = torch.arange(24 * world).reshape(1, 24 * world, 1)
    shards = [shard(x, 1, r, world, layout) for r in range(world)]
    assert torch.equal(unshard_shards(shards, 1, layout), x)
    for r, s in enumerate(shards):
        assert torch.equal(positions(s.shape[1], r, world, layout), s[0, :, 0])
    assert torch.equal(positions(24, 0, world, layout, offset=5), shards[0][0, :, 0] + 5)


def test_zigzag_balanced_and_exact():
    """The zigzag plan covers exactly the causal pairs, with the same work on every rank."""
    for world in (2, 3, 4):
        seqlen_local = 4 * 2
        seen = torch.zeros(seqlen_local * world, seqlen_local * world, dtype=torch.int64)
        work = []
        for rank in range(world):
            pos_q = positions(seqlen_local, rank, world, "zigzag")
            total = 0
            for step in range(world):
                src = (rank - step) % world
                pos_k = positions(seqlen_local, src, world, "zigzag")
                plan = step_plan(rank, src, seqlen_local, True, "zigzag")
                if plan is None:
                    continue
                rows, cols, block_causal = plan
                pq, pk = pos_q[rows], pos_k[cols]
                visible = pk[None, :] <= pq[:, None]
                if block_causal:
                    mask = torch.ones_like(visible).tril()
                    assert torch.equal(visible, mask.bool())
                else:
                    assert visible.all()
                seen[pq[:, None], pk[None, :]] += visible.long()
                total += visible.numel()
            work.append(total)
        assert torch.equal(seen, torch.ones_like(seen).tril())
        assert len(set(work)) == 1


def test_errors_without_distributed():
    with pytest.raises(ValueError, match="layout"):
        shard(torch.randn(1, 8, 1), 1, 0, 2, "striped")
    with pytest.raises(ValueError, match="x"):
        shard(torch.randn(1, 6, 1), 1, 0, 2, "zigzag")
    with pytest.raises(ValueError, match="rank"):
        positions(8, 2, 2, "zigzag")
    with pytest.raises(ValueError, match="seqlen_local"):
        positions(7, 0, 2, "zigzag")


def _model_worker(rank, world, rendezvous_file, layout):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        from llama_kernels.models import CodeLlama, CodeLlamaConfig

        torch.manual_seed(0)  # the same weights, tokens and output gradient on every rank
        config = CodeLlamaConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32)
        model = CodeLlama(config, backend="reference")
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(1.0, 0.1) if name.endswith("norm.weight") else p.normal_(0.0, 0.05)
        tokens = torch.randint(0, 300, (2, 8 * world))
        grad_logits = torch.randn(2, 8 * world, 300)
        full = model(tokens)
        (full * grad_logits).sum().backward()
        want_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()

        model.set_context_parallel(layout=layout)
        local = model(shard(tokens, 1, rank, world, layout))
        torch.testing.assert_close(local, shard(full, 1, rank, world, layout), atol=1e-4, rtol=1e-4)
        (local * shard(grad_logits, 1, rank, world, layout)).sum().backward()
        for name, p in model.named_parameters():  # the whole loss is the sum of the ranks' losses
            dist.all_reduce(p.grad)
            torch.testing.assert_close(p.grad, want_grads[name], atol=1e-4, rtol=1e-4, msg=f"rank {rank} {name}")
    except BaseException:
        dist.destroy_process_group()
        raise
    _exit_cleanly()


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_code_llama_context_parallel_equals_the_single_process_model(layout):
    """CodeLlama with its sequence sharded over 2 ranks: each rank's logits are its shard of the single-process
    logits, and the all-reduced parameter gradients are the single-process ones."""
    _spawn_workers(_model_worker, 2, layout)
