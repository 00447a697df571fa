"""RoPE frequencies: the base formula and the Hugging Face ``rope_scaling`` variants.

Every variant Llama-family checkpoints use only rescales ``inv_freq`` (and, for
YaRN, the magnitude of cos and sin), so the rotation kernel never needs to know
which one is in force: it takes ``inv_freq`` and an ``attention_factor``.

In float32 (the default) each formula follows Hugging Face's
``modeling_rope_utils`` operation for operation, so the frequencies are the
bits that HF and Meta use; in float64 the same formulas give the precise table
that ``apply_rope(..., precise=True)`` rotates with.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_real

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_type(scaling: dict | None) -> str:
    """The variant a ``rope_scaling`` dict names ("rope_type", or the older "type")."""
    if not scaling:
        return "default"
    if not isinstance(scaling, dict):
        raise TypeError(f"scaling: expected a Hugging Face rope_scaling dict or None, got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"scaling: rope_type {kind!r} is not supported; expected one of {SUPPORTED_ROPE_TYPES}")
    return kind


def _require(scaling: dict, key: str, kind: str) -> float:
    """scaling[key], which rope_type `kind` needs: every such parameter is a positive number."""
    if scaling.get(key) is None:
        raise ValueError(f"scaling: rope_type {kind!r} needs the key {key!r}")
    return check_real(f"scaling[{key!r}]", scaling[key], above=0)


def _optional(scaling: dict, key: str, default: float | None) -> float | None:
    """scaling[key] if set (a positive number), else default."""
    return default if scaling.get(key) is None else check_real(f"scaling[{key!r}]", scaling[key], above=0)


def rope_inv_freq(
    head_dim: int,
    theta: float = 1e6,
    scaling: dict | None = None,
    *,
    seq_len: int | None = None,
    max_position_embeddings: int | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    """Inverse frequencies ``1 / theta ** (2i / head_dim)``, i < head_dim / 2, rescaled by ``scaling``.

    theta: 10,000 for Llama 2, 1,000,000 for Code Llama.
    scaling: a Hugging Face ``rope_scaling`` dict, or None. Types: ``linear``
        (position interpolation), ``dynamic`` (NTK; uses ``seq_len`` and
        ``max_position_embeddings``), ``llama3`` and ``yarn`` (see
        ``rope_attention_factor`` for YaRN's scale of cos and sin).
    dtype: float32 reproduces Meta's and HF's tables bit for bit; float64 is the
        precise table.
    """
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim: expected a positive even int, got {head_dim!r}")
    theta = check_real("theta", theta, above=1)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
    kind = rope_type(scaling)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(dtype) / head_dim

    if kind == "dynamic":
        factor = _require(scaling, "factor", kind)
        max_pos = max_position_embeddings or _optional(scaling, "original_max_position_embeddings", None)
        if max_pos is None:
            raise ValueError("max_position_embeddings: rope_type 'dynamic' needs the trained context length")
        check_real("max_position_embeddings", max_pos, above=0)
        seq_len = max(seq_len or max_pos, max_pos)
        theta = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (head_dim / (head_dim - 2))

    inv_freq = 1.0 / (theta**exponents)

    if kind == "linear":
        inv_freq /= _require(scaling, "factor", kind)
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind == "yarn":
        inv_freq = _yarn_inv_freq(head_dim, theta, theta**exponents, scaling, max_position_embeddings)
    return inv_freq


def _llama3_inv_freq(inv_freq: Tensor, scaling: dict) -> Tensor:
    """Llama 3.1: long wavelengths divided by factor, short ones kept, a smooth ramp between."""
    factor = _require(scaling, "factor", "llama3")
    low_freq_factor = _require(scaling, "low_freq_factor", "llama3")
    high_freq_factor = _require(scaling, "high_freq_factor", "llama3")
    old_context = _require(scaling, "original_max_position_embeddings", "llama3")
    if not high_freq_factor > low_freq_factor:  # the ramp between them divides by their difference
        raise ValueError(f"scaling['high_freq_factor']: expected more than low_freq_factor ({low_freq_factor}), "
                         f"got {high_freq_factor}")
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(head_dim, theta, pos_freqs, scaling, max_position_embeddings) -> Tensor:
    """YaRN: interpolate the low frequencies, extrapolate the high ones, linear ramp between."""
    old_context = _require(scaling, "original_max_position_embeddings", "yarn")
    factor = _yarn_factor(scaling, max_position_embeddings)
    beta_fast = _optional(scaling, "beta_fast", 32)
    beta_slow = _optional(scaling, "beta_slow", 1)

    def correction_dim(num_rotations):
        return (head_dim * math.log(old_context / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as HF: avoid a zero-width ramp
    dims = torch.arange(head_dim // 2, dtype=pos_freqs.dtype, device=pos_freqs.device)
    extrapolation_weight = 1 - ((dims - low) / (high - low)).clamp(0, 1)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    return inv_freq_interpolation * (1 - extrapolation_weight) + inv_freq_extrapolation * extrapolation_weight


def _yarn_factor(scaling: dict, max_position_embeddings: int | None) -> float:
    factor = _optional(scaling, "factor", None)
    if factor is None:
        if max_position_embeddings is None:
            raise ValueError("scaling: rope_type 'yarn' needs 'factor' or max_position_embeddings")
        factor = check_real("max_position_embeddings", max_position_embeddings, above=0) / _require(
            scaling, "original_max_position_embeddings", "yarn")
    return factor


def rope_attention_factor(scaling: dict | None, *, max_position_embeddings: int | None = None) -> float:
    """The factor that multiplies cos and sin: YaRN's ``0.1 * mscale * ln(factor) + 1``; 1.0 otherwise."""
    if rope_type(scaling) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return _optional(scaling, "attention_factor", None)
    factor = _yarn_factor(scaling, max_position_embeddings)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    # As HF: the ratio only when both are set and non-zero (0 is a value configs use for "not set").
    m, m_all_dim = (check_real(f"scaling[{key!r}]", scaling.get(key) or 0) for key in ("mscale", "mscale_all_dim"))
    if m and m_all_dim:
        return float(mscale(factor, m) / mscale(factor, m_all_dim))
    return float(mscale(factor))
