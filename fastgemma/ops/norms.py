"""RMSNorm and the residual patterns around it, computed in float32.

``offset`` is added to the weight before it scales the normalised input: 1.0 for models
that store the weight as a difference from one (Gemma), 0.0 otherwise. The weight is
applied in float32 before the cast back to the input's dtype.
"""

from __future__ import annotations

import torch

from .compile import LEADING, fuse


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (offset + weight.float())).to(x.dtype)


def _norm_add(x, residual, weight, eps: float, offset: float):
    """``residual + rms_norm(x)``: a sub-block's output normalised, then added to the stream."""
    return residual + _rms_norm(x, weight, eps, offset)


def _norm_add_norm(x, residual, weight, next_weight, eps: float, offset: float):
    """``(h, rms_norm(h))`` with ``h = residual + rms_norm(x)``: one sub-block's exit and the next one's entry."""
    stream = residual + _rms_norm(x, weight, eps, offset)
    return stream, _rms_norm(stream, next_weight, eps, offset)


_fused_rms_norm = fuse(_rms_norm, {0: LEADING})
_fused_norm_add = fuse(_norm_add, {0: LEADING, 1: LEADING})
_fused_norm_add_norm = fuse(_norm_add_norm, {0: LEADING, 1: LEADING})


def rms_norm(x, weight, eps: float, offset: float = 0.0, fused: bool = True):
    """``x / rms(x) * (offset + weight)`` over the last dimension, in float32, cast back to x's dtype."""
    return (_fused_rms_norm if fused else _rms_norm)(x, weight, eps, offset)


def norm_add(x, residual, weight, eps: float, offset: float = 0.0, fused: bool = True):
    """``residual + rms_norm(x, weight)``."""
    return (_fused_norm_add if fused else _norm_add)(x, residual, weight, eps, offset)


def norm_add_norm(x, residual, weight, next_weight, eps: float, offset: float = 0.0, fused: bool = True):
    """``h = residual + rms_norm(x, weight)``; returns ``(h, rms_norm(h, next_weight))``."""
    return (_fused_norm_add_norm if fused else _norm_add_norm)(x, residual, weight, next_weight, eps, offset)
