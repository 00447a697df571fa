"""The launch-config sweep of ``bench/gpu_check.py``: every candidate of every kernel's ``Tuning``, timed on a card.

The workloads are the benchmark's own cases ("ours") at ``cases.SWEEP_SHAPES``: each is run once
with every declared Tuning (``_triton.TUNINGS``) asked what its kernel launches with, which finds
the (kernel, target, key) entries of the tuned table it exercises; each candidate is then forced
(``_triton.forced_config``) and timed on every workload of its entry, its output held to the
default config's. The winner of an entry has the least total median; the default stays unless a
candidate beats it by more than ``KEEP_DEFAULT_WITHIN``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import traceback

import torch
import triton

from ..ops import _triton
from .cases import SWEEP_SHAPES, matrix

SWEEP_OPS = ("attention", "decode", "rms_norm", "rope", "swiglu", "cross_entropy")  # compute-bound first
# A candidate's output against the default config's (bf16): tiles of another shape sum in another order, within a
# few ulps of each other; a broken config is off by far more. (Correctness is the test suite's.)
SAME_AS_DEFAULT = {"rtol": 2e-2, "atol": 2e-2}
KEEP_DEFAULT_WITHIN = 0.03  # a candidate replaces the default only if >3% faster: noise must not churn the table


def run(device: torch.device, deadline: float, fail) -> list[dict]:
    """Every (kernel, key) the workloads launch, in SWEEP_OPS' order (compute-bound first: their configs matter
    most and take longest), one entry each; ``fail(text)`` records what went wrong, and the sweep goes on."""
    entries = []
    for (kernel, target, key), workload in sweep_workloads(device, fail).items():
        try:
            entries.append(sweep_key(kernel, workload["ask"], workload["variants"], deadline, fail))
        except Exception as e:  # one kernel's sweep failing leaves the others to run
            traceback.print_exc()
            fail(f"sweep {kernel} {key}: raised {type(e).__name__}: {e}")
    return entries


def same_as_default(got, want) -> dict:
    """A sweep candidate's output (a tensor or a tuple of them) against the default config's, elementwise in float64:
    |got - want| <= atol + rtol |want| (SAME_AS_DEFAULT); 'worst' = the largest error over its allowance."""
    got, want = _tensors(got), _tensors(want)
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape or g.isnan().any():
            return {"ok": False, "worst": float("inf")}
        allowance = SAME_AS_DEFAULT["atol"] + SAME_AS_DEFAULT["rtol"] * w.double().abs()
        worst = max(worst, ((g.double() - w.double()).abs() / allowance).max().item())
    return {"ok": worst <= 1, "worst": worst}


def _tensors(output) -> tuple:
    return (output,) if isinstance(output, torch.Tensor) else tuple(t for t in output if t is not None)


def sweep_workloads(device: torch.device, fail) -> dict:
    """{(kernel, target, key): {"ask": Ask, "variants": {label: (fn, output)}}}: the launches the benchmark's
    "ours" makes at the sweep shapes (``cases.SWEEP_SHAPES``), found by asking every declared Tuning what its
    kernel is launched with (``_triton.TUNINGS``). A variant is one case at one shape, with its default output."""
    found: dict = {}
    for item in matrix(SWEEP_OPS, device, with_compile=False, shapes=SWEEP_SHAPES):
        if item.provider != "ours":
            continue
        label = f"{item.case.name} {item.shape.label(item.case.op)}"
        try:
            fn = item.case.build("ours", item.case.make_inputs(item.shape, device), device)
            with contextlib.ExitStack() as stack:
                asks = {kernel: stack.enter_context(_triton.forced_config(kernel, lambda default: default))
                        for kernel in _triton.TUNINGS}
                output = fn()
        except Exception as e:  # a case that cannot run leaves the others to sweep
            traceback.print_exc()
            fail(f"sweep: {label} raised {type(e).__name__}: {e}")
            continue
        for kernel, asked in asks.items():
            keys = {(ask.target, ask.key) for ask in asked}
            if len(keys) == 1:  # a forced config applies to every launch of the kernel: one key per variant
                entry = found.setdefault((kernel, *keys.pop()), {"ask": asked[0], "variants": {}})
                entry["variants"][label] = (fn, output)
            elif keys:
                fail(f"sweep {kernel}: {label} asks for several keys {sorted(keys)}; not swept there")
    return found


def sweep_key(kernel: str, ask: _triton.Ask, variants: dict, deadline: float, fail) -> dict:
    """Time every candidate of ``TUNINGS[kernel]`` on every variant; return the entry.

    The winner has the least total median over the variants, among candidates whose outputs
    match the default's. The default is timed first, so a run cut short still has it.
    """
    entry = {"kernel": kernel, "target": ask.target, "key": ask.key, "default": ask.default, "candidates": []}
    candidates = _triton.TUNINGS[kernel].candidates(ask.default, ask.target, ask.fields)
    for i, config in enumerate(candidates):
        if time.monotonic() > deadline:
            fail(f"sweep {kernel} {ask.key}: time budget spent after {i} of {len(candidates)} candidates")
            break
        timed = {"config": config, "variants": {}}
        for name, (fn, want) in variants.items():
            try:
                with _triton.forced_config(kernel, lambda default: config):
                    result = same_as_default(fn(), want)
                    times = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="all")
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
        print(f"  {kernel} {ask.key} [{i + 1}/{len(candidates)}] {config}  min/median/max ms  {spread}", flush=True)
        if not ok and i == 0:
            fail(f"sweep {kernel} {ask.key}: the default config fails {timed['variants']}")

    passing = [c for c in entry["candidates"] if c["total_median_ms"] is not None]
    if not entry["candidates"]:
        return entry  # the time budget was spent before the first candidate: failed above
    if not passing:
        fail(f"sweep {kernel} {ask.key}: no candidate passed")
        return entry
    best = min(passing, key=lambda c: c["total_median_ms"])
    default_timed = entry["candidates"][0]
    default_ms = default_timed["total_median_ms"]
    if default_ms is not None and best["total_median_ms"] > (1 - KEEP_DEFAULT_WITHIN) * default_ms:
        best = default_timed
    entry["winner"] = best["config"]
    if default_ms is not None:
        entry["speedup_vs_default"] = default_ms / best["total_median_ms"]
    print(f"  -> {kernel} {ask.key}: {best['config']} "
          f"({entry.get('speedup_vs_default', float('nan')):.3f}x the default)")
    return entry


def winners_of(entries: list) -> dict:
    """{kernel: {target: {key: config}}}: the format llama_kernels/ops/_triton.py reads."""
    winners: dict = {}
    for entry in entries:
        if "winner" in entry:
            winners.setdefault(entry["kernel"], {}).setdefault(entry["target"], {})[entry["key"]] = entry["winner"]
    return winners


