"""A PEFT LoRA linear layer with its adapter added inside the GEMM.

PEFT computes ``base(x).clone() + lora_B(lora_A(x)) * scaling`` as four passes over the
output (clone, GEMM, scale, add). ``addmm_`` folds the scale and the add into the second
adapter GEMM's epilogue, writing into the base layer's output: no linear saves its output for
its backward, and the out-of-place ``addmm`` would copy it first.
"""

from __future__ import annotations

import torch

from .nf4 import holds_dequantized, linear_4bit, runs_as_tensor_ops


def plain_lora_parts(module: torch.nn.Module):
    """(base_layer, lora_A weight, lora_B weight, scaling) when `module` is a vanilla PEFT LoRA linear
    in its plain state (one active adapter, no dropout, not merged, no DoRA or other variant, no
    hooks of its own or from accelerate); otherwise None, and the caller runs the module as it is."""
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None or getattr(module, "base_layer", None) is None:
        return None
    if module.disable_adapters or module.merged or module._forward_hooks or module._forward_pre_hooks:
        return None
    if hasattr(module, "_hf_hook"):  # accelerate wraps `forward` itself (device placement, offloading)
        return None
    active = module.active_adapters
    if len(active) != 1 or active[0] not in lora_a or getattr(module, "lora_variant", {}).get(active[0]) is not None:
        return None
    name = active[0]
    dropout = module.lora_dropout[name]
    if module.training and not isinstance(dropout, torch.nn.Identity):
        return None
    if getattr(module, "lora_bias", {}).get(name, False):
        return None
    return module.base_layer, lora_a[name].weight, module.lora_B[name].weight, module.scaling[name]


def lora_linear(module: torch.nn.Module, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """``module(x)``; for a plain PEFT LoRA linear (and `fused`), the adapter is added in the GEMM epilogue.

    The fused path runs only where PEFT would compute in x's dtype too: under autocast, or
    when the adapter weights already have x's dtype. Anything else goes through PEFT.
    """
    parts = plain_lora_parts(module) if fused else None
    if parts is None:
        return module(x)
    base, weight_a, weight_b, scaling = parts
    if not torch.is_autocast_enabled(x.device.type) and not (weight_a.dtype == weight_b.dtype == x.dtype):
        return module(x)
    rows = x.reshape(-1, x.shape[-1])  # 2-D, so the base's output is a tensor of its own, not a view
    result = base_linear(base, rows)
    down = torch.nn.functional.linear(rows, weight_a)
    if result.dtype != down.dtype:  # a base layer that returns another dtype: PEFT's own arithmetic
        fused = result + torch.nn.functional.linear(down, weight_b) * scaling
    elif torch.compiler.is_compiling() or result._is_view():
        # (the compiler plans its own buffers; in place on a view would make autograd copy the base's output)
        fused = torch.addmm(result, down, weight_b.t(), alpha=scaling)
    else:
        fused = result.addmm_(down, weight_b.t(), alpha=scaling)
    return fused.view(*x.shape[:-1], fused.shape[-1])


def base_linear(base: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``base(x)``; a bitsandbytes 4-bit base runs as tensor ops inside a compiled region (which the compiler
    fuses, instead of bitsandbytes' opaque op and its per-call Python dispatch), and wherever it holds a
    dequantised copy of its weight (fastgemma.dense_weights), which it then multiplies with directly."""
    if (torch.compiler.is_compiling() or holds_dequantized(base)) and runs_as_tensor_ops(base):
        return linear_4bit(base, x)
    return base(x)
