"""What is benchmarked: each op at Code Llama shapes, against what a user would otherwise run.

A ``Case`` is one operation (RMSNorm forward, RoPE backward, ...). It makes its
inputs for a ``Shape``, says how many bytes the operation must move at least
(each input read once, each output written once: the floor), and builds, per
provider, the zero-argument function that is timed. Peers:

- ``eager``: Hugging Face's formulas (``LlamaRMSNorm``, ``apply_rotary_pos_emb``),
  the residual add as its own op, as in HF's decoder layer;
- ``compile``: ``torch.compile`` of those same functions, static shapes;
- ``torch.rms_norm``: ``torch.nn.functional.rms_norm``;
- ``liger``: Liger-Kernel's ``LigerRMSNormFunction`` (``LigerFusedAddRMSNormFunction``
  with a residual, where it exists) and ``LigerRopeFunction``;
- ``flash_attn``: flash-attn's ``apply_rotary_emb``;
- SwiGLU: ``eager`` is HF's ``LlamaMLP`` activation ``silu(gate) * up``, ``liger`` ``LigerSiLUMulFunction``;
- cross-entropy: ``eager`` is HF's ``LlamaForCausalLM`` loss (bf16 logits, upcast, ``F.cross_entropy``:
  the logits materialized), ``liger`` ``LigerFusedLinearCrossEntropyFunction``, ``cce`` Cut
  Cross-Entropy's ``linear_cross_entropy``.

A peer that cannot run here raises ``Unavailable`` and is reported as skipped.
The same cases feed ``llama-kernels bench``, the pytest-benchmark suites in
``bench/`` and ``bench/gpu_check.py``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch._functorch.config  # a submodule torch does not import until something compiles

import llama_kernels as lk
from llama_kernels import _native

from ..models.config import CodeLlamaConfig
from .harness import default_device

DTYPE = torch.bfloat16  # every shape's unless it names another
EPS = 1e-5


@functools.cache
def model_config(model: str) -> CodeLlamaConfig:
    """The shapes of a Code Llama size ("7B", "13B", "34B"): CodeLlamaConfig's table."""
    return CodeLlamaConfig.from_name(f"CodeLlama-{model.lower()}")


THETA = model_config("7B").rope_theta  # every Code Llama's RoPE base
VOCAB = model_config("7B").vocab_size  # 32,016: the loss is timed over it at every width


class Unavailable(Exception):
    """A provider that cannot run here (not installed, no such function): skipped, with the reason."""


@dataclass(frozen=True)
class Shape:
    """One Code Llama model size at a sequence length (``tokens``), ``batch`` sequences, in ``dtype``."""

    model: str
    tokens: int
    batch: int = 1
    width: int | None = None  # a hidden size other than the model's (the CPU's reduced cross-entropy)
    dtype: torch.dtype = DTYPE

    @property
    def element(self) -> int:
        return self.dtype.itemsize  # bytes

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def hidden(self) -> int:
        return self.width or model_config(self.model).dim

    @property
    def heads(self) -> tuple[int, int, int]:
        c = model_config(self.model)
        return c.n_heads, c.n_kv_heads, c.head_dim

    @property
    def ffn(self) -> int:
        return model_config(self.model).hidden_dim

    def as_dict(self, op: str) -> dict:
        return {**self._dims(op), "dtype": self.dtype_name}

    def _dims(self, op: str) -> dict:
        if op == "rms_norm":
            return {"model": self.model, "tokens": self.tokens, "hidden": self.hidden}
        if op == "swiglu":
            return {"model": self.model, "tokens": self.tokens, "ffn": self.ffn}
        if op == "cross_entropy":
            return {"model": self.model, "tokens": self.tokens, "hidden": self.hidden, "vocab": VOCAB,
                    "reduced": self.width is not None}
        hq, hk, d = self.heads
        return {"model": self.model, "batch": self.batch, "seqlen": self.tokens, "q_heads": hq,
                "kv_heads": hk, "head_dim": d}

    def label(self, op: str) -> str:
        dims = self._dims_label(op)
        return dims if self.dtype == DTYPE else f"{dims} {self.dtype_name}"

    def _dims_label(self, op: str) -> str:
        if op == "rms_norm":
            return f"{self.model} T={self.tokens} H={self.hidden}"
        if op == "swiglu":
            return f"{self.model} T={self.tokens} F={self.ffn}"
        if op == "cross_entropy":
            return f"{self.model} N={self.tokens} H={self.hidden}{' (reduced)' if self.width else ''} V={VOCAB}"
        hq, hk, d = self.heads
        batch = f"B={self.batch} " if self.batch > 1 else ""
        return f"{self.model} {batch}S={self.tokens} {hq}/{hk}x{d}"


GPU_SHAPES = {
    "memory": (Shape("7B", 1024), Shape("7B", 16384), Shape("13B", 16384), Shape("34B", 16384), Shape("34B", 100_000)),
    # 16k tokens per batch below 16k-token sequences, as flash-attn's benchmarks do
    "attention": tuple(Shape(model, s, max(1, 16384 // s)) for model in ("7B", "34B")
                       for s in (4096, 16384, 32768, 65536, 100_000)),
    # one decoding step: `tokens` is the cache length; batch 32 at 16k (a serving batch; 100k would not fit twice,
    # contiguous and paged, beside the 7B's heads)
    "decode": tuple(Shape(model, s, batch) for model in ("7B", "34B") for batch in (1, 8)
                    for s in (4096, 16384, 65536, 100_000)) + (Shape("7B", 16384, 32), Shape("34B", 16384, 32)),
    # the loss over N tokens: H = 4096 (7B) and 8192 (34B)
    "cross_entropy": tuple(Shape(model, n) for model in ("7B", "34B") for n in (4096, 16384, 65536)),
}
FP32 = torch.float32
CPU_SHAPES = {  # 2 cores
    "memory": (Shape("7B", 1024), Shape("34B", 4096)),
    # bf16 and fp32, at 512 tokens and at 2048 (the CPU's long context)
    "attention": (Shape("7B", 512), Shape("34B", 512), Shape("7B", 512, dtype=FP32), Shape("34B", 512, dtype=FP32),
                  Shape("7B", 2048), Shape("7B", 2048, dtype=FP32)),
    "decode": (Shape("7B", 2048), Shape("34B", 2048, 4), Shape("7B", 2048, dtype=FP32),
               Shape("34B", 2048, 4, dtype=FP32), Shape("7B", 8192)),
    # 6 N H V at H = 4096 is ~6 TFLOP a call: H reduced to 256 on 2 cores (said in the label)
    "cross_entropy": (Shape("7B", 8192, width=256),),
}
# The GPU check's launch-config sweep: the shapes each kind of op is tuned at (16k tokens, decoding over 64k
# cached ones; a tuned config's key does not depend on the token count).
SWEEP_SHAPES = {
    "memory": (Shape("7B", 16384), Shape("13B", 16384), Shape("34B", 16384)),
    "attention": (Shape("34B", 16384),),
    "decode": (Shape("34B", 65536), Shape("7B", 65536)),
    "cross_entropy": (Shape("7B", 16384), Shape("34B", 16384)),
}
# The GPU check's benchmark: the key shapes only, to fit its budget (llama-kernels bench runs them all): 16k
# tokens of the 7B and 34B layouts, and 100k tokens for the memory-bound ops (a 100k-token attention backward
# takes 1.5 s a call).
CHECK_SHAPES = {
    "memory": (Shape("7B", 16384), Shape("34B", 16384), Shape("34B", 100_000)),
    "attention": (Shape("7B", 16384), Shape("34B", 16384)),
    "decode": (Shape("7B", 16384), Shape("34B", 65536), Shape("34B", 100_000, 8)),
    "cross_entropy": (Shape("7B", 16384), Shape("34B", 16384)),
}
QUICK_SHAPES = {"memory": (Shape("7B", 256),), "attention": (Shape("34B", 128),), "decode": (Shape("34B", 256),),
                "cross_entropy": (Shape("7B", 256, width=128),)}


def shapes_for(op: str, device: torch.device, quick: bool, table: dict | None = None) -> tuple[Shape, ...]:
    """The shapes of op's kind ("memory", "attention", "decode" or "cross_entropy") in ``table``, by default the
    device's."""
    table = table or (QUICK_SHAPES if quick else GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    return table.get(op, table["memory"])


def ours_backend(device: torch.device) -> str | None:
    """On CPU the package's CPU path: the C++ kernels when built, else the reference. Naming it keeps
    TRITON_INTERPRET=1 from turning "ours" into the (very slow) Triton interpreter."""
    if device.type != "cpu":
        return None
    return "native" if _native.available("cpu") else "reference"


def _import(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"{module}.{name} not importable ({type(e).__name__})") from None


def _compile(fn):
    torch._dynamo.reset()  # a fresh static-shape graph for each shape, never the recompile limit
    return torch.compile(fn, dynamic=False)


# --------------------------------------------------------------------------- RMSNorm providers
# Each builds norm(x, w, residual=None) -> y, or (y, h) with a residual.
def _separate_add(norm):
    """norm(x, w) -> norm(x, w, residual=None), the residual add as its own op, as in HF's decoder layer."""

    def f(x, w, residual=None):
        if residual is None:
            return norm(x, w)
        h = x + residual
        return norm(h, w), h

    return f


def _hf_llama_rms_norm(x, w):
    """Hugging Face's LlamaRMSNorm.forward."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


hf_rms_norm = _separate_add(_hf_llama_rms_norm)  # torch.compile of it sees the add and the norm together


def _rms_ours(device):
    backend = ours_backend(device)
    return lambda x, w, residual=None: lk.rms_norm(x, w, EPS, residual=residual, backend=backend)


def _need_cuda_extension(device) -> None:
    if device.type != "cuda" or not _native.available("cuda"):
        raise Unavailable("the extension's CUDA kernels are not built here (bench/gpu_check.py builds them on a card)")


def _rms_cuda_extension(device):
    """The extension's hand-written CUDA kernels (``backend="cuda"``: forward only, Triton's backward)."""
    _need_cuda_extension(device)
    return lambda x, w, residual=None: lk.rms_norm(x, w, EPS, residual=residual, backend="cuda")


def _rms_torch(device):
    return _separate_add(lambda x, w: torch.nn.functional.rms_norm(x, (x.shape[-1],), w, EPS))


def _rms_liger(device):
    if device.type != "cuda":
        raise Unavailable("Liger-Kernel needs CUDA")
    norm = _import("liger_kernel.ops.rms_norm", "LigerRMSNormFunction")
    try:
        fused_add = _import("liger_kernel.ops.fused_add_rms_norm", "LigerFusedAddRMSNormFunction")
    except Unavailable:  # releases before it: the add as its own op
        fused_add = None

    # Positional (X, [R,] W, eps) only: later arguments changed across Liger releases; the
    # defaults are Llama casting, as HF's module computes.
    separate = _separate_add(lambda x, w: norm.apply(x, w, EPS))
    if fused_add is None:
        return separate
    # With a residual, (y, h) from one kernel, like ours.
    return lambda x, w, residual=None: separate(x, w) if residual is None else fused_add.apply(x, residual, w, EPS)


RMS_NORM_PROVIDERS = {
    "ours": _rms_ours,
    "ours_cuda": _rms_cuda_extension,
    "eager": lambda device: hf_rms_norm,
    "compile": lambda device: _compile(hf_rms_norm),
    "torch.rms_norm": _rms_torch,
    "liger": _rms_liger,
}


# --------------------------------------------------------------------------- RoPE providers
# Each builds rope(q, k) -> (q_rotated, k_rotated) for q (B, S, Hq, D), k (B, S, Hk, D).
# The peers' cos/sin tables are made here, outside the timing: HF computes them once per
# forward and shares them across all layers; ours computes its angles inside the kernel.
def hf_cos_sin(positions, head_dim: int, dtype):
    """HF's LlamaRotaryEmbedding.forward: (B, S, D) cos and sin in the activations' dtype."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (THETA**exponents)
    inv_freq_expanded = inv_freq[None, :, None].expand(positions.shape[0], -1, 1)
    freqs = (inv_freq_expanded @ positions[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2):
    """HF's apply_rotary_pos_emb; unsqueeze_dim=2 for (B, S, H, D) tensors (HF's (B, H, S, D) views use 1)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def _rope_ours(inputs, device):
    backend = ours_backend(device)
    return lambda q, k: lk.apply_rope(q, k, theta=THETA, backend=backend)


def _rope_cuda_extension(inputs, device):
    _need_cuda_extension(device)
    return lambda q, k: lk.apply_rope(q, k, theta=THETA, backend="cuda")


def _hf_tables(inputs):
    return hf_cos_sin(inputs["positions"], inputs["q"].shape[-1], inputs["q"].dtype)


def _rope_eager(inputs, device):
    cos, sin = _hf_tables(inputs)
    return lambda q, k: hf_apply_rotary_pos_emb(q, k, cos, sin)


def _rope_compile(inputs, device):
    cos, sin = _hf_tables(inputs)
    compiled = _compile(hf_apply_rotary_pos_emb)
    return lambda q, k: compiled(q, k, cos, sin)


def _rope_liger(inputs, device):
    if device.type != "cuda":
        raise Unavailable("Liger-Kernel needs CUDA")
    liger = _import("liger_kernel.ops.rope", "LigerRopeFunction")
    cos, sin = _hf_tables(inputs)

    def rope(q, k):
        # Liger takes HF's (B, H, S, D) views of (B, S, H, D) storage and rotates them in place.
        q_out, k_out = liger.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)

    return rope


def _rope_flash_attn(inputs, device):
    if device.type != "cuda":
        raise Unavailable("flash-attn needs CUDA")
    apply_rotary_emb = _import("flash_attn.layers.rotary", "apply_rotary_emb")
    cos, sin = _hf_tables(inputs)
    half = inputs["q"].shape[-1] // 2
    cos, sin = cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous()  # its (S, D/2) table
    return lambda q, k: (apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin))


ROPE_PROVIDERS = {
    "ours": _rope_ours,
    "ours_cuda": _rope_cuda_extension,
    "eager": _rope_eager,
    "compile": _rope_compile,
    "liger": _rope_liger,
    "flash_attn": _rope_flash_attn,
}


# Meta's layout (interleaved pairs): what the model runs on Meta's checkpoints, against Meta's own code.
def meta_freqs_cis(positions, head_dim: int):
    """Meta's precompute_freqs_cis at these positions: (S, D/2) complex64, made once per forward."""
    inv_freq = 1.0 / (THETA ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = torch.outer(positions[0].float(), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def meta_apply_rotary_emb(q, k, freqs_cis):
    """Meta's apply_rotary_emb: pairs as complex numbers, multiplied in fp32, cast back."""
    def rotate(x):
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs_cis[None, :, None, :]).flatten(3).type_as(x)
    return rotate(q), rotate(k)


def _rope_interleaved_ours(inputs, device, backend=None):
    backend = backend or ours_backend(device)
    return lambda q, k: lk.apply_rope(q, k, theta=THETA, interleaved=True, backend=backend)


def _rope_interleaved_cuda_extension(inputs, device):
    _need_cuda_extension(device)
    return _rope_interleaved_ours(inputs, device, backend="cuda")


def _rope_meta(compiled: bool):
    def build(inputs, device):
        freqs_cis = meta_freqs_cis(inputs["positions"], inputs["q"].shape[-1])
        rotate = _compile(meta_apply_rotary_emb) if compiled else meta_apply_rotary_emb
        return lambda q, k: rotate(q, k, freqs_cis)
    return build


# "eager" and "compile" here are Meta's apply_rotary_emb (HF has no interleaved form).
ROPE_INTERLEAVED_PROVIDERS = {"ours": _rope_interleaved_ours, "ours_cuda": _rope_interleaved_cuda_extension,
                              "eager": _rope_meta(False), "compile": _rope_meta(True)}


# --------------------------------------------------------------------------- attention providers
# Each builds attn(q, k, v) -> o for (B, S, H, D) tensors, causal or not; masks are made here, untimed.
def _attention_ours(inputs, device, causal):
    backend = ours_backend(device)
    return lambda q, k, v: lk.flash_attention(q, k, v, causal=causal, backend=backend)


def _sdpa(backend_name: str, cuda_only: bool = True):
    def build(inputs, device, causal):
        if cuda_only and device.type != "cuda":
            raise Unavailable(f"SDPA's {backend_name} backend needs CUDA")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)

        def attn(q, k, v):  # SDPA takes (B, H, S, D): views of the same storage
            with sdpa_kernel(backend):
                o = torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True)
            return o.transpose(1, 2)

        return attn

    return build


def _flex(inputs, device, causal):
    if device.type != "cuda":
        raise Unavailable("FlexAttention is timed on CUDA only (its CPU path has no backward)")
    flex_module = "torch.nn.attention.flex_attention"
    flex_attention, create_block_mask = _import(flex_module, "flex_attention"), _import(flex_module, "create_block_mask")
    seqlen = inputs["q"].shape[1]
    block_mask = (create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, seqlen, seqlen,
                                    device=device) if causal else None)
    compiled = _compile(flex_attention)
    return lambda q, k, v: compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                                    enable_gqa=True).transpose(1, 2)


def _flash_attn(inputs, device, causal):
    if device.type != "cuda":
        raise Unavailable("flash-attn needs CUDA")
    flash_attn_func = _import("flash_attn", "flash_attn_func")
    return lambda q, k, v: flash_attn_func(q, k, v, causal=causal)


ATTENTION_PROVIDERS = {
    "ours": _attention_ours,
    "sdpa_flash": _sdpa("FLASH_ATTENTION", cuda_only=False),  # on a CPU: torch's CPU flash kernel
    "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa_efficient": _sdpa("EFFICIENT_ATTENTION"),
    "flex": _flex,
    "flash_attn": _flash_attn,
}


def _attention_inputs(shape: Shape, device) -> dict:
    hq, hk, d = shape.heads
    b, s = shape.batch, shape.tokens
    return {"q": _randn(shape, device, b, s, hq, d), "k": _randn(shape, device, b, s, hk, d),
            "v": _randn(shape, device, b, s, hk, d), "do": _randn(shape, device, b, s, hq, d)}


def _attention_build(causal: bool, backward: bool):
    def build(provider, inputs, device):
        attn = ATTENTION_PROVIDERS[provider](inputs, device, causal)
        q, k, v = inputs["q"], inputs["k"], inputs["v"]
        if backward:
            return _backward_only(attn, (q, k, v), (inputs["do"],))
        return lambda: attn(q, k, v)

    return build


def _attention_flops(causal: bool, backward: bool):
    """4 B Hq S^2 D for the two matrix products, half of it when causal; the backward does 2.5 times that."""

    def flops(shape: Shape) -> float:
        hq, _, d = shape.heads
        forward = 4 * shape.batch * hq * shape.tokens**2 * d / (2 if causal else 1)
        return forward * (2.5 if backward else 1.0)

    return flops


# --------------------------------------------------------------------------- decoding
# One step: a query per sequence over `tokens` cached keys and values. The peers are the attention
# providers over the same (B, 1, Hq, D) query and (B, L, Hk, D) caches, without masks; and, over a paged cache
# (the same keys and values in pages of 16 or 256 positions, shuffled in one pool: `_pages`), ours,
# flash-attn's flash_attn_with_kvcache with a block table (pages of 256: it needs multiples of 256) and
# FlashInfer's paged decode (pages of 16).
DECODE_PROVIDERS = ("ours", "ours_paged16", "ours_paged256", "flash_attention", "sdpa_flash", "sdpa_efficient",
                    "sdpa_cudnn", "flex", "flash_attn", "flash_attn_paged256", "flashinfer_paged16")


def _decode_inputs(shape: Shape, device) -> dict:
    hq, hk, d = shape.heads
    b, length = shape.batch, shape.tokens
    return {"q": _randn(shape, device, b, 1, hq, d), "k": _randn(shape, device, b, length, hk, d),
            "v": _randn(shape, device, b, length, hk, d),
            "cache_seqlens": torch.full((b,), length, dtype=torch.int32, device=device)}


def _pages(inputs: dict, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_pool, v_pool, block_table): the caches' positions in pages of block_size, in a random order in one pool
    (what a serving pool looks like after sequences came and went)."""
    k_cache, v_cache = inputs["k"], inputs["v"]
    batch, length, hk, d = k_cache.shape
    per_sequence = -(-length // block_size)
    block_table = torch.randperm(batch * per_sequence, device=k_cache.device).view(batch, per_sequence).int()

    def pool(cache):
        padded = torch.nn.functional.pad(cache, (0, 0, 0, 0, 0, per_sequence * block_size - length))
        pages = torch.empty(batch * per_sequence, block_size, hk, d, dtype=cache.dtype, device=cache.device)
        pages[block_table.flatten().long()] = padded.view(-1, block_size, hk, d)
        return pages

    return pool(k_cache), pool(v_cache), block_table


def _ours_paged(q, k_pool, v_pool, seqlens, block_table, device):
    backend = ours_backend(device)
    return lambda: lk.flash_attention_with_kvcache(q, k_pool, v_pool, seqlens, backend=backend,
                                                   block_table=block_table)


def _flash_attn_paged(q, k_pool, v_pool, seqlens, block_table, device):
    flash_attn_with_kvcache = _import("flash_attn", "flash_attn_with_kvcache")
    return lambda: flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=seqlens, block_table=block_table)


def _flashinfer_paged(q, k_pool, v_pool, seqlens, block_table, device):
    wrapper_class = _import("flashinfer", "BatchDecodeWithPagedKVCacheWrapper")
    batch, _, hq, d = q.shape
    block_size = k_pool.shape[1]
    # FlashInfer's table is CSR: each sequence's pages in a row of indices, and its last page's filled length.
    indptr = torch.arange(batch + 1, dtype=torch.int32, device=device) * block_table.shape[1]
    last_page_len = (seqlens - 1) % block_size + 1
    wrapper = wrapper_class(torch.empty(128 * 2**20, dtype=torch.uint8, device=device), "NHD")
    try:
        wrapper.plan(indptr, block_table.flatten(), last_page_len, hq, k_pool.shape[2], d, block_size,
                     q_data_type=q.dtype, kv_data_type=k_pool.dtype)
    except TypeError as e:  # an older release's signature
        raise Unavailable(f"flashinfer's BatchDecodeWithPagedKVCacheWrapper.plan: {e}") from None
    q_rows = q[:, 0]  # (B, Hq, D): one query per sequence
    return lambda: wrapper.run(q_rows, (k_pool, v_pool))


# "<name>_paged<block size>" providers: (q, k_pool, v_pool, cache_seqlens, block_table, device) -> timed fn
PAGED_DECODE = {"ours": _ours_paged, "flash_attn": _flash_attn_paged, "flashinfer": _flashinfer_paged}


def _decode_build(provider, inputs, device):
    q, k_cache, v_cache, seqlens = inputs["q"], inputs["k"], inputs["v"], inputs["cache_seqlens"]
    if provider == "ours":
        backend = ours_backend(device)
        return lambda: lk.flash_attention_with_kvcache(q, k_cache, v_cache, seqlens, backend=backend)
    if "_paged" in provider:
        name, block_size = provider.split("_paged")
        if name != "ours" and device.type != "cuda":
            raise Unavailable(f"{provider} needs CUDA")
        k_pool, v_pool, block_table = _pages(inputs, int(block_size))
        return PAGED_DECODE[name](q, k_pool, v_pool, seqlens, block_table, device)
    attn = ATTENTION_PROVIDERS["ours" if provider == "flash_attention" else provider](inputs, device, False)
    return lambda: attn(q, k_cache, v_cache)


def _decode_bytes(shape: Shape) -> int:
    hq, hk, d = shape.heads
    # K, V, q read; o written
    return (2 * shape.batch * shape.tokens * hk * d + 2 * shape.batch * hq * d) * shape.element


# --------------------------------------------------------------------------- SwiGLU providers
# Each builds swiglu(gate, up) -> silu(gate) * up; gate and up are the halves of one fused projection.
def _silu_mul(gate, up):
    return torch.nn.functional.silu(gate) * up  # HF's LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)


def _swiglu_liger(device):
    if device.type != "cuda":
        raise Unavailable("Liger-Kernel needs CUDA")
    return _import("liger_kernel.ops.swiglu", "LigerSiLUMulFunction").apply


SWIGLU_PROVIDERS = {
    "ours": lambda device: functools.partial(lk.swiglu, backend=ours_backend(device)),
    "eager": lambda device: _silu_mul,
    "compile": lambda device: _compile(_silu_mul),
    "liger": _swiglu_liger,
}


def _swiglu_inputs(shape: Shape, device) -> dict:
    gate, up = _randn(shape, device, shape.tokens, 2 * shape.ffn).chunk(2, -1)
    return {"gate": gate, "up": up, "dy": _randn(shape, device, shape.tokens, shape.ffn)}


def _swiglu_forward(provider, inputs, device):
    swiglu, gate, up = SWIGLU_PROVIDERS[provider](device), inputs["gate"], inputs["up"]
    return lambda: swiglu(gate, up)


def _swiglu_backward(provider, inputs, device):
    return _backward_only(SWIGLU_PROVIDERS[provider](device), (inputs["gate"], inputs["up"]), (inputs["dy"],))


# --------------------------------------------------------------------------- cross-entropy providers
# Each builds loss(hidden, weight, target) -> the mean loss of hidden @ weight.T over the targets.
def _materialized_loss(hidden, weight, target):
    """HF's LlamaForCausalLM: the bf16 logits, upcast to fp32 for the loss (N x V twice, and their gradient)."""
    return torch.nn.functional.cross_entropy((hidden @ weight.T).float(), target)


def _cross_entropy_liger(device):
    if device.type != "cuda":
        raise Unavailable("Liger-Kernel needs CUDA")
    function = _import("liger_kernel.ops.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")
    def loss(hidden, weight, target):
        # Positional (input, weight, target) only: later arguments changed across Liger releases, and so did
        # the result (the loss, or (loss, z_loss)).
        result = function.apply(hidden, weight, target)
        return result[0] if isinstance(result, tuple) else result

    return loss


def _cross_entropy_cce(device):
    if device.type != "cuda":
        raise Unavailable("Cut Cross-Entropy needs CUDA")
    return _import("cut_cross_entropy", "linear_cross_entropy")  # (embeddings, classifier, targets)


CROSS_ENTROPY_PROVIDERS = {
    "ours": lambda device: functools.partial(lk.fused_linear_cross_entropy, backend=ours_backend(device)),
    "eager": lambda device: _materialized_loss,
    "compile": lambda device: _compile(_materialized_loss),
    "liger": _cross_entropy_liger,
    "cce": _cross_entropy_cce,
}


def _cross_entropy_inputs(shape: Shape, device) -> dict:
    return {"hidden": _randn(shape, device, shape.tokens, shape.hidden),
            "weight": _randn(shape, device, VOCAB, shape.hidden) * shape.hidden**-0.5,
            "target": torch.randint(0, VOCAB, (shape.tokens,), device=device)}


def _cross_entropy_forward_backward(provider, inputs, device):
    loss = CROSS_ENTROPY_PROVIDERS[provider](device)
    hidden, weight = (inputs[name].detach().requires_grad_() for name in ("hidden", "weight"))
    target = inputs["target"]
    return lambda: torch.autograd.grad(loss(hidden, weight, target), (hidden, weight))


def _cross_entropy_flops(shape: Shape) -> float:
    """6 N H V: the logits (2 N H V), then dhidden and dweight (2 N H V each); the softmax is noise beside them."""
    return 6 * shape.tokens * shape.hidden * VOCAB


# --------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    name: str
    op: str  # "rms_norm", "rope", "attention", "decode", "swiglu" or "cross_entropy": what --ops selects
    title: str
    make_inputs: Callable[[Shape, torch.device], dict]
    # The floor: memory-bound ops count the bytes they must move (each input read once, each
    # output written once) against the copy bandwidth; compute-bound ops their FLOPs against the matmul peak.
    bytes_moved: Callable[[Shape], int] | None
    build: Callable[[str, dict, torch.device], Callable[[], object]]  # (provider, inputs, device) -> timed fn
    providers: tuple[str, ...]
    flops: Callable[[Shape], float] | None = None
    # Its CPU rows measure their peak memory in a fresh process (``harness.cpu_peak_memory_bytes``, from
    # ``fresh_step``): a few seconds a row, spent where the memory is the point.
    cpu_peak: bool = False


def _randn(shape: Shape, device, *sizes):
    """Standard normal values of sizes, in shape's dtype."""
    return torch.randn(*sizes, device=device, dtype=shape.dtype)


def _rms_inputs(shape: Shape, device) -> dict:
    t, h = shape.tokens, shape.hidden
    return {"x": _randn(shape, device, t, h), "residual": _randn(shape, device, t, h),
            "dy": _randn(shape, device, t, h), "w": 1 + 0.1 * _randn(shape, device, h)}


def _rms_forward(provider, inputs, device):
    norm = RMS_NORM_PROVIDERS[provider](device)
    x, w = inputs["x"], inputs["w"]
    return lambda: norm(x, w)


def _rms_residual_forward(provider, inputs, device):
    norm = RMS_NORM_PROVIDERS[provider](device)
    x, r, w = inputs["x"], inputs["residual"], inputs["w"]
    return lambda: norm(x, w, r)


def _rms_forward_backward(provider, inputs, device):
    norm = RMS_NORM_PROVIDERS[provider](device)
    x, w = inputs["x"].detach().requires_grad_(), inputs["w"].detach().requires_grad_()
    dy = inputs["dy"]
    return lambda: torch.autograd.grad(norm(x, w), (x, w), dy)


def _backward_only(forward, inputs: tuple, grads: tuple):
    """Time the backward alone: the forward runs once here, each timed call differentiates it again.

    retain_graph=True keeps the graph for the next call; a compiled backward that donates
    its saved buffers refuses that, so donation is off for the forward compiled here.
    """
    leaves = tuple(t.detach().requires_grad_() for t in inputs)
    with torch._functorch.config.patch(donated_buffer=False):
        outputs = forward(*leaves)
    return lambda: torch.autograd.grad(outputs, leaves, grads, retain_graph=True)


def _rms_backward(provider, inputs, device):
    norm = RMS_NORM_PROVIDERS[provider](device)
    return _backward_only(norm, (inputs["x"], inputs["w"]), (inputs["dy"],))


def _rope_inputs(shape: Shape, device) -> dict:
    hq, hk, d = shape.heads
    s = shape.tokens
    return {"q": _randn(shape, device, 1, s, hq, d), "k": _randn(shape, device, 1, s, hk, d),
            "dq": _randn(shape, device, 1, s, hq, d), "dk": _randn(shape, device, 1, s, hk, d),
            "positions": torch.arange(s, device=device)[None]}


def _rope_forward(provider, inputs, device, providers=ROPE_PROVIDERS):
    rope = providers[provider](inputs, device)
    q, k = inputs["q"], inputs["k"]
    return lambda: rope(q, k)


def _rope_backward(provider, inputs, device):
    rope = ROPE_PROVIDERS[provider](inputs, device)
    return _backward_only(rope, (inputs["q"], inputs["k"]), (inputs["dq"], inputs["dk"]))


def _rope_bytes(shape: Shape) -> int:
    hq, hk, d = shape.heads
    return 2 * shape.tokens * (hq + hk) * d * shape.element  # q and k read, q and k written


CASES = (
    Case("rms_norm", "rms_norm", "RMSNorm forward: y = RMSNorm(x) * w",
         _rms_inputs, lambda s: (2 * s.tokens * s.hidden + s.hidden) * s.element,  # x, w read; y written
         _rms_forward, tuple(RMS_NORM_PROVIDERS)),
    Case("rms_norm_residual", "rms_norm", "RMSNorm forward with residual: h = x + r, y = RMSNorm(h) * w",
         _rms_inputs, lambda s: (4 * s.tokens * s.hidden + s.hidden) * s.element,  # x, r, w read; y, h written
         _rms_residual_forward, tuple(RMS_NORM_PROVIDERS)),
    Case("rms_norm_bwd", "rms_norm", "RMSNorm backward (dx, dw)",
         _rms_inputs, lambda s: (3 * s.tokens * s.hidden + 2 * s.hidden) * s.element,  # dy, x, w read; dx, dw written
         _rms_backward, tuple(RMS_NORM_PROVIDERS)),
    Case("rms_norm_fwd_bwd", "rms_norm", "RMSNorm forward + backward (dx, dw)",
         # two passes: forward reads x, w and writes y; backward reads dy, x, w and writes dx, dw
         _rms_inputs, lambda s: (5 * s.tokens * s.hidden + 3 * s.hidden) * s.element,
         _rms_forward_backward, tuple(RMS_NORM_PROVIDERS)),
    Case("rope", "rope", "RoPE forward on q and k (half-split layout)",
         _rope_inputs, _rope_bytes, _rope_forward, tuple(ROPE_PROVIDERS)),
    Case("rope_bwd", "rope", "RoPE backward: dq, dk from the gradients of the rotated q, k",
         _rope_inputs, _rope_bytes, _rope_backward, tuple(ROPE_PROVIDERS)),
    Case("rope_interleaved", "rope", "RoPE forward on q and k (Meta's interleaved layout)",
         _rope_inputs, _rope_bytes, functools.partial(_rope_forward, providers=ROPE_INTERLEAVED_PROVIDERS),
         tuple(ROPE_INTERLEAVED_PROVIDERS)),
    *(Case(f"attention{'_bwd' if backward else ''}{'_causal' if causal else ''}", "attention",
           f"attention {'backward (dq, dk, dv)' if backward else 'forward'}{', causal' if causal else ''}",
           _attention_inputs, None, _attention_build(causal, backward), tuple(ATTENTION_PROVIDERS),
           flops=_attention_flops(causal, backward))
      for backward in (False, True) for causal in (True, False)),
    Case("decode", "decode", "decoding step over a KV cache (Sq = 1; shape S = cached tokens)",
         _decode_inputs, _decode_bytes, _decode_build, DECODE_PROVIDERS),
    Case("swiglu", "swiglu", "SwiGLU forward: silu(gate) * up, the halves of one fused projection",
         _swiglu_inputs, lambda s: 3 * s.tokens * s.ffn * s.element,  # gate, up read; y written
         _swiglu_forward, tuple(SWIGLU_PROVIDERS)),
    Case("swiglu_bwd", "swiglu", "SwiGLU backward (dgate, dup)",
         _swiglu_inputs, lambda s: 5 * s.tokens * s.ffn * s.element,  # dy, gate, up read; dgate, dup written
         _swiglu_backward, tuple(SWIGLU_PROVIDERS)),
    Case("cross_entropy", "cross_entropy", "linear cross-entropy forward + backward (dhidden, dweight), mean loss",
         _cross_entropy_inputs, None, _cross_entropy_forward_backward, tuple(CROSS_ENTROPY_PROVIDERS),
         flops=_cross_entropy_flops, cpu_peak=True),
)
# What --ops selects. "model" and "train" are the Code Llama layer stack of ``model.py`` and ``train.py``, not cases:
# ``matrix`` finds no case for them, and the runner measures them on their own.
OPS = ("rms_norm", "rope", "attention", "decode", "swiglu", "cross_entropy", "model", "train")


COMPILED_PROVIDERS = ("compile", "flex")  # their warm-ups take seconds: left out of --quick


def figures(case: Case, shape: Shape, median_ms: float, ceilings: dict) -> dict:
    """Rate, fraction of the ceiling and floor of one measurement: GB/s against the copy, or TFLOP/s against
    the matmul."""
    seconds = median_ms * 1e-3
    if case.flops is not None:
        work, peak = case.flops(shape), ceilings["matmul"]["tflops"] * 1e12
        return {"flops": work, "rate": work / seconds / 1e12, "unit": "TFLOP/s", "ceiling": "matmul",
                "fraction_of_ceiling": work / seconds / peak, "floor_ms": work / peak * 1e3}
    work, peak = case.bytes_moved(shape), ceilings["copy"]["gbps"] * 1e9
    return {"bytes": work, "rate": work / seconds / 1e9, "unit": "GB/s", "ceiling": "copy",
            "fraction_of_ceiling": work / seconds / peak, "floor_ms": work / peak * 1e3}


@dataclass(frozen=True)
class Item:
    """One measurement: a case at a shape by a provider."""

    case: Case
    shape: Shape
    provider: str

    def __str__(self) -> str:
        return f"{self.case.name}-{self.shape.label(self.case.op).replace(' ', '-')}-{self.provider}"


def matrix(ops, device: torch.device, quick: bool = False, with_compile: bool = True,
           shapes: dict | None = None) -> list[Item]:
    """Every (case, shape, provider) to measure, in the order of ``ops``, case by case, shape by shape."""
    return [
        Item(case, shape, provider)
        for op in ops for case in CASES if case.op == op
        for shape in shapes_for(case.op, device, quick, shapes)
        for provider in case.providers if with_compile or provider not in COMPILED_PROVIDERS
    ]


def fresh_step(case_name: str, shape: Shape, provider: str) -> contextlib.nullcontext:
    """One CPU row's timed function built from nothing, its inputs included, as the context
    ``harness.cpu_peak_memory_bytes`` runs in a fresh process (a module-level function of picklable arguments)."""
    case = next(case for case in CASES if case.name == case_name)
    device = torch.device("cpu")
    return contextlib.nullcontext(case.build(provider, case.make_inputs(shape, device), device))


def suite_items(op: str) -> list[Item]:
    """The pytest-benchmark suites' items: the benchmark's shapes on a GPU; on a CPU, a smoke test (quick shape)."""
    device = default_device()
    return matrix((op,), device, quick=device.type == "cpu")
