"""Generation with ``CodeLlama``: batched prompts of different lengths, greedy or top-p sampling, stop tokens,
and Code Llama's infilling (fill in the middle).

One prefill and then one step per new token. The prompts are padded on the right and
prefilled together through ``flash_attention`` (causal, so a prompt's tokens never see
its padding); each sequence's cache length is then set to its own prompt length, so its
first new token overwrites its first padding slot. Every step after that is one token
per sequence through ``flash_attention_with_kvcache``. Nothing in a step reads the
device on the host except the sampled tokens themselves, once per step.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .._checks import check_positive_int, check_real
from .tokenizer import infilling_prompt, stop_tokens


@torch.inference_mode()
def generate(model, prompts: list[list[int]] | Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 0.95, stop_tokens: set[int] | tuple = (), generator: torch.Generator | None = None,
             max_seq_len: int | None = None) -> list[list[int]]:
    """The new tokens of each prompt (without the prompt; ending before a stop token).

    prompts: lists of token ids, or a 2-D integer tensor whose rows are the prompts.
    temperature 0 is greedy decoding; otherwise tokens are sampled from the smallest set
    of most likely tokens whose probability reaches top_p (Meta's ``sample_top_p``).
    max_seq_len: the KV cache's length; by default the longest prompt plus max_new_tokens, which must then be
    within the model's ``config.max_seq_len`` (pass a larger max_seq_len to run past the trained context).
    """
    prompts = _token_lists(prompts, model.config.vocab_size)
    check_positive_int("max_new_tokens", max_new_tokens)
    if temperature != 0:
        check_real("temperature", temperature, above=0)
    if check_real("top_p", top_p, above=0) > 1:
        raise ValueError(f"top_p: expected a probability in (0, 1], got {top_p!r}")
    device = model.output.weight.device
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    if max_seq_len is None:  # the cache is allocated before the first step: bounded by the model's context
        if longest + max_new_tokens > model.config.max_seq_len:
            raise ValueError(f"max_new_tokens: the longest prompt ({longest} tokens) plus max_new_tokens "
                             f"({max_new_tokens}) exceeds the model's max_seq_len = {model.config.max_seq_len} "
                             f"(config.max_seq_len); pass max_seq_len= to run past the trained context")
        max_seq_len = longest + max_new_tokens
    elif longest + max_new_tokens > check_positive_int("max_seq_len", max_seq_len):
        raise ValueError(f"prompts: the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) "
                         f"does not fit the cache's max_seq_len = {max_seq_len}")
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    tokens = tokens.to(device)
    prompt_lengths = torch.tensor(lengths, dtype=torch.int32, device=device)

    cache = model.new_cache(len(prompts), max_seq_len)
    logits = model(tokens, cache=cache, logits_at=prompt_lengths - 1)
    cache.seqlens.copy_(prompt_lengths)  # each sequence resumes after its own prompt, over its padding

    stops = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    produced = []
    for step in range(max_new_tokens):
        next_token = _sample(logits[:, -1].float(), temperature, top_p, generator)
        produced.append(torch.where(finished, -1, next_token))
        finished |= torch.isin(next_token, stops)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        logits = model(next_token[:, None], cache=cache)
    out = torch.stack(produced, dim=1).tolist()
    return [[t for t in row if t != -1 and t not in stop_tokens] for row in out]


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
