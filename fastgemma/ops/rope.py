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


def _rotated_heads(query, key, value, cos, sin, head_dim: int, length: int):
    batch, tokens = query.shape[:2]

    def heads(projection):  # (batch, tokens, heads * head_dim) -> (batch, heads, tokens, head_dim)
        return projection.view(batch, tokens, -1, head_dim).transpose(1, 2)

    query, key = _rotate_pairs(heads(query), heads(key), cos, sin)
    rows = (0, 0, 0, length - tokens)  # zero rows after the last token
    return tuple(torch.nn.functional.pad(t, rows).contiguous() for t in (query, key, heads(value)))


_fused_rotated_heads = fuse(_rotated_heads, {0: (0, 1), 1: (0, 1), 2: (0, 1), 3: (0, 1), 4: (0, 1)})


def rotated_heads(query, key, value, cos, sin, head_dim: int, length: int, fused: bool = True):
    """Projections (batch, tokens, heads x head_dim) split into contiguous (batch, heads, length, head_dim), RoPE
    on query and key, zero rows from `tokens` to `length`.

    An attention kernel that wants its inputs padded to a fixed length (flex_attention's static shapes) then
    gets them from the one kernel RoPE runs anyway, instead of copying all three again; and their gradients
    come back to the projections in the projections' own layout.
    """
    if length < query.shape[1]:
        raise ValueError(f"cannot pad {query.shape[1]} tokens to {length}")
    return (_fused_rotated_heads if fused else _rotated_heads)(query, key, value, cos, sin, head_dim, length)
