"""Argument checks shared by the public functions.

Each raises TypeError (wrong type or dtype) or ValueError (wrong shape, size,
layout or device) with a message that names the argument and what was expected.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, t, *, dtypes=FLOAT_DTYPES, ndim: int | tuple[int, ...] | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        expected = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({expected}), got {str(t.dtype).removeprefix('torch.')}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            expected = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name}: expected {expected} dimensions, got shape {tuple(t.shape)}")
    return t


def check_same_device(**tensors: Tensor | None) -> None:
    _check_same("device", ValueError, tensors)


def check_same_dtype(**tensors: Tensor | None) -> None:
    _check_same("dtype", TypeError, tensors)


def _check_same(attribute: str, error: type[Exception], tensors: dict) -> None:
    """Every tensor given (None skipped) has the first one's device or dtype."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    expected = getattr(first, attribute)
    for name, t in named[1:]:
        if getattr(t, attribute) != expected:
            raise error(f"{name}: expected {attribute} {expected} (the {attribute} of {first_name}), "
                        f"got {getattr(t, attribute)}")
