"""Rotary position embeddings in the "rotate half" layout."""

from __future__ import annotations

import torch

from .compile import fuse


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rotate_pairs(query, key, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin


_fused_rotate_pairs = fuse(_rotate_pairs, {0: (0, 2), 1: (0, 2), 2: (0, 1), 3: (0, 1)})


def rotate_pairs(query, key, cos, sin, fused: bool = True):
    """RoPE on query and key (batch, heads, tokens, head_dim) with cos/sin (batch, tokens, head_dim)."""
    return (_fused_rotate_pairs if fused else _rotate_pairs)(query, key, cos, sin)
