"""On paper: what fine-tuning a Code Llama on one card needs, and the longest sequence that fits.

    python -m llama_kernels.bench.memory_plan [--card-gb 80] [--lora-rank 16]

Batch 1, bf16 compute, activation checkpointing at every layer boundary (what both HF's
``gradient_checkpointing_enable()`` and ``CodeLlama.activation_checkpointing`` do). Per way of
training, the bytes are:

- state: weights, gradients and AdamW's two moments. Full fine-tuning with mixed precision
  (bf16 weights and gradients, fp32 master weights and moments; HF's Trainer with fp32 weights
  under autocast holds the same 16 bytes a parameter), full fine-tuning in bf16 with an 8-bit
  AdamW (bitsandbytes': 6 bytes a parameter, what fits one card), or LoRA (frozen bf16 weights,
  adapters of rank ``r`` on q, k, v and o trained with 16 bytes a parameter);
- the checkpoints: each layer's input, S x dim in bf16 (the model in bf16 both ways, fp32 master
  weights in the optimizer's state; HF's Trainer with fp32 weights under autocast keeps an fp32
  residual stream: its checkpoints are twice these);
- one layer recomputed for its backward: what its autograd graph saves, plus its gradients;
- the loss: HF materializes the logits (bf16 from lm_head, an fp32 copy, fp32 log-softmax
  saved for the backward and its fp32 gradient: 14 bytes a logit; a one-layer HF Llama's step at
  4,096 tokens measured +1.6 GB on the CPU in fp32, 12 bytes a logit); the fused cross-entropy
  holds a chunk of logits (``CHUNK_BYTES``) and, when lm_head trains, an fp32 dW accumulator.

These are estimates of the tensors autograd keeps, not measurements: the allocator's
fragmentation and the CUDA context (about 1 GB) come on top, which ``usable_bytes`` leaves for.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..models.config import CodeLlamaConfig

GB = 1e9
CHUNK_BYTES = 0.5 * GB  # the fused cross-entropy's logits chunk and its gradient, at most
MODELS = ("CodeLlama-7b", "CodeLlama-34b")
SEQUENCE_LENGTHS = (16384, 32768, 100_000)


@dataclass(frozen=True)
class Way:
    name: str
    state_bytes_per_parameter: int  # of the trained parameters: weights, gradients, optimizer moments
    lora: bool
    ours: bool  # our model/patch (fused norm, SwiGLU, loss) against HF's defaults (SDPA attention)


WAYS = tuple(Way(f"{kind}, {who}", per_parameter, kind == "LoRA", who == "ours")
             for kind, per_parameter in (("full", 16), ("full 8-bit AdamW", 6), ("LoRA", 16))
             for who in ("HF defaults", "ours"))


def parameter_count(c: CodeLlamaConfig) -> int:
    kv_dim = c.n_kv_heads * c.head_dim
    per_layer = c.dim * (2 * c.dim + 2 * kv_dim) + 3 * c.dim * c.hidden_dim + 2 * c.dim
    return c.n_layers * per_layer + 2 * c.vocab_size * c.dim + c.dim


def lora_parameter_count(c: CodeLlamaConfig, rank: int) -> int:
    kv_dim = c.n_kv_heads * c.head_dim
    per_layer = rank * ((c.dim + c.dim) * 2 + (c.dim + kv_dim) * 2)  # q, o: dim -> dim; k, v: dim -> kv_dim
    return c.n_layers * per_layer


def state_bytes(c: CodeLlamaConfig, way: Way, rank: int) -> float:
    if way.lora:
        return 2 * parameter_count(c) + way.state_bytes_per_parameter * lora_parameter_count(c, rank)
    return way.state_bytes_per_parameter * parameter_count(c)


def layer_bytes_per_token(c: CodeLlamaConfig, ours: bool) -> float:
    """What one recomputed layer's autograd graph saves per token (bf16 unless said), and its gradients.

    Both: the q/k/v and gate/up inputs (2 dim), q, k, v, the attention output (2 dim + 2 kv_dim),
    flash attention's lse (fp32 per head), the down projection's input (ffn). The norms: ours
    save their input and an fp32 rstd; HF's eager RMSNorm saves its fp32 upcast and the fp32
    normalized rows (8 dim each). The MLP: SwiGLU fused saves gate and up (2 ffn), eager silu(g) * u
    also silu(g) (3 ffn). Gradients flowing through the layer: about two ffn-sized and two
    dim-sized tensors at once.
    """
    kv_dim = c.n_kv_heads * c.head_dim
    common = 2 * (2 * c.dim + 2 * c.dim + 2 * kv_dim + c.hidden_dim) + 4 * c.n_heads
    norms = 2 * (2 * c.dim + 4) if ours else 2 * (8 * c.dim)
    mlp = 2 * (2 if ours else 3) * c.hidden_dim
    gradients = 2 * (2 * c.hidden_dim + 2 * c.dim)
    return common + norms + mlp + gradients


def activation_bytes(c: CodeLlamaConfig, way: Way, seq_len: int) -> float:
    checkpoints = c.n_layers * seq_len * c.dim * 2
    return checkpoints + seq_len * layer_bytes_per_token(c, way.ours)


def loss_bytes(c: CodeLlamaConfig, way: Way, seq_len: int) -> float:
    if not way.ours:
        return 14 * seq_len * c.vocab_size
    weight_gradient = 0 if way.lora else 4 * c.vocab_size * c.dim
    return min(CHUNK_BYTES, 6 * seq_len * c.vocab_size) + weight_gradient


def total_bytes(c: CodeLlamaConfig, way: Way, seq_len: int, rank: int) -> float:
    return state_bytes(c, way, rank) + activation_bytes(c, way, seq_len) + loss_bytes(c, way, seq_len)


def usable_bytes(card_gb: float) -> float:
    return (card_gb - 2) * GB  # CUDA context, cuBLAS workspace, fragmentation


def longest_sequence(c: CodeLlamaConfig, way: Way, card_gb: float, rank: int) -> int:
    """The longest sequence (a multiple of 1,024 tokens) whose step fits, 0 if the state alone does not."""
    budget, seq_len = usable_bytes(card_gb), 0
    if total_bytes(c, way, 1024, rank) > budget:
        return 0
    step = 1 << 24
    while step >= 1024:  # largest fitting multiple of 1,024, by halving steps
        if total_bytes(c, way, seq_len + step, rank) <= budget:
            seq_len += step
        else:
            step //= 2
    return seq_len


def table(card_gb: float = 80, rank: int = 16) -> str:
    lines = [f"Fine-tuning on one {card_gb:g} GB card (batch 1, bf16, checkpointing every layer; GB = 1e9 bytes;"
             f" LoRA rank {rank} on q, k, v, o)", ""]
    header = "| model | way | state | " + " | ".join(f"{s // 1000}k: act + loss = total" for s in SEQUENCE_LENGTHS)
    lines += [header + " | longest that fits |", "|" + "---|" * (4 + len(SEQUENCE_LENGTHS))]
    for name in MODELS:
        c = CodeLlamaConfig.from_name(name)
        for way in WAYS:
            cells = [f"{activation_bytes(c, way, s) / GB:.1f} + {loss_bytes(c, way, s) / GB:.1f} = "
                     f"{total_bytes(c, way, s, rank) / GB:.0f}" for s in SEQUENCE_LENGTHS]
            longest = longest_sequence(c, way, card_gb, rank)
            fits = f"{longest:,} tokens" if longest else "no: the state alone is over"
            lines.append(f"| {name} | {way.name} | {state_bytes(c, way, rank) / GB:.0f} | " + " | ".join(cells)
                         + f" | {fits} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama_kernels.bench.memory_plan",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--card-gb", type=float, default=80)
    parser.add_argument("--lora-rank", type=int, default=16)
    args = parser.parse_args(argv)
    print(table(args.card_gb, args.lora_rank))


if __name__ == "__main__":
    main()
