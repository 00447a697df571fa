"""Compile every Triton kernel for sm_80 and sm_90 ahead of time, without a GPU.

The launchers run on meta tensors at Code Llama shapes inside
``_triton.record_launches``, so what is compiled is exactly what a GPU would
launch (same configs, same argument specialization as Triton's JIT). Each
kernel goes down to PTX and cubin; Triton's own ptxas reports registers and
spills. A kernel fails the check on a compile error, any spill, or more shared
memory than the card has. A config that ``bench/gpu_check.py`` measured on the
card (``ops/tuned_configs.json``) is exempt from the spill and wgmma rules, which
stand in for a measurement: its spills and instructions are in its timing, and
the table shows it as "measured".

    python -m llama_kernels.aot            # table of every kernel, exit 1 on a failure
    python -m llama_kernels.aot --arch sm90 --op attention --keep    # one card, one op; keep Triton's cache

Run it with TRITON_INTERPRET unset (in an interpreting process Triton cannot
compile kernels that call other @triton.jit functions).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

from ._checks import dtype_name

# name: (compute capability, shared memory per block the card allows, bytes)
TARGETS = {"sm80": (80, 166_912), "sm90": (90, 232_448)}

MODELS = ("CodeLlama-7b", "CodeLlama-13b", "CodeLlama-34b")  # their shapes come from CodeLlamaConfig
EXTRA_WIDTHS = (6656, 32768)  # hidden sizes beyond Code Llama's: LLaMA 33B's, and the widest RMSNorm claimed
EXTRA_HEADS = ((8, 1, 64),)  # (Hq, Hk, D) beyond Code Llama's: MQA at head_dim 64
TOKENS = 16384
# decode: the RoPE + cache append launch and the attention
OPS = ("rms_norm", "rope", "attention", "decode", "swiglu", "cross_entropy")


@dataclass
class CompileResult:
    target: str
    label: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    shared_limit: int
    wgmma_needed: bool = False  # attention on sm_90: its matrix products must be Hopper's wgmma
    wgmma_found: bool = False
    measured: bool = False  # the config is a winner the GPU check timed on the card
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.shared_bytes <= self.shared_limit
                and (self.measured or (self.spill_bytes == 0 and (self.wgmma_found or not self.wgmma_needed))))


def _configs():
    from .models.config import CodeLlamaConfig

    return [CodeLlamaConfig.from_name(name) for name in MODELS]


def hidden_sizes() -> list[int]:
    return sorted({c.dim for c in _configs()} | set(EXTRA_WIDTHS))


def head_layouts() -> list[tuple[int, int, int]]:
    return [(c.n_heads, c.n_kv_heads, c.head_dim) for c in _configs()] + list(EXTRA_HEADS)


def launches(target: str, ops=OPS) -> list[tuple[str, object]]:
    """(label, LaunchRecord) for every kernel launch the ops make at Code Llama shapes."""
    from .ops import _triton

    meta = torch.device("meta")
    labels = []
    with _triton.record_launches(target) as records:
        for op in ops:
            labels += _LAUNCHES[op](target, meta)
    return list(zip(labels, records, strict=True))


def _rms_norm_launches(target: str, meta) -> list[str]:
    from .ops import rms_norm

    labels = []
    for dtype in (torch.bfloat16, torch.float32):
        for hidden in hidden_sizes():
            x = torch.empty(TOKENS, hidden, dtype=dtype, device=meta)
            w = torch.empty(hidden, dtype=dtype, device=meta)
            for residual in (None, x):
                rms_norm.forward_triton(x, residual, w, 1e-5)
                with_residual = " +residual" if residual is not None else ""
                labels.append(f"rms_norm_fwd {hidden} {dtype_name(dtype)}{with_residual}")
            rms_norm.backward_triton(x, x, x, w, 1e-5)
            labels.append(f"rms_norm_bwd {hidden} {dtype_name(dtype)}")
    return labels


def _rope_launches(target: str, meta) -> list[str]:
    from .ops import rope

    labels = []
    for hq, hk, d in head_layouts():
        q = torch.empty(1, TOKENS, hq, d, dtype=torch.bfloat16, device=meta)
        k = torch.empty(1, TOKENS, hk, d, dtype=torch.bfloat16, device=meta)
        for interleaved in (False, True):
            for inv_freq_dtype in (torch.float32, torch.float64):
                positions = torch.empty(1, TOKENS, dtype=torch.int64, device=meta)
                inv_freq = torch.empty(d // 2, dtype=inv_freq_dtype, device=meta)
                rope.rope_triton(q, k, q, k, positions, 0, inv_freq, 1.0, interleaved, False)
                layout = "interleaved" if interleaved else "half"
                labels.append(f"rope {hq}/{hk}/{d} {layout} {dtype_name(inv_freq_dtype)}-angles")
    return labels


# By causal: launches that cover each kernel's sweep variants (attention._candidates); dk/dv's split diagonal
# spills beside a persistent loop on sm_90, a combination the sweep does not offer.
_ATTENTION_VARIANTS = {
    True: ({"attention_fwd": {"PERSISTENT": True, "HEAVIEST_FIRST": True},
            "attention_bwd_dkdv": {"SPLIT_DIAGONAL": True}, "attention_bwd_dq": {"HEAVIEST_FIRST": True}},
           {"attention_fwd": {"HEAVIEST_FIRST": True}, "attention_bwd_dkdv": {"PERSISTENT": True}}),
    False: ({"attention_fwd": {"PERSISTENT": True}, "attention_bwd_dkdv": {"PERSISTENT": True}},),
}


def _all_attention_launches(target: str, meta) -> list[str]:
    labels = []
    for head_dim in (64, 128):
        for varlen in (False, True):
            for causal in (True, False):
                _attention_launches(head_dim, varlen, causal, meta)
                kind = f"{'varlen' if varlen else 'dense'} {'causal' if causal else 'full'} D{head_dim}"
                labels += [f"attention_fwd {kind}", f"attention_bwd_delta {kind}", f"attention_bwd_dkdv {kind}",
                           f"attention_bwd_dq {kind}"]
                if not varlen and target == "sm90":  # the kernels' TMA form, candidates of the GPU check's sweep
                    _attention_launches(head_dim, varlen, causal, meta, tma=True)
                    labels += [f"attention_fwd {kind} TMA", f"attention_bwd_delta {kind}",
                               f"attention_bwd_dkdv {kind} TMA", f"attention_bwd_dq {kind} TMA"]
                if not varlen:  # deterministic=False's candidate: dq by atomic adds in the dk/dv pass
                    _attention_launches(head_dim, varlen, causal, meta, atomic_dq=True)
                    labels += [f"attention_fwd {kind}", f"attention_bwd_delta {kind}",
                               f"attention_bwd_any_order {kind} atomic dq"]
                if not varlen:  # the sweep's variants, in their TMA form on sm_90 (where the sweep offers them)
                    tma = target == "sm90"
                    for variants in _ATTENTION_VARIANTS[causal]:
                        _attention_launches(head_dim, varlen, causal, meta, tma=tma, variants=variants)
                        for kernel in ("attention_fwd", "attention_bwd_delta", "attention_bwd_dkdv",
                                       "attention_bwd_dq"):
                            form = " TMA" if tma and kernel != "attention_bwd_delta" else ""
                            fields = "".join(f" {name.lower().replace('_', ' ')}" for name in variants.get(kernel, {}))
                            labels.append(f"{kernel} {kind}{form}{fields}")
    return labels


def _all_decode_launches(target: str, meta) -> list[str]:
    from .ops.decode import PAGE_SIZES

    labels = []
    layouts = [(hq, hk) for hq, hk, d in head_layouts()[:len(MODELS)] if (hq, hk) in ((32, 32), (64, 8))]
    # 7B's and 34B's heads over a contiguous cache (page size 0) and over pages of the smallest and largest size
    for (hq, hk), seqlen_q, page_size in itertools.product(layouts, (1, 5), (0, PAGE_SIZES[0], PAGE_SIZES[-1])):
        _decode_launches(hq, hk, seqlen_q, page_size, meta)
        kind = f"{hq}/{hk} Sq={seqlen_q}" + (f" pages of {page_size}" if page_size else "")
        labels += [f"rope+append {kind}", f"decode_split {kind}", f"decode_merge {kind}"]
    return labels


def _decode_launches(n_q_heads: int, n_kv_heads: int, seqlen_q: int, page_size: int, device) -> None:
    """A decoding step over a 16k-token bf16 cache, D 128, batch 1: RoPE with the append, then the attention;
    page_size > 0: the cache is a pool of pages read through a block table."""
    from .ops import decode, rope

    q = torch.empty(1, seqlen_q, n_q_heads, 128, dtype=torch.bfloat16, device=device)
    new_kv = torch.empty(1, seqlen_q, n_kv_heads, 128, dtype=torch.bfloat16, device=device)
    if page_size:
        cache = torch.empty(TOKENS // page_size, page_size, n_kv_heads, 128, dtype=torch.bfloat16, device=device)
        block_table = torch.empty(1, TOKENS // page_size, dtype=torch.int32, device=device)
    else:
        cache, block_table = torch.empty(1, TOKENS, n_kv_heads, 128, dtype=torch.bfloat16, device=device), None
    positions = torch.empty(1, seqlen_q, dtype=torch.int64, device=device)
    inv_freq = torch.empty(64, dtype=torch.float32, device=device)
    rope.rope_triton(q, new_kv, q, cache, positions, 0, inv_freq, 1.0, False, False, v=new_kv, v_out=cache,
                     block_table=block_table)
    seqlens = torch.empty(1, dtype=torch.int32, device=device)
    decode.decode_triton(q, cache, cache, seqlens, seqlen_q, True, 128**-0.5, 0, block_table)


def _attention_launches(head_dim: int, varlen: bool, causal: bool, device, tma: bool = False,
                        atomic_dq: bool = False, variants: dict | None = None) -> None:
    """Forward and backward at Code Llama 34B's layout (64 query heads, 8 key/value heads), bf16, 16k tokens;
    with tma, every kernel's config asks for its TMA form; with atomic_dq, the backward is deterministic=False's
    with ATOMIC_DQ; variants ({kernel: fields}) adds to those kernels' configs."""
    from .ops import _triton, attention

    shape = (TOKENS,) if varlen else (1, TOKENS)
    q = torch.empty(*shape, 64, head_dim, dtype=torch.bfloat16, device=device)
    k = torch.empty(*shape, 8, head_dim, dtype=torch.bfloat16, device=device)
    cu = torch.empty(3, dtype=torch.int32, device=device) if varlen else None
    layout = attention.Layout(q, k, cu, cu, TOKENS, TOKENS)
    with contextlib.ExitStack() as configs:
        extra = {tuning.kernel: {"TMA": True} for tuning in (attention.FORWARD_TUNING, attention.DKDV_TUNING,
                                                            attention.DQ_TUNING) if tma}
        for kernel, fields in (variants or {}).items():
            extra[kernel] = {**extra.get(kernel, {}), **fields}
        for kernel, fields in extra.items():
            configs.enter_context(_triton.forced_config(kernel, lambda default, fields=fields: {**default, **fields}))
        if atomic_dq:
            atomic = attention.atomic_dq_config(_triton.target_of(device), head_dim)
            configs.enter_context(_triton.forced_config(attention.ANY_ORDER_TUNING.kernel, lambda default: atomic))
        o, lse = attention.forward_triton(q, k, k, layout, causal, head_dim**-0.5)
        attention.backward_triton(o, q, k, k, o, lse, None, layout, causal, head_dim**-0.5,
                                  deterministic=not atomic_dq)


def _swiglu_launches(target: str, meta) -> list[str]:
    """Forward and backward over each model's FFN width, a gate/up pair split from one fused projection."""
    from .ops import swiglu

    labels = []
    for c in _configs():
        gate_up = torch.empty(TOKENS, 2 * c.hidden_dim, dtype=torch.bfloat16, device=meta)
        gate, up = gate_up.chunk(2, -1)
        swiglu.forward_triton(gate, up)
        swiglu.backward_triton(gate.contiguous(), gate, up)
        labels += [f"swiglu_fwd {c.hidden_dim} bfloat16", f"swiglu_bwd {c.hidden_dim} bfloat16"]
    return labels


def _cross_entropy_launches(target: str, meta) -> list[str]:
    """The step that turns a chunk of fp32 logits into loss and gradient, at each vocabulary size."""
    from .ops import cross_entropy

    labels = []
    for vocab in sorted({c.vocab_size for c in _configs()}):
        logits = torch.empty(2048, vocab, dtype=torch.float32, device=meta)
        target_ids = torch.empty(2048, dtype=torch.int64, device=meta)
        row_scale = torch.empty(2048, dtype=torch.float32, device=meta)
        for write_grad in (True, False):
            cross_entropy.logits_to_grad_triton(logits, target_ids, row_scale, -100, 0.0, write_grad)
            labels.append(f"cross_entropy_step V={vocab}{' +grad' if write_grad else ''}")
    return labels


_LAUNCHES = {"rms_norm": _rms_norm_launches, "rope": _rope_launches, "attention": _all_attention_launches,
             "decode": _all_decode_launches, "swiglu": _swiglu_launches, "cross_entropy": _cross_entropy_launches}


def compile_record(record, capability: int):
    """Compile one recorded launch as Triton's JIT would for this capability."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = record.kernel
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    bind = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {"num_warps": record.num_warps, "num_stages": record.num_stages}
    bound_args, specialization, options = bind(**record.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def ptxas_usage(ptx: str, capability: int) -> tuple[int, int]:
    """(registers, spill bytes) from Triton's bundled ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = "sm_90a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        report = subprocess.run(
            [get_ptxas(capability).path, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    registers = max(int(n) for n in re.findall(r"Used (\d+) registers", report))
    spills = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report))
    return registers, spills


def is_measured(target: str, label: str, record) -> bool:
    """Whether the launch uses a config from the tuned table (labels start with the table's kernel names)."""
    from .ops import _triton

    launched = {**record.args, "num_warps": record.num_warps, "num_stages": record.num_stages}
    return any(label.startswith(f"{kernel} ") and any(all(launched.get(k) == v for k, v in config.items())
                                                      for config in by_target.get(target, {}).values())
               for kernel, by_target in _triton.tuned_table().items())


def check(targets=tuple(TARGETS), ops=OPS) -> list[CompileResult]:
    results = []
    for target in targets:
        capability, shared_limit = TARGETS[target]
        for label, record in launches(target, ops):
            try:
                compiled = compile_record(record, capability)
                registers, spills = ptxas_usage(compiled.asm["ptx"], capability)
                results.append(CompileResult(
                    target, label, registers, spills, compiled.metadata.shared, shared_limit,
                    # decoding is memory bound and its tiles are too short for wgmma (64 rows): mma is right there;
                    # the backward's delta is a row sum with no matrix product
                    wgmma_needed=capability == 90 and label.startswith("attention") and "_delta" not in label,
                    wgmma_found="wgmma.mma_async" in compiled.asm["ptx"], measured=is_measured(target, label, record)))
            except Exception as e:  # a compile error is a result to report, not a crash
                results.append(CompileResult(target, label, 0, 0, 0, shared_limit, error=f"{type(e).__name__}: {e}"))
    return results


def _arguments(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llama_kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=TARGETS, action="append",
                        help="a target to compile for (repeatable; default: all of them)")
    parser.add_argument("--op", choices=OPS, action="append", help="an op whose kernels to compile (repeatable; "
                        "default: all; decode is its RoPE + cache append launch and its attention)")
    parser.add_argument("--keep", action="store_true",
                        help="keep Triton's cache of the compiled kernels (a folder of 60-70 MB) and print where")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _arguments(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: kernels cannot be compiled in an interpreting process", file=sys.stderr)
        return 2
    with _triton_cache(args.keep) as cache:
        status = _report(check(args.arch or tuple(TARGETS), args.op or OPS))
    if args.keep:
        print(f"Triton's cache of the compiled kernels: {cache}")
    return status


@contextlib.contextmanager
def _triton_cache(keep: bool):
    """Where Triton caches what it compiles: the user's TRITON_CACHE_DIR if set, else a new folder, removed at
    the end unless keep (everything takes 60-70 MB)."""
    if "TRITON_CACHE_DIR" in os.environ:
        yield os.environ["TRITON_CACHE_DIR"]
        return
    folder = tempfile.mkdtemp(prefix="llama-kernels-aot-")
    os.environ["TRITON_CACHE_DIR"] = folder
    try:
        yield folder
    finally:
        del os.environ["TRITON_CACHE_DIR"]
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def _report(results: list[CompileResult]) -> int:
    """Print the table; 1 if a kernel failed."""
    print(f"{'target':6} {'kernel':44} {'regs':>5} {'spill B':>8} {'shared B':>9} {'wgmma':>5}  status")
    for r in results:
        problem = ("SPILLS" if r.spill_bytes else "NO WGMMA" if r.wgmma_needed and not r.wgmma_found
                   else "SHARED MEMORY OVER LIMIT")
        status = ("measured" if r.measured else "ok") if r.ok else (r.error or problem)
        print(f"{r.target:6} {r.label:44} {r.registers:5d} {r.spill_bytes:8d} {r.shared_bytes:9d} "
              f"{'yes' if r.wgmma_found else 'no':>5}  {status}")
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} compiled clean, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
