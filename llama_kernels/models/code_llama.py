"""Code Llama on this package's kernels: a drop-in ``nn.Module`` with a preallocated KV cache.

    model = CodeLlama.from_pretrained("CodeLlama-7b-hf", dtype=torch.bfloat16, device="cuda")
    logits = model(tokens)                                    # (B, S, vocab): scoring
    loss = model(tokens[:, :-1], targets=tokens[:, 1:])       # training: the mean loss, no logits built
    out = model.generate([prompt_a, prompt_b], max_new_tokens=64)

The block is Llama 2's (Meta's ``llama/model.py``): pre-norm RMSNorm, attention with
RoPE and grouped key/value heads, SwiGLU feed-forward, each wrapped in a residual add.
Parameter names are Meta's, so Meta's checkpoints load as they are and Hugging Face's
are renamed (``checkpoint.py``). What runs where:

- every RMSNorm after the first is ``rms_norm(x, w, residual=h)``: the residual add and
  the norm in one kernel, which hands the running sum ``h`` on to the next one;
- q and k are rotated by ``apply_rope`` in one launch, in the checkpoint's pair layout
  (``rope_interleaved``: Meta's interleaved pairs, or the half-split pairs of Hugging
  Face's permuted weights), so no weight is permuted at load time;
- attention is ``flash_attention`` (training and prefill: O(S) memory) or, once the cache
  holds tokens, ``flash_attention_with_kvcache``, which rotates the new q and k at their
  positions, appends k and v to the cache and attends in three launches; or torch's SDPA
  for a phase where the card's measurements say it is faster (``attention``: "auto",
  "llama_kernels", "sdpa"; ``ops.attention_choice``);
- the feed-forward's activation is ``swiglu(w1 x, w3 x)``, one kernel each way;
- with ``targets`` the output layer and the loss are ``fused_linear_cross_entropy``: the
  (B, S, vocab) logits are never built (at 16k tokens and V = 32,016 they would be 2 GB in
  fp32, and their gradient as much again);
- the matrix products are torch's (cuBLAS): they are already at the card's peak.

``backend="reference"`` runs the same module through ``llama_kernels.reference`` (plain
PyTorch), so any difference between the two is the kernels'. ``backend=None`` lets each
op choose from the tensors' device (Triton on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .. import (flash_attention, flash_attention_with_kvcache, fused_linear_cross_entropy, rms_norm,
               rope_attention_factor, rope_inv_freq, swiglu)
from .._checks import check_positive_int, check_tensor
from ..distributed.ring import positions as ring_positions
from ..distributed.ring import ring_attention
from ..ops._backend import BACKENDS, for_op
from ..ops.attention_choice import attention_for, check_choice, phase_of
from ..ops.rope import apply_rope
from ..rope_scaling import rope_type
from .config import CodeLlamaConfig
from .paged_cache import BLOCK_SIZES, PagedKVCache

_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def as_autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors in autocast's dtype where autocast is on for their device, as it casts an ``nn.Linear``'s
    operands: the loss's op is not one autocast knows."""
    device = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


@dataclass
class KVCache:
    """Per-layer key and value caches (B, max_seq_len, Hk, D) and the tokens each sequence holds.

    ``seqlens`` (int32, on the device) is what the kernels read; ``filled`` is the host's upper
    bound of it, kept so that a step that would overflow the cache is refused without a sync.
    """

    k: list[Tensor]
    v: list[Tensor]
    seqlens: Tensor
    filled: int = 0
    block_table = None  # contiguous: each sequence's row of k[i] is its cache (``PagedKVCache`` has a table)

    @property
    def max_seq_len(self) -> int:
        return self.k[0].shape[1]

    def reserve(self, tokens: int) -> None:
        """Before a forward of ``tokens`` new tokens per sequence: refused if they would overflow the cache."""
        if self.filled + tokens > self.max_seq_len:
            raise ValueError(f"tokens: {tokens} more tokens after {self.filled} would overflow the cache of "
                             f"{self.max_seq_len}; make a longer one with new_cache(batch, max_seq_len)")

    def advance(self, tokens: int) -> None:
        """After a forward: the host's bound follows ``seqlens``, which the forward advanced on the device."""
        self.filled += tokens

    def truncate(self, lengths: list[int]) -> None:
        """Each sequence back to ``lengths[b]`` tokens (``filled`` stays their bound): the next tokens overwrite
        what followed, as after a padded prefill."""
        self.seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))


class LayerCache(NamedTuple):
    """What one layer's attention reads of a cache: its (k, v) caches or pools, and what all layers share."""

    k: Tensor
    v: Tensor
    seqlens: Tensor
    filled: int  # the host's bound of seqlens
    block_table: Tensor | None  # a PagedKVCache's; None for a contiguous KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.backend: str | None = None

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(RMSNorm(x + residual) * weight, x + residual): the sum is the next residual."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps, backend=for_op(self.backend, "rms_norm")), x
        return rms_norm(x, self.weight, self.eps, residual=residual, backend=for_op(self.backend, "rms_norm"))


class Attention(nn.Module):
    def __init__(self, config: CodeLlamaConfig, rope_interleaved: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.rope_interleaved = rope_interleaved
        self.backend: str | None = None
        self.attention = "auto"  # CodeLlama.attention sets it

    def forward(self, x: Tensor, inv_freq: Tensor, cache: LayerCache | None, prefill: bool,
                ring: tuple | None = None) -> Tensor:
        """x (B, S, dim). cache: this layer's part of a KVCache or PagedKVCache; prefill: the (contiguous) cache is
        empty, so the S tokens attend among themselves and are then written to it. ring: (process group, layout,
        global positions) when x is this rank's shard of the sequence (context parallelism: ring_attention,
        whatever ``attention`` says)."""
        batch, seqlen, _ = x.shape
        q = self.wq(x).view(batch, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        paged = cache is not None and cache.block_table is not None
        # The choice is asked only where it applies (it may warn): context parallelism always runs ring_attention,
        # and a paged cache ours (SDPA has no paged form: it would gather every page each step).
        sdpa = ring is None and not paged and attention_for(
            self.attention, x.device, phase_of(cache is not None and not prefill, x, self.wq.weight)) == "sdpa"
        if ring is not None:
            group, layout, positions = ring
            q, k = apply_rope(q, k, positions, inv_freq=inv_freq, interleaved=self.rope_interleaved,
                              backend=for_op(self.backend, "rope"))
            o = ring_attention(q, k, v, group, causal=True, layout=layout,
                               backend=for_op(self.backend, "flash_attention"))
        elif cache is None or prefill:
            q, k = apply_rope(q, k, inv_freq=inv_freq, interleaved=self.rope_interleaved,
                              backend=for_op(self.backend, "rope"))
            if sdpa:
                o = _sdpa_bshd(q, k, v, is_causal=True)
            else:
                o = flash_attention(q, k, v, causal=True, backend=for_op(self.backend, "flash_attention"))
            if cache is not None:
                cache.k[:, :seqlen] = k
                cache.v[:, :seqlen] = v
        else:
            # Under autocast the projections' dtype need not be the cache's (one made outside it): the cache's rules.
            q, k, v = (t.to(cache.k.dtype) for t in (q, k, v))
            if sdpa:
                o = self._sdpa_decode(q, k, v, inv_freq, cache)
            else:
                o = flash_attention_with_kvcache(q, cache.k, cache.v, cache.seqlens, k=k, v=v, inv_freq=inv_freq,
                                                 interleaved=self.rope_interleaved, causal=True,
                                                 block_table=cache.block_table,
                                                 backend=for_op(self.backend, "flash_attention_with_kvcache"))
        return self.wo(o.reshape(batch, seqlen, self.n_heads * self.head_dim))

    def _sdpa_decode(self, q: Tensor, k: Tensor, v: Tensor, inv_freq: Tensor, cache: LayerCache) -> Tensor:
        """What flash_attention_with_kvcache does, on torch's SDPA (contiguous caches): the new k and v rotated at
        each sequence's positions and written into the caches first, then the queries over their first
        ``filled + S`` keys, query i of sequence b seeing keys j <= seqlens[b] + i (bottom-right causal per
        sequence: batched prompts end at different positions)."""
        positions = cache.seqlens[:, None].long() + torch.arange(q.shape[1], device=q.device)  # (B, S)
        q, k = apply_rope(q, k, positions, inv_freq=inv_freq, interleaved=self.rope_interleaved,
                          backend=for_op(self.backend, "rope"))
        sequences = torch.arange(q.shape[0], device=q.device)[:, None]
        cache.k[sequences, positions], cache.v[sequences, positions] = k, v
        length = cache.filled + q.shape[1]
        visible = torch.arange(length, device=q.device) <= positions[:, :, None]  # (B, S, length)
        return _sdpa_bshd(q, cache.k[:, :length], cache.v[:, :length], mask=visible[:, None])


def _sdpa_bshd(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool = False, mask: Tensor | None = None) -> Tensor:
    """F.scaled_dot_product_attention on (B, S, H, D) tensors (it takes (B, H, S, D): transposed views), GQA's
    shared key/value heads through enable_gqa (torch 2.5+), repeated before."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if _SDPA_HAS_GQA:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
    else:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    return o.transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, config: CodeLlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)  # down
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)  # up
        self.backend: str | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), backend=for_op(self.backend, "swiglu")))


class TransformerBlock(nn.Module):
    def __init__(self, config: CodeLlamaConfig, rope_interleaved: bool):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, rope_interleaved)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, residual: Tensor | None, inv_freq: Tensor, cache, prefill: bool, ring=None):
        """Takes the previous sublayer's output x and the running sum before it (None in the first block);
        returns the same pair, so each residual add happens inside the next norm's kernel."""
        y, h = self.attention_norm(x, residual)
        x = self.attention(y, inv_freq, cache, prefill, ring)
        y, h = self.ffn_norm(x, h)
        return self.feed_forward(y), h


class CodeLlama(nn.Module):
    def __init__(self, config: CodeLlamaConfig, *, rope_interleaved: bool = False, backend: str | None = None,
                 attention: str = "auto"):
        super().__init__()
        if not isinstance(config, CodeLlamaConfig):
            raise TypeError(f"config: expected a CodeLlamaConfig, got {type(config).__name__}")
        if config.rope_scaling and rope_attention_factor(config.rope_scaling) != 1.0:
            raise ValueError(f"config.rope_scaling: expected a scaling of the frequencies alone; "
                             f"{config.rope_scaling} also scales attention, which the model does not apply")
        if rope_type(config.rope_scaling) == "dynamic":  # its frequencies follow each call's length
            raise ValueError("config.rope_scaling: rope_type 'dynamic' is not implemented (the model computes its "
                             "frequencies once); expected 'default', 'linear', 'llama3' or 'yarn'")
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, rope_interleaved) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._inv_freq: dict[torch.device, Tensor] = {}
        self.activation_checkpointing = False
        self.context_parallel: tuple | None = None  # (process group, layout) when the sequence is sharded
        self.backend = backend
        self.attention = attention

    def inv_freq(self, device: torch.device) -> Tensor:
        """RoPE's inverse frequencies, fp32 on ``device``. Not a buffer: ``model.to(torch.bfloat16)`` would round
        a buffer to bf16, and angles at 100k positions need every bit of fp32. Made outside inference mode:
        the first call may come from ``generate``, and an inference tensor cannot be saved for a later backward."""
        if device not in self._inv_freq:
            c = self.config
            with torch.inference_mode(False):
                self._inv_freq[device] = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling,
                                                       max_position_embeddings=c.max_seq_len, device=device)
        return self._inv_freq[device]

    @property
    def rope_interleaved(self) -> bool:
        return self.layers[0].attention.rope_interleaved

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        """Which kernels every op of the model runs: None (each op's choice), or one of ``ops._backend.BACKENDS``
        ("native": the C++ CPU kernels, "cuda": the extension's CUDA kernels; an op without kernels of theirs
        runs the reference or Triton instead: ``_backend.for_op``)."""
        if value is not None and value not in BACKENDS:
            raise ValueError(f"backend: expected None or one of {BACKENDS}, got {value!r}")
        self._backend = value
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, FeedForward)):
                module.backend = value

    @property
    def attention(self) -> str:
        return self._attention

    @attention.setter
    def attention(self, value: str) -> None:
        """Whose attention the layers run (``ops.attention_choice``): "auto" (SDPA for a phase where the card's
        measurements say it beats ours, said once by a warning; ours elsewhere and on the CPU), "llama_kernels"
        (ours always) or "sdpa" (F.scaled_dot_product_attention always). Context parallelism runs ring_attention
        whatever it says."""
        self._attention = check_choice("attention", value)
        for module in self.modules():
            if isinstance(module, Attention):
                module.attention = value

    def set_context_parallel(self, group=None, layout: str = "zigzag") -> None:
        """Shard the sequence over the ranks of ``group`` (the default group when None): each rank's forward then
        takes its shard of the tokens (``llama_kernels.distributed.shard(tokens, 1, rank, world, layout)``) and
        returns the logits of that shard, attention running as ``ring_attention``. Training and scoring only
        (no KV cache). ``disable_context_parallel()`` goes back to whole sequences."""
        from ..distributed.ring import LAYOUTS

        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        self.context_parallel = (group, layout)

    def disable_context_parallel(self) -> None:
        self.context_parallel = None

    # ------------------------------------------------------------------ forward
    def new_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_seq_len`` tokens, in the model's dtype (under
        autocast, autocast's: the dtype the projections then give)."""
        k, v = self._cache_tensors((batch_size, max_seq_len))
        return KVCache(k=k, v=v, seqlens=torch.zeros(batch_size, dtype=torch.int32, device=k[0].device))

    def new_paged_cache(self, num_blocks: int, block_size: int = 16, *, max_batch_size: int = 64,
                        max_seq_len: int | None = None) -> PagedKVCache:
        """An empty paged cache: per layer a pool of ``num_blocks`` blocks of ``block_size`` tokens (a power of two,
        16 to 256), in the dtype ``new_cache`` takes. Batches of up to ``max_batch_size`` sequences of up to
        ``max_seq_len`` tokens (by default the model's ``config.max_seq_len``) each."""
        check_positive_int("num_blocks", num_blocks)
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size: expected a power of two from 16 to 256, got {block_size!r}")
        max_seq_len = check_positive_int("max_seq_len", max_seq_len or self.config.max_seq_len)
        k, v = self._cache_tensors((num_blocks, block_size))
        return PagedKVCache(k, v, max_batch_size=max_batch_size, max_blocks_per_seq=-(-max_seq_len // block_size))

    def _cache_tensors(self, leading: tuple[int, int]) -> tuple[list[Tensor], list[Tensor]]:
        """Per layer a zero-filled k and v of shape (*leading, Hk, D) in the model's (or autocast's) dtype. Zeros, not
        uninitialized memory: SDPA's decode reads every sequence's keys up to the longest one's, masked, and a
        masked NaN is still NaN (ours reads only each sequence's own)."""
        device = self.output.weight.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else \
            self.output.weight.dtype
        shape = (*leading, self.config.n_kv_heads, self.config.head_dim)
        return ([torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers],
                [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers])

    def forward(self, tokens: Tensor, targets: Tensor | None = None, *, cache: KVCache | PagedKVCache | None = None,
                logits_at: Tensor | None = None) -> Tensor:
        """Logits (B, S, vocab) of the tokens (B, S), or (B, 1, vocab) at positions ``logits_at`` (B,); with
        ``targets``, the mean cross-entropy loss instead (an fp32 scalar).

        targets: (B, S) class indices, the token each position should predict (the caller shifts:
        ``model(tokens[:, :-1], targets=tokens[:, 1:])``), -100 where no loss is wanted. The loss is the mean
        over the other positions (nan if there are none, as torch's), computed by
        ``fused_linear_cross_entropy`` without building the logits.
        With a cache (a ``KVCache``, or a ``PagedKVCache`` over its ``set_batch``), the tokens follow what each
        sequence already holds (an empty cache: a prefill from position 0), and the cache is advanced by S; a
        forward with a cache runs without autograd (generation: the decode kernel writes the caches in place and
        has no backward).
        """
        if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens: expected an integer tensor (B, S), got {tokens.dtype} {tuple(tokens.shape)}")
        if targets is not None:
            check_tensor("targets", targets, dtypes=(torch.int64, torch.int32))
            if targets.shape != tokens.shape:
                raise ValueError(f"targets: expected tokens' shape {tuple(tokens.shape)}, got {tuple(targets.shape)}")
            if cache is not None or logits_at is not None:
                raise ValueError("targets: expected no cache and no logits_at with targets (the loss is training's, "
                                 "over every position)")
            if self.context_parallel is not None:  # a shard's mean is not the sequence's
                raise ValueError("targets: a context-parallel model returns its shard's logits, not a loss")
        if cache is None:
            return self._run(tokens, targets, None, logits_at)
        if self.context_parallel is not None:
            raise ValueError("cache: a context-parallel model has no KV cache (training and scoring only)")
        if cache.seqlens.shape[0] != tokens.shape[0]:
            raise ValueError(f"cache: expected one for {tokens.shape[0]} sequences, got {cache.seqlens.shape[0]}")
        cache.reserve(tokens.shape[1])  # an overflow refused, or pages taken, before anything is written
        with torch.no_grad():  # generation: decoding writes the caches, has no backward
            logits = self.cached_pass(tokens, cache, logits_at)
        cache.advance(tokens.shape[1])
        return logits

    def cached_pass(self, tokens: Tensor, cache: KVCache | PagedKVCache, logits_at: Tensor | None = None) -> Tensor:
        """The device's part of a forward over a cache, no checks: the tokens appended and attended, ``cache.seqlens``
        advanced on the device, the logits. The caller does the host's part around it (``cache.reserve(S)`` before,
        ``cache.advance(S)`` after), as ``forward`` does; ``generation.DecodeStep`` captures this in a CUDA graph,
        so nothing in it may read the device or change the host's state."""
        return self._run(tokens, None, cache, logits_at)

    def _run(self, tokens: Tensor, targets: Tensor | None, cache, logits_at: Tensor | None) -> Tensor:
        batch, seqlen = tokens.shape
        # A contiguous cache's first forward is a prefill by flash_attention; a paged cache always appends through
        # the KV-cache kernel (which writes into the pages).
        prefill = cache is not None and cache.block_table is None and cache.filled == 0
        x, residual, inv_freq = self.tok_embeddings(tokens), None, self.inv_freq(tokens.device)
        ring = None
        if self.context_parallel is not None:  # tokens are this rank's shard: their global positions, once
            group, layout = self.context_parallel
            ring = (group, layout, ring_positions(seqlen, dist.get_rank(group), dist.get_world_size(group), layout,
                                                  device=tokens.device))
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else LayerCache(cache.k[i], cache.v[i], cache.seqlens, cache.filled,
                                                                cache.block_table)
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x, residual = checkpoint(layer, x, residual, inv_freq, layer_cache, prefill, ring, use_reentrant=False)
            else:
                x, residual = layer(x, residual, inv_freq, layer_cache, prefill, ring)
        if cache is not None:
            cache.seqlens.add_(seqlen)
        if logits_at is not None:  # only the positions that are sampled: a 16k prompt's logits would be 1 GB
            index = logits_at.to(device=x.device, dtype=torch.long).view(batch, 1, 1).expand(batch, 1, x.shape[-1])
            x, residual = x.gather(1, index), residual.gather(1, index)
        hidden = self.norm(x, residual)[0]
        if targets is None:
            return self.output(hidden)
        hidden, weight = as_autocast(hidden, self.output.weight)
        return fused_linear_cross_entropy(hidden, weight, targets,
                                          backend=for_op(self.backend, "fused_linear_cross_entropy"))

    def generate(self, prompts: list[list[int]] | Tensor, max_new_tokens: int, **kwargs) -> list[list[int]]:
        """New tokens for each prompt: ``generation.generate`` (temperature, top_p, stop_tokens, generator)."""
        from .generation import generate

        return generate(self, prompts, max_new_tokens, **kwargs)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_config_name(cls, name: str, **kwargs) -> CodeLlama:
        """A randomly initialized published variant (``CodeLlamaConfig.from_name``)."""
        return cls(CodeLlamaConfig.from_name(name), **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = torch.bfloat16, device=None,
                        backend: str | None = None, attention: str = "auto") -> CodeLlama:
        """Meta's (params.json + consolidated.NN.pth) or Hugging Face's (config.json + safetensors / .bin)
        checkpoint directory. The weights are read one tensor at a time into a model built on the meta
        device, so no second copy exists; RoPE runs in the checkpoint's pair layout."""
        from .checkpoint import load_checkpoint

        loaded = load_checkpoint(path, dtype=dtype, device=device or "cpu")
        with torch.device("meta"):
            model = cls(loaded.config, rope_interleaved=loaded.interleaved, backend=backend, attention=attention)
        model.load_state_dict(loaded.state_dict, strict=True, assign=True)
        return model
