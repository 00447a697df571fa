"""Chunked prefill against one-shot prefill, and the decode step generate captures (CUDA graph on --device cuda,
the same static-buffer step eagerly on the CPU) against the plain forward; torch.compile traces that step whole."""

import warnings

import pytest
import torch

from llama_kernels.models.generation import DecodeStep, prefill
from test_models import TINY, tiny_model
from utils import KERNEL_BACKENDS, assert_close

# Ragged prompts: 11 tokens (chunks of 4 cut it 4 + 4 + 3), 8 (ending exactly on a chunk's end) and 2.
PROMPT_LENGTHS = [11, 8, 2]


def padded_prompts(lengths, device="cpu"):
    tokens = torch.randint(0, TINY.vocab_size, (len(lengths), max(lengths)), device=device)
    for row, length in enumerate(lengths):
        tokens[row, length:] = 0
    return tokens


def new_cache(model, kind: str, batch: int):
    """A contiguous cache of 32 slots a sequence, or a paged one (blocks of 16) whose batch is ``batch`` new
    sequences: their blocks are taken in turns as they grow, so their tables interleave."""
    if kind == "contiguous":
        return model.new_cache(batch, 32)
    cache = model.new_paged_cache(2 * batch, 16, max_batch_size=batch, max_seq_len=32)
    cache.set_batch([cache.allocate() for _ in range(batch)])
    return cache


def filled_positions(cache, lengths):
    """Every layer's cached k and v at each sequence's own positions (the padding's slots are not compared)."""
    if cache.block_table is not None:  # a paged cache: each sequence's pages, in order
        return [t[cache.block_table[b, :2].long()].flatten(0, 1)[:length]
                for t in cache.k + cache.v for b, length in enumerate(lengths)]
    return [t[b, :length] for t in cache.k + cache.v for b, length in enumerate(lengths)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_chunked_prefill_equals_one_shot(backend):
    """Chunks of 4 (the first through flash_attention, the others through the KV-cache kernel over what the first
    wrote) against the whole prompt at once: the last logits, the cache's contents and its lengths."""
    model = tiny_model(backend=backend, rope_interleaved=True)
    tokens = padded_prompts(PROMPT_LENGTHS)
    results = []
    for chunk in (tokens.shape[1], 4):
        cache = model.new_cache(len(PROMPT_LENGTHS), 16)
        with torch.inference_mode():
            logits = prefill(model, tokens, PROMPT_LENGTHS, cache, chunk)
        results.append((logits, cache))
    (one_shot, one_shot_cache), (chunked, chunked_cache) = results
    assert chunked.shape == (len(PROMPT_LENGTHS), TINY.vocab_size)
    assert_close(chunked, one_shot, rtol=1e-4, atol=1e-4)
    # the last logits are each prompt's own: those of an uncached forward at its last position
    full = model(tokens)
    assert_close(chunked, full[torch.arange(len(PROMPT_LENGTHS)), torch.tensor(PROMPT_LENGTHS) - 1],
                 rtol=1e-4, atol=1e-4)
    for got, want in zip(filled_positions(chunked_cache, PROMPT_LENGTHS),
                         filled_positions(one_shot_cache, PROMPT_LENGTHS)):
        assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert chunked_cache.seqlens.tolist() == one_shot_cache.seqlens.tolist() == PROMPT_LENGTHS


def test_generation_with_a_small_prefill_chunk_gives_the_same_tokens():
    model = tiny_model(backend="reference")
    prompts = [[int(t) for t in torch.randint(0, TINY.vocab_size, (n,))] for n in PROMPT_LENGTHS]
    assert model.generate(prompts, max_new_tokens=5, prefill_chunk=3) == model.generate(prompts, max_new_tokens=5)


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_decode_step_equals_the_forward(device, kind):
    """The static-buffer step generate replays (on --device cuda: captured at its first call, then replayed) gives
    the logits and the cache contents of plain forwards, step after step, the lengths advanced on the device
    (six: the 11-token prompt's cross into its second page)."""
    # On the CPU the reference (the step's machinery is under test; the kernels' Sq = 1 path has its own tests)
    model = tiny_model(backend=None if device.type == "cuda" else "reference", attention="llama_kernels").to(device)
    tokens = padded_prompts(PROMPT_LENGTHS, device)
    steps = torch.randint(0, TINY.vocab_size, (6, len(PROMPT_LENGTHS)), device=device)
    runs = []
    for stepped in (False, True):
        cache = new_cache(model, kind, len(PROMPT_LENGTHS))
        with torch.inference_mode():
            prefill(model, tokens, PROMPT_LENGTHS, cache)
            step = DecodeStep(model, cache, capture=True) if stepped else lambda t: model(t[:, None], cache=cache)
            logits = [step(token).clone() for token in steps]
        runs.append((logits, cache))
        if stepped and device.type == "cuda":
            assert step.graph is not None
    (forward_logits, forward_cache), (step_logits, step_cache) = runs
    for got, want in zip(step_logits, forward_logits):
        assert_close(got, want, rtol=1e-4, atol=1e-4)
    after = [n + len(steps) for n in PROMPT_LENGTHS]
    assert step_cache.seqlens.tolist() == forward_cache.seqlens.tolist() == after
    assert step_cache.filled == forward_cache.filled == max(after)
    for got, want in zip(filled_positions(step_cache, after), filled_positions(forward_cache, after)):
        assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_fullgraph_compile_traces_a_decode_step_with_the_cache_mutation(kind):
    """torch.compile(fullgraph=True) of one decode step of the whole model (the step DecodeStep captures): no graph
    break, the logits and the appended k/v as eager's, the lengths advanced once."""
    torch._dynamo.reset()
    model = tiny_model(backend="reference")
    tokens, token = padded_prompts(PROMPT_LENGTHS), torch.randint(0, TINY.vocab_size, (len(PROMPT_LENGTHS), 1))
    compiled = torch.compile(model.cached_pass, backend="aot_eager", fullgraph=True)
    runs = []
    for step in (model.cached_pass, compiled):
        cache = new_cache(model, kind, len(PROMPT_LENGTHS))
        with torch.inference_mode():
            prefill(model, tokens, PROMPT_LENGTHS, cache)
            cache.reserve(1)
            logits = step(token, cache)
            cache.advance(1)
        runs.append((logits, cache))
    (eager, eager_cache), (traced, traced_cache) = runs
    assert_close(traced, eager, rtol=1e-5, atol=1e-5)
    after = [n + 1 for n in PROMPT_LENGTHS]
    assert traced_cache.seqlens.tolist() == after
    for got, want in zip(filled_positions(traced_cache, after), filled_positions(eager_cache, after)):
        assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_step_that_cannot_be_captured_runs_eagerly_said_once(device):
    """SDPA's decode (its shapes follow the cache's length) is not captured: on CUDA a warning, once however many
    generations; on the CPU nothing to say (graphs are CUDA's). Either way the same tokens as ours."""
    from llama_kernels.models import generation

    generation._noticed.clear()
    backend = None if device.type == "cuda" else "reference"
    model = tiny_model(backend=backend, attention="sdpa").to(device)
    prompts = [[int(t) for t in torch.randint(0, TINY.vocab_size, (n,))] for n in PROMPT_LENGTHS]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        outs = [model.generate(prompts, max_new_tokens=4) for _ in range(2)]
    notices = [w for w in said if "without a CUDA graph" in str(w.message)]
    assert len(notices) == (1 if device.type == "cuda" else 0)
    model.attention = "llama_kernels"
    assert outs[0] == outs[1] == model.generate(prompts, max_new_tokens=4)
