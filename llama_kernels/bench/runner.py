"""The benchmark run behind ``llama-kernels bench`` and ``python -m llama_kernels.bench``.

Measures the ceilings, then every (case, shape, provider) on the device present
(CUDA if any, else CPU), and derives per row: the rate (GB/s for the memory-bound
ops, TFLOP/s for attention), its fraction of the ceiling measured in the same run
(the copy bandwidth, the matmul peak), the floor time, ours' speed-up against the
row's provider and the extra memory one call allocates. With "model" in the ops, the
model section (``model``: a Code Llama 7B layer stack against Hugging Face's model,
prefill and decode) runs first, so that a deadline cuts op rows rather than it; then, with
"train", the training section (``train``: one forward + backward step of that stack).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from pathlib import Path

import torch

from . import model, report, train
from .cases import CASES, OPS, Unavailable, figures, fresh_step, matrix
from .harness import (FULL, QUICK, default_device, device_info, measure, measure_ceilings, measure_in_turns,
                      peak_memory_bytes)


def run_benchmark(ops=OPS, quick: bool = False, device: torch.device | None = None,
                  deadline: float | None = None, progress=sys.stderr, shapes: dict | None = None,
                  model_layers: int | None = None, train_tokens: tuple[int, ...] | None = None) -> dict:
    """All measurements as one JSON-ready dict. ``deadline`` (time.monotonic()) skips what is left once passed;
    ``shapes`` ({"memory": ..., "attention": ..., "decode": ..., "model": model.ModelShapes}) replaces the
    device's shape lists; ``model_layers`` the model and train sections' layer count; ``train_tokens`` the train
    section's sequence lengths."""
    device = device or default_device()
    plan = QUICK if quick else FULL
    info = device_info(device)  # its CPU notice is printed once, with the table
    print(f"[ceilings] copy and matmul on {info['name']}", file=progress)
    ceilings = measure_ceilings(device, quick)
    model_section = None
    if "model" in ops:
        model_section = model.run_model_benchmark(device, quick, ceilings, deadline, progress, layers=model_layers,
                                                  shapes=(shapes or {}).get("model"))
        for _, group in itertools.groupby(model_section["rows"], key=lambda row: row["label"]):
            _add_speedups(list(group))
    train_section = None
    if "train" in ops:
        train_section = train.run_train_benchmark(device, quick, deadline, progress, layers=model_layers,
                                                  lengths=train_tokens)
        for _, group in itertools.groupby(train_section["rows"], key=lambda row: row["label"]):
            _add_speedups(list(group))
    # "model" has no case: the matrix holds the op cases only
    items = matrix(ops, device, quick, with_compile=not quick, shapes=shapes)  # compile warm-ups take seconds each

    rows = []
    for (case, shape), group in itertools.groupby(items, key=lambda item: (item.case, item.shape)):
        inputs = case.make_inputs(shape, device)
        group = list(group)
        announces = [functools.partial(print, f"[{len(rows) + i + 1}/{len(items)}] {case.name} "
                                       f"{shape.label(case.op)} {item.provider}", file=progress, flush=True)
                     for i, item in enumerate(group)]
        if device.type == "cuda":  # one provider built and timed at a time: long rows' saved activations are large
            shape_rows = [_measure_items([item], inputs, device, plan, ceilings, deadline, [announce])[0]
                          for item, announce in zip(group, announces)]
        else:
            shape_rows = _measure_items(group, inputs, device, plan, ceilings, deadline, announces)
        _add_speedups(shape_rows)
        rows += shape_rows
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    unavailable = dict.fromkeys(f"{r['provider']} ({r['reason']})" for r in rows if r["status"] == "skipped")
    if unavailable:
        print(f"skipped: {', '.join(unavailable)}", file=progress)

    result = {
        "schema": 1,
        "quick": quick,
        "dtype": "bfloat16",
        "device": info,
        "ceilings": ceilings,
        "cases": {case.name: case.title for case in CASES if case.op in ops},
        "rows": rows,
    }
    if model_section is not None:
        result["model"] = model_section
    if train_section is not None:
        result["train"] = train_section
    return result


def _measure_items(items, inputs, device, plan, ceilings: dict, deadline: float | None, announces) -> list[dict]:
    """The rows of one shape's providers, in their order: built, then timed (on a CPU in turns, harness's
    measure_in_turns). ``announces[i]()`` prints item i's progress line once it is built, so that a provider that
    cannot run here (skipped, with the reason) prints none."""
    rows, fns = [], {}
    for index, (item, announce) in enumerate(zip(items, announces)):
        case, shape = item.case, item.shape
        rows.append({"case": case.name, "op": case.op, "shape": shape.as_dict(case.op),
                     "shape_label": shape.label(case.op), "provider": item.provider})
        if deadline is not None and time.monotonic() > deadline:
            rows[-1].update(status="skipped", reason="time budget spent")
            continue
        try:
            fns[index] = case.build(item.provider, inputs, device)
            announce()
        except Exception as e:
            rows[-1].update(_failure(e, device))
    if device.type == "cuda":
        timings = {}
        for index, fn in fns.items():
            try:
                timings[index] = measure(fn, device, plan)
            except Exception as e:
                timings[index] = e
    else:
        timings = measure_in_turns(fns, plan)
    for index, timing in timings.items():
        item, row = items[index], rows[index]
        try:
            if isinstance(timing, Exception):
                raise timing
            setup = None
            if item.case.cpu_peak:
                setup = functools.partial(fresh_step, item.case.name, item.shape, item.provider)
            peak = peak_memory_bytes(fns[index], device, setup)
        except Exception as e:
            row.update(_failure(e, device))
            continue
        row.update(status="ok", **timing.as_dict(), **figures(item.case, item.shape, timing.median_ms, ceilings),
                   peak_mem_bytes=peak)
    return rows


def _failure(e: Exception, device) -> dict:
    """A provider that cannot run here is skipped, with the reason; one that fails (a peer's version, out of
    memory) is an error row, not the end of the run."""
    if isinstance(e, Unavailable):
        return {"status": "skipped", "reason": str(e)}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    first_line = (str(e).splitlines() or [""])[0][:300]
    return {"status": "error", "reason": f"{type(e).__name__}: {first_line}"}


def _add_speedups(shape_rows: list[dict]) -> None:
    """ours_speedup = provider time / ours' time: how many times faster ours is than that provider."""
    ours = next((r for r in shape_rows if r["provider"] == "ours" and r["status"] == "ok"), None)
    for row in shape_rows:
        if row["status"] == "ok":
            row["ours_speedup"] = row["median_ms"] / ours["median_ms"] if ours else None


# --------------------------------------------------------------------------- command line
def _ops(text: str) -> tuple[str, ...]:
    ops = tuple(op.strip() for op in text.split(",") if op.strip())
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(OPS)}, got {text!r}")
    return ops


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _lengths(text: str) -> tuple[int, ...]:
    return tuple(_positive(part.strip()) for part in text.split(","))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="one small shape per case, few repetitions, no torch.compile peer (a few seconds)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"),
                        help="directory for bench.json, bench.txt and bench.png (default: bench-out)")
    parser.add_argument("--ops", type=_ops, default=OPS, help=f"comma-separated ops to run (default: {','.join(OPS)})")
    parser.add_argument("--no-plot", action="store_true", help="do not write bench.png")
    parser.add_argument("--model-layers", type=_positive, default=None,
                        help=f"layers of the Code Llama 7B stack in the model and train sections (default: {model.GPU_LAYERS} on a "
                             f"GPU; {model.REDUCED_LAYERS} of the reduced model on a CPU and with --quick)")
    parser.add_argument("--train-tokens", type=_lengths, default=None,
                        help=f"comma-separated sequence lengths of the train section (default: "
                             f"{','.join(map(str, train.GPU_TOKENS))} on a GPU, "
                             f"{','.join(map(str, train.REDUCED_TOKENS))} on a CPU)")


def run_from_args(args: argparse.Namespace) -> int:
    """Run, print the table, write the files. Exit status 1 if one of ours' measurements failed."""
    result = run_benchmark(ops=args.ops, quick=args.quick, model_layers=args.model_layers,
                           train_tokens=args.train_tokens)
    table = report.format_table(result)
    print(table)
    for line in report.write_outputs(result, args.out, table, plot=not args.no_plot):
        print(line)
    rows = result["rows"] + result.get("model", {}).get("rows", []) + result.get("train", {}).get("rows", [])
    failed = [r for r in rows if r["provider"] == "ours" and r["status"] == "error"]
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_kernels.bench",
                                     description="Time the ops against their peers (same as llama-kernels bench).")
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
