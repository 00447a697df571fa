"""The model benchmark: a Code Llama 7B layer stack, ours against the unpatched Hugging Face model.

    llama-kernels bench --ops model [--model-layers 8]

Three providers, and HF's compiled decode, run the same random bf16 weights (the Hugging Face
model's parameters are ours' tensors, assigned with ``load_state_dict(assign=True)``: one copy in memory):

- ``ours``: ``llama_kernels.models.CodeLlama`` (the Triton kernels on CUDA; on a CPU the
  package's CPU path: the C++ kernels, or the reference where they are not built);
- ``hf_sdpa``: transformers' ``LlamaForCausalLM`` with ``attn_implementation="sdpa"``, unpatched;
- ``hf_patched``: that same model after ``llama_kernels.models.hf.patch_hf_llama`` (skipped, with
  the reason, where the patch is missing or refuses; unpatched again after each of its rows);
- ``hf_static_compiled`` (decode): that same unpatched model over its ``StaticCache``, called through
  ``get_compiled_call`` with transformers' default ``CompileConfig``: the compiled forward ``generate``
  runs each token with a static cache, HF's fastest decode (on CUDA ``mode="reduce-overhead"``, so CUDA
  graphs). Its compile takes about a minute on a CPU: left out of ``--quick``.

and three variants of ours, each against ours' plain row of its phase:

- ``ours_chunked`` (prefill): the prompt prefilled ``prefill_chunk`` tokens at a time
  (``generation.prefill``; the default chunk on a GPU, S / 4 on the CPU's reduced lengths): its
  peak memory and tokens/s against the one-shot prefill;
- ``ours_graph`` (decode): the step ``generate`` replays, captured in a CUDA graph
  (``generation.DecodeStep``; ours' attention, SDPA's decode is not captured); on the CPU a
  skipped row that says why;
- ``ours_paged`` (decode): the same step over a ``PagedKVCache`` of 16-token pages holding the ctx
  tokens (the smallest pages, the most table reads), eagerly as ``ours``.

Two phases, batch 1, under ``torch.inference_mode()``:

- prefill of S tokens: one forward that fills a fresh KV cache, as a generation's first step
  does, and computes the logits of the last position only (ours: ``logits_at``; HF:
  ``logits_to_keep=1``). Ours allocates its cache (``new_cache(1, S)``) inside the timed call,
  as HF's forward allocates its ``DynamicCache``, so both pay for it in time and in memory.
- decode after ctx cached tokens: one new token at position ctx. Ours: a ``KVCache`` of ctx + 8
  slots filled with random values; each call resets its lengths to ctx (a one-element ``fill_``)
  and appends into the preallocated slot. HF: a ``DynamicCache``, the cache ``generate()`` uses by
  default, filled with random (1, Hk, ctx, D) keys and values per layer. It appends by
  concatenation, so every step copies each layer's whole cache: that copy is measured, as it is
  what HF's generation pays per token. Each call first crops the cache back to ctx tokens (a
  view, no copy), so every repetition sees ctx tokens and the cache does not grow across them.
  ``hf_static_compiled``: a ``StaticCache`` of ctx + 8 slots holding ctx random tokens, its token count
  set back to ctx before each call, so each call writes slot ctx and attends over the cache's slots masked at
  ctx + 1, as HF's static-cache decode does.

Per (phase, length, provider): the median time (``harness.measure``), tokens/s (prefill: S /
time) or ms per token (decode), the floor (prefill: FLOPs / the matmul ceiling; decode: weights
and KV cache read once / the copy ceiling) and the peak memory: the KV cache held before the call
plus what the call allocates on top of it (GPU only; the weights, shared, are left out). The
runner adds ours' speed-up over each peer (peer time / ours' time), as for the op rows.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from ..models import CodeLlama, CodeLlamaConfig
from ..models.checkpoint import hf_to_meta_name
from ..models.generation import PREFILL_CHUNK, DecodeStep, prefill
from ..ops.attention_choice import attention_for
from .cases import DTYPE, Unavailable, ours_backend
from .harness import FULL, QUICK, measure, peak_memory_bytes

PROVIDERS = ("ours", "hf_sdpa", "hf_patched")
# A phase's own rows (above): ours another way, and HF's compiled static-cache decode
VARIANTS = {"prefill": ("ours_chunked",), "decode": ("ours_graph", "ours_paged", "hf_static_compiled")}
COMPILED_PROVIDERS = ("hf_static_compiled",)  # their first call compiles: a minute on a CPU
PAGE_SIZE = 16  # ours_paged's pages
CPU_CHUNKS = 4  # ours_chunked on the CPU's reduced lengths: S / 4 tokens a chunk (the default chunk is 4096)
BATCH = 1
DECODE_HEADROOM = 8  # ours' cache holds ctx + this many slots, as a generation's cache has room for new tokens
FULL_MODEL = CodeLlamaConfig.from_name("CodeLlama-7b")
# 8 of 32 layers on an 80 GB H100: the shared weights take 2.1 GB (0.4 GB a layer, 0.5 GB for the embedding and
# the output), and one provider's cache at a time 12.8 GB at 100k tokens (1.6 GB a layer), plus its activations
# (a one-shot 100k prefill: ~7 GB for the MLP's gate, up and product in one layer; ours_chunked one chunk's).
# 32 layers would hold 51 GB of cache at 100k and take four times as long.
GPU_LAYERS = 8
# The CPU (and --quick): the 7B's heads of 128 and plain multi-head attention, 8 of them (dim 1024), 2 layers,
# so that the whole section takes a few seconds on 2 cores.
REDUCED = {"dim": 1024, "n_heads": 8, "n_kv_heads": 8}
REDUCED_LAYERS = 2
# A prefill at 64k takes about a second a call on an H100 (0.7 s at the floor for 8 layers): do_bench's default
# 100 ms window would time it once.
MODEL_PLAN = replace(FULL, gpu_warmup_ms=100, gpu_rep_ms=1000)


@dataclass(frozen=True)
class ModelShapes:
    prefill: tuple[int, ...]  # prompt lengths S
    decode: tuple[int, ...]  # tokens in the cache before the step (ctx)


GPU_SHAPES = ModelShapes(prefill=(4096, 16384, 65536, 100_000), decode=(16384, 100_000))
REDUCED_SHAPES = ModelShapes(prefill=(256,), decode=(1024,))
# The GPU check's benchmark: the targets' two lengths only (prefill at 16k, decode at 100k; 15-25 s on an H100).
CHECK_SHAPES = ModelShapes(prefill=(16384,), decode=(100_000,))


@dataclass(frozen=True)
class ModelItem:
    """One measurement: a phase at a length (prompt tokens, or cached tokens for decode) by a provider."""

    phase: str  # "prefill" or "decode"
    tokens: int
    provider: str

    @property
    def label(self) -> str:
        return f"prefill S={self.tokens}" if self.phase == "prefill" else f"decode ctx={self.tokens}"

    def __str__(self) -> str:
        return f"{self.label.replace(' ', '-')}-{self.provider}"


def items(shapes: ModelShapes) -> list[ModelItem]:
    """Length by length, every provider and the phase's variants: the rows of one length are compared with each
    other."""
    points = [("prefill", s) for s in shapes.prefill] + [("decode", ctx) for ctx in shapes.decode]
    return [ModelItem(phase, tokens, provider) for phase, tokens in points
            for provider in PROVIDERS + VARIANTS[phase]]


def model_config(reduced: bool, layers: int | None = None) -> CodeLlamaConfig:
    config = replace(FULL_MODEL, **REDUCED) if reduced else FULL_MODEL
    return replace(config, n_layers=layers or (REDUCED_LAYERS if reduced else GPU_LAYERS))


def describe(config: CodeLlamaConfig) -> str:
    text = f"Code Llama 7B, {config.n_layers} of {FULL_MODEL.n_layers} layers"
    if config.dim != FULL_MODEL.dim:
        text += f", reduced to dim {config.dim} ({config.n_heads} heads of {config.head_dim})"
    return text


# --------------------------------------------------------------------------- floors
def layer_matmul_params(config: CodeLlamaConfig) -> int:
    c = config
    attention = 2 * c.dim * c.n_heads * c.head_dim + 2 * c.dim * c.n_kv_heads * c.head_dim  # wq, wo; wk, wv
    return attention + 3 * c.dim * c.hidden_dim  # w1, w2, w3


def prefill_flops(config: CodeLlamaConfig, tokens: int) -> float:
    """Per layer 2 FLOPs per weight per token, and the causal attention's two products, 2 * 2 * S^2 * dim / 2;
    then the output layer for the last position."""
    per_layer = 2 * layer_matmul_params(config) * tokens + 2 * tokens**2 * config.dim
    return BATCH * (config.n_layers * per_layer + 2 * config.dim * config.vocab_size)


def decode_bytes(config: CodeLlamaConfig, ctx: int) -> int:
    """Every layer's weights, the output layer's and the KV cache, each read once."""
    kv_cache = 2 * BATCH * ctx * config.n_kv_heads * config.head_dim
    weights = config.n_layers * (layer_matmul_params(config) + 2 * config.dim) + config.dim * config.vocab_size
    return (weights + config.n_layers * kv_cache) * DTYPE.itemsize


# --------------------------------------------------------------------------- providers
@dataclass
class Models:
    config: CodeLlamaConfig
    ours: CodeLlama
    hf: torch.nn.Module | None  # transformers' LlamaForCausalLM; None where transformers is missing
    hf_missing: str = ""


def build_models(config: CodeLlamaConfig, device: torch.device) -> Models:
    """Ours with random bf16 weights, and transformers' model of the same config holding the same tensors."""
    torch.manual_seed(0)
    with torch.device(device):
        # rope_interleaved=False: the half-split pairs of HF's layout, so HF's weights need no permutation
        ours = CodeLlama(config, rope_interleaved=False, backend=ours_backend(device)).to(DTYPE).eval()
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        return Models(config, ours, None, f"transformers not importable ({e})")
    with torch.device(device):  # fp32 random weights for a moment, replaced by ours' tensors below
        hf = LlamaForCausalLM(LlamaConfig(**config.to_hf_config(), attn_implementation="sdpa"))
    ours_weights = ours.state_dict()
    hf.load_state_dict({name: ours_weights[hf_to_meta_name(name)] for name in hf.state_dict()},
                       strict=True, assign=True)
    return Models(config, ours, hf.eval())


@dataclass
class Workload:
    fn: Callable[[], object]  # the timed call; returns the logits
    cache_bytes: int  # the KV cache held between calls (0 for a prefill: it makes its own)


@contextlib.contextmanager
def workload(item: ModelItem, models: Models, device: torch.device) -> Iterator[Workload]:
    """The timed call of one item; hf_patched's runs with the patch in place, removed on leaving."""
    prefill = item.phase == "prefill"
    if item.provider == "ours":
        yield (_ours_prefill if prefill else _ours_decode)(models, item.tokens, device)
        return
    if item.provider in OURS_VARIANTS:
        with OURS_VARIANTS[item.provider](models, item.tokens, device) as work:
            yield work
        return
    if models.hf is None:
        raise Unavailable(models.hf_missing)
    if item.provider == "hf_static_compiled":
        yield _hf_static_compiled_decode(models, item.tokens, device)
        return
    with _hf_patched(models.hf) if item.provider == "hf_patched" else contextlib.nullcontext():
        yield (_hf_prefill if prefill else _hf_decode)(models, item.tokens, device)


def _tokens(config: CodeLlamaConfig, count: int, device: torch.device) -> torch.Tensor:
    """Random token ids, the same for every provider at a length."""
    generator = torch.Generator().manual_seed(count)
    return torch.randint(config.vocab_size, (BATCH, count), generator=generator).to(device)


def _ours_prefill(models: Models, length: int, device: torch.device) -> Workload:
    model, tokens = models.ours, _tokens(models.config, length, device)
    last = torch.full((BATCH,), length - 1, device=device)

    @torch.inference_mode()
    def prefill():
        return model(tokens, cache=model.new_cache(BATCH, length), logits_at=last)

    return Workload(prefill, cache_bytes=0)


def _ours_decode(models: Models, ctx: int, device: torch.device) -> Workload:
    model, token = models.ours, _tokens(models.config, 1, device)
    cache = _filled_cache(model, ctx)

    @torch.inference_mode()
    def step():
        cache.seqlens.fill_(ctx)
        cache.filled = ctx
        return model(token, cache=cache)

    return Workload(step, cache_bytes=sum(t.nbytes for t in cache.k + cache.v))


def _filled_cache(model: CodeLlama, ctx: int):
    """A contiguous cache of ctx + DECODE_HEADROOM slots, random values."""
    cache = model.new_cache(BATCH, ctx + DECODE_HEADROOM)
    for t in cache.k + cache.v:
        t.normal_()
    return cache


@contextlib.contextmanager
def _ours_chunked_prefill(models: Models, length: int, device: torch.device) -> Iterator[Workload]:
    model, tokens = models.ours, _tokens(models.config, length, device)
    chunk = PREFILL_CHUNK if device.type == "cuda" else max(1, length // CPU_CHUNKS)

    @torch.inference_mode()
    def chunked():
        return prefill(model, tokens, [length] * BATCH, model.new_cache(BATCH, length), chunk)

    yield Workload(chunked, cache_bytes=0)


@contextlib.contextmanager
def _ours_captured_decode(models: Models, ctx: int, device: torch.device) -> Iterator[Workload]:
    """The CUDA graph's replay: a first call runs eagerly and captures (an error if it could not), the timed ones
    replay."""
    if device.type != "cuda":
        raise Unavailable("CUDA graphs need a CUDA device (on the CPU generate runs the same step eagerly: ours)")
    model, token = models.ours, _tokens(models.config, 1, device)[:, 0]
    cache, chosen = _filled_cache(model, ctx), model.attention
    model.attention = "llama_kernels"  # SDPA's decode follows the cache's length: never captured
    try:
        step = DecodeStep(model, cache, capture=True)

        @torch.inference_mode()
        def replay():
            cache.seqlens.fill_(ctx)
            cache.filled = ctx
            return step(token)

        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            replay()
        if step.graph is None:  # the row would time eager steps under the captured name
            why = "; ".join(str(w.message) for w in said) or "generate's warning, given earlier, says why"
            raise RuntimeError(f"the decode step was not captured: {why}")
        yield Workload(replay, cache_bytes=sum(t.nbytes for t in cache.k + cache.v))
    finally:
        model.attention = chosen


@contextlib.contextmanager
def _ours_paged_decode(models: Models, ctx: int, device: torch.device) -> Iterator[Workload]:
    model, token = models.ours, _tokens(models.config, 1, device)
    cache = model.new_paged_cache(-(-(ctx + DECODE_HEADROOM) // PAGE_SIZE), PAGE_SIZE, max_batch_size=BATCH,
                                  max_seq_len=ctx + DECODE_HEADROOM)
    cache.set_batch([cache.allocate() for _ in range(BATCH)])
    cache.reserve(ctx + DECODE_HEADROOM)  # the pages a prefill of ctx tokens and the new tokens take
    cache.advance(ctx)  # held: their values random (below), as _filled_cache's
    for t in cache.k + cache.v:
        t.normal_()

    @torch.inference_mode()
    def step():
        cache.truncate([ctx] * BATCH)
        return model(token, cache=cache)

    yield Workload(step, cache_bytes=sum(t.nbytes for t in cache.k + cache.v))


OURS_VARIANTS = {"ours_chunked": _ours_chunked_prefill, "ours_graph": _ours_captured_decode,
                 "ours_paged": _ours_paged_decode}


def _hf_keywords(hf: torch.nn.Module) -> tuple[str, str]:
    """The installed transformers' names of the cache argument and of the number of logits to keep."""
    parameters = inspect.signature(hf.forward).parameters
    cache = "cache" if "cache" in parameters else "past_key_values"  # renamed in 5.x
    keep = "logits_to_keep" if "logits_to_keep" in parameters else "num_logits_to_keep"  # renamed in 4.50
    return cache, keep


def _hf_prefill(models: Models, length: int, device: torch.device) -> Workload:
    hf, tokens = models.hf, _tokens(models.config, length, device)
    _, keep = _hf_keywords(hf)

    @torch.inference_mode()
    def prefill():
        return hf(input_ids=tokens, use_cache=True, **{keep: 1}).logits

    return Workload(prefill, cache_bytes=0)


def _hf_decode(models: Models, ctx: int, device: torch.device) -> Workload:
    from transformers import DynamicCache

    c, hf = models.config, models.hf
    cache_keyword, _ = _hf_keywords(hf)
    cache, shape = DynamicCache(), (BATCH, c.n_kv_heads, ctx, c.head_dim)
    for layer in range(c.n_layers):
        cache.update(torch.randn(shape, dtype=DTYPE, device=device), torch.randn(shape, dtype=DTYPE, device=device),
                     layer)
    token, position = _tokens(c, 1, device), torch.full((BATCH, 1), ctx, device=device)

    @torch.inference_mode()
    def step():
        grown = cache.get_seq_length() - ctx
        if grown:  # never crop(0): 4.5x reads it as "keep 0 tokens"; a negative count drops tokens in 4.5x and 5.x
            cache.crop(-grown)
        return hf(input_ids=token, position_ids=position, use_cache=True, **{cache_keyword: cache}).logits

    return Workload(step, cache_bytes=_hf_cache_bytes(c, ctx))


def _hf_cache_bytes(config: CodeLlamaConfig, slots: int) -> int:
    """HF's cache: per layer a key and a value tensor of (BATCH, Hk, slots, D)."""
    return 2 * config.n_layers * BATCH * config.n_kv_heads * slots * config.head_dim * DTYPE.itemsize


def _hf_static_compiled_decode(models: Models, ctx: int, device: torch.device) -> Workload:
    from transformers import CompileConfig, StaticCache

    c, hf = models.config, models.hf
    cache_keyword, _ = _hf_keywords(hf)
    # The constructor's arguments differ between releases (4.x: the batch size, device and dtype up front)
    wanted = {"config": hf.config, "max_cache_len": ctx + DECODE_HEADROOM, "max_batch_size": BATCH, "device": device,
              "dtype": DTYPE}
    accepted = inspect.signature(StaticCache.__init__).parameters
    cache = StaticCache(**{name: value for name, value in wanted.items() if name in accepted})
    shape = (BATCH, c.n_kv_heads, ctx, c.head_dim)
    for layer in range(c.n_layers):
        cache.update(torch.randn(shape, dtype=DTYPE, device=device), torch.randn(shape, dtype=DTYPE, device=device),
                     layer, {"cache_position": torch.arange(ctx, device=device)})
    token, position = _tokens(c, 1, device), torch.full((BATCH, 1), ctx, device=device)
    # 4.x writes at the cache_position it is given; 5.x's layers count their tokens on the device (rewound below)
    write_at = ({"cache_position": torch.tensor([ctx], device=device)}
                if "cache_position" in inspect.signature(hf.forward).parameters else {})
    counters = [layer.cumulative_length for layer in getattr(cache, "layers", [])
                if hasattr(layer, "cumulative_length")]
    torch._dynamo.reset()  # a graph of this ctx alone, as generate compiles for its cache's length
    compiled = hf.get_compiled_call(CompileConfig())

    @torch.inference_mode()
    def step():
        for counter in counters:
            counter.fill_(ctx)
        return compiled(input_ids=token, position_ids=position, use_cache=True, **{cache_keyword: cache},
                        **write_at).logits

    return Workload(step, cache_bytes=_hf_cache_bytes(c, ctx + DECODE_HEADROOM))


@contextlib.contextmanager
def _hf_patched(hf: torch.nn.Module) -> Iterator[None]:
    try:
        from ..models.hf import patch_hf_llama, unpatch_hf_llama
    except ImportError as e:
        raise Unavailable(f"llama_kernels.models.hf.patch_hf_llama not importable ({e})") from None
    try:
        patch_hf_llama(hf)
    except Exception as e:  # the version check, or a half-written patch: the row says why
        unpatch_hf_llama()
        raise Unavailable(f"patch_hf_llama refused: {type(e).__name__}: {e}") from None
    try:
        yield
    finally:
        unpatch_hf_llama()  # the patch is class-wide: hf_sdpa's rows must see the original classes


def attention_ran(provider: str, models: Models, device: torch.device, phase: str) -> str:
    """Whose attention a provider ran for ``phase`` ("forward", "backward", "decode"): "sdpa" for transformers'
    own ("hf_sdpa", "hf_static_compiled", and "hf_liger": Liger leaves attention as it is), else the model's choice
    (the patch's default "auto" for "hf_patched") on this card: ``ops.attention_choice``."""
    if provider in ("hf_sdpa", "hf_static_compiled", "hf_liger"):
        return "sdpa"
    if provider in ("ours_graph", "ours_paged"):  # captured: ours forced; paged: SDPA has no pages
        return "llama_kernels"
    return attention_for(models.ours.attention if provider == "ours" else "auto", device, phase)


# --------------------------------------------------------------------------- the run
def run_model_benchmark(device: torch.device, quick: bool, ceilings: dict, deadline: float | None = None,
                        progress=sys.stderr, layers: int | None = None, shapes: ModelShapes | None = None) -> dict:
    """The model section of the benchmark's result: what was measured and one row per item."""
    reduced = quick or device.type != "cuda"
    config = model_config(reduced, layers)
    shapes = shapes or (REDUCED_SHAPES if reduced else GPU_SHAPES)
    plan = QUICK if quick else MODEL_PLAN
    print(f"[model] building {describe(config)}", file=progress, flush=True)
    todo = items(shapes)
    try:
        models = build_models(config, device)
    except Exception as e:  # out of memory, a transformers release that refuses the config: the op rows still run
        rows = [{**_row(item), "status": "error", "reason": f"building the models: {_reason(e)}"} for item in todo]
    else:
        rows = []
        for i, item in enumerate(todo, 1):
            print(f"[model {i}/{len(todo)}] {item.label} {item.provider}", file=progress, flush=True)
            rows.append(_measure(item, models, device, plan, ceilings, deadline, quick))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the caches of this row are gone: the next provider gets the memory
        del models
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ours_path = {None: "the Triton kernels", "native": "the C++ kernels (CPU)",
                 "reference": "the plain-PyTorch reference (CPU)"}[ours_backend(device)]
    return {"title": f"{describe(config)}; random {str(DTYPE).removeprefix('torch.')} weights, batch {BATCH}; "
                     f"ours = {ours_path}",
            "config": config.to_dict(), "reduced": reduced, "batch": BATCH, "rows": rows}


def _row(item: ModelItem) -> dict:
    return {"phase": item.phase, "tokens": item.tokens, "label": item.label, "provider": item.provider}


def _reason(error: Exception) -> str:
    first_line = (str(error).splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {first_line}"


def _measure(item: ModelItem, models: Models, device: torch.device, plan, ceilings: dict,
             deadline: float | None, quick: bool) -> dict:
    row = _row(item)
    if deadline is not None and time.monotonic() > deadline:
        return {**row, "status": "skipped", "reason": "time budget spent"}
    if quick and item.provider in COMPILED_PROVIDERS:
        return {**row, "status": "skipped", "reason": "--quick leaves compiling peers out"}
    try:
        with workload(item, models, device) as work:
            timing = measure(work.fn, device, plan)
            call_peak = peak_memory_bytes(work.fn, device)
    except Unavailable as e:
        return {**row, "status": "skipped", "reason": str(e)}
    except Exception as e:  # a peer's version, out of memory: a row, not the end of the run
        return {**row, "status": "error", "reason": _reason(e)}
    phase = "forward" if item.phase == "prefill" else "decode"
    return {**row, "status": "ok", **timing.as_dict(), **figures(item, models.config, timing.median_ms, ceilings),
            "attention": attention_ran(item.provider, models, device, phase), "cache_bytes": work.cache_bytes,
            "peak_mem_bytes": None if call_peak is None else work.cache_bytes + call_peak}


def figures(item: ModelItem, config: CodeLlamaConfig, median_ms: float, ceilings: dict) -> dict:
    """Throughput (prefill) or latency per token (decode), and the floor against the ceilings of the same run."""
    if item.phase == "prefill":
        flops = prefill_flops(config, item.tokens)
        return {"tokens_per_s": BATCH * item.tokens / (median_ms * 1e-3), "flops": flops,
                "floor_ms": flops / (ceilings["matmul"]["tflops"] * 1e12) * 1e3}
    nbytes = decode_bytes(config, item.tokens)
    return {"ms_per_token": median_ms, "bytes": nbytes, "floor_ms": nbytes / (ceilings["copy"]["gbps"] * 1e9) * 1e3}


# --------------------------------------------------------------------------- the table
def format_section(model: dict) -> list[str]:
    lines = [
        f"model: {model['title']}",
        "prefill S: one forward filling a fresh KV cache, logits of the last token; decode ctx: one token after ctx "
        "cached tokens (HF: its default DynamicCache, which appends by concatenation, cropped back to ctx before "
        "each step; hf_static_compiled: its StaticCache under generate's torch.compile)",
        "floor = FLOPs / matmul ceiling (prefill), weights + KV cache read once / copy ceiling (decode); peak = KV "
        "cache held before the call + what the call allocates (GPU only; the shared weights left out)",
        "attention: whose attention ran (llama_kernels: ours; sdpa: torch's, where the card's table picks it); "
        "ours_chunked: the prefill chunk by chunk; ours_graph: the decode step replayed from a CUDA graph; "
        "ours_paged: over 16-token pages; ours x: the row's time / ours' (under 1: faster than ours)",
        f"{'phase':20} {'provider':18} {'median ms':>10} {'rate':>14} {'floor ms':>9} {'ours x':>7} {'peak MiB':>9} "
        f"{'attention':13}",
    ]
    previous = None
    for row in model["rows"]:
        label = row["label"] if row["label"] != previous else ""
        previous = row["label"]
        lines.append(f"{label:20} {row['provider']:18} {_figures(row)}")
    return lines


def _figures(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    rate = f"{row['tokens_per_s']:.0f} tok/s" if row["phase"] == "prefill" else f"{row['ms_per_token']:.3f} ms/tok"
    speedup = "-" if row["provider"] == "ours" or row.get("ours_speedup") is None else f"{row['ours_speedup']:.2f}x"
    peak = "n/a" if row["peak_mem_bytes"] is None else f"{row['peak_mem_bytes'] / 2**20:.0f}"
    return f"{row['median_ms']:10.3f} {rate:>14} {row['floor_ms']:9.3f} {speedup:>7} {peak:>9} {row['attention']:13}"
