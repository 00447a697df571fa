"""The GPU check: the test suite on the card, a launch-config sweep, the extension, the benchmark, in ~7 minutes.

    python bench/gpu_check.py OUTDIR [--budget-s 420]

1. tests: ``pytest tests --device cuda`` (every op test on CUDA tensors, the Triton kernels compiled,
   against ``llama_kernels.reference`` with the CPU suite's tolerances), in a subprocess cut at its
   share of the budget; its passed / failed / skipped counts and failing test ids are recorded;
2. sweep: every candidate of each kernel's ``Tuning`` (declared beside the kernel), timed through
   the benchmark's cases at ``cases.SWEEP_SHAPES`` (min / median / max), its output checked against
   the default config's, and the winners written as ``tuned_configs.json``;
3. extension (``gpu_extension.py``): the compiled extension, built on the CPUs from the
   start of the run, its standalone CUDA test, and the suite's tests of ``backend="cuda"`` (the
   hand-written RMSNorm and RoPE; the benchmark's ``ours_cuda`` rows time them);
4. benchmark: ``llama-kernels bench``'s run, with the winners in force: first the model
   (Code Llama 7B's layer stack against Hugging Face's, prefill at 16k tokens and decode at
   100k) and its training step at 16k tokens, then the ops;
5. a summary, printed last.

Files in OUTDIR: gpu_check.log (all output but the tests'), tests.log and tests.xml (pytest's output
and junit report), gpu_check.json (every figure, count and failure), tuned_configs.json (copy it to
llama_kernels/ops/ to use the winners), attention_choice.json (the committed attention table with this card's
entry from the benchmark: SDPA for a phase where its best backend beat ours; copy it to llama_kernels/ops/ too),
bench.json / bench.txt / bench.png, summary.txt.

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
import subprocess
import sys
import time
import traceback
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout, installed or not

import torch  # noqa: E402

import gpu_extension  # noqa: E402  (bench/, beside this file)
from llama_kernels.bench import harness, model, report, run_benchmark, sweep  # noqa: E402
from llama_kernels.bench.cases import CHECK_SHAPES  # noqa: E402
from llama_kernels.ops import _triton, attention_choice  # noqa: E402

DEVICE = torch.device("cuda")
# The model and the training step run first (the runner puts them before the op cases), the step at 16k tokens
# only (its longer lengths take a minute each); attention last: the slowest per shape.
BENCH_OPS = ("model", "train", "rms_norm", "rope", "swiglu", "decode", "cross_entropy", "attention")
TRAIN_TOKENS = (16384,)
TESTS_SHARE, SWEEP_SHARE, EXTENSION_SHARE = 0.25, 0.6, 0.7  # of the budget: where each part must stop
MAX_FAILURES_LISTED = 30  # failing tests named one by one in the failures; the rest counted


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
def run_tests(rec: Recorder, out_dir: Path, deadline: float, name: str = "tests", extra: tuple = ()) -> None:
    """``pytest tests --device cuda [extra]`` in a subprocess, interrupted at the deadline (pytest still writes the
    junit file then); its output goes to OUTDIR/{name}.log, its counts and failing test ids into the results."""
    junit = out_dir / f"{name}.xml"
    # A module that fails to import (a package the card lacks) costs its own tests, not the run's.
    command = [sys.executable, "-m", "pytest", "tests", "--device", "cuda", "-q", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={junit}", *extra]
    print(" ".join(command), flush=True)
    with open(out_dir / f"{name}.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rec.fail(f"{name}: interrupted, their time budget spent (the counts are of the tests run so far)")
            process.send_signal(signal.SIGINT)  # pytest stops after the current test and writes its junit file
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    print((out_dir / f"{name}.log").read_text()[-3000:])
    if not junit.exists():
        rec.fail(f"{name}: pytest wrote no {junit.name} (exit status {process.returncode}; see {name}.log)")
        return
    tests = rec.results[name] = {"exit_status": process.returncode, **junit_counts(junit)}
    for test_id in tests["failed_ids"][:MAX_FAILURES_LISTED]:
        rec.fail(f"{name}: {test_id}")
    if len(tests["failed_ids"]) > MAX_FAILURES_LISTED:
        rec.fail(f"{name}: {len(tests['failed_ids']) - MAX_FAILURES_LISTED} more failed (OUTDIR/{junit.name})")


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


# --------------------------------------------------------------------------- 2. benchmark
def benchmark(rec: Recorder, out_dir: Path, winners: dict, deadline: float) -> None:
    # Measure what a committed tuned_configs.json would give.
    with _triton.tuned_table_in_force(winners):
        result = run_benchmark(BENCH_OPS, deadline=deadline, progress=sys.stdout,
                               shapes={**CHECK_SHAPES, "model": model.CHECK_SHAPES}, train_tokens=TRAIN_TOKENS)
    result["tuned_configs_in_force"] = winners
    table = report.format_table(result)
    print(table)
    for line in report.write_outputs(result, out_dir, table):
        print(line)
    rec.results["bench"] = {"ceilings": result["ceilings"], "file": "bench.json"}
    model_rows = result.get("model", {}).get("rows", [])
    ours_model = {"ours", *model.OURS_VARIANTS}  # an error in these fails the check; a peer's stays in its row
    described = [(f"bench {row['case']} {row['shape_label']} {row['provider']}", row, row["provider"] == "ours")
                 for row in result["rows"]]
    described += [(f"bench model {row['label']} {row['provider']}", row, row["provider"] in ours_model)
                  for row in model_rows]
    for what, row, ours in described:
        if row["status"] == "error" and ours:
            rec.fail(f"{what}: {row['reason']}")
        elif row["status"] == "skipped" and row["reason"] == "time budget spent":
            rec.fail(f"{what}: skipped, time budget spent")
    rec.results["bench_rows"] = result["rows"]
    rec.results["bench_model"] = result.get("model")
    propose_attention_choice(rec, out_dir, result["rows"])


def propose_attention_choice(rec: Recorder, out_dir: Path, rows: list[dict]) -> None:
    """OUTDIR/attention_choice.json: the committed table, this card's entry replaced by what its rows say."""
    device, target = rec.results["device"], _triton.target_of(DEVICE)
    entry = attention_choice.proposed_entry(rows, f"{device.get('name')}, {device['date']}, gpu_check")
    table = {**attention_choice.attention_table(), target: entry} if entry else attention_choice.attention_table()
    (out_dir / "attention_choice.json").write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    rec.results["attention_choice"] = {target: entry}


# --------------------------------------------------------------------------- 3. summary
def summary(rec: Recorder, device: dict) -> str:
    lines = [f"== gpu_check summary: {device.get('name')} ({device.get('capability')}) | torch {device['torch']} | "
             f"triton {device['triton']} | {device['date']} =="]
    for name in ("tests", "extension_tests"):
        if name in rec.results:
            tests = rec.results[name]
            lines.append(f"{name} (pytest --device cuda): {tests['passed']} passed, {tests['failed']} failed, "
                         f"{tests['skipped']} skipped; exit status {tests['exit_status']}")
    extension = rec.results.get("extension", {})
    if "cuda_test" in extension:
        lines.append(f"extension: test_cuda_kernels exit status {extension['cuda_test']['returncode']}")
    for entry in rec.results.get("sweep", []):
        if "winner" in entry:
            lines.append(f"sweep {entry['kernel']:13} {entry['key']:30} -> {entry['winner']}  "
                         f"{entry.get('speedup_vs_default', float('nan')):.3f}x the default")
    if rec.results.get("bench_rows"):
        lines += report.ours_lines(rec.results["bench_rows"], rec.results["bench"]["ceilings"])
    if rec.results.get("bench_model"):
        lines += [f"  {line}" for line in model.format_section(rec.results["bench_model"])]
    for target, entry in rec.results.get("attention_choice", {}).items():
        phases = ", ".join(f"{phase} {entry[phase]}" for phase in attention_choice.PHASES if phase in entry)
        lines.append(f"attention choice proposed for {target} (ours vs SDPA's best backend per phase): "
                     f"{phases or 'nothing measured'}; OUTDIR/attention_choice.json, copy it to llama_kernels/ops/")
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
        rec.results["sweep"] = sweep.run(DEVICE, deadline=start + SWEEP_SHARE * args.budget_s, fail=rec.fail)
    # Written even after a failed sweep: whatever was measured, and {} when nothing was.
    winners = sweep.winners_of(rec.results.get("sweep", []))
    (args.outdir / "tuned_configs.json").write_text(json.dumps(winners, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.outdir / 'tuned_configs.json'}")
    with rec.part("extension"):
        library = gpu_extension.load(rec, builds, deadline=start + EXTENSION_SHARE * args.budget_s)
        run_tests(rec, args.outdir, start + EXTENSION_SHARE * args.budget_s, name="extension_tests",
                  extra=("--extension-library", library, "-m", "extension"))
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
