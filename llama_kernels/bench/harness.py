"""Timing, ceilings and device facts: what every benchmark figure is measured with.

- ``measure`` times a zero-argument function: on a GPU with
  ``triton.testing.do_bench`` (CUDA events, L2 flushed before each run, after a
  warm-up), on a CPU with ``time.perf_counter``; medians are reported, with the
  min and max beside them so the spread shows. ``measure_in_turns`` times a row's
  providers on a CPU in turns, a call of each per round.
- ``measure_ceilings`` measures, in the same run, what the card or machine can do
  at best: a large device-to-device copy (bandwidth: every op here is memory
  bound, so its floor is bytes / copy bandwidth) and a large matmul (FLOP/s,
  for context).
- ``peak_memory_bytes`` measures what one call allocates on top of what is resident: on a
  GPU from the caching allocator's peak statistics; on a CPU (which keeps none) as the peak
  resident memory of the call in a fresh process, for the rows that give it a ``setup``.
- ``device_info`` says what the figures were measured on.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import gc
import itertools
import multiprocessing
import os
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, ContextManager

import torch
import triton

from llama_kernels import _native

CPU_NOTICE = (
    "CPU FIGURES: no CUDA device here. 'ours' is the package's CPU path (the C++ kernels of the native "
    "extension, or the plain-torch reference where it is not built), not the Triton kernels, and the shapes "
    "are reduced. These figures say nothing about GPU performance."
)


@dataclass(frozen=True)
class TimingPlan:
    """How long to measure. GPU: do_bench's warm-up and repetition windows; CPU: repetition counts and a time box."""

    gpu_warmup_ms: float
    gpu_rep_ms: float
    cpu_min_reps: int
    cpu_max_reps: int
    cpu_budget_s: float


FULL = TimingPlan(gpu_warmup_ms=25, gpu_rep_ms=100, cpu_min_reps=5, cpu_max_reps=50, cpu_budget_s=0.3)
QUICK = TimingPlan(gpu_warmup_ms=5, gpu_rep_ms=20, cpu_min_reps=3, cpu_max_reps=5, cpu_budget_s=0.02)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int
    first_call_ms: float  # includes compiles and autotuning: reported, never part of the median

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "max_ms": self.max_ms,
                "reps": self.reps, "first_call_ms": self.first_call_ms}


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_timer(device: torch.device):
    """A clock for pytest-benchmark: on a GPU it waits for queued kernels before reading the time."""
    if device.type != "cuda":
        return time.perf_counter

    def cuda_timer() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return cuda_timer


def measure(fn, device: torch.device, plan: TimingPlan = FULL) -> Timing:
    if device.type != "cuda":
        timing = measure_in_turns({"fn": fn}, plan)["fn"]
        if isinstance(timing, Exception):
            raise timing
        return timing
    start = time.perf_counter()
    fn()
    synchronize(device)
    first_call_ms = (time.perf_counter() - start) * 1e3
    times = triton.testing.do_bench(fn, warmup=plan.gpu_warmup_ms, rep=plan.gpu_rep_ms, return_mode="all")
    return Timing(statistics.median(times), min(times), max(times), len(times), first_call_ms)


def measure_in_turns(fns: dict, plan: TimingPlan = FULL) -> dict:
    """CPU: the providers of one row timed in turns, one call of each per round, the order reversed every other
    round, so that every provider sees the same machine (a VM's bandwidth and page-fault costs drift 1.3-2x within
    seconds, and timing one provider after another puts that drift into their ratio). Stops after cpu_max_reps
    rounds, or after cpu_min_reps once the rounds took cpu_budget_s per provider. Returns {name: Timing, or the
    exception its call raised (that provider then drops out of the rounds)}."""
    results, first_call_ms, times = {}, {}, {}
    for name, fn in fns.items():
        try:
            start = time.perf_counter()
            fn()
            first_call_ms[name] = (time.perf_counter() - start) * 1e3
            fn()  # a second warm call: the first one may have compiled or faulted pages in
            times[name] = []
        except Exception as e:  # reported as this provider's row by the caller
            results[name] = e
    order, box_start = list(times), time.perf_counter()
    for rounds in itertools.count():
        if not order or rounds >= plan.cpu_max_reps or (
                rounds >= plan.cpu_min_reps and time.perf_counter() - box_start > plan.cpu_budget_s * len(order)):
            break
        for name in order if rounds % 2 == 0 else reversed(order):
            try:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
            except Exception as e:
                results[name] = e
        order = [name for name in order if name not in results]
    for name in order:
        results[name] = Timing(statistics.median(times[name]), min(times[name]), max(times[name]), len(times[name]),
                               first_call_ms[name])
    return results


def peak_memory_bytes(fn, device: torch.device, setup: Callable[[], ContextManager] | None = None) -> int | None:
    """Memory one call allocates on top of what is already resident (outputs, temporaries, saved activations).

    GPU: ``fn``'s call, from the allocator's statistics. CPU: the CPU allocator keeps none, so ``setup``
    (picklable; it builds the inputs, and its context yields the function to measure) runs in a fresh process
    (``cpu_peak_memory_bytes``); without one, or off Linux, None (the row says n/a).
    """
    if device.type != "cuda":
        return cpu_peak_memory_bytes(setup) if setup is not None else None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    del result
    return torch.cuda.max_memory_allocated(device) - before


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def cpu_peak_memory_bytes(setup: Callable[[], ContextManager]) -> int | None:
    """The peak resident memory one call of the function ``with setup() as fn`` yields adds, in a fresh process.

    In a process of its own (multiprocessing's spawn, so nothing of this one is resident there),
    ``setup()`` builds the inputs and enters what the function needs (a patch); it runs once to warm up (lazy
    initializations and compiled code are not the call's), then Linux's peak-RSS mark is reset
    (``/proc/self/clear_refs``) and the figure is the peak RSS over a second call (VmHWM) minus the
    RSS before it (VmRSS). glibc's mmap threshold is pinned at 64 KiB there, so that every freed
    buffer goes back to the system at once and RSS follows what is allocated (with its sliding
    default, freed memory stays resident and is reused unseen). Page granularity (4 KiB); None where
    /proc/self/clear_refs is missing (not Linux).
    """
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_peak_in_this_process, setup).result()


def _peak_in_this_process(setup) -> int:
    ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    with setup() as fn:
        fn()
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _status_bytes("VmRSS")
        result = fn()
        peak = _status_bytes("VmHWM")
        del result
    return peak - before


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


# --------------------------------------------------------------------------- ceilings
def measure_copy(device: torch.device, quick: bool = False) -> dict:
    """Bandwidth of a large copy: each byte read once and written once, as in the ops' floors."""
    if device.type == "cuda":
        nbytes = 2**28 if quick else 2**30  # 1 GiB: far past L2, as the benchmarked tensors are
    else:
        nbytes = 2**26 if quick else 2**28
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, QUICK if quick else FULL)
    moved = 2 * nbytes
    return {"tensor_bytes": nbytes, "bytes_moved": moved, "median_ms": timing.median_ms,
            "gbps": moved / (timing.median_ms * 1e-3) / 1e9}


def measure_matmul(device: torch.device, quick: bool = False) -> dict:
    """FLOP/s of a large square matmul: bf16 on a GPU (tensor cores); on a CPU the faster of fp32 and bf16 (bf16
    units where the CPU has them, AVX512-BF16 or AMX, and slow emulation where it has not)."""
    if device.type == "cuda":
        n, dtypes = (4096 if quick else 8192), (torch.bfloat16,)
    else:
        n, dtypes = (512 if quick else 1024), (torch.float32, torch.bfloat16)
    best = None
    for dtype in dtypes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        timing = measure(lambda: a @ b, device, QUICK if quick else FULL)
        if best is None or timing.median_ms < best["median_ms"]:
            best = {"n": n, "dtype": str(dtype).removeprefix("torch."), "median_ms": timing.median_ms,
                    "tflops": 2 * n**3 / (timing.median_ms * 1e-3) / 1e12}
    return best


def measure_ceilings(device: torch.device, quick: bool = False) -> dict:
    ceilings = {"copy": measure_copy(device, quick), "matmul": measure_matmul(device, quick)}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ceilings


# --------------------------------------------------------------------------- device facts
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    info = {
        "kind": device.type,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "host_cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],  # other processes skew CPU figures (and launch-bound GPU ones)
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        major, minor = torch.cuda.get_device_capability(device)
        info.update(name=props.name, capability=f"sm{major}{minor}", memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        info.update(cpu_isa=_native.cpu_isa(), notice=CPU_NOTICE)
        isa = f", C++ kernels on {info['cpu_isa']}" if info["cpu_isa"] else ""
        info.update(name=f"CPU: {info['host_cpu']} ({info['cpu_threads']} threads{isa})")
    return info
