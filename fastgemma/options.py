"""PatchOptions: every setting of patch_model in one frozen object, validated once, stored once per model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch

from .attention import EXPERIMENTAL_FLASH, check_backend, check_kernel_options, check_softcap_tanh
from .memory_budget import check_budget
from .patching import state_of


def _is_auto_or_bool(value) -> bool:
    return isinstance(value, bool) or (isinstance(value, str) and value == "auto")


@dataclass(frozen=True)
class PatchOptions:
    """How `fastgemma.patch_model` runs a model (see its docstring for each setting).

    max_row_tokens: the most tokens one row of a batch holds, i.e. the length flex_attention pads every
        batch to. With padding-free packing that is batch size x tokens per document; with padded batches,
        the longest document.
    backend: "auto", "flex", "compiled" or "eager".
    fused_ops: "auto" (fused on CUDA), True or False.
    flex_kernel_options: "auto" (tuned Triton options), None (torch's defaults), a dict passed to
        flex_attention as is, or "experimental-flash" (FlashAttention 4's kernels; see docs/design.md).
    softcap_tanh: "auto", "exact" or "approx".
    cuda_graphs: "auto", True or False.
    memory_budget: "auto", None or a number of bytes.
    force_offload: not a patch_model argument: offload every checkpointed layer's input to CPU memory whatever
        the budget (to measure what offloading costs).
    compiled_regions: not a patch_model argument: decoder layers that are not graphed run as one compiled
        region each while training (what cuda_graphs=True falls back to; kept for host-time measurements).
    hold_dequantized_weights: not a patch_model argument: CUDA-graphed training calls under a memory budget
        multiply with dequantised copies of the 4-bit weights, held while allocations stay within half the
        device's memory (fastgemma.dense_weights).
    """

    max_row_tokens: int = 8192
    backend: str = "auto"
    fused_ops: Union[bool, str] = "auto"
    flex_kernel_options: Union[str, dict, None] = "auto"
    softcap_tanh: str = "auto"
    cuda_graphs: Union[bool, str] = "auto"
    memory_budget: Union[str, int, None] = "auto"
    compiled_regions: bool = field(default=False, repr=False)
    force_offload: bool = field(default=False, repr=False)
    hold_dequantized_weights: bool = field(default=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.max_row_tokens, int) or isinstance(self.max_row_tokens, bool) \
                or self.max_row_tokens <= 0:
            raise ValueError(f"max_row_tokens must be a positive int, got {self.max_row_tokens!r}")
        check_backend(self.backend)
        if not _is_auto_or_bool(self.fused_ops):
            raise ValueError(f"fused_ops must be 'auto', True or False, got {self.fused_ops!r}")
        check_kernel_options(self.flex_kernel_options)
        if isinstance(self.flex_kernel_options, dict):  # a copy: a caller's later edits must not reach the model
            object.__setattr__(self, "flex_kernel_options", dict(self.flex_kernel_options))
        check_softcap_tanh(self.softcap_tanh)
        if not _is_auto_or_bool(self.cuda_graphs):
            raise ValueError(f"cuda_graphs must be 'auto', True or False, got {self.cuda_graphs!r}")
        check_budget(self.memory_budget)
        if not isinstance(self.force_offload, bool):
            raise ValueError(f"force_offload must be True or False, got {self.force_offload!r}")
        if not isinstance(self.hold_dequantized_weights, bool):
            raise ValueError(f"hold_dequantized_weights must be True or False, got {self.hold_dequantized_weights!r}")
        if not isinstance(self.compiled_regions, bool):
            raise ValueError(f"compiled_regions must be True or False, got {self.compiled_regions!r}")
        if self.flash and (self.compiled_regions or self.cuda_graphs is True):
            raise ValueError(f"flex_kernel_options={EXPERIMENTAL_FLASH!r} runs FlashAttention 4 from fastgemma's own "
                             "flex call, not inside compiled decoder layers: use it without cuda_graphs=True")
        if self.cuda_graphs is True and self.fused_ops is False:
            raise ValueError("cuda_graphs=True replays the fused, compiled layers: it needs fused_ops 'auto' or True")

    @property
    def flash(self) -> bool:
        """Whether flex runs FlashAttention 4's kernels (flex_kernel_options="experimental-flash")."""
        return isinstance(self.flex_kernel_options, str) and self.flex_kernel_options == EXPERIMENTAL_FLASH

    @property
    def layer_graphs(self) -> Union[bool, str]:
        """cuda_graphs as it applies: "auto" picks op by op where these settings rule the graphs out."""
        if self.cuda_graphs == "auto" and (self.fused_ops is False or self.flash):
            return False
        return self.cuda_graphs

    @property
    def compiles_layers(self) -> bool:
        """Whether decoder layers that do not run graphed run as compiled regions while training (under
        cuda_graphs "auto" they run op by op instead: graphs where they pay off, nothing in between)."""
        return self.compiled_regions or self.cuda_graphs is True

    def fuses(self, x: torch.Tensor) -> bool:
        """Whether a call on `x` runs the fused (compiled) elementwise ops: when training (grad enabled), and
        on CUDA under "auto". Inference and decoding run the same maths eagerly, without compiles."""
        if self.fused_ops is False or not torch.is_grad_enabled():
            return False
        return self.fused_ops is True or x.device.type == "cuda"


def fused_here(module, x: torch.Tensor) -> bool:
    """`PatchOptions.fuses` for a patched module (each holds its model's patch state)."""
    return state_of(module).options.fuses(x)
