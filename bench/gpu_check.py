"""The GPU check: correctness on the card, a launch-config sweep, the extension, the benchmark, in ~7 minutes.

    python bench/gpu_check.py OUTDIR [--budget-s 420]

1. correctness: every op (RMSNorm forward with and without residual and its
   backward, RoPE forward in both layouts and its backward, attention forward,
   lse and backward, dense and packed, decoding over a KV cache with the append
   and RoPE) against ``llama_kernels.reference`` at Code Llama shapes, bf16 and fp32;
2. sweep: every candidate launch config of each Triton kernel, timed through
   the public functions at the key shapes (min / median / max), checked against
   the reference, and the winners written as ``tuned_configs.json``;
3. extension (``gpu_extension.py``): the compiled extension, built on the CPUs from the
   start of the run, its standalone CUDA test, and ``backend="cuda"`` (the hand-written
   RMSNorm and RoPE) beside the Triton kernels, checked and timed as a fraction of the copy;
4. benchmark: ``llama-kernels bench``'s run, with the winners in force: first the model
   (Code Llama 7B's layer stack against Hugging Face's, prefill at 16k tokens and decode at
   100k), then the ops;
5. a summary, printed last.

Files in OUTDIR: gpu_check.log (all output), gpu_check.json (every figure,
check and failure), tuned_configs.json (copy it to llama_kernels/ops/ to use
the winners), bench.json / bench.txt / bench.png, summary.txt.

A part that fails is recorded and the run goes on; the exit status is 1 if
anything failed, 2 without a CUDA device. Each part has its share of the time budget
(correctness 25%, the sweep to 60%, the extension to 70%, the benchmark to the end); what is left of a
part past its share is skipped and counted as a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout, installed or not

import torch  # noqa: E402
import triton  # noqa: E402

import gpu_extension  # noqa: E402  (bench/, beside this file)
import llama_kernels as lk  # noqa: E402
from llama_kernels import reference  # noqa: E402
from llama_kernels.bench import harness, report, run_benchmark  # noqa: E402
from llama_kernels.bench.cases import Shape  # noqa: E402
from llama_kernels.bench.model import ModelShapes  # noqa: E402
from llama_kernels.bench.model import format_section as format_model_section  # noqa: E402
from llama_kernels.ops import _triton  # noqa: E402

DEVICE = torch.device("cuda")
ULP = {torch.bfloat16: 2.0**-7}
EPS = 1e-5
THETA = 1e6

# Correctness shapes: Code Llama hidden sizes and head layouts (Hq, Hk, D), with and without explicit positions.
CHECK_ROWS = 4096
CHECK_HIDDEN = (4096, 5120, 8192)
CHECK_ROPE = (("7B", 2, 4096, (32, 32, 128), False), ("34B", 1, 16384, (64, 8, 128), True))  # ..., explicit positions
# (name, batch, Sq, Sk, (Hq, Hk, D), causal): Code Llama 7B and 34B layouts, D 64, Sq != Sk both ways.
CHECK_ATTENTION = (
    ("7B causal", 1, 2048, 2048, (32, 32, 128), True), ("7B full", 1, 2048, 2048, (32, 32, 128), False),
    ("34B causal", 1, 4096, 4096, (64, 8, 128), True), ("D64 Sq<Sk", 2, 1000, 3000, (8, 2, 64), True),
    ("D64 Sq>Sk", 2, 3000, 1000, (8, 1, 64), True),
)
CHECK_VARLEN = ([1, 700, 1500, 64], [300, 700, 2000, 0])  # q and k lengths: one of 1, one with no keys
# (name, (Hq, Hk, D), cache_seqlens, Sq, append new k/v, RoPE): ragged caches, one of them empty.
CHECK_DECODE = (
    ("34B step", (64, 8, 128), [0, 1, 5000, 16383], 1, True, True),
    ("7B step no append", (32, 32, 128), [1, 4096, 9000], 1, False, False),
    ("34B 5 tokens", (64, 8, 128), [0, 300, 12000], 5, True, True),
)
DECODE_CACHE = 16384
# Attention tolerances: bf16 rounds P before the PV product, as every flash kernel does.
ATTENTION_TOLERANCE = {torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}, torch.float32: {"rtol": 1e-4, "atol": 1e-4}}
# Sweep shapes: 16k tokens of bf16.
SWEEP_TOKENS = 16384
SWEEP_HIDDEN = (4096, 5120, 8192)
SWEEP_HEADS = ((32, 32, 128), (64, 8, 128))  # 7B, 34B
SWEEP_ATTENTION_HEADS = (64, 8, 128)  # 34B: GQA, Code Llama's head_dim
DECODE_SWEEP_TOKENS = 65536
# The benchmark's key shapes only, to fit the budget (llama-kernels bench runs them all): 16k tokens of the
# 7B and 34B layouts, and 100k tokens for the memory-bound ops (a 100k-token attention backward takes 1.5 s
# a call: left to llama-kernels bench). The model at the two targets only (prefill at 16k, decode at
# 100k; estimated at 15-25 s on an H100), the 4k and 64k prefills and the 16k decode left to llama-kernels bench.
BENCH_SHAPES = {"memory": (Shape("7B", 16384), Shape("34B", 16384), Shape("34B", 100_000)),
                "attention": (Shape("7B", 16384), Shape("34B", 16384)),
                "decode": (Shape("7B", 16384), Shape("34B", 65536), Shape("34B", 100_000, 8)),
                "model": ModelShapes(prefill=(16384,), decode=(100_000,))}
# The model runs first (the runner puts it before the op cases); attention last: the slowest per shape.
BENCH_OPS = ("model", "rms_norm", "rope", "decode", "attention")
CORRECTNESS_SHARE, SWEEP_SHARE, EXTENSION_SHARE = 0.25, 0.6, 0.7  # of the budget: where each part must stop
KEEP_DEFAULT_WITHIN = 0.03  # a candidate replaces the default only if >3% faster: noise must not churn the table


class Tee:
    """Writes to the terminal and the log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.stream.write(text)
        self.log.write(text)
        return len(text)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding...: the terminal's
        return getattr(self.stream, name)


class Recorder:
    """Results and failures of the whole run; a part that raises is a failure, and the run goes on."""

    def __init__(self):
        self.failures: list[str] = []
        self.results: dict = {"durations_s": {}}

    def fail(self, what: str) -> None:
        self.failures.append(what)
        print(f"FAILED: {what}", flush=True)

    @contextlib.contextmanager
    def part(self, name: str):
        print(f"\n== {name} ==", flush=True)
        start = time.monotonic()
        try:
            yield
        except Exception:
            traceback.print_exc()
            self.fail(f"{name}: raised {traceback.format_exc().strip().splitlines()[-1]}")
        finally:
            self.results["durations_s"][name] = round(time.monotonic() - start, 1)
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- comparisons
def compare(got, want, *, rtol: float, atol: float) -> dict:
    """|got - want| <= atol + rtol |want| elementwise in float64; 'worst' = max error / allowance (<= 1 passes)."""
    got, want = got.double(), want.double()
    if got.shape != want.shape:
        error = f"shape {tuple(got.shape)} != {tuple(want.shape)}"
        return {"ok": False, "max_abs_err": None, "worst": None, "error": error}
    err = (got - want).abs()
    worst = (err / (atol + rtol * want.abs())).max().item()
    ok = worst <= 1 and not got.isnan().any().item()
    return {"ok": bool(ok), "max_abs_err": err.max().item(), "worst": worst}


def output_tolerance(dtype) -> dict:
    """Forward outputs: two bf16 ulps, or fp32 ~1e-5."""
    return {"rtol": 2 * ULP[dtype], "atol": 1e-5} if dtype in ULP else {"rtol": 1e-5, "atol": 1e-5}


def gradient_tolerance(dtype, rows_summed: int = 1) -> dict:
    """Gradients against the fp32 ideal (as tests/test_rms_norm.py); a dweight sums rows_summed products."""
    scale = rows_summed**0.5
    return {"rtol": 3 * ULP[dtype], "atol": 1e-2 * scale} if dtype in ULP else {"rtol": 1e-5, "atol": 1e-5 * scale}


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


# --------------------------------------------------------------------------- 1. correctness
def check_correctness(rec: Recorder, deadline: float) -> None:
    checks = rec.results.setdefault("correctness", [])

    def record(name: str, result: dict) -> None:
        checks.append({"check": name, **result})
        figures = result.get("error") or f"max |err| {result['max_abs_err']:.3g}  {result['worst']:.3f} of tolerance"
        print(f"  {'ok' if result['ok'] else 'FAIL':4} {name:58} {figures}")
        if not result["ok"]:
            rec.fail(f"correctness: {name}")

    def guarded(name: str, fn) -> None:
        if time.monotonic() > deadline:
            rec.fail(f"correctness: {name} skipped, its time budget spent")
            return
        try:
            fn()
        except Exception as e:  # a crashing check is a failed check; the others still run
            traceback.print_exc()
            rec.fail(f"correctness: {name} raised {type(e).__name__}: {e}")

    for dtype in (torch.bfloat16, torch.float32):
        dname = str(dtype).removeprefix("torch.")
        for hidden in CHECK_HIDDEN:
            guarded(f"rms_norm {hidden} {dname}", lambda: _check_rms_norm(record, hidden, dtype, dname))
        for name, batch, seqlen_q, seqlen_k, heads, causal in CHECK_ATTENTION:
            guarded(f"attention {name} {dname}", lambda: _check_attention(
                record, name, batch, seqlen_q, seqlen_k, heads, causal, dtype, dname))
        guarded(f"attention varlen {dname}", lambda: _check_attention_varlen(record, dtype, dname))
        for name, heads, lengths, seqlen_q, append, rope in CHECK_DECODE:
            guarded(f"decode {name} {dname}", lambda: _check_decode(
                record, name, heads, lengths, seqlen_q, append, rope, dtype, dname))
        for model, batch, seqlen, heads, explicit in CHECK_ROPE:
            guarded(f"rope {model} {dname}",
                    lambda: _check_rope(record, model, batch, seqlen, heads, explicit, dtype, dname))


def _check_rms_norm(record, hidden: int, dtype, dname: str) -> None:
    x, r = randn(2, CHECK_ROWS // 2, hidden, dtype=dtype), randn(2, CHECK_ROWS // 2, hidden, dtype=dtype)
    w = (1 + 0.1 * randn(hidden)).to(dtype)
    tol = output_tolerance(dtype)
    record(f"rms_norm fwd {hidden} {dname}", compare(lk.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS), **tol))
    y, h = lk.rms_norm(x, w, EPS, residual=r)
    record(f"rms_norm fwd +residual h {hidden} {dname}", compare(h, x + r, **tol))
    # y is checked given the kernel's h, so a one-ulp difference in h does not count twice.
    record(f"rms_norm fwd +residual y {hidden} {dname}", compare(y, reference.rms_norm(h, w, EPS), **tol))

    gy, gh = randn(*x.shape, dtype=dtype), randn(*x.shape, dtype=dtype)
    for inputs, label in (((x, w), ""), ((x, w, r), " +residual")):
        got = _rms_grads(lambda a, b, res: lk.rms_norm(a, b, EPS, residual=res), inputs, gy, gh)
        ideal = _rms_grads(lambda a, b, res: reference.rms_norm(a, b, EPS, residual=res), [t.float() for t in inputs],
                           gy.float(), gh.float())
        for name, g, want in zip(("dx", "dweight", "dresidual"), got, ideal):
            tol = gradient_tolerance(dtype, CHECK_ROWS if name == "dweight" else 1)
            record(f"rms_norm bwd{label} {name} {hidden} {dname}", compare(g, want, **tol))


def _check_attention(record, name, batch, seqlen_q, seqlen_k, heads, causal, dtype, dname) -> None:
    hq, hk, d = heads
    q = randn(batch, seqlen_q, hq, d, dtype=dtype)
    k, v = randn(batch, seqlen_k, hk, d, dtype=dtype), randn(batch, seqlen_k, hk, d, dtype=dtype)
    do = randn(batch, seqlen_q, hq, d, dtype=dtype)
    _check_attention_against(record, f"{name} {dname}", dtype, (q, k, v), do,
                             lambda *t: lk.flash_attention(*t, causal=causal, return_lse=True),
                             lambda *t: lk.flash_attention(*t, causal=causal, return_lse=True, backend="reference"))


def _check_attention_varlen(record, dtype, dname) -> None:
    """Packed sequences of unequal lengths (one of length 1, one with no keys), 34B's heads."""
    lengths_q, lengths_k = CHECK_VARLEN
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
                  for n in (lengths_q, lengths_k))
    q = randn(sum(lengths_q), 64, 128, dtype=dtype)
    k, v = randn(sum(lengths_k), 8, 128, dtype=dtype), randn(sum(lengths_k), 8, 128, dtype=dtype)
    do = randn(*q.shape, dtype=dtype)
    args = (cu_q, cu_k, max(lengths_q), max(lengths_k))
    _check_attention_against(record, f"varlen {dname}", dtype, (q, k, v), do,
                             lambda *t: lk.flash_attention_varlen(*t, *args, return_lse=True),
                             lambda *t: lk.flash_attention_varlen(*t, *args, return_lse=True, backend="reference"))


def _check_attention_against(record, label, dtype, inputs, do, ours, theirs) -> None:
    """o, lse and the gradients of q, k, v of ours against the reference backend (computing in fp32)."""
    results = []
    for fn in (ours, theirs):
        leaves = [t.detach().requires_grad_() for t in inputs]
        o, lse = fn(*leaves)
        results.append((o, lse, *torch.autograd.grad(o, leaves, do)))
    tol = ATTENTION_TOLERANCE[dtype]
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), *results):
        if name == "lse":  # fp32 from the fp32 scores: tight; -inf rows must match exactly
            same_inf = torch.equal(torch.isneginf(got), torch.isneginf(want))
            finite = torch.isfinite(want)
            result = compare(got[finite], want[finite], rtol=1e-4, atol=1e-4)
            result["ok"] = result["ok"] and same_inf
        else:
            result = compare(got, want, **tol)
        record(f"attention {name} {label}", result)


def _check_decode(record, name, heads, lengths, seqlen_q, append, rope, dtype, dname) -> None:
    """The Triton path against the reference backend on copies of the same caches: o, lse, the caches after."""
    hq, hk, d = heads
    batch = len(lengths)
    q = randn(batch, seqlen_q, hq, d, dtype=dtype)
    caches = [randn(batch, DECODE_CACHE, hk, d, dtype=dtype) for _ in range(2)]
    new = [randn(batch, seqlen_q, hk, d, dtype=dtype) for _ in range(2)] if append else [None, None]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    results = []
    for backend in ("triton", "reference"):
        k_cache, v_cache = (c.clone() for c in caches)
        o, lse = lk.flash_attention_with_kvcache(q, k_cache, v_cache, seqlens, *new, rope_theta=THETA if rope else None,
                                                 return_lse=True, backend=backend)
        results.append((o, lse, k_cache, v_cache))
    tol = ATTENTION_TOLERANCE[dtype]
    for what, got, want in zip(("o", "lse", "k_cache", "v_cache"), *results):
        if what == "lse":  # with RoPE the two backends' rotated q and k differ by rounding: o's tolerance
            finite = torch.isfinite(want)
            result = compare(got[finite], want[finite], **tol)
            result["ok"] = result["ok"] and torch.equal(torch.isneginf(got), torch.isneginf(want))
        else:  # the caches differ only where RoPE rounded the new keys
            result = compare(got, want, **(tol if what == "o" else output_tolerance(dtype)))
        record(f"decode {what} {name} {dname}", result)


def _rms_grads(fn, inputs, gy, gh):
    """Gradients of sum(y * gy) (+ sum(h * gh) with a residual) with respect to (x, weight[, residual])."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    x, w, *r = leaves
    out = fn(x, w, r[0] if r else None)
    loss = (out[0] * gy).sum() + (out[1] * gh).sum() if r else (out * gy).sum()
    return torch.autograd.grad(loss, leaves)


def _check_rope(record, model: str, batch: int, seqlen: int, heads, explicit: bool, dtype, dname: str) -> None:
    hq, hk, d = heads
    q, k = randn(batch, seqlen, hq, d, dtype=dtype), randn(batch, seqlen, hk, d, dtype=dtype)
    positions = torch.randint(0, 100_000, (batch, seqlen), device=DEVICE) if explicit else None
    inv_freq = lk.rope_inv_freq(d, THETA, device=DEVICE)
    gq, gk = randn(*q.shape, dtype=dtype), randn(*k.shape, dtype=dtype)
    tol = output_tolerance(dtype)
    for interleaved in (False, True):
        label = f"{model} {hq}/{hk}x{d} {'interleaved' if interleaved else 'half'} {dname}"
        got = lk.apply_rope(q, k, positions, theta=THETA, interleaved=interleaved)
        want = reference.apply_rope(q, k, positions, inv_freq, interleaved)
        for name, a, b in zip(("q", "k"), got, want):
            record(f"rope fwd {name} {label}", compare(a, b, **tol))

        def grads(fn):
            qq, kk = q.detach().requires_grad_(), k.detach().requires_grad_()
            a, b = fn(qq, kk)
            return torch.autograd.grad((a * gq).sum() + (b * gk).sum(), (qq, kk))

        got = grads(lambda a, b: lk.apply_rope(a, b, positions, theta=THETA, interleaved=interleaved))
        want = grads(lambda a, b: reference.apply_rope(a, b, positions, inv_freq, interleaved))
        for name, a, b in zip(("dq", "dk"), got, want):
            record(f"rope bwd {name} {label}", compare(a, b, **tol))


# --------------------------------------------------------------------------- 2. config sweep
def rms_norm_candidates(default: dict) -> list[dict]:
    """Tiles of whole rows (BLOCK_N = the row's power of two: chunked rows re-read memory), 8-32 elements a thread."""
    block_n = default["BLOCK_N"]
    found = [default]
    for block_m in (1, 2, 4, 8, 16):
        for warps in (4, 8, 16):
            config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps}
            if 8 <= block_m * block_n // (32 * warps) <= 32 and config != default:
                found.append(config)
    return found


def rope_candidates(default: dict, max_heads: int) -> list[dict]:
    """16 elements of each half-head a thread (the default's), spread over tokens and heads differently."""
    block_half = default.get("BLOCK_HALF", 64)
    found = [{key: default[key] for key in ("BLOCK_S", "BLOCK_H", "num_warps")}]
    for warps in (4, 8):
        for block_s in (1, 2, 4, 8):
            block_h = 16 * 32 * warps // (block_s * block_half)
            config = {"BLOCK_S": block_s, "BLOCK_H": block_h, "num_warps": warps}
            if 1 <= block_h <= triton.next_power_of_2(max_heads) and config not in found:
                found.append(config)
    return found


def sweep_key(rec: Recorder, kernel: str, expected_key: str, variants: dict, candidates_of, deadline: float) -> dict:
    """Time every candidate on every variant (fn() -> output, check(output) -> compare dict); return the entry.

    The winner has the least total median over the variants, among candidates that
    pass every check. The default is timed first, so a run cut short still has it.
    """
    first_fn = next(iter(variants.values()))[0]
    with _triton.override_config(kernel, lambda default: default) as asked:
        first_fn()
    target, key, default = asked[-1]
    if key != expected_key:
        rec.fail(f"sweep {kernel}: the op asked for key {key!r}, the sweep expected {expected_key!r}")
    entry = {"kernel": kernel, "target": target, "key": key, "default": default, "candidates": []}
    candidates = candidates_of(default)
    for i, config in enumerate(candidates):
        if time.monotonic() > deadline:
            rec.fail(f"sweep {kernel} {key}: time budget spent after {i} of {len(candidates)} candidates")
            break
        timed = {"config": config, "variants": {}}
        for name, (fn, check) in variants.items():
            try:
                with _triton.override_config(kernel, lambda default: config) as asked:
                    result = check(fn())
                    times = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="all")
                launched = {(t, k) for t, k, _ in asked}
                if launched != {(target, key)}:
                    raise RuntimeError(f"launches asked for {sorted(launched)}, not {(target, key)}")
                timed["variants"][name] = {"ok": result["ok"], "worst": result["worst"], "min_ms": min(times),
                                           "median_ms": statistics.median(times), "max_ms": max(times)}
            except Exception as e:  # a config that fails to compile or launch is a losing candidate, not a crash
                timed["variants"][name] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        ok = all(v["ok"] for v in timed["variants"].values())
        timed["total_median_ms"] = sum(v["median_ms"] for v in timed["variants"].values()) if ok else None
        entry["candidates"].append(timed)
        spread = "  ".join(
            f"{n}: {v['min_ms']:.4f}/{v['median_ms']:.4f}/{v['max_ms']:.4f}{'' if v['ok'] else ' WRONG RESULT'}"
            if "median_ms" in v else f"{n}: {v['error']}" for n, v in timed["variants"].items())
        print(f"  {kernel} {key} [{i + 1}/{len(candidates)}] {config}  min/median/max ms  {spread}", flush=True)
        if not ok and i == 0:
            rec.fail(f"sweep {kernel} {key}: the default config fails {timed['variants']}")

    passing = [c for c in entry["candidates"] if c["total_median_ms"] is not None]
    if not entry["candidates"]:
        return entry  # the time budget was spent before the first candidate: failed above
    if not passing:
        rec.fail(f"sweep {kernel} {key}: no candidate passed")
        return entry
    best = min(passing, key=lambda c: c["total_median_ms"])
    default_timed = entry["candidates"][0]
    default_ms = default_timed["total_median_ms"]
    if default_ms is not None and best["total_median_ms"] > (1 - KEEP_DEFAULT_WITHIN) * default_ms:
        best = default_timed
    entry["winner"] = best["config"]
    if default_ms is not None:
        entry["speedup_vs_default"] = default_ms / best["total_median_ms"]
    print(f"  -> {kernel} {key}: {best['config']} ({entry.get('speedup_vs_default', float('nan')):.3f}x the default)")
    return entry


def sweep(rec: Recorder, deadline: float) -> None:
    """All sweeps, one entry per (kernel, key) in rec.results["sweep"]."""
    entries = rec.results.setdefault("sweep", [])
    # The compute-bound kernels first: their configs matter most and their sweeps take longest.
    sweep_attention(rec, entries, deadline)
    sweep_decode(rec, entries, deadline)
    dtype = torch.bfloat16
    for hidden in SWEEP_HIDDEN:
        x, r = randn(SWEEP_TOKENS, hidden, dtype=dtype), randn(SWEEP_TOKENS, hidden, dtype=dtype)
        w = (1 + 0.1 * randn(hidden)).to(dtype)
        dy, dh = randn(SWEEP_TOKENS, hidden, dtype=dtype), randn(SWEEP_TOKENS, hidden, dtype=dtype)
        tol = output_tolerance(dtype)
        want_y, want_h = reference.rms_norm(x, w, EPS), x + r
        forward = {
            "no residual": (lambda: lk.rms_norm(x, w, EPS), lambda y: compare(y, want_y, **tol)),
            # y is checked given the kernel's h, as in the correctness part
            "residual": (lambda: lk.rms_norm(x, w, EPS, residual=r),
                         lambda out: _both(compare(out[1], want_h, **tol),
                                           compare(out[0], reference.rms_norm(out[1], w, EPS), **tol))),
        }
        _sweep_guarded(rec, entries, "rms_norm_fwd", f"{hidden}:bfloat16", forward, rms_norm_candidates, deadline)

        # Backward alone: the forward runs once, each timed call differentiates it again.
        leaves = [t.detach().requires_grad_() for t in (x, w, r)]
        y = lk.rms_norm(leaves[0], leaves[1], EPS)
        y_res, h = lk.rms_norm(leaves[0], leaves[1], EPS, residual=leaves[2])
        ideal = _rms_grads(lambda a, b, res: reference.rms_norm(a, b, EPS, residual=res), [x.float(), w.float()],
                           dy.float(), None)
        ideal_res = _rms_grads(lambda a, b, res: reference.rms_norm(a, b, EPS, residual=res),
                               [x.float(), w.float(), r.float()], dy.float(), dh.float())
        backward = {
            "no residual": (lambda: torch.autograd.grad(y, leaves[:2], dy, retain_graph=True),
                            lambda g: _grads_close(g, ideal, dtype)),
            "residual": (lambda: torch.autograd.grad((y_res, h), leaves, (dy, dh), retain_graph=True),
                         lambda g: _grads_close(g, ideal_res, dtype)),
        }
        _sweep_guarded(rec, entries, "rms_norm_bwd", f"{hidden}:bfloat16", backward, rms_norm_candidates, deadline)

    for hq, hk, d in SWEEP_HEADS:
        q, k = randn(1, SWEEP_TOKENS, hq, d, dtype=dtype), randn(1, SWEEP_TOKENS, hk, d, dtype=dtype)
        inv_freq = lk.rope_inv_freq(d, THETA, device=DEVICE)
        for interleaved in (False, True):
            want = reference.apply_rope(q, k, None, inv_freq, interleaved)
            tol = output_tolerance(dtype)
            variant = {"forward": (lambda: lk.apply_rope(q, k, theta=THETA, interleaved=interleaved),
                                   lambda out: _both(compare(out[0], want[0], **tol), compare(out[1], want[1], **tol)))}
            layout = "interleaved" if interleaved else "half"
            _sweep_guarded(rec, entries, "rope", f"{hq}/{hk}/{d}:bfloat16:{layout}", variant,
                           lambda default: rope_candidates(default, max(hq, hk)), deadline)


def attention_candidates(default: dict, kernel: str) -> list[dict]:
    """Tiles around the default: the forward's (M 64/128 x N 32/64/128), the backward's (M 32/64 x N 32/64/128).
    On sm_90 the kernels' TMA forms come right after the default: never measured yet, they are what a sweep cut
    short by the budget should not miss (on sm_80 descriptors only add registers: no candidates there)."""
    forward = kernel == "attention_fwd"
    found = [default]
    if _triton.target_of(DEVICE) == "sm90":
        # (BLOCK_M, BLOCK_N, warps, stages) that compile clean in their TMA form (python -m llama_kernels.aot)
        tma_tiles = (((128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 3)) if forward
                     else ((default["BLOCK_M"], default["BLOCK_N"], default["num_warps"], default["num_stages"]),
                           (64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2)))
        for block_m, block_n, warps, num_stages in tma_tiles:
            config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": num_stages,
                      "TMA": True}
            if config not in found:
                found.append(config)
    for block_m in (64, 128) if forward else (32, 64):
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for num_stages in (2, 3, 4) if forward else (1, 2):
                    config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": num_stages}
                    # 128-row tiles need 8 warps (4 spill); 4 stages of 128-column tiles overflow shared memory
                    if (block_m == 128 and warps == 4) or (num_stages == 4 and block_n == 128) or config in found:
                        continue
                    found.append(config)
    return found


def sweep_attention(rec: Recorder, entries: list, deadline: float) -> None:
    """Code Llama 34B's layout (64/8 heads, D 128), bf16, 16k tokens, causal and not; each candidate's output
    is checked against the default config's (the correctness part checks that one against the reference)."""
    dtype, (hq, hk, d) = torch.bfloat16, SWEEP_ATTENTION_HEADS
    q, k, v = (randn(1, SWEEP_TOKENS, h, d, dtype=dtype) for h in (hq, hk, hk))
    do = randn(1, SWEEP_TOKENS, hq, d, dtype=dtype)
    tol = ATTENTION_TOLERANCE[dtype]
    forward, backward = {}, {}
    for causal in (True, False):
        name = "causal" if causal else "full"
        want = lk.flash_attention(q, k, v, causal=causal)
        forward[name] = (lambda c=causal: lk.flash_attention(q, k, v, causal=c),
                         lambda out, w=want: compare(out, w, **tol))
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = lk.flash_attention(*leaves, causal=causal)
        want_grads = torch.autograd.grad(out, leaves, do, retain_graph=True)
        backward[name] = (lambda o=out, ls=leaves: torch.autograd.grad(o, ls, do, retain_graph=True),
                          lambda g, w=want_grads: _both(_both(*(compare(a, b, **tol) for a, b in zip(g[:2], w[:2]))),
                                                        compare(g[2], w[2], **tol)))
    for kernel, variants in (("attention_fwd", forward), ("attention_bwd_dkdv", backward),
                             ("attention_bwd_dq", backward)):
        _sweep_guarded(rec, entries, kernel, f"{d}:bfloat16", variants,
                       lambda default, kernel=kernel: attention_candidates(default, kernel), deadline)


def decode_candidates(default: dict) -> list[dict]:
    found = [default]
    for block_n in (32, 64, 128):
        for warps in (2, 4, 8):
            for num_stages in (1, 2, 3):
                config = {"BLOCK_M": default["BLOCK_M"], "BLOCK_N": block_n, "num_warps": warps,
                          "num_stages": num_stages}
                if config not in found:
                    found.append(config)
    return found


def sweep_decode(rec: Recorder, entries: list, deadline: float) -> None:
    """A decoding step (Sq = 1, bf16, D 128) over 64k cached tokens, batch 1: 34B's and 7B's heads."""
    variants = {}
    for name, (hq, hk, d) in (("34B", (64, 8, 128)), ("7B", (32, 32, 128))):
        q = randn(1, 1, hq, d, dtype=torch.bfloat16)
        k_cache, v_cache = (randn(1, DECODE_SWEEP_TOKENS, hk, d, dtype=torch.bfloat16) for _ in range(2))
        seqlens = torch.full((1,), DECODE_SWEEP_TOKENS, dtype=torch.int32, device=DEVICE)

        def step(q=q, k_cache=k_cache, v_cache=v_cache, seqlens=seqlens):
            return lk.flash_attention_with_kvcache(q, k_cache, v_cache, seqlens)

        want = step()
        variants[name] = (step, lambda out, w=want: compare(out, w, **ATTENTION_TOLERANCE[torch.bfloat16]))
    _sweep_guarded(rec, entries, "decode", "128:bfloat16:16", variants, decode_candidates, deadline)


def winners_of(entries: list) -> dict:
    """{kernel: {target: {key: config}}}: the format llama_kernels/ops/_triton.py reads."""
    winners: dict = {}
    for entry in entries:
        if "winner" in entry:
            winners.setdefault(entry["kernel"], {}).setdefault(entry["target"], {})[entry["key"]] = entry["winner"]
    return winners


def _sweep_guarded(rec: Recorder, entries: list, kernel: str, key: str, *args) -> None:
    try:
        entries.append(sweep_key(rec, kernel, key, *args))
    except Exception as e:  # one kernel's sweep failing leaves the others to run
        traceback.print_exc()
        rec.fail(f"sweep {kernel} {key}: raised {type(e).__name__}: {e}")


def _both(a: dict, b: dict) -> dict:
    return {"ok": a["ok"] and b["ok"], "worst": max(a["worst"] or 0, b["worst"] or 0)}


def _grads_close(got, ideal, dtype) -> dict:
    results = [compare(g, want, **gradient_tolerance(dtype, SWEEP_TOKENS if i == 1 else 1))
               for i, (g, want) in enumerate(zip(got, ideal))]  # index 1 is dweight
    return {"ok": all(r["ok"] for r in results), "worst": max(r["worst"] or 0 for r in results)}


# --------------------------------------------------------------------------- 3. benchmark
def benchmark(rec: Recorder, out_dir: Path, winners: dict, deadline: float) -> None:
    # Measure what a committed tuned_configs.json would give: the package reads its table through _tuned_table().
    original = _triton._tuned_table
    _triton._tuned_table = lambda: winners
    try:
        result = run_benchmark(BENCH_OPS, deadline=deadline, progress=sys.stdout, shapes=BENCH_SHAPES)
    finally:
        _triton._tuned_table = original
    result["tuned_configs_in_force"] = winners
    table = report.format_table(result)
    print(table)
    for line in report.write_outputs(result, out_dir, table):
        print(line)
    rec.results["bench"] = {"ceilings": result["ceilings"], "file": "bench.json"}
    model_rows = result.get("model", {}).get("rows", [])
    described = [(f"bench {row['case']} {row['shape_label']} {row['provider']}", row) for row in result["rows"]]
    described += [(f"bench model {row['label']} {row['provider']}", row) for row in model_rows]
    for what, row in described:
        if row["status"] == "error" and row["provider"] == "ours":
            rec.fail(f"{what}: {row['reason']}")
        elif row["status"] == "skipped" and row["reason"] == "time budget spent":
            rec.fail(f"{what}: skipped, time budget spent")
    rec.results["bench_rows"] = result["rows"]
    rec.results["bench_model"] = result.get("model")


# --------------------------------------------------------------------------- 4. summary
def summary(rec: Recorder, device: dict) -> str:
    lines = [f"== gpu_check summary: {device.get('name')} ({device.get('capability')}) | torch {device['torch']} | "
             f"triton {device['triton']} | {device['date']} =="]
    checks = rec.results.get("correctness", [])
    if checks:
        passed = sum(c["ok"] for c in checks)
        worst = max(checks, key=lambda c: c["worst"] if c["worst"] is not None else float("inf"))
        lines.append(f"correctness: {passed}/{len(checks)} passed; closest to its tolerance: {worst['check']} "
                     f"({worst['worst']:.2f} of it)")
    extension = rec.results.get("extension", {})
    if "cuda_test" in extension:
        lines.append(f"extension: test_cuda_kernels exit status {extension['cuda_test']['returncode']}")
    for row in extension.get("rows", []):
        lines.append(f"  {row['case']:40} {row['backend']:7} {'ok' if row['ok'] else 'WRONG':5} "
                     f"{row['median_ms']:8.4f} ms {row['gbps']:6.0f} GB/s {row['of_copy']:5.0%} of copy")
    for entry in rec.results.get("sweep", []):
        if "winner" in entry:
            lines.append(f"sweep {entry['kernel']:13} {entry['key']:30} -> {entry['winner']}  "
                         f"{entry.get('speedup_vs_default', float('nan')):.3f}x the default")
    rows = rec.results.get("bench_rows", [])
    if rows:
        copy, matmul = rec.results["bench"]["ceilings"]["copy"], rec.results["bench"]["ceilings"]["matmul"]
        lines.append(f"bench: copy ceiling {copy['gbps']:.0f} GB/s, matmul {matmul['tflops']:.0f} TFLOP/s "
                     f"({matmul['dtype']})")
        lines.append(f"  {'case':20} {'shape':30} {'ours ms':>9} {'rate':>14} {'of ceiling':>17}  "
                     "ours' speed-up over each peer")
        for row in (r for r in rows if r["provider"] == "ours"):
            peers = [r for r in rows if r["case"] == row["case"] and r["shape_label"] == row["shape_label"]
                     and r["provider"] != "ours" and r["status"] == "ok" and r.get("ours_speedup")]
            speedups = " ".join(f"{p['provider']} {p['ours_speedup']:.2f}x" for p in peers)
            if row["status"] == "ok":
                lines.append(f"  {row['case']:20} {row['shape_label']:30} {row['median_ms']:9.4f} "
                             f"{row['rate']:6.0f} {row['unit']:7} {row['fraction_of_ceiling']:8.0%} of {row['ceiling']:6} "
                             f" {speedups}")
            else:
                lines.append(f"  {row['case']:20} {row['shape_label']:30} {row['status']}: {row['reason']}")
    if rec.results.get("bench_model"):
        lines += [f"  {line}" for line in format_model_section(rec.results["bench_model"])]
    durations = ", ".join(f"{k} {v:.0f}s" for k, v in rec.results["durations_s"].items())
    lines.append(f"durations: {durations}")
    lines.append("FAILURES:" if rec.failures else "no failures")
    lines += [f"  - {f}" for f in rec.failures]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    rec = Recorder()
    if not torch.cuda.is_available():
        rec.fail("no CUDA device: nothing was checked")
        text = summary(rec, harness.device_info(torch.device("cpu")))
        (args.outdir / "summary.txt").write_text(text + "\n")
        print(text)
        return 2

    device = harness.device_info(DEVICE)
    rec.results["device"] = device
    print(json.dumps(device, indent=1))
    torch.manual_seed(0)
    builds = gpu_extension.start_build()  # compiles on the CPUs while the GPU runs the parts below
    # Each part has its own share of the budget: on the first card the correctness checks (Triton compiling
    # every kernel variant) took 60% of it and left the sweep nothing.
    with rec.part("correctness"):
        check_correctness(rec, deadline=start + CORRECTNESS_SHARE * args.budget_s)
    with rec.part("sweep"):
        sweep(rec, deadline=start + SWEEP_SHARE * args.budget_s)
    # Written even after a failed sweep: whatever was measured, and {} when nothing was.
    winners = winners_of(rec.results.get("sweep", []))
    (args.outdir / "tuned_configs.json").write_text(json.dumps(winners, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.outdir / 'tuned_configs.json'}")
    with rec.part("extension"):
        copy_gbps = harness.measure_copy(DEVICE)["gbps"]
        gpu_extension.check(rec, builds, copy_gbps, deadline=start + EXTENSION_SHARE * args.budget_s)
    with rec.part("benchmark"):
        benchmark(rec, args.outdir, winners, deadline=start + args.budget_s)

    rec.results["failures"] = rec.failures
    (args.outdir / "gpu_check.json").write_text(json.dumps(rec.results, indent=1, default=str) + "\n")
    text = summary(rec, device)
    (args.outdir / "summary.txt").write_text(text + "\n")
    print()
    print(text)
    return 1 if rec.failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, help="where the logs and results go (created)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds: correctness stops at 25%% of it, the sweep at 60%%, the extension's part at "
                             "70%%, the benchmark at its end (default 420)")
    args = parser.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    with open(args.outdir / "gpu_check.log", "w") as log:
        sys.stdout, sys.stderr = Tee(sys.__stdout__, log), Tee(sys.__stderr__, log)
        try:
            return run(args)
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


if __name__ == "__main__":
    sys.exit(main())
