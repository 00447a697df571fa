"""The training benchmark: one step (forward, loss, backward) of a Code Llama 7B layer stack.

    llama-kernels bench --ops train [--model-layers 8]

The models are the model section's (``model.build_models``: random bf16 weights, Hugging Face's
parameters holding ours' tensors), in training mode with activation checkpointing (each layer's
activations recomputed in the backward), batch 1. Providers:

- ``ours``: ``CodeLlama(tokens, targets=...)``: swiglu, and the loss by
  ``fused_linear_cross_entropy``, which never builds the (S, vocab) logits;
- ``hf_sdpa``: transformers' ``LlamaForCausalLM(input_ids, labels=...)`` with sdpa attention,
  unpatched: bf16 logits, upcast to fp32 for the loss, and their gradients;
- ``hf_patched``: that model after ``patch_hf_llama`` (every switch on: the loss is the fused op too);
- ``hf_liger``: that model after Liger-Kernel's ``apply_liger_kernel_to_llama`` (CUDA, where it is
  installed). Liger's patch cannot be undone, so its rows are measured after all the others.

Ours predicts S targets from S tokens; HF shifts its labels, so S - 1. A step ends with the
gradients set to None, so every call allocates its gradients (2 bytes a parameter): they are in
its peak, with the checkpointed activations and one layer's recomputed ones. Peak memory: the
GPU allocator's statistics; on a CPU the peak resident memory of the step in a fresh process
(``harness.cpu_peak_memory_bytes``), the weights left out in both.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from . import model
from .cases import Unavailable
from .harness import FULL, QUICK, measure, peak_memory_bytes

PROVIDERS = ("ours", "hf_sdpa", "hf_patched", "hf_liger")
GPU_TOKENS = (4096, 16384, 32768, 65536, 100_000)
# The CPU: the model section's reduced stack (dim 1024, 2 layers) at 1k and 4k tokens: a step takes about 1.5 and
# 8 s on 2 cores (16k about a minute: --train-tokens 16384), and each provider runs it five times for its time and
# twice more for its memory, in a fresh process. --quick: 256 tokens.
REDUCED_TOKENS = (1024, 4096)
QUICK_TOKENS = (256,)
# A step at 100k tokens on 8 layers takes seconds on an H100: do_bench's default window would time it once. On a
# CPU the step is timed three times after its two warm-up calls, the median kept (one timing swings 30% there).
TRAIN_PLAN = replace(model.MODEL_PLAN, cpu_min_reps=3, cpu_max_reps=3, cpu_budget_s=0)


@dataclass(frozen=True)
class TrainItem:
    tokens: int
    provider: str

    @property
    def label(self) -> str:
        return f"train S={self.tokens}"


def items(lengths: tuple[int, ...]) -> list[TrainItem]:
    """Provider by provider (hf_liger's patch is for good: last), each at every length."""
    return [TrainItem(tokens, provider) for provider in PROVIDERS for tokens in lengths]


# --------------------------------------------------------------------------- providers
@contextlib.contextmanager
def train_step(item: TrainItem, models: model.Models, device: torch.device) -> Iterator[Callable[[], None]]:
    """The timed step of one item; hf_patched's runs with the patch in place, removed on leaving."""
    tokens = model._tokens(models.config, item.tokens + 1, device)
    if item.provider == "ours":
        ours = models.ours.train()
        ours.activation_checkpointing = True
        yield _step(ours, lambda: ours(tokens[:, :-1], targets=tokens[:, 1:]))
        return
    if models.hf is None:
        raise Unavailable(models.hf_missing)
    hf = models.hf.train()
    # use_reentrant=False: the recomputation that ours' torch.utils.checkpoint runs (5.x renamed the method)
    if hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable({"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable({"use_reentrant": False})
    patch = {"hf_patched": model._hf_patched, "hf_liger": _liger}.get(item.provider)
    with patch(hf) if patch else contextlib.nullcontext():
        ids = tokens[:, :-1]
        yield _step(hf, lambda: hf(input_ids=ids, labels=ids, use_cache=False).loss)


def _step(module: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def step():
        loss().backward()
        module.zero_grad(set_to_none=True)

    return step


@contextlib.contextmanager
def _liger(hf: torch.nn.Module) -> Iterator[None]:
    if not torch.cuda.is_available():
        raise Unavailable("Liger-Kernel needs CUDA")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError as e:
        raise Unavailable(f"liger_kernel not importable ({e})") from None
    apply_liger_kernel_to_llama(model=hf)
    yield


def fresh_step(config, item: TrainItem) -> contextlib.AbstractContextManager[Callable[[], None]]:
    """The step built from nothing (the models too), for ``harness.cpu_peak_memory_bytes``' fresh process."""
    device = torch.device("cpu")
    return train_step(item, model.build_models(config, device), device)


# --------------------------------------------------------------------------- the run
def run_train_benchmark(device: torch.device, quick: bool, deadline: float | None = None, progress=sys.stderr,
                        layers: int | None = None, lengths: tuple[int, ...] | None = None) -> dict:
    """The train section of the benchmark's result: what was measured and one row per item, length by length
    (``lengths``: the sequence lengths, by default the device's)."""
    reduced = quick or device.type != "cuda"
    config = model.model_config(reduced, layers)
    lengths = lengths or (QUICK_TOKENS if quick else REDUCED_TOKENS if reduced else GPU_TOKENS)
    plan = QUICK if quick else TRAIN_PLAN
    print(f"[train] building {model.describe(config)}", file=progress, flush=True)
    todo = items(lengths)
    try:
        models = model.build_models(config, device)
    except Exception as e:  # out of memory, a transformers release that refuses the config: the other rows still run
        rows = [{**_row(item), "status": "error", "reason": f"building the models: {model._reason(e)}"}
                for item in todo]
    else:
        rows = []
        for i, item in enumerate(todo, 1):
            print(f"[train {i}/{len(todo)}] {item.label} {item.provider}", file=progress, flush=True)
            rows.append(_measure(item, models, device, plan, deadline, config))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del models
    rows.sort(key=lambda row: lengths.index(row["tokens"]))  # length by length: the rows compared together
    ours_path = {None: "the Triton kernels", "native": "the C++ kernels (CPU)",
                 "reference": "the plain-PyTorch reference (CPU)"}[model.ours_backend(device)]
    return {"title": f"{model.describe(config)}; random {str(model.DTYPE).removeprefix('torch.')} weights, batch "
                     f"{model.BATCH}, activation checkpointing; ours = {ours_path}",
            "config": config.to_dict(), "reduced": reduced, "batch": model.BATCH, "rows": rows}


def _row(item: TrainItem) -> dict:
    return {"tokens": item.tokens, "label": item.label, "provider": item.provider}


def _measure(item: TrainItem, models: model.Models, device: torch.device, plan, deadline: float | None,
             config) -> dict:
    row = _row(item)
    if deadline is not None and time.monotonic() > deadline:
        return {**row, "status": "skipped", "reason": "time budget spent"}
    try:
        with train_step(item, models, device) as step:
            timing = measure(step, device, plan)
            peak = peak_memory_bytes(step, device, setup=functools.partial(fresh_step, config, item))
    except Unavailable as e:
        return {**row, "status": "skipped", "reason": str(e)}
    except Exception as e:  # a peer's version, out of memory: a row, not the end of the run
        return {**row, "status": "error", "reason": model._reason(e)}
    return {**row, "status": "ok", **timing.as_dict(),
            "tokens_per_s": model.BATCH * item.tokens / (timing.median_ms * 1e-3), "peak_mem_bytes": peak,
            "attention": model.attention_ran(item.provider, models, device, "backward")}


# --------------------------------------------------------------------------- the table
def format_section(train: dict) -> list[str]:
    lines = [
        f"train: {train['title']}",
        "one step: forward, loss over the tokens' next-token targets, backward (gradients set to None after it); "
        "peak = what the step allocates on top of the weights (GPU: the allocator's peak; CPU: the step's peak "
        "resident memory in a fresh process, above its resident memory before the step)",
        f"{'length':20} {'provider':12} {'median ms':>10} {'tok/s':>10} {'ours x':>7} {'peak MiB':>9} "
        f"{'attention':13}",
    ]
    previous = None
    for row in train["rows"]:
        label = row["label"] if row["label"] != previous else ""
        previous = row["label"]
        if row["status"] != "ok":
            lines.append(f"{label:20} {row['provider']:12} {row['status']}: {row['reason']}")
            continue
        speedup = "-" if row["provider"] == "ours" or row.get("ours_speedup") is None else f"{row['ours_speedup']:.2f}x"
        peak = "n/a" if row["peak_mem_bytes"] is None else f"{row['peak_mem_bytes'] / 2**20:.0f}"
        lines.append(f"{label:20} {row['provider']:12} {row['median_ms']:10.1f} {row['tokens_per_s']:10.0f} "
                     f"{speedup:>7} {peak:>9} {row['attention']:13}")
    return lines
