"""What every Triton op shares: launch configs and launch recording (``_backend.py`` picks where an op runs).

- ``target_of`` names what a launch is for: a GPU architecture ("sm90", "sm80"),
  or "interpreter" for CPU tensors under ``TRITON_INTERPRET=1``. Configs are picked
  per target: big tiles and few programs for the interpreter (it costs ~8 ms per
  program and loop step), the measured winners in ``tuned_configs.json`` on a GPU
  (written by ``bench/gpu_check.py``), else each op's default. ``override_config``
  forces a config through the public ops (the sweep's candidates, the AOT check's
  variants).
- ``launch`` runs a kernel, or, inside ``record_launches``, only records it: the
  ahead-of-time compile check (``llama_kernels.aot``) runs the real launchers on
  meta tensors this way, so it compiles exactly what would be launched.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TUNED_CONFIGS_PATH = Path(__file__).with_name("tuned_configs.json")


# --------------------------------------------------------------------------- targets and configs
_recording_target: str | None = None


def target_of(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm{major}{minor}"
    if device.type == "meta" and _recording_target is not None:
        return _recording_target
    return "interpreter"


@functools.cache
def _tuned_table() -> dict:
    if TUNED_CONFIGS_PATH.exists():
        return json.loads(TUNED_CONFIGS_PATH.read_text())
    return {}


def tuned_config(kernel: str, target: str, key: str, default: dict) -> dict:
    """The measured winner for (kernel, target, key) if the GPU check recorded one, else ``default``."""
    return _tuned_table().get(kernel, {}).get(target, {}).get(key, default)


@contextlib.contextmanager
def override_config(kernel: str, choose):
    """Route ``tuned_config(kernel, ...)`` through choose(default); yield the (target, key, default) of each ask.

    The ops look ``tuned_config`` up at every launch (as a module attribute), so this
    forces a config through the public functions: the GPU check's sweep times its
    candidates this way, and the ahead-of-time check compiles the variants no
    default uses. What the ops ask for is the exact key format tuned_configs.json uses.
    """
    global tuned_config
    original, asked = tuned_config, []

    def hooked(name, target, key, default):
        if name != kernel:
            return original(name, target, key, default)
        asked.append((target, key, default))
        return choose(default)

    tuned_config = hooked
    try:
        yield asked
    finally:
        tuned_config = original


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100's count, for meta-tensor compiles; the interpreter picks its own grid


# --------------------------------------------------------------------------- launching
def strides(name: str, t: torch.Tensor, dims: str = "bshd") -> dict:
    """The leading len(dims) strides of a (batch, seq, heads, head_dim) tensor as kernel arguments:
    stride_{name}b, stride_{name}s, ..."""
    return {f"stride_{name}{dim}": stride for dim, stride in zip(dims, t.stride()[:len(dims)], strict=True)}


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel fills is allocated here (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass
class LaunchRecord:
    kernel: object  # the @triton.jit function
    grid: tuple
    args: dict  # every kernel argument by name, constexprs included
    num_warps: int
    num_stages: int


_records: list[LaunchRecord] | None = None


@contextlib.contextmanager
def record_launches(target: str):
    """Record launches instead of running them; meta tensors get ``target``'s configs."""
    global _records, _recording_target
    _records, _recording_target = [], target
    try:
        yield _records
    finally:
        _records, _recording_target = None, None


def launch(kernel, grid: tuple, device: torch.device, *, num_warps: int, num_stages: int = 1, **args) -> None:
    if _records is not None:
        _records.append(LaunchRecord(kernel, grid, args, num_warps, num_stages))
        return
    if 0 in grid:  # nothing to compute (an empty sequence or batch); a zero grid is a launch error
        return
    # Triton launches on the current CUDA device: make it the tensors' device.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](**args, num_warps=num_warps, num_stages=num_stages)
