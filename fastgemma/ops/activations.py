"""Gated activations (the elementwise middle of a gated MLP)."""

from __future__ import annotations

import torch

from .compile import LEADING, fuse


def _gelu_tanh_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


_fused_gelu_tanh_gate = fuse(_gelu_tanh_gate, {0: LEADING, 1: LEADING})


def gelu_tanh_gate(gate: torch.Tensor, up: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """GeGLU: ``gelu_tanh(gate) * up``. Fused, the backward recomputes the gelu instead of storing it."""
    return (_fused_gelu_tanh_gate if fused else _gelu_tanh_gate)(gate, up)
