"""flash_attention_with_kvcache over a paged KV cache (block_table) against the same call over contiguous caches and
against the reference, on --device.

Each case starts from contiguous caches (test_decode's make_inputs) and copies each sequence's pages into a shared
pool in a random order, the sequences' pages interleaved, beside pages no sequence owns (poisoned with NaN) and with
the table's entries past a sequence's pages pointing outside the pool (-1 or num_blocks + 1000): a kernel that reads
or writes a page it should not shows. The paged call must then give the contiguous call's o and lse bit for bit
(same backend, same arithmetic), leave each sequence's pages holding the contiguous cache's rows afterwards (the
append included), and match the reference (test_decode's expected_o_lse).

Sizes are kept small for the interpreter (~8 ms per program and loop step): batch <= 3, <= 320 positions.
"""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import llama_kernels as lk
from llama_kernels import reference as ref
from test_decode import expected, expected_o_lse, make_inputs, rope_kwargs
from utils import check_attention_out, check_lse, kernel_backends, randn

pytestmark = pytest.mark.usefixtures("poison_outputs")

F32, BF16 = torch.float32, torch.bfloat16
I32 = torch.int32
BACKENDS = kernel_backends("flash_attention_with_kvcache")
UNOWNED_BLOCKS = 3


def page_layout(seqlens, appended, block_size, max_blocks, device):
    """(block_table, num_blocks): each sequence's ceil(L / block_size) pages at random places in the pool,
    interleaved between sequences; UNOWNED_BLOCKS pages nobody owns; entries past a sequence's pages outside the
    pool."""
    used = [-(-(length + appended) // block_size) for length in seqlens]
    num_blocks = sum(used) + UNOWNED_BLOCKS
    free = iter(torch.randperm(num_blocks).tolist())
    table = torch.empty(len(seqlens), max_blocks, dtype=I32)
    for b in range(len(seqlens)):
        table[b] = torch.tensor([-1, num_blocks + 1000] * max_blocks)[:max_blocks]
    for j in range(max(used, default=0)):  # round robin: sequence 0's page j, sequence 1's page j, ...
        for b, n in enumerate(used):
            if j < n:
                table[b, j] = next(free)
    return table.to(device), num_blocks


def to_pool(cache, block_table, num_blocks):
    """The pool (num_blocks, block_size, Hk, D) holding cache (B, max_blocks * block_size, Hk, D)'s pages at the
    table's valid entries, NaN in every other page."""
    batch, capacity, hk, d = cache.shape
    block_size = capacity // block_table.shape[1]
    pool = torch.full((num_blocks, block_size, hk, d), float("nan"), dtype=cache.dtype, device=cache.device)
    pages = cache.view(batch, block_table.shape[1], block_size, hk, d)
    owned = (block_table >= 0) & (block_table < num_blocks)
    pool[block_table[owned].long()] = pages[owned]
    return pool


def check_pool(pool, pool_before, cache_after, block_table):
    """Every owned page holds the contiguous cache's rows afterwards; every other page is bit-identical (NaN)."""
    owned = (block_table >= 0) & (block_table < pool.shape[0])
    expected_pool = pool_before.clone()
    expected_pool[block_table[owned].long()] = cache_after.view(*block_table.shape, *pool.shape[1:])[owned]
    assert torch.equal(pool.isnan(), expected_pool.isnan()), "a page outside the sequences' pages was written"
    assert torch.equal(pool.nan_to_num(), expected_pool.nan_to_num()), "the pages differ from the contiguous cache"


# --------------------------------------------------------------------------- paged = contiguous = reference
# (id, batch, block_size, max_blocks, Hq, Hk, head_dim, dtype, cache_seqlens, Sq, append, rope, num_splits)
CASES = [
    # L = 0; 31 + 1 = 32 ends on a page; 47 + 1 fills page 3 of 5.
    ("b16-ragged-0-boundary-8/2-d64-fp32-half", 3, 16, 5, 8, 2, 64, F32, [0, 31, 47], 1, True, "theta", 0),
    # 61..65 crosses a page; 128..132 opens a new one.
    ("b64-sq5-crossing-8/8-d128-bf16-interleaved", 2, 64, 3, 8, 8, 128, BF16, [61, 128], 5, True,
     "theta-interleaved", 0),
    ("b256-sq5-crossing-8/1-d64-bf16-inv_freq-splits3", 2, 256, 2, 8, 1, 64, BF16, [254, 3], 5, True, "inv_freq", 3),
    # No append: L = 0 (zeros, lse -inf), 16 (one full page), 37; RoPE on q only.
    ("b16-no-append-sq5-8/2-d128-fp32-interleaved-splits2", 3, 16, 4, 8, 2, 128, F32, [0, 16, 37], 5, False,
     "theta-interleaved", 2),
    ("b16-sq1-no-rope-8/1-d64-bf16", 2, 16, 4, 8, 1, 64, BF16, [15, 40], 1, True, None, 0),
    ("b64-sq5-8/2-d64-fp32-inv_freq-interleaved-splits7", 1, 64, 5, 8, 2, 64, F32, [250], 5, True,
     "inv_freq-interleaved", 7),
] + [
    # Every GQA ratio x head_dim x dtype, at a decode step of one sequence: 31 + 1 ends its second page.
    (f"step-8/{hk}-d{d}-{str(dtype)[6:]}", 1, 16, 2, 8, hk, d, dtype, [31], 1, True, "theta", 0)
    for hk in (8, 2, 1) for d in (64, 128) for dtype in (F32, BF16)
]


def case_id(case):
    return case[0]


def run_paged(q, k_cache, v_cache, cache_seqlens, k, v, block_table, num_blocks, backend, num_splits, kwargs):
    """The same call over contiguous caches and over their pages: both results, the caches and pools after."""
    k_pool, v_pool = to_pool(k_cache, block_table, num_blocks), to_pool(v_cache, block_table, num_blocks)
    pools_before = k_pool.clone(), v_pool.clone()
    kc, vc = k_cache.clone(), v_cache.clone()
    contiguous = lk.flash_attention_with_kvcache(q, kc, vc, cache_seqlens, k=k, v=v, num_splits=num_splits,
                                                 return_lse=True, backend=backend, **kwargs)
    paged = lk.flash_attention_with_kvcache(q, k_pool, v_pool, cache_seqlens, k=k, v=v, num_splits=num_splits,
                                            return_lse=True, backend=backend, block_table=block_table, **kwargs)
    check_pool(k_pool, pools_before[0], kc, block_table)
    check_pool(v_pool, pools_before[1], vc, block_table)
    return contiguous, paged


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_paged_matches_contiguous_and_reference(device, case, backend):
    _, batch, block_size, max_blocks, hq, hk, d, dtype, seqlens, sq, append, rope, num_splits = case
    q, k_cache, v_cache, cache_seqlens, k, v = make_inputs(batch, max_blocks * block_size, hq, hk, d, dtype, seqlens,
                                                           sq, append, device)
    block_table, num_blocks = page_layout(seqlens, sq if append else 0, block_size, max_blocks, device)
    kwargs, inv_freq, interleaved = rope_kwargs(rope, d, device)
    (o_c, lse_c), (o_p, lse_p) = run_paged(q, k_cache, v_cache, cache_seqlens, k, v, block_table, num_blocks,
                                           backend, num_splits, kwargs)
    assert torch.equal(o_p, o_c) and torch.equal(lse_p, lse_c), "paged and contiguous results differ"
    want_o, want_lse = expected_o_lse(q, k_cache, v_cache, cache_seqlens, k, v, inv_freq, interleaved,
                                      rotation_backend="triton" if backend == "triton" else "native")
    check_attention_out(o_p, want_o)
    check_lse(lse_p, want_lse)


def test_gather_pages(device):
    """The reference's page gather: position p of the sequence is row p % block_size of page table[p // block_size];
    entries past its pages are not read."""
    pool = randn(5, 16, 2, 64, device=device)
    table_row = torch.tensor([3, 0, 4, -1], dtype=I32, device=device)
    got = ref.gather_pages(pool, table_row, 37)
    assert torch.equal(got, torch.cat([pool[3], pool[0], pool[4, :5]]))
    assert ref.gather_pages(pool, table_row, 0).shape == (0, 2, 64)


# --------------------------------------------------------------------------- refusals
def _call(**overrides):
    """Valid paged arguments (B 2, pool of 6 blocks of 16, Hq 4, Hk 2, D 64, cache_seqlens [20, 13], Sq 3 with an
    append; sequence 0 uses blocks 4, 1, sequence 1 block 5; -1 pads the table) with overrides."""
    args = {
        "q": randn(2, 3, 4, 64), "k_cache": randn(6, 16, 2, 64), "v_cache": randn(6, 16, 2, 64),
        "cache_seqlens": torch.tensor([20, 13], dtype=I32), "k": randn(2, 3, 2, 64), "v": randn(2, 3, 2, 64),
        "rope_theta": 1e4, "block_table": torch.tensor([[4, 1, -1], [5, -1, 99]], dtype=I32),
    }
    return {**args, **overrides}


@pytest.mark.parametrize("backend", [*kernel_backends("flash_attention_with_kvcache", "cpu"), "reference"])
@pytest.mark.parametrize(
    "make_kwargs,error,match",
    [
        (lambda: _call(), None, None),  # the baseline is accepted (the -1 and 99 padding is never read)
        (lambda: _call(block_table=torch.tensor([[4, 1, -1], [5, -1, 99]])), ValueError,
         r"^block_table: expected dtype in \(int32\), got int64"),
        (lambda: _call(block_table=torch.tensor([[4.0, 1.0], [5.0, 0.0]])), ValueError,
         r"^block_table: expected dtype in \(int32\), got float32"),
        (lambda: _call(block_table=torch.tensor([4, 1, 5], dtype=I32)), ValueError, r"^block_table: expected"),
        (lambda: _call(block_table=torch.tensor([[[4, 1]], [[5, 0]]], dtype=I32)), ValueError,
         r"^block_table: expected"),
        (lambda: _call(block_table=torch.tensor([[4, 1, 0]], dtype=I32)), ValueError, r"^block_table: expected"),
        (lambda: _call(block_table=torch.zeros(2, 0, dtype=I32)), ValueError, r"^block_table: expected"),
        # 13 + 3 = 16 fits sequence 1's one block; 14 + 3 needs a second one: -1
        (lambda: _call(cache_seqlens=torch.tensor([20, 14], dtype=I32)), ValueError, r"^block_table: expected"),
        (lambda: _call(block_table=torch.tensor([[4, 6, -1], [5, -1, 99]], dtype=I32)), ValueError,
         r"^block_table: expected"),  # block 6 of a pool of 6
        (lambda: _call(block_table=torch.tensor([[4, 1, 0], [-3, 0, 0]], dtype=I32)), ValueError,
         r"^block_table: expected"),
        # 3 blocks of 16 hold 48 positions: 46 + 3 do not fit
        (lambda: _call(cache_seqlens=torch.tensor([46, 0], dtype=I32),
                       block_table=torch.tensor([[4, 1, 0], [5, 2, 3]], dtype=I32)), ValueError,
         r"^block_table: expected"),
        (lambda: _call(cache_seqlens=torch.tensor([20, -1], dtype=I32)), ValueError, r"^cache_seqlens: expected"),
        (lambda: _call(k_cache=randn(6, 24, 2, 64), v_cache=randn(6, 24, 2, 64)), ValueError, r"^k_cache: expected"),
        (lambda: _call(k_cache=randn(12, 8, 2, 64), v_cache=randn(12, 8, 2, 64)), ValueError, r"^k_cache: expected"),
        (lambda: _call(k_cache=randn(6, 512, 2, 64), v_cache=randn(6, 512, 2, 64)), ValueError,
         r"^k_cache: expected"),
    ],
    ids=["ok", "int64", "float", "1-d", "3-d", "batch", "no-blocks", "too-short-for-append", "index-past-pool",
         "index-negative", "too-short-for-capacity", "seqlens-negative", "block-size-24", "block-size-8",
         "block-size-512"],
)
def test_bad_block_table_is_refused_before_any_write(backend, make_kwargs, error, match):
    kwargs = make_kwargs()
    k_before, v_before = kwargs["k_cache"].clone(), kwargs["v_cache"].clone()
    if error is None:
        o = lk.flash_attention_with_kvcache(**kwargs, backend=backend)
        assert o.shape == kwargs["q"].shape and not o.isnan().any()
        assert not torch.equal(kwargs["k_cache"], k_before)  # the baseline does append
        return
    with pytest.raises(error, match=match):
        lk.flash_attention_with_kvcache(**kwargs, backend=backend)
    assert torch.equal(kwargs["k_cache"], k_before), "k_cache was written before the refusal"
    assert torch.equal(kwargs["v_cache"], v_before), "v_cache was written before the refusal"


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the merge kernel meets the NaN rows
@pytest.mark.parametrize("table_width", [3, 2], ids=["index-past-pool", "table-too-short"])
def test_kernels_guard_bad_tables(device, table_width):
    """On a GPU the wrapper reads neither cache_seqlens nor the table (a host sync per step): the kernels must write
    nothing outside the pool and give NaN for the sequences whose pages are bad, the right answer for the others.
    Called through the torch op, which skips the wrapper's host-side checks. The pool is a view inside a larger
    buffer whose first and last pages are what entries -1 and num_blocks would address."""
    seqlens = [20, 13, 5, 40, 5]  # Sq 3, blocks of 16
    q, _, _, cache_seqlens, k, v = make_inputs(5, 48, 4, 2, 64, F32, seqlens, 3, True, device)
    num_blocks = 8
    block_table = torch.tensor([[4, 1, -1],  # fine (20 + 3 in two blocks)
                                [5, -1, 0],  # 13 + 3 = 16: one block, fine
                                [-1, 2, 3],  # its only page is outside the pool
                                # 40 + 3 needs three pages: the third is past the pool, or (two columns) the table
                                # ends before it, and the next row's first entry must not be taken for it
                                [6, 7, 8],
                                [3, -1, -1]],  # fine (5 + 3 in one block)
                               dtype=I32, device=device)[:, :table_width].contiguous()
    k_big, v_big = randn(num_blocks + 2, 16, 2, 64, device=device), randn(num_blocks + 2, 16, 2, 64, device=device)
    k_before, v_before = k_big.clone(), v_big.clone()
    k_pool, v_pool = k_big[1:-1], v_big[1:-1]
    inv_freq = lk.rope_inv_freq(64, 1e4, device=device)
    o, lse = torch.ops.llama_kernels.flash_attention_with_kvcache(
        q, k_pool, v_pool, cache_seqlens, k, v, inv_freq, False, True, 64**-0.5, 0, "triton", block_table)
    good, bad = [0, 1, 4], [2, 3]
    assert o[bad].isnan().all() and lse[bad].isnan().all()
    assert torch.equal(k_big[[0, -1]], k_before[[0, -1]]) and torch.equal(v_big[[0, -1]], v_before[[0, -1]]), \
        "a page outside the pool was written"
    # The good sequences against the same call over their pages alone, on the reference.
    k_ref, v_ref = k_before[1:-1].clone(), v_before[1:-1].clone()
    want_o, want_lse = lk.flash_attention_with_kvcache(
        q[good], k_ref, v_ref, cache_seqlens[good], k=k[good], v=v[good], inv_freq=inv_freq, return_lse=True,
        block_table=block_table[good], backend="reference")
    check_attention_out(o[good], want_o)
    check_lse(lse[good], want_lse)
    touched_by_good, untouched = [4, 1, 5, 3], [0, 2, 6, 7]
    for pool, want, before in ((k_pool, k_ref, k_before), (v_pool, v_ref, v_before)):
        torch.testing.assert_close(pool[touched_by_good], want[touched_by_good], rtol=1e-6, atol=1e-6)
        assert torch.equal(pool[untouched], before[1:-1][untouched]), "a bad sequence wrote outside its valid slots"


# --------------------------------------------------------------------------- torch.compile
def test_fullgraph_compile_over_pages(device):
    """The block table passes through a compiled graph: compiled and eager give the same o and the same pools."""
    torch._dynamo.reset()
    seqlens = [9, 30]
    q, k_cache, v_cache, cache_seqlens, k, v = make_inputs(2, 48, 8, 2, 64, F32, seqlens, 5, True, device)
    block_table, num_blocks = page_layout(seqlens, 5, 16, 3, device)

    def f(q, k_pool, v_pool, cache_seqlens, k, v, block_table):
        return lk.flash_attention_with_kvcache(q, k_pool, v_pool, cache_seqlens, k=k, v=v, rope_theta=1e4,
                                               block_table=block_table, backend="triton") * 2

    def run(fn):
        k_pool, v_pool = to_pool(k_cache, block_table, num_blocks), to_pool(v_cache, block_table, num_blocks)
        return fn(q, k_pool, v_pool, cache_seqlens, k, v, block_table), k_pool, v_pool

    (o_c, kp_c, vp_c), (o_e, kp_e, vp_e) = run(torch.compile(f, backend="aot_eager", fullgraph=True)), run(f)
    assert torch.equal(o_c, o_e)
    assert torch.equal(kp_c.nan_to_num(), kp_e.nan_to_num()) and torch.equal(vp_c.nan_to_num(), vp_e.nan_to_num())
    want_o, *_ = expected(q, k_cache, v_cache, cache_seqlens, k, v, lk.rope_inv_freq(64, 1e4, device=device), False)
    check_attention_out(o_c / 2, want_o)


# --------------------------------------------------------------------------- property
@settings(max_examples=6, deadline=None, derandomize=True)
@given(data=st.data(), batch=st.integers(1, 2), block_size=st.sampled_from([16, 32, 64, 128, 256]),
       sq=st.sampled_from([1, 5]), append=st.booleans(), n_kv=st.integers(1, 2), group=st.sampled_from([1, 4]),
       rope=st.sampled_from([None, "theta", "theta-interleaved"]), num_splits=st.sampled_from([0, 1, 3]),
       dtype=st.sampled_from([F32, BF16]))
def test_any_paged_shape(device, data, batch, block_size, sq, append, n_kv, group, rope, num_splits, dtype):
    """Paged equals contiguous, bit for bit, for any page size, lengths (a page's end included) and split count."""
    max_blocks = data.draw(st.integers(1, max(1, 320 // block_size)), label="max_blocks")
    top = max_blocks * block_size - (sq if append else 0)
    assume(top >= 0)
    lengths = st.one_of(st.integers(0, top), st.sampled_from([n * block_size - (sq if append else 0)
                                                             for n in range(1, max_blocks + 1)]))
    seqlens = data.draw(st.lists(lengths.filter(lambda n: 0 <= n <= top), min_size=batch, max_size=batch),
                        label="cache_seqlens")
    q, k_cache, v_cache, cache_seqlens, k, v = make_inputs(batch, max_blocks * block_size, n_kv * group, n_kv, 64,
                                                           dtype, seqlens, sq, append, device)
    block_table, num_blocks = page_layout(seqlens, sq if append else 0, block_size, max_blocks, device)
    kwargs, _, _ = rope_kwargs(rope, 64, device)
    (o_c, lse_c), (o_p, lse_p) = run_paged(q, k_cache, v_cache, cache_seqlens, k, v, block_table, num_blocks,
                                           "triton", num_splits, kwargs)
    assert torch.equal(o_p, o_c) and torch.equal(lse_p, lse_c), "paged and contiguous results differ"
