"""Fused elementwise operations for transformer blocks, model-agnostic.

Each op is written once in plain PyTorch (the exact maths of the reference model) and
compiled with torch.compile into one kernel for the forward and one for the backward.
``fused=False`` runs the same code eagerly, op by op.
"""

from .activations import gelu_tanh_gate
from .compile import fuse, mark_dynamic
from .lora import lora_linear
from .norms import norm_add, norm_add_norm, rms_norm
from .rope import rotate_pairs, rotated_heads
from .shared_input_lora import lora_linears

__all__ = ["fuse", "mark_dynamic", "rms_norm", "norm_add", "norm_add_norm", "gelu_tanh_gate", "rotate_pairs",
           "rotated_heads", "lora_linear", "lora_linears"]
