"""The GPU check: the test suite on the card, a launch-config sweep, the extension, the benchmark, in ~7 minutes.

    python bench/gpu_check.py OUTDIR [--budget-s 420]

1. tests: ``pytest tests --device cuda`` (every op test on CUDA tensors, the Triton kernels compiled,
   against ``llama_kernels.reference`` with the CPU suite's tolerances), in a subprocess cut at its
   share of the budget; its passed / failed / skipped counts and failing test ids are recorded;
2. sweep: every candidate launch config of each Triton kernel, timed through
   the public functions at the key shapes (min / median / max), its output checked against
   the default config's, and the winners written as ``tuned_configs.json``;
3. extension (``gpu_extension.py``): the compiled extension, built on the CPUs from the
   start of the run, its standalone CUDA test, and ``backend="cuda"`` (the hand-written
   RMSNorm and RoPE) beside the Triton kernels, checked and timed as a fraction of the copy;
4. benchmark: ``llama-kernels bench``'s run, with the winners in force: first the model
   (Code Llama 7B's layer stack against Hugging Face's, prefill at 16k tokens and decode at
   100k), then the ops;
5. a summary, printed last.

Files in OUTDIR: gpu_check.log (all output but the tests'), tests.log and tests.xml (pytest's output
and junit report), gpu_check.json (every figure, count and failure), tuned_configs.json (copy it to
llama_kernels/ops/ to use the winners), bench.json / bench.txt / bench.png, summary.txt.

A part that fails is recorded and the run goes on; the exit status is 1 if
anything failed, 2 without a CUDA device. Each part has its share of the time budget
(the tests 25%, the sweep to 60%, the extension to 70%, the benchmark to the end); what is left of a
part past its share is skipped and counted as a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout, installed or not

import torch  # noqa: E402
import triton  # noqa: E402

import gpu_extension  # noqa: E402  (bench/, beside this file)
import llama_kernels as lk  # noqa: E402
from llama_kernels.bench import harness, report, run_benchmark  # noqa: E402
from llama_kernels.bench.cases import Shape  # noqa: E402
from llama_kernels.bench.model import ModelShapes  # noqa: E402
from llama_kernels.bench.model import format_section as format_model_section  # noqa: E402
from llama_kernels.ops import _triton  # noqa: E402

DEVICE = torch.device("cuda")
EPS = 1e-5
THETA = 1e6

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
TESTS_SHARE, SWEEP_SHARE, EXTENSION_SHARE = 0.25, 0.6, 0.7  # of the budget: where each part must stop
MAX_FAILURES_LISTED = 30  # failing tests named one by one in the failures; the rest counted
# A sweep candidate's output against the default config's (bf16): tiles of another shape sum in another order,
# within a few ulps of each other; a broken config is off by far more. (Correctness is the test suite's.)
SAME_AS_DEFAULT = {"rtol": 2e-2, "atol": 2e-2}
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


# --------------------------------------------------------------------------- 1. the test suite on the card
def run_tests(rec: Recorder, out_dir: Path, deadline: float) -> None:
    """``pytest tests --device cuda`` in a subprocess, interrupted at the deadline (pytest still writes the junit
    file then); its output goes to OUTDIR/tests.log, its counts and failing test ids into the results."""
    junit = out_dir / "tests.xml"
    # A module that fails to import (a package the card lacks) costs its own tests, not the run's.
    command = [sys.executable, "-m", "pytest", "tests", "--device", "cuda", "-q", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={junit}"]
    print(" ".join(command), flush=True)
    with open(out_dir / "tests.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rec.fail("tests: interrupted, their time budget spent (the counts are of the tests run so far)")
            process.send_signal(signal.SIGINT)  # pytest stops after the current test and writes its junit file
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    print((out_dir / "tests.log").read_text()[-3000:])
    if not junit.exists():
        rec.fail(f"tests: pytest wrote no {junit.name} (exit status {process.returncode}; see tests.log)")
        return
    tests = rec.results["tests"] = {"exit_status": process.returncode, **junit_counts(junit)}
    for test_id in tests["failed_ids"][:MAX_FAILURES_LISTED]:
        rec.fail(f"tests: {test_id}")
    if len(tests["failed_ids"]) > MAX_FAILURES_LISTED:
        rec.fail(f"tests: {len(tests['failed_ids']) - MAX_FAILURES_LISTED} more failed (OUTDIR/{junit.name})")


def junit_counts(path: Path) -> dict:
    """passed / failed (failures and errors) / skipped counts and the failing test ids of pytest's junit xml."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failed_ids": []}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        # classname "tests.test_rope", name "test_x[param]": the test id "tests/test_rope.py::test_x[param]"
        test_id = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        outcomes = {child.tag for child in case}
        if outcomes & {"failure", "error"}:
            counts["failed"] += 1
            counts["failed_ids"].append(test_id)
        elif "skipped" in outcomes:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def same_as_default(got, want) -> dict:
    """A sweep candidate's output (a tensor or a tuple of them) against the default config's, elementwise in float64:
    |got - want| <= atol + rtol |want| (SAME_AS_DEFAULT); 'worst' = the largest error over its allowance."""
    if isinstance(got, torch.Tensor):
        got, want = (got,), (want,)
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape or g.isnan().any():
            return {"ok": False, "worst": float("inf")}
        allowance = SAME_AS_DEFAULT["atol"] + SAME_AS_DEFAULT["rtol"] * w.double().abs()
        worst = max(worst, ((g.double() - w.double()).abs() / allowance).max().item())
    return {"ok": worst <= 1, "worst": worst}


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


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
        want_y, want_residual = lk.rms_norm(x, w, EPS), lk.rms_norm(x, w, EPS, residual=r)
        forward = {
            "no residual": (lambda: lk.rms_norm(x, w, EPS), lambda y: same_as_default(y, want_y)),
            "residual": (lambda: lk.rms_norm(x, w, EPS, residual=r),
                         lambda out: same_as_default(out, want_residual)),
        }
        _sweep_guarded(rec, entries, "rms_norm_fwd", f"{hidden}:bfloat16", forward, rms_norm_candidates, deadline)

        # Backward alone: the forward runs once, each timed call differentiates it again.
        leaves = [t.detach().requires_grad_() for t in (x, w, r)]
        y = lk.rms_norm(leaves[0], leaves[1], EPS)
        y_res, h = lk.rms_norm(leaves[0], leaves[1], EPS, residual=leaves[2])

        def grads():
            return torch.autograd.grad(y, leaves[:2], dy, retain_graph=True)

        def grads_residual():
            return torch.autograd.grad((y_res, h), leaves, (dy, dh), retain_graph=True)

        want_grads, want_grads_residual = grads(), grads_residual()
        backward = {
            "no residual": (grads, lambda g: same_as_default(g, want_grads)),
            "residual": (grads_residual, lambda g: same_as_default(g, want_grads_residual)),
        }
        _sweep_guarded(rec, entries, "rms_norm_bwd", f"{hidden}:bfloat16", backward, rms_norm_candidates, deadline)

    for hq, hk, d in SWEEP_HEADS:
        q, k = randn(1, SWEEP_TOKENS, hq, d, dtype=dtype), randn(1, SWEEP_TOKENS, hk, d, dtype=dtype)
        for interleaved in (False, True):
            want = lk.apply_rope(q, k, theta=THETA, interleaved=interleaved)
            variant = {"forward": (lambda: lk.apply_rope(q, k, theta=THETA, interleaved=interleaved),
                                   lambda out: same_as_default(out, want))}
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
    is checked against the default config's (the test suite checks that one against the reference)."""
    dtype, (hq, hk, d) = torch.bfloat16, SWEEP_ATTENTION_HEADS
    q, k, v = (randn(1, SWEEP_TOKENS, h, d, dtype=dtype) for h in (hq, hk, hk))
    do = randn(1, SWEEP_TOKENS, hq, d, dtype=dtype)
    forward, backward = {}, {}
    for causal in (True, False):
        name = "causal" if causal else "full"
        want = lk.flash_attention(q, k, v, causal=causal)
        forward[name] = (lambda c=causal: lk.flash_attention(q, k, v, causal=c),
                         lambda out, w=want: same_as_default(out, w))
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = lk.flash_attention(*leaves, causal=causal)
        want_grads = torch.autograd.grad(out, leaves, do, retain_graph=True)
        backward[name] = (lambda o=out, ls=leaves: torch.autograd.grad(o, ls, do, retain_graph=True),
                          lambda g, w=want_grads: same_as_default(g, w))
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
        variants[name] = (step, lambda out, w=want: same_as_default(out, w))
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
    tests = rec.results.get("tests")
    if tests:
        lines.append(f"tests (pytest tests --device cuda): {tests['passed']} passed, {tests['failed']} failed, "
                     f"{tests['skipped']} skipped; exit status {tests['exit_status']}")
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
    with rec.part("tests"):
        run_tests(rec, args.outdir, deadline=start + TESTS_SHARE * args.budget_s)
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
                        help="seconds: the tests stop at 25%% of it, the sweep at 60%%, the extension's part at "
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
