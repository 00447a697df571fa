"""Argument checks shared by the public functions.

Each raises TypeError (wrong type or dtype) or ValueError (wrong shape, size,
layout or device) with a message that names the argument and what was expected.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: in messages and in the tuned configs' keys."""
    return str(dtype).removeprefix("torch.")


def check_tensor(name: str, t, *, dtypes=FLOAT_DTYPES, ndim: int | tuple[int, ...] | None = None,
                 dtype_error: type[Exception] = TypeError) -> Tensor:
    """A tensor of one of ``dtypes`` with ``ndim`` dimensions; a wrong dtype raises ``dtype_error``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        expected = ", ".join(dtype_name(d) for d in dtypes)
        raise dtype_error(f"{name}: expected dtype in ({expected}), got {dtype_name(t.dtype)}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            expected = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name}: expected {expected} dimensions, got shape {tuple(t.shape)}")
    return t


def check_real(name: str, value, *, above: float | None = None) -> float:
    """A finite real number, > ``above`` if given, as a float (a bool or a string is refused, not converted)."""
    expected = "a finite number" + (f" > {above}" if above is not None else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {expected}, got {value!r}")
    if not math.isfinite(value) or (above is not None and not value > above):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


def check_no_self_overlap(name: str, t: Tensor) -> None:
    """A tensor written in place must not alias itself: an expanded view (a stride-0 dim of size > 1) would have
    one element rotated or overwritten once per index of that dim."""
    if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride())):
        raise ValueError(f"{name}: expected a tensor whose elements do not share memory (it is written in place), "
                         f"got an expanded view with shape {tuple(t.shape)} and strides {t.stride()}; "
                         "pass a copy (.clone())")


def values_readable(*tensors: Tensor) -> bool:
    """Whether host-side checks may read these tensors' values: not inside a compiled graph, not for meta or fake
    tensors (shapes only: the ops' fake implementations carry them through)."""
    if torch.compiler.is_compiling():
        return False
    return all(t.device.type != "meta" and (_plain(t) or not is_fake(t)) for t in tensors)


def _plain(t: Tensor) -> bool:
    """A plain tensor, not a subclass (a fake one) or a wrapper: what ``is_fake`` would say False for, at a third
    of its cost with cold caches (the decoding step's checks run after the kernel streamed the cache)."""
    return (type(t) is Tensor and not torch._is_functional_tensor(t)
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


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


def check_positive_int(name: str, value) -> int:
    """An int >= 1: a bool, a whole float (4.0) or a numeric string ("4") is refused, not converted."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value
