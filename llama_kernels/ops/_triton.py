"""What every Triton op shares: launch configs and launch recording (``_backend.py`` picks where an op runs).

- ``target_of`` names what a launch is for: a GPU architecture ("sm90", "sm80"),
  or "interpreter" for CPU tensors under ``TRITON_INTERPRET=1``. Configs are picked
  per target: big tiles and few programs for the interpreter (it costs ~8 ms per
  program and loop step), the measured winners in ``tuned_configs.json`` on a GPU
  (written by ``bench/gpu_check.py``), else each op's default. Each kernel declares a
  ``Tuning`` beside its defaults (its key and the sweep's candidates: ``TUNINGS``);
  ``forced_config`` forces a config through the public ops (the sweep's candidates, the
  AOT check's variants).
- ``launch`` runs a kernel, or, inside ``record_launches``, only records it: the
  ahead-of-time compile check (``llama_kernels.aot``) runs the real launchers on
  meta tensors this way, so it compiles exactly what would be launched.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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


# The measured winners (bench/gpu_check.py writes them): {kernel: {target: {key: config}}}.
_table_in_force: dict | None = None


@functools.cache
def _committed_table() -> dict:
    if TUNED_CONFIGS_PATH.exists():
        return json.loads(TUNED_CONFIGS_PATH.read_text())
    return {}


def tuned_table() -> dict:
    return _table_in_force if _table_in_force is not None else _committed_table()


@contextlib.contextmanager
def tuned_table_in_force(table: dict):
    """Launches inside use ``table``'s winners instead of the committed ones (the GPU check's benchmark, run
    with the winners it has just measured)."""
    global _table_in_force
    previous, _table_in_force = _table_in_force, table
    try:
        yield
    finally:
        _table_in_force = previous


class Ask(NamedTuple):
    """One launch's request for a config: what the GPU check's sweep needs to offer it candidates."""

    target: str
    key: str
    fields: dict
    default: dict


TUNINGS: dict[str, Tuning] = {}  # by kernel name, in the order the op modules declare them
_forced: dict[str, tuple[Callable[[dict], dict], list[Ask]]] = {}


@dataclass(frozen=True)
class Tuning:
    """A Triton kernel's launch config: the key it is measured and looked up by, and what the sweep may try.

    ``kernel`` names it in tuned_configs.json; ``key`` is a format string over the fields the
    config depends on (``"{n_cols}:{dtype}"``), which gives the table's key; ``candidates(default,
    target, fields)`` lists the configs the GPU check's sweep times, the default first. Each op
    declares one per kernel beside its default configs and asks it for every launch's config.
    """

    kernel: str
    key: str
    candidates: Callable[[dict, str, dict], list[dict]]

    def __post_init__(self):
        TUNINGS[self.kernel] = self

    def config(self, target: str, default: dict, **fields) -> dict:
        """The config a launch uses: the forced one inside ``forced_config``, else the measured winner for
        (target, key), else ``default``."""
        key = self.key.format(**fields)
        if self.kernel in _forced:
            choose, asks = _forced[self.kernel]
            asks.append(Ask(target, key, fields, default))
            return choose(default)
        return tuned_table().get(self.kernel, {}).get(target, {}).get(key, default)


@contextlib.contextmanager
def forced_config(kernel: str, choose: Callable[[dict], dict]):
    """Launches of ``kernel`` inside use ``choose(default)``; yields the list of their ``Ask``s.

    The sweep times its candidates through the public functions this way, and the AOT check
    compiles the variants no default uses (the TMA forms)."""
    if kernel not in TUNINGS:
        raise ValueError(f"kernel: expected one of {sorted(TUNINGS)}, got {kernel!r}")
    previous, asks = _forced.get(kernel), []
    _forced[kernel] = (choose, asks)
    try:
        yield asks
    finally:
        if previous is None:
            del _forced[kernel]
        else:
            _forced[kernel] = previous


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100's count, for meta-tensor compiles; the interpreter picks its own grid


def program_budget(device: torch.device, per_multiprocessor: int = 2) -> int:
    """The programs that fill the card per_multiprocessor times over (a persistent grid, a count of splits); 4 under
    the interpreter, whose tests want a few programs that each take several tiles."""
    if target_of(device) == "interpreter":
        return 4
    return per_multiprocessor * multiprocessor_count(device)


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
