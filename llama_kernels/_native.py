"""The native extension ``llama_kernels._C`` (built from csrc/ by setup.py): whether it is here, and what it runs.

Importing ``_C`` registers the ops ``torch.ops.llama_kernels_C.*`` (C++ CPU kernels; CUDA
kernels for RMSNorm and RoPE when it was built with CUDA). Without it, CPU tensors run
``reference.py``, and the first op to fall back says so once.
"""

from __future__ import annotations

import importlib
import warnings

import torch

try:
    importlib.import_module("llama_kernels._C")  # registers the ops
    MISSING_REASON = None
except ImportError as e:  # not built: an isolated or extension-less install
    MISSING_REASON = f"{type(e).__name__}: {e}"

_noticed = False
_registered: set[str] = set()  # device types found registered (kernels, once registered, stay)


def available(device_type: str = "cpu") -> bool:
    """Whether the ops are registered with kernels for ``device_type`` ("cpu" or "cuda"): by ``_C``, or by a library
    loaded with ``torch.ops.load_library`` (the CMake build's, or the GPU check's build on the card)."""
    if device_type in _registered:  # every op call asks: the dispatcher's lookup costs 0.1 ms with cold caches
        return True
    key = "CUDA" if device_type == "cuda" else "CPU"
    try:
        found = torch._C._dispatch_has_kernel_for_dispatch_key("llama_kernels_C::rms_norm", key)
    except RuntimeError:  # no such op: nothing registered
        return False
    if found:
        _registered.add(device_type)
    return found


def notice_reference_fallback() -> None:
    """Say once that CPU tensors run the plain-PyTorch reference because the extension is absent."""
    global _noticed
    if not _noticed:
        _noticed = True
        warnings.warn(f"llama_kernels: the native extension is not built ({MISSING_REASON}); CPU tensors run the "
                      "plain-PyTorch reference. Build it with: pip install --no-build-isolation .", stacklevel=3)


def cpu_isa() -> str | None:
    """The instruction-set path the C++ CPU kernels run in this process ("avx2", "avx512", "avx512_bf16" or "amx":
    the widest this CPU has, or the one ``LLAMA_KERNELS_CPU_ISA`` forces), or None without the extension. A forced
    path this CPU lacks raises RuntimeError naming the variable and the paths it has."""
    return ops().cpu_isa() if available() else None


def ops():
    """``torch.ops.llama_kernels_C``: the native ops."""
    return torch.ops.llama_kernels_C
