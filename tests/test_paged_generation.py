"""PagedKVCache: its block bookkeeping, the model over pages against the model over a contiguous cache, sequences
joining and leaving a running batch, greedy generation over both caches, refusals.

The model runs on the reference backend (the paged kernels have their own tests, tests/test_decode_paged.py):
what is under test here is which pages the model writes and reads.
"""

import pytest
import torch

from llama_kernels.models import PagedKVCache
from test_models import TINY, tiny_model
from utils import assert_close

BLOCK = 16


def pool(num_blocks=6, max_batch_size=3, max_seq_len=64):
    return tiny_model().new_paged_cache(num_blocks, BLOCK, max_batch_size=max_batch_size, max_seq_len=max_seq_len)


# --------------------------------------------------------------------------- bookkeeping
def test_blocks_are_lent_as_sequences_grow_and_returned_when_they_leave():
    cache = pool()
    assert (cache.num_blocks, cache.block_size, cache.max_seq_len, cache.free_blocks) == (6, BLOCK, 64, 6)
    a, b = cache.allocate(20), cache.allocate()
    assert len(cache.blocks(a)) == 2 and cache.blocks(b) == [] and cache.free_blocks == 4
    cache.set_batch([b, a])
    assert cache.block_table.shape == (2, 4) and cache.seqlens.tolist() == [0, 0]
    assert cache.block_table[1, :2].tolist() == cache.blocks(a)
    cache.reserve(17)  # b: 2 blocks; a: room for 20 already, 17 needs no more
    cache.advance(17)
    assert [cache.length(s) for s in (a, b)] == [17, 17] and len(cache.blocks(b)) == 2 and cache.free_blocks == 2
    cache.reserve(16)  # both cross into a third block (33 > 2 * 16)
    assert cache.block_table[0, :3].tolist() == cache.blocks(b) and cache.block_table[1, :3].tolist() == cache.blocks(a)
    owned = cache.blocks(a) + cache.blocks(b)
    assert sorted(owned) == list(range(6)) and cache.free_blocks == 0  # disjoint, every block of the pool
    cache.truncate([3, 17])
    assert cache.seqlens.tolist() == [3, 17] and cache.length(b) == 3
    cache.set_batch([a])
    freed = cache.blocks(b)
    cache.free(b)
    assert cache.free_blocks == 3 and cache.sequences == [a]
    c = cache.allocate(40)  # b's blocks, lent again
    assert sorted(cache.blocks(c)) == sorted(freed)
    cache.set_batch([c, a])
    assert cache.seqlens.tolist() == [0, 17]


def test_extend_lends_blocks_after_what_a_sequence_holds():
    """extend counts from the tokens a sequence holds, not from its blocks' room; a sequence in the batch gets the
    new blocks in its table row at once, one outside it when set_batch writes its row."""
    cache = pool()
    a, b = cache.allocate(), cache.allocate(5)  # a: no block; b: one block, 0 tokens held
    cache.set_batch([b, a])
    cache.extend(a, 0)
    assert cache.blocks(a) == [] and cache.free_blocks == 5
    cache.extend(b, 16)  # 0 + 16 fills b's one block exactly: nothing new
    assert len(cache.blocks(b)) == 1 and cache.free_blocks == 5
    cache.extend(a, 17)
    assert len(cache.blocks(a)) == 2 and cache.block_table[1, :2].tolist() == cache.blocks(a)
    cache.reserve(3)
    cache.advance(3)
    cache.extend(b, 14)  # 3 + 14 = 17: a second block
    assert len(cache.blocks(b)) == 2 and cache.block_table[0, :2].tolist() == cache.blocks(b)
    c = cache.allocate()
    cache.extend(c, 1)  # not in the batch: its row is written when it joins
    assert cache.block_table.shape[0] == 2
    cache.set_batch([c, b])
    assert cache.block_table[0, :1].tolist() == cache.blocks(c) and cache.seqlens.tolist() == [0, 3]
    assert sorted(cache.blocks(a) + cache.blocks(b) + cache.blocks(c)) == list(range(5)) and cache.free_blocks == 1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda cache, a: cache.allocate(200), r"^tokens: .*past the block table's max_seq_len = 128"),
        (lambda cache, a: cache.allocate(40), r"^tokens: a new sequence of 40 tokens: 3 more blocks .* 2 free of "
                                              r"num_blocks = 6"),
        (lambda cache, a: cache.extend(a, 100), r"^tokens: 100 more tokens for sequence 0: 3 more blocks"),
        (lambda cache, a: cache.reserve(100), r"^tokens: 100 more tokens for each of sequences \[0\]"),
        (lambda cache, a: cache.free(a), r"^seq: sequence 0 is in the running batch"),
        (lambda cache, a: cache.free(7), r"^seq: expected a live sequence id"),
        (lambda cache, a: cache.set_batch([a, a]), r"^seqs: expected at most max_batch_size = 3 distinct"),
        (lambda cache, a: cache.set_batch([0, 1, 2, 3]), r"^seqs"),
        (lambda cache, a: cache.allocate(-1), r"^tokens: expected an int >= 0"),
        (lambda cache, a: cache.truncate([40]), r"^lengths: expected one length per sequence"),
    ],
    ids=["past-max-seq-len", "pool-exhausted", "extend-exhausted", "reserve-exhausted", "free-in-batch",
         "unknown-sequence", "duplicate-in-batch", "batch-too-large", "negative-tokens", "truncate-longer"],
)
def test_bookkeeping_refusals_leave_the_cache_as_it_was(call, match):
    cache = pool(max_seq_len=128)
    a = cache.allocate(64)  # 4 of the 6 blocks
    cache.set_batch([a])
    before = (cache.blocks(a), cache.free_blocks, cache.block_table.tolist())
    with pytest.raises(ValueError, match=match):
        call(cache, a)
    assert (cache.blocks(a), cache.free_blocks, cache.block_table.tolist()) == before


def test_model_refusals():
    model = tiny_model()
    cache = model.new_paged_cache(4, BLOCK)
    with pytest.raises(ValueError, match=r"^cache: expected one for 1 sequences, got 0"):
        model(torch.ones(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"^cache: the prompts and their max_new_tokens need 5 blocks"):
        model.generate([[1] * 30, [2] * 20], max_new_tokens=8, cache=cache)
    assert cache.sequences == [] and cache.free_blocks == 4  # nothing joined
    with pytest.raises(TypeError, match=r"^cache: expected None or a PagedKVCache, got KVCache"):
        model.generate([[1]], max_new_tokens=2, cache=model.new_cache(1, 8))
    for kwargs, match in (({"block_size": 24}, r"^block_size: expected a power of two from 16 to 256"),
                          ({"block_size": 512}, r"^block_size"), ({"num_blocks": 0}, r"^num_blocks")):
        with pytest.raises(ValueError, match=match):
            model.new_paged_cache(**{"num_blocks": 4, **kwargs})
    with pytest.raises(ValueError, match=r"^k: expected pools \(num_blocks, block_size, Hk, D\)"):
        PagedKVCache([torch.zeros(4, 24, 2, 64)], [torch.zeros(4, 24, 2, 64)], max_batch_size=1, max_blocks_per_seq=1)


# --------------------------------------------------------------------------- the model over pages
def full_logits(model, tokens: list[int]) -> torch.Tensor:
    """The logits of the last token of an uncached forward over the whole sequence."""
    return model(torch.tensor([tokens]))[0, -1]


def test_sequences_join_and_leave_a_running_batch():
    """A is prefilled and steps alone; B joins (prefilled alone, then one token each per step); A leaves and C
    takes its blocks. Every step's logits are those of an uncached forward over each sequence's own tokens, and
    the blocks of a resident sequence no one runs are never written."""
    model = tiny_model(backend="reference", rope_interleaved=True)
    cache = model.new_paged_cache(12, BLOCK, max_batch_size=2)
    resident = cache.allocate(2 * BLOCK)  # blocks 0-1: owned, never in a batch
    for pool_ in cache.k + cache.v:
        pool_[cache.blocks(resident)] = 7.0
    text = {name: torch.randint(0, TINY.vocab_size, (n,)).tolist() for name, n in (("a", 21), ("b", 16), ("c", 5))}
    seqs, held = {}, {}

    def join(name):
        seqs[name] = cache.allocate()
        cache.set_batch([seqs[name]])
        held[name] = text[name][:-4]
        logits = model(torch.tensor([held[name]]), cache=cache)[0, -1]
        assert_close(logits, full_logits(model, held[name]), rtol=1e-4, atol=1e-4)

    def step(names):
        cache.set_batch([seqs[name] for name in names])
        tokens = [text[name][len(held[name])] for name in names]
        logits = model(torch.tensor(tokens)[:, None], cache=cache)[:, -1]
        for row, name in enumerate(names):
            held[name].append(tokens[row])
            assert_close(logits[row], full_logits(model, held[name]), rtol=1e-4, atol=1e-4)

    join("a")  # 17 tokens: two blocks
    step(["a"])
    join("b")  # 12 tokens, 16 after its four steps: ending on a page's end
    step(["a", "b"])
    step(["b", "a"])  # the rows of a batch are any order
    cache.set_batch([seqs["b"]])
    cache.free(seqs["a"])
    join("c")
    step(["b", "c"])
    step(["b", "c"])
    assert cache.length(seqs["b"]) == 16 and cache.length(seqs["c"]) == 3
    for pool_ in cache.k + cache.v:
        assert bool((pool_[cache.blocks(resident)] == 7.0).all())


def test_greedy_generation_is_identical_over_paged_and_contiguous_caches():
    """Ragged prompts (one ending on a page's end, the others crossing into a new page as they decode) in a pool
    another sequence also holds blocks of: the same tokens as over a contiguous cache, and every block lent for
    the call back in the pool afterwards, the other sequence's untouched and its batch restored."""
    model = tiny_model(backend="reference")
    prompts = [torch.randint(0, TINY.vocab_size, (n,)).tolist() for n in (14, BLOCK, 3)]
    contiguous = model.generate(prompts, max_new_tokens=6)
    cache = model.new_paged_cache(8, BLOCK, max_batch_size=4)
    other = cache.allocate(20)
    cache.set_batch([other])
    for pool_ in cache.k + cache.v:
        pool_[cache.blocks(other)] = -3.0
    assert model.generate(prompts, max_new_tokens=6, cache=cache) == contiguous
    assert cache.sequences == [other] and cache.free_blocks == 6 and cache.batch == [other]
    for pool_ in cache.k + cache.v:
        assert bool((pool_[cache.blocks(other)] == -3.0).all())
