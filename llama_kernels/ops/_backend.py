"""The one place that decides where an op runs.

Backends: "triton" (the Triton kernels: CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1), "native" (the C++ CPU kernels of the extension), "cuda" (the
extension's hand-written CUDA kernels, RMSNorm and RoPE, to hold the Triton ones to
account) and "reference" (``reference.py``). By default CUDA tensors run Triton and
CPU tensors run the native kernels when the extension is built and implements the
op, else the reference (said once when the extension is missing).
"""

from __future__ import annotations

import torch

from .. import _native
from . import _triton

BACKENDS = ("triton", "native", "cuda", "reference")
# The extension's backends that implement each op (the others run Triton or the reference).
COMPILED = {
    "rms_norm": ("native", "cuda"),
    "rope": ("native", "cuda"),
    "flash_attention": ("native",),
    "flash_attention_varlen": ("native",),
    "flash_attention_with_kvcache": ("native",),
    "fused_linear_cross_entropy": ("native",),
    "swiglu": ("native",),
}
# Ops whose "native" path is written in torch ops (the cross-entropy's chunked loop): it needs no extension.
NATIVE_IN_TORCH = ("fused_linear_cross_entropy",)
DEVICE_OF = {"native": "cpu", "cuda": "cuda"}


def resolve_backend(t: torch.Tensor, backend: str | None, op: str) -> str:
    compiled = COMPILED[op]
    if backend is None:
        if t.is_cuda or (_triton.INTERPRET and t.device.type == "cpu"):
            return "triton"
        if "native" in compiled and t.device.type == "cpu":
            if op in NATIVE_IN_TORCH or _native.available("cpu"):
                return "native"
            _native.notice_reference_fallback()
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and not (t.is_cuda or _triton.INTERPRET):
        raise ValueError(f"backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {t.device} tensors")
    if backend in DEVICE_OF:
        if backend not in compiled:
            raise ValueError(f"backend: {backend!r} does not implement {op}; it has {compiled or 'no'} compiled "
                             "backends besides 'triton' and 'reference'")
        if t.device.type != DEVICE_OF[backend]:
            raise ValueError(f"backend: {backend!r} runs {DEVICE_OF[backend]} tensors, got {t.device} tensors")
        if not (backend == "native" and op in NATIVE_IN_TORCH) and not _native.available(DEVICE_OF[backend]):
            raise ValueError(f"backend: {backend!r} needs the native extension built"
                             f"{' with CUDA' if backend == 'cuda' else ''} (pip install --no-build-isolation .)")
    return backend


def pick(backend: str, *, triton, reference, extension=None, native=None, cuda=None):
    """The function an op body calls for ``backend`` (``resolve_backend``'s answer): every op names one per backend
    it has, with one signature; ``extension`` serves both of the extension's backends ("native" and "cuda")."""
    chosen = {"triton": triton, "reference": reference, "native": native or extension, "cuda": cuda or extension}
    if chosen.get(backend) is None:  # resolve_backend refuses these first; this guards a new op's table
        raise ValueError(f"backend: {backend!r} has no implementation of this op")
    return chosen[backend]


# A model asked to run one of the extension's backends runs it where the op has its kernels, this elsewhere.
_IN_PLACE_OF_THE_EXTENSION = {"native": "reference", "cuda": "triton"}


def for_op(backend: str | None, op: str) -> str | None:
    """The backend ``op`` runs in a model set to ``backend`` (any of BACKENDS, or None: each op's default)."""
    if backend in _IN_PLACE_OF_THE_EXTENSION and backend not in COMPILED[op]:
        return _IN_PLACE_OF_THE_EXTENSION[backend]
    return backend
