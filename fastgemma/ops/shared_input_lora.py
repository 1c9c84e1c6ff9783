"""PEFT LoRA linears that read one input (q, k and v; gate and up), the input's gradient summed inside the GEMMs.

Autograd sums an input's gradient one contribution at a time: each projection's frozen base and its adapter give
one, so q, k and v cost five extra passes over a (tokens x hidden) gradient. Here one backward node writes the
first contribution and every other GEMM adds its share in its epilogue (``addmm_``). The GEMMs are those of
bitsandbytes' and PEFT's own backward; only the order in which the sum is rounded differs.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .lora import base_linear, lora_linear, plain_lora_parts
from .nf4 import DEQUANTIZED, holds_dequantized, runs_as_tensor_ops


def lora_linears(modules: Sequence[torch.nn.Module], x: torch.Tensor, fused: bool = True) -> list:
    """``[module(x) for module in modules]``; plain PEFT LoRA linears over frozen bases (see `_projection`) share one
    backward node while training. Anything else, or a compiled region (whose compiler fuses the sums itself),
    goes through `lora_linear` one module at a time."""
    projections = None
    if fused and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        projections = [_projection(module, x) for module in modules]
    if projections is None or any(projection is None for projection in projections):
        return [lora_linear(module, x, fused) for module in modules]
    weights = [weight for projection in projections for weight in projection[1:3]]
    rows = x.reshape(-1, x.shape[-1])
    outputs = _SharedInputLora.apply(projections, rows, *weights)
    return [output.view(*x.shape[:-1], output.shape[-1]) for output in outputs]


def _projection(module: torch.nn.Module, x: torch.Tensor) -> Optional[tuple]:
    """(base, lora_A weight, lora_B weight, scaling) of a plain LoRA linear whose base computes in x's dtype with
    frozen weights: a torch Linear, or a bitsandbytes 4-bit one without hooks; where the adapter computes in x's
    dtype too (its weights have it, or autocast casts to it). Else None."""
    parts = plain_lora_parts(module)
    if parts is None:
        return None
    base, weight_a, weight_b, _ = parts
    if any(parameter.requires_grad for parameter in base.parameters()):
        return None
    if type(base) is torch.nn.Linear:
        if base.weight.dtype != x.dtype:
            return None
    elif not runs_as_tensor_ops(base) or getattr(base, "compute_dtype", None) not in (None, x.dtype):
        return None
    autocast_to_x = (torch.is_autocast_enabled(x.device.type)
                     and torch.get_autocast_dtype(x.device.type) == x.dtype)
    if not autocast_to_x and not weight_a.dtype == weight_b.dtype == x.dtype:
        return None
    return parts


def _frozen_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base's weight as the backward multiplies with it: bitsandbytes' dequantisation for a 4-bit layer (as its
    own backward does), or the copy it holds (fastgemma.dense_weights)."""
    if holds_dequantized(base):
        return getattr(base, DEQUANTIZED).to(dtype)
    if type(base) is torch.nn.Linear:
        return base.weight.to(dtype)
    import bitsandbytes

    return bitsandbytes.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)


class _SharedInputLora(torch.autograd.Function):
    """Each projection's ``base(x) + (x @ A.T) @ B.T * scaling`` on 2-D `rows`, weights flattened as A0, B0, A1, B1..."""

    @staticmethod
    def forward(ctx, projections, rows, *weights):
        ctx.projections = projections
        outputs, downs = [], []
        with torch.autocast(rows.device.type, enabled=False):  # the casts autocast would make, made explicitly
            for base, weight_a, weight_b, scaling in projections:
                down = torch.nn.functional.linear(rows, weight_a.to(rows.dtype))
                result = base_linear(base, rows)
                outputs.append(result.addmm_(down, weight_b.to(rows.dtype).t(), alpha=scaling))
                downs.append(down)
        ctx.save_for_backward(rows, *weights, *downs)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        rows, *saved = ctx.saved_tensors
        count = len(ctx.projections)
        weights, downs = saved[:2 * count], saved[2 * count:]
        wants_rows = ctx.needs_input_grad[1]
        grad_rows, grad_weights = None, []
        with torch.autocast(rows.device.type, enabled=False):
            for index, (base, _, _, scaling) in enumerate(ctx.projections):
                grad, weight_a, weight_b = grad_outputs[index], weights[2 * index], weights[2 * index + 1]
                grad_down = torch.mm(grad, weight_b.to(grad.dtype)) * scaling
                if wants_rows:
                    frozen = _frozen_weight(base, grad.dtype)
                    if grad_rows is None:
                        grad_rows = torch.mm(grad, frozen)
                    else:
                        grad_rows.addmm_(grad, frozen)
                    grad_rows.addmm_(grad_down, weight_a.to(grad.dtype))
                grad_a = torch.mm(grad_down.t(), rows).to(weight_a.dtype) if ctx.needs_input_grad[2 + 2 * index] else None
                grad_b = ((torch.mm(grad.t(), downs[index]) * scaling).to(weight_b.dtype)
                          if ctx.needs_input_grad[3 + 2 * index] else None)
                grad_weights += [grad_a, grad_b]
        return (None, grad_rows, *grad_weights)
