"""Generation with ``CodeLlama``: batched prompts of different lengths, greedy or top-p sampling, stop tokens,
and Code Llama's infilling (fill in the middle).

A prefill and then one step per new token. Over a contiguous ``KVCache`` (the default) the
prompts are padded on the right and prefilled together (causal, so a prompt's tokens never
see its padding); each sequence's cache length is then set to its own prompt length, so its
first new token overwrites its first padding slot. Over a ``PagedKVCache`` each prompt is
prefilled alone (no padding: pages hold only the sequence's own tokens) and the sequences then
decode together. Either way a prompt longer than ``prefill_chunk`` tokens is prefilled chunk by
chunk (``prefill``), and every step after that is one token per sequence through
``flash_attention_with_kvcache``, captured in a CUDA graph on CUDA (``DecodeStep``). Nothing in a
step reads the device on the host except the sampled tokens themselves, once per step.
"""

from __future__ import annotations

import numbers
import warnings

import torch
from torch import Tensor

from .._checks import check_positive_int, check_real
from ..ops.attention_choice import attention_for
from .paged_cache import PagedKVCache
from .tokenizer import infilling_prompt, stop_tokens

# Chunked prefill's default chunk. Its activations scale with it: per chunk the MLP's gate, up and SwiGLU outputs
# (3 x chunk x hidden_dim: 270 MB at 4096 tokens for 7B's 11008 in bf16, 540 MB for 34B's 22016, against 2.2 GB a
# layer for 7B's gate alone at 100k tokens in one shot), and the chunk's q, k, v and logits. 4096 tokens keep the
# matrix products at the card's peak (an M of 4096 fills an H100 for Code Llama's widths; below ~1024 they lose
# efficiency) and the chunks few (25 for 100k tokens), each attending over the whole cache written so far.
PREFILL_CHUNK = 4096


@torch.inference_mode()
def generate(model, prompts: list[list[int]] | Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 0.95, stop_tokens: set[int] | tuple = (), generator: torch.Generator | None = None,
             max_seq_len: int | None = None, cache: PagedKVCache | None = None, prefill_chunk: int = PREFILL_CHUNK,
             cuda_graph: bool = True) -> list[list[int]]:
    """The new tokens of each prompt (without the prompt; ending before a stop token).

    prompts: lists of token ids, or a 2-D integer tensor whose rows are the prompts.
    temperature 0 is greedy decoding; otherwise tokens are sampled from the smallest set
    of most likely tokens whose probability reaches top_p (Meta's ``sample_top_p``).
    max_seq_len: the contiguous KV cache's length; by default the longest prompt plus max_new_tokens, which must
    then be within the model's ``config.max_seq_len`` (pass a larger max_seq_len to run past the trained context).
    cache: a ``PagedKVCache`` (``model.new_paged_cache``) to generate over instead of a contiguous cache made for
    this call. A cache argument rather than a ``paged=True`` switch: the pool's size is the caller's memory budget
    (a server sizes one pool for all its requests and keeps it across calls); the prompts join it as new sequences
    and leave it (their blocks freed) when the call returns, the pool's batch (``set_batch``) as it was.
    prefill_chunk: prompts are prefilled this many tokens at a time (``PREFILL_CHUNK``: the activations of one
    chunk, not of the whole prompt).
    cuda_graph: on CUDA, each decode step of the whole model is captured once in a CUDA graph and replayed
    (``DecodeStep``); False runs every step eagerly.
    """
    prompts = _token_lists(prompts, model.config.vocab_size)
    check_positive_int("max_new_tokens", max_new_tokens)
    check_positive_int("prefill_chunk", prefill_chunk)
    if temperature != 0:
        check_real("temperature", temperature, above=0)
    if check_real("top_p", top_p, above=0) > 1:
        raise ValueError(f"top_p: expected a probability in (0, 1], got {top_p!r}")
    if cache is not None and not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache: expected None or a PagedKVCache, got {type(cache).__name__}")
    device = model.output.weight.device
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    if cache is not None:
        _check_pool(cache, lengths, max_new_tokens)
    elif max_seq_len is None:  # the cache is allocated before the first step: bounded by the model's context
        if longest + max_new_tokens > model.config.max_seq_len:
            raise ValueError(f"max_new_tokens: the longest prompt ({longest} tokens) plus max_new_tokens "
                             f"({max_new_tokens}) exceeds the model's max_seq_len = {model.config.max_seq_len} "
                             f"(config.max_seq_len); pass max_seq_len= to run past the trained context")
        max_seq_len = longest + max_new_tokens
    elif longest + max_new_tokens > check_positive_int("max_seq_len", max_seq_len):
        raise ValueError(f"prompts: the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) "
                         f"does not fit the cache's max_seq_len = {max_seq_len}")

    if cache is None:
        tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        cache = model.new_cache(len(prompts), max_seq_len)
        return _decode(model, cache, prefill(model, tokens.to(device), lengths, cache, prefill_chunk),
                       max_new_tokens, temperature, top_p, stop_tokens, generator, cuda_graph)
    sequences, callers_batch = [], cache.batch
    try:
        logits = []
        for prompt in prompts:  # each joins the pool alone: its pages hold its own tokens, no padding
            sequences.append(cache.allocate())
            cache.set_batch(sequences[-1:])
            logits.append(prefill(model, torch.tensor([prompt], device=device), [len(prompt)], cache, prefill_chunk))
        cache.set_batch(sequences)
        return _decode(model, cache, torch.cat(logits), max_new_tokens, temperature, top_p, stop_tokens, generator,
                       cuda_graph)
    finally:  # the sequences leave the pool, whatever happened; the caller's batch is as it was
        cache.set_batch(callers_batch)
        for seq in sequences:
            cache.free(seq)


def _check_pool(cache: PagedKVCache, lengths: list[int], max_new_tokens: int) -> None:
    """Refused before anything runs: a pool too small for every prompt and its new tokens."""
    if len(lengths) > cache.max_batch_size:
        raise ValueError(f"prompts: expected at most the cache's max_batch_size = {cache.max_batch_size} prompts, "
                         f"got {len(lengths)}")
    if max(lengths) + max_new_tokens > cache.max_seq_len:
        raise ValueError(f"prompts: the longest prompt ({max(lengths)} tokens) plus max_new_tokens "
                         f"({max_new_tokens}) does not fit the cache's max_seq_len = {cache.max_seq_len}")
    needed = sum(cache.blocks_for(length + max_new_tokens) for length in lengths)
    if needed > cache.free_blocks:
        raise ValueError(f"cache: the prompts and their max_new_tokens need {needed} blocks of {cache.block_size} "
                         f"tokens, the pool has {cache.free_blocks} free of num_blocks = {cache.num_blocks}")


def prefill(model, tokens: Tensor, lengths: list[int], cache, chunk: int = PREFILL_CHUNK) -> Tensor:
    """Fills an empty cache (a KVCache, or the batch of a PagedKVCache) with the right-padded prompts ``tokens``
    (B, S) of ``lengths``, ``chunk`` tokens at a time, and returns each prompt's last logits (B, vocab).

    The first chunk of a contiguous cache runs as one prefill (flash_attention); every other chunk's queries attend
    over the cache written so far and themselves (flash_attention_with_kvcache, Sq = chunk, causal bottom-right).
    Each chunk computes the logits of one position per sequence, its prompt's last if it ends in the chunk, kept
    where it does (a (B, vocab) product a chunk, against the chunk's S x every weight). Afterwards each sequence's
    length is its own prompt's (``cache.truncate``), so a shorter prompt's first new token overwrites its padding.
    """
    last = torch.tensor(lengths, device=tokens.device) - 1
    logits = None
    for start in range(0, tokens.shape[1], chunk):
        piece = tokens[:, start:start + chunk]
        at = (last - start).clamp(0, piece.shape[1] - 1)
        chunk_logits = model(piece, cache=cache, logits_at=at)[:, 0]
        ends_here = (last >= start)[:, None]  # a later chunk's positions are the prompt's padding
        logits = chunk_logits if logits is None else torch.where(ends_here, chunk_logits, logits)
    cache.truncate(lengths)
    return logits


def _decode(model, cache, logits: Tensor, max_new_tokens: int, temperature: float, top_p: float, stop_tokens,
            generator, cuda_graph: bool) -> list[list[int]]:
    """The generation loop after the prefill: sample from the logits (B, vocab), step, until max_new_tokens or
    every sequence has stopped."""
    device = logits.device
    stops = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=device)
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
    step = DecodeStep(model, cache, capture=cuda_graph)
    produced = []
    for i in range(max_new_tokens):
        next_token = _sample(logits.float(), temperature, top_p, generator)
        produced.append(torch.where(finished, -1, next_token))
        finished |= torch.isin(next_token, stops)
        if i == max_new_tokens - 1 or bool(finished.all()):
            break
        logits = step(next_token)[:, -1]
    out = torch.stack(produced, dim=1).tolist()
    return [[t for t in row if t != -1 and t not in stop_tokens] for row in out]


_noticed: set[str] = set()  # the reasons a step was not captured, each said once


class DecodeStep:
    """One decode step of the whole model (every layer, the append, the logits) over static buffers: the tokens
    (B, 1) copied into one, the logits (B, 1, vocab) out of one, ``cache.seqlens`` advanced on the device.

    With ``capture`` on CUDA, the first call runs eagerly (Triton's compiles, lazy initializations) and then
    captures the step in a CUDA graph, which every later call replays: one launch for the whole step instead of
    about ten per layer from Python, which at batch 1 leave the card mostly waiting. A CUDA graph of our own
    rather than ``torch.compile(mode="reduce-overhead")``: the step is already our fused kernels, so compiling
    adds minutes for a 34B model and nothing a graph does not give, and dynamo would guard on the host's cache
    length (one recompile per step, or dynamic shapes to set up). The host's part (``cache.reserve``, pages for a
    paged cache; ``cache.advance``) runs around each replay. A step that cannot be captured (SDPA's decode, whose
    shapes follow the cache's length; a capture that fails) runs eagerly, said once. On the CPU the same step runs
    eagerly: what is replayed on CUDA is what the tests run here.
    """

    def __init__(self, model, cache, *, capture: bool = True):
        self.model, self.cache = model, cache
        self.tokens = torch.zeros((cache.seqlens.shape[0], 1), dtype=torch.long, device=cache.seqlens.device)
        self.logits: Tensor | None = None
        self.graph = None
        self.capture = capture and self.tokens.is_cuda and self._capturable()

    def _capturable(self) -> bool:
        if self.cache.block_table is None and attention_for(self.model.attention, self.tokens.device,
                                                            "decode") == "sdpa":
            _notice("attention runs SDPA for the decode, whose shapes follow the cache's length")
            return False
        return True

    def __call__(self, tokens: Tensor) -> Tensor:
        self.cache.reserve(1)
        self.tokens.copy_(tokens.view(-1, 1))
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.no_grad():
                self.logits = self.model.cached_pass(self.tokens, self.cache)
            if self.capture:
                self._capture()
        self.cache.advance(1)
        return self.logits

    def _capture(self) -> None:
        """Records the step without running it (the cache's contents and lengths are not touched)."""
        self.capture = False
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.no_grad(), torch.cuda.graph(graph):
                logits = self.model.cached_pass(self.tokens, self.cache)
        except Exception as e:  # an op that cannot be captured: eager steps, as without capture
            _notice(f"capturing it failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            return
        self.graph, self.logits = graph, logits


def _notice(reason: str) -> None:
    if reason not in _noticed:
        _noticed.add(reason)
        warnings.warn(f"llama_kernels: generate runs its decode steps without a CUDA graph: {reason}", stacklevel=3)


def _token_lists(prompts, vocab_size: int) -> list[list[int]]:
    """The prompts as lists of token ids in [0, vocab_size): a list of int lists, or a 2-D integer tensor
    (one prompt a row). Floats are refused, not truncated."""
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2 or prompts.is_floating_point() or prompts.is_complex() or prompts.dtype == torch.bool:
            raise TypeError(f"prompts: expected a 2-D integer tensor (one prompt a row) or a list of token lists, "
                            f"got a {prompts.dtype} tensor of shape {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts: expected a non-empty list of non-empty token lists, got {prompts!r:.60}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError(f"prompts[{i}]: expected a non-empty list of token ids, got {prompt!r:.60}")
        for j, token in enumerate(prompt):
            if isinstance(token, bool) or not isinstance(token, numbers.Integral):
                raise TypeError(f"prompts[{i}][{j}]: expected a token id (int), got {token!r}")
            if not 0 <= token < vocab_size:
                raise ValueError(f"prompts[{i}][{j}]: expected a token id in [0, vocab_size = {vocab_size}), "
                                 f"got {token}")
    return [[int(token) for token in prompt] for prompt in prompts]


def _sample(logits: Tensor, temperature: float, top_p: float, generator) -> Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the most likely tokens until their mass reaches top_p (the one that crosses it included).
    sorted_probs[(sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p] = 0.0
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(dim=-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def infill(model, tokenizer, prefix: str, suffix: str, *, suffix_first: bool = False, max_new_tokens: int = 128,
           **kwargs) -> str:
    """The middle between ``prefix`` and ``suffix``, generated until the end-of-infill token.

    suffix_first: the suffix-prefix-middle prompt order instead of prefix-suffix-middle.
    ``tokenizer``: a ``CodeLlamaTokenizer`` over the SentencePiece file that came with the model.
    """
    prompt = infilling_prompt(tokenizer, prefix, suffix, suffix_first=suffix_first)
    middle = generate(model, [prompt], max_new_tokens, stop_tokens=stop_tokens(tokenizer, infilling=True), **kwargs)
    return tokenizer.decode_infilling(middle[0])
