"""A bitsandbytes 4-bit linear layer written in plain PyTorch, for use inside a compiled region.

bitsandbytes' 4-bit matmul is an opaque custom op: inside torch.compile every call still goes
through its Python dispatch (about 150 us per projection on an H100 host, twice per layer for the
checkpoint's recompute). Written as tensor ops, the dequantisation becomes one Inductor kernel
per weight and the call costs nothing on the host. Same arithmetic as bitsandbytes: the 4-bit
code looked up in float32, times the block's float32 absmax (itself dequantised from 8 bits
with its own absmax and offset when double-quantised), rounded once to the weight's dtype.
"""

from __future__ import annotations

import torch

# The attribute of a 4-bit layer that holds its weight dequantised (fastgemma.dense_weights), when it does.
DEQUANTIZED = "fastgemma_dequantized_weight"


def quant_state(module: torch.nn.Module):
    """The QuantState of a bitsandbytes Linear4bit we can dequantise ourselves, else None."""
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or getattr(weight, "bnb_quantized", True) is False:
        return None
    if getattr(state, "packing_format_for_cpu", False):  # repacked by bitsandbytes for CPU inference
        return None
    kind = type(module)  # (PEFT's LoRA wrapper of one is a "Linear4bit" too, with the base's weight)
    if kind.__name__ not in ("Linear4bit", "LinearNF4", "LinearFP4") or not kind.__module__.startswith("bitsandbytes"):
        return None
    if weight.dtype != torch.uint8 or state.code is None or state.shape is None or len(state.shape) != 2:
        return None
    if 2 * weight.numel() != state.shape.numel() or (state.nested and state.state2 is None):
        return None
    return state


def supports_4bit_linear(module: torch.nn.Module) -> bool:
    """Whether `linear_4bit` computes this module's forward (a bitsandbytes 4-bit linear, nf4 or fp4)."""
    return quant_state(module) is not None


def runs_as_tensor_ops(module: torch.nn.Module) -> bool:
    """Whether `linear_4bit` may stand in for this module's call: a 4-bit linear it can dequantise, with no hooks
    around the call (accelerate's included)."""
    return (supports_4bit_linear(module) and not module._forward_hooks and not module._forward_pre_hooks
            and not hasattr(module, "_hf_hook"))


def _per_element(block_values: torch.Tensor, count: int, blocksize: int) -> torch.Tensor:
    """Each of `count` elements' block value (the last block may be partial)."""
    return block_values[torch.arange(count, device=block_values.device) // blocksize]


def block_scales(state) -> torch.Tensor:
    """Each quantisation block's float32 absmax; double quantisation stores it in 8 bits."""
    if not state.nested:
        return state.absmax.float()
    inner = state.state2
    scales = _per_element(inner.absmax.float(), state.absmax.numel(), inner.blocksize)
    return inner.code[state.absmax.long()] * scales + state.offset


def dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """The weight of a 4-bit layer in `state.dtype`: two values per byte, the first in the high nibble."""
    packed = packed.reshape(-1)
    nibbles = torch.stack((packed >> 4, packed & 0x0F), dim=-1).view(-1)
    scales = _per_element(block_scales(state), nibbles.numel(), state.blocksize)
    return (state.code[nibbles.long()] * scales).view(state.shape).to(state.dtype)


def linear_4bit(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a bitsandbytes Linear4bit (see `supports_4bit_linear`), as tensor ops; with the weight's
    dequantised copy where the layer holds one."""
    weight = getattr(module, DEQUANTIZED, None)
    if weight is None:
        weight = dequantize_4bit(module.weight, quant_state(module))
    compute = module.compute_dtype or x.dtype
    bias = None if module.bias is None else module.bias.to(compute)
    return torch.nn.functional.linear(x.to(compute), weight.to(compute), bias).to(x.dtype)


def holds_dequantized(module: torch.nn.Module) -> bool:
    """Whether a 4-bit layer holds its weight dequantised (fastgemma.dense_weights)."""
    return DEQUANTIZED in module.__dict__
