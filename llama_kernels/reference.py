"""The oracle: plain PyTorch following Meta's Code Llama math.

Every kernel in this package is tested against these functions, and these
functions are tested against float64. They are also the CPU backend until
the native extension exists. Each one computes in ``promote(dtype, float32)``
(so float64 inputs give a float64 computation) and casts back at the end,
where Meta's code does.

Layouts are (batch, seq, heads, head_dim) throughout, as in Meta's and
Hugging Face's Llama code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------- RMSNorm
def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5, residual: Tensor | None = None):
    """Meta's ``RMSNorm.forward``: normalize in fp32, cast to x's dtype, then scale.

    With ``residual``, first forms the new residual stream ``h = x + residual``
    (in torch's promotion of the two dtypes, as ``h = x + self.attention(...)`` does in
    Meta's block: x's dtype when they share it, fp32 for a bf16 x on an fp32 residual
    stream under autocast) and returns ``(rms_norm(h), h)``; y is then in h's dtype.
    """
    if residual is not None:
        x = x + residual
    xf = x.to(_compute_dtype(x.dtype))
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = normed.type_as(x) * weight
    return y if residual is None else (y, x)


def rms_norm_backward(dy: Tensor, h: Tensor, weight: Tensor, eps: float = 1e-5, dh: Tensor | None = None):
    """Gradients (dh, dweight) of ``rms_norm(h, weight, eps)`` for an output gradient dy.

    With n = h * rstd and g = dy * weight (treating the cast of n as the identity,
    as autograd does): dh = rstd * (g - n * mean(g * n)), dweight = sum of dy * cast(n)
    over all rows. ``dh``, if given, is a gradient reaching h directly (the residual
    stream's), added before the result is rounded. The tests hold this to autograd
    of ``rms_norm``. It is the CPU backend's backward: inside a custom op autograd
    records nothing, so the gradient is written out.
    """
    cdtype = _compute_dtype(torch.promote_types(h.dtype, dy.dtype))
    hf, g = h.to(cdtype), dy.to(cdtype) * weight.to(cdtype)
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    normed = hf * rstd
    dx = rstd * (g - normed * (g * normed).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + dh.to(cdtype)
    dweight = (dy.to(cdtype) * normed.type_as(h).to(cdtype)).reshape(-1, h.shape[-1]).sum(0)
    return dx.to(h.dtype), dweight.to(weight.dtype)


# --------------------------------------------------------------------------- RoPE
def rope_positions(positions, batch: int, seqlen: int, device) -> Tensor:
    """Normalize the accepted forms of ``positions`` to a (batch, seqlen) integer tensor.

    None means 0..seqlen-1, an int is an offset added to that, a (seqlen,) tensor
    is shared by the batch, a (batch, seqlen) tensor is used as it is.
    """
    if positions is None or isinstance(positions, int):
        offset = positions or 0
        positions = torch.arange(offset, offset + seqlen, device=device)
    return positions.expand(batch, seqlen)


def rope_angles(positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Angles position * inv_freq, computed in inv_freq's dtype as Meta and HF do.

    With float32 inv_freq this is ``torch.outer(t.float(), freqs)`` of Meta's
    ``precompute_freqs_cis``: inv_freq and the product are rounded to float32, which
    puts the angle off by up to 7.2e-3 rad at positions up to 100,000 (measured
    against float64). With float64 inv_freq it is exact for any practical position.
    """
    return positions.to(inv_freq.dtype)[..., None] * inv_freq


def apply_rope(
    q: Tensor,
    k: Tensor,
    positions=None,
    inv_freq: Tensor | None = None,
    interleaved: bool = False,
    attention_factor: float = 1.0,
):
    """Rotate q (B, S, Hq, D) and k (B, S, Hk, D) by their positions' angles.

    ``interleaved=True`` is Meta's layout (pairs (x[2i], x[2i+1]), rotated as complex
    numbers as in ``apply_rotary_emb``); ``False`` is Hugging Face's half-split
    layout (pairs (x[i], x[i + D/2]), ``x * cos + rotate_half(x) * sin``). Both
    compute in fp32 and cast once at the end (Meta's precision; HF casts cos and
    sin to the input dtype first, which adds up to an ulp of error).
    ``attention_factor`` scales cos and sin (YaRN's mscale).
    """
    batch, seqlen, _, head_dim = q.shape
    if inv_freq is None:
        inv_freq = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, device=q.device).float() / head_dim))
    angles = rope_angles(rope_positions(positions, batch, seqlen, q.device), inv_freq)
    angles = angles[:, :, None, :]  # broadcast over heads
    rotate = _rotate_interleaved if interleaved else _rotate_half_split
    return tuple(rotate(x, angles, attention_factor) for x in (q, k))


def _rotate_interleaved(x: Tensor, angles: Tensor, attention_factor: float) -> Tensor:
    cdtype = _compute_dtype(x.dtype)
    freqs_cis = torch.polar(torch.full_like(angles, attention_factor), angles)
    x_complex = torch.view_as_complex(x.to(cdtype).reshape(*x.shape[:-1], x.shape[-1] // 2, 2).contiguous())
    out = torch.view_as_real(x_complex * freqs_cis.to(x_complex.dtype)).flatten(-2)
    return out.type_as(x)


def _rotate_half_split(x: Tensor, angles: Tensor, attention_factor: float) -> Tensor:
    cdtype = _compute_dtype(x.dtype)
    emb = torch.cat((angles, angles), dim=-1)
    cos = (emb.cos() * attention_factor).to(cdtype)
    sin = (emb.sin() * attention_factor).to(cdtype)
    xf = x.to(cdtype)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated_half = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated_half * sin).type_as(x)


# --------------------------------------------------------------------------- attention
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
):
    """Naive softmax attention with GQA; the oracle for the flash attention kernels.

    q: (B, Sq, Hq, D); k, v: (B, Sk, Hk, D) with Hq a multiple of Hk. Query head h
    attends with key/value head h // (Hq // Hk), as ``repeat_kv`` does in Meta's
    code. Causal masking is aligned bottom-right: query i sees keys
    j <= i + (Sk - Sq), so the last query sees every key (flash-attn >= 2.1).
    Rows with no visible key give zeros and an lse of -inf.
    Returns o (B, Sq, Hq, D) and, if asked, lse (B, Hq, Sq) in the compute dtype
    (fp32, or fp64 for fp64 inputs; natural log).
    """
    qf, kf, vf, probs, lse = _softmax(q, k, v, causal, softmax_scale)
    out = (probs @ vf).transpose(1, 2).to(q.dtype)
    return (out, lse) if return_lse else out


def _softmax(q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float | None):
    """q, and k and v repeated per query head, as (B, H, S, D) in the compute dtype; P and the lse (B, Hq, Sq)."""
    seqlen_q, n_q_heads, head_dim = q.shape[1:]
    seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    cdtype = _compute_dtype(q.dtype)
    group = n_q_heads // n_kv_heads
    qf = q.to(cdtype).transpose(1, 2)  # (B, Hq, Sq, D)
    kf = k.to(cdtype).repeat_interleave(group, dim=2).transpose(1, 2)
    vf = v.to(cdtype).repeat_interleave(group, dim=2).transpose(1, 2)
    scores = (qf @ kf.transpose(-1, -2)) * softmax_scale
    if causal:
        i = torch.arange(seqlen_q, device=q.device)[:, None]
        j = torch.arange(seqlen_k, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (seqlen_k - seqlen_q), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where nothing is visible
    # exp(-inf - finite) = 0 keeps fully masked rows at zero instead of NaN.
    probs = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(cdtype).min))
    return qf, kf, vf, probs, lse


def attention_backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    dlse: Tensor | None = None,
):
    """Gradients (dq, dk, dv) of ``attention`` for an output gradient do (and, if given, an lse gradient).

    With P = softmax(S), S = scale * q k^T (masked), O = P v:
        dv = P^T do,  dP = do v^T,  dS = P * (dP - rowsum(do * O) + dlse),
        dq = scale * dS k,  dk = scale * dS^T q,
    and dk, dv of a shared key/value head summed over its query heads (GQA).
    Written out because autograd records nothing inside a custom op; the tests
    hold it to autograd of ``attention``.
    """
    batch, _, n_q_heads, head_dim = q.shape
    seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    group = n_q_heads // n_kv_heads
    qf, kf, vf, probs, _ = _softmax(q, k, v, causal, softmax_scale)
    dof = do.to(qf.dtype).transpose(1, 2)
    out = probs @ vf
    dv = probs.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    row_term = (dof * out).sum(-1, keepdim=True)
    if dlse is not None:
        row_term = row_term - dlse.to(qf.dtype)[..., None]
    ds = probs * (dp - row_term)
    dq = (ds @ kf) * softmax_scale
    dk = (ds.transpose(-1, -2) @ qf) * softmax_scale

    def per_kv_head(t):  # (B, Hq, Sk, D) -> (B, Sk, Hk, D), summed over each group of query heads
        return t.reshape(batch, n_kv_heads, group, seqlen_k, head_dim).sum(2).transpose(1, 2)

    return dq.transpose(1, 2).to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype)


def gather_pages(pool: Tensor, block_table_row: Tensor, length: int) -> Tensor:
    """The first ``length`` positions of one sequence of a paged KV cache, as one contiguous (length, Hk, D) tensor.

    pool: (num_blocks, block_size, Hk, D); block_table_row: the sequence's block indices. Position p lives at
    ``pool[block_table_row[p // block_size], p % block_size]`` (FlashAttention-2's layout); entries past the
    sequence's ceil(length / block_size) blocks are not read.
    """
    blocks = block_table_row[:-(-length // pool.shape[1])].long()
    return pool[blocks].flatten(0, 1)[:length]


# --------------------------------------------------------------------------- linear cross-entropy
def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None):
    """(rows of hidden as (N, H), the (N, V) logits), both in the compute dtype."""
    cdtype = _compute_dtype(hidden.dtype)
    h = hidden.reshape(-1, hidden.shape[-1]).to(cdtype)
    return h, torch.nn.functional.linear(h, weight.to(cdtype), bias.to(cdtype) if bias is not None else None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, target, ...)`` with the logits materialized in fp32.

    hidden (..., H), weight (V, H), bias (V,) or None, target hidden.shape[:-1] of class indices;
    the loss is fp32 (fp64 for fp64 inputs), of target's shape for reduction="none".
    """
    _, logits = _logits(hidden, weight, bias)
    loss = torch.nn.functional.cross_entropy(
        logits, target.reshape(-1).long(), ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing)
    return loss.view(target.shape) if reduction == "none" else loss


# --------------------------------------------------------------------------- SwiGLU
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` (Meta's FeedForward: ``w2(F.silu(w1(x)) * w3(x))``), in fp32, rounded once."""
    cdtype = _compute_dtype(gate.dtype)
    return (torch.nn.functional.silu(gate.to(cdtype)) * up.to(cdtype)).to(gate.dtype)


def swiglu_backward(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients (dgate, dup) of ``swiglu``: with s = sigmoid(gate),
    dgate = dy * up * s * (1 + gate * (1 - s)), dup = dy * gate * s. Written out because autograd
    records nothing inside a custom op; the tests hold it to autograd of ``swiglu``."""
    cdtype = _compute_dtype(gate.dtype)
    g, u, d = gate.to(cdtype), up.to(cdtype), dy.to(cdtype)
    s = torch.sigmoid(g)
    return (d * u * s * (1 + g * (1 - s))).to(gate.dtype), (d * g * s).to(up.dtype)


def linear_cross_entropy_backward(grad_loss: Tensor, hidden: Tensor, weight: Tensor, target: Tensor,
                                  bias: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                                  label_smoothing: float = 0.0):
    """Gradients (dhidden, dweight, dbias or None) of ``linear_cross_entropy`` for a loss gradient grad_loss.

    With z the logits, t the target, e the smoothing and V classes, per row not ignored:
    dz = softmax(z) - (1 - e) onehot(t) - e / V, times grad_loss (its row's for "none", divided by the
    number of rows not ignored for "mean"); dhidden = dz W, dweight = dz^T h, dbias = sum of dz.
    Written out because autograd records nothing inside a custom op; the tests hold it to autograd.
    """
    h, logits = _logits(hidden, weight, bias)
    t = target.reshape(-1).long()
    ignored = t == ignore_index
    dz = torch.softmax(logits, dim=1) - label_smoothing / weight.shape[0]
    dz[torch.arange(t.numel()), t.masked_fill(ignored, 0)] -= 1 - label_smoothing
    g = grad_loss.to(logits.dtype)
    if reduction == "none":
        g = g.reshape(-1, 1)
    elif reduction == "mean":
        g = g / (~ignored).sum().clamp(min=1)  # every row ignored: zero gradients, as torch
    dz = (dz * g).masked_fill(ignored[:, None], 0.0)
    dbias = dz.sum(0).to(bias.dtype) if bias is not None else None
    return (dz @ weight.to(dz.dtype)).to(hidden.dtype).view(hidden.shape), (dz.T @ h).to(weight.dtype), dbias
