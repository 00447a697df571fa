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

import torch
from torch import Tensor

from .tokenizer import infilling_prompt, stop_tokens


@torch.inference_mode()
def generate(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 0.95,
             stop_tokens: set[int] | tuple = (), generator: torch.Generator | None = None,
             max_seq_len: int | None = None) -> list[list[int]]:
    """The new tokens of each prompt (without the prompt; ending before a stop token).

    temperature 0 is greedy decoding; otherwise tokens are sampled from the smallest set
    of most likely tokens whose probability reaches top_p (Meta's ``sample_top_p``).
    max_seq_len: the KV cache's length; by default the longest prompt plus max_new_tokens.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: expected a non-empty list of non-empty token lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature, top_p: expected temperature >= 0 and 0 < top_p <= 1, "
                         f"got {temperature} and {top_p}")
    device = model.output.weight.device
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    max_seq_len = max_seq_len or longest + max_new_tokens
    if longest + max_new_tokens > max_seq_len:
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
