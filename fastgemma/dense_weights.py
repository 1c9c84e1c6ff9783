"""Frozen 4-bit base weights held dequantised while training runs CUDA-graphed, where the device has room
(opt-in: `PatchOptions(hold_dequantized_weights=True)`).

A checkpointed QLoRA micro-step dequantises each frozen 4-bit weight three times (the forward, the checkpoint's
recompute, the input gradient), a pass over the whole model each time, for weights that never change. That work
does not shrink with the tokens (about 1% of a 2B step's GPU time at 16,384 tokens), so the short micro-steps the
CUDA-graphed layers run pay it about eight times over at 2,048. A dequantised
copy costs 2 bytes per weight (2B: about 4 GiB; 9B: 16 GiB), so a backbone holds copies only on calls that run
graphed (short micro-steps: little activation memory), only under a memory budget, and only for as many layers
(from the first) as leave at least half of the process's device memory (and the budget's cap) unused.

The copy is `fastgemma.ops.nf4.dequantize_4bit` of the weight, the values every use would dequantise again, so the
arithmetic is unchanged. A base weight replaced since (PEFT's merge assigns a new one) drops its copy; the layer's
graphs record again (`graph_policy.lora_states` names the copies). A forward that runs out of memory while copies
are held drops them all for good and runs again (`step_memory.run_planned`).
"""

from __future__ import annotations

import logging

import torch

from .log import say_once
from .memory_budget import GiB
from .ops.nf4 import DEQUANTIZED, dequantize_4bit, quant_state, runs_as_tensor_ops

HOLD_FRACTION = 0.5  # of the process's device memory (or the budget's cap): what allocations may reach with copies


class DenseWeights:
    """One backbone's dequantised copies: made once (the first graphed training call), dropped when stale."""

    def __init__(self):
        self.sources: dict = {}  # module -> the packed weight its copy was made from
        self.decided = False
        self.held_layers = 0

    def drop_stale(self) -> None:
        """Drop the copy of every module whose weight was replaced since it was made."""
        for module, weight in list(self.sources.items()):
            if module.weight is not weight:
                self._drop(module)

    def hold(self, layers, memory, cap=None) -> None:
        """Make the copies, at the first call only: whole layers in order, while allocations stay within
        `HOLD_FRACTION` of the process's device memory (`memory`: a DeviceMemory) and of `cap`."""
        if self.decided:
            return
        self.decided = True
        ceiling = int(HOLD_FRACTION * (memory.total() if cap is None else min(cap, memory.total())))
        room = min(ceiling, memory.limit()) - memory.allocated()
        held, total, held_bytes, full = 0, 0, 0, False
        for layer in layers:
            modules = [m for m in layer.modules() if eligible(m)]
            if not modules:
                continue
            total += 1
            need = sum(2 * m.weight.numel() * m.compute_dtype.itemsize for m in modules)  # two weights a byte
            full = full or need > room  # the copies are of the first layers, up to the first that does not fit
            if full:
                continue
            with torch.no_grad():
                for module in modules:
                    copy = dequantize_4bit(module.weight, quant_state(module)).to(module.compute_dtype)
                    object.__setattr__(module, DEQUANTIZED, copy)
                    self.sources[module] = module.weight
            room -= need
            held += 1
            held_bytes += need
        self.held_layers = held
        if total:
            say_once(("dense weights", held, total), logging.INFO,
                     "fastgemma: memory: graphed steps read dequantised copies of %d of %d layers' 4-bit weights "
                     "(%.1f GiB), within %d%% of the device's memory", held, total, held_bytes / GiB,
                     round(100 * HOLD_FRACTION))

    def give_up(self) -> int:
        """Drop every copy for good (a forward ran short of memory); returns how many layers held copies."""
        layers = self.held_layers if self.sources else 0
        for module in list(self.sources):
            self._drop(module)
        self.held_layers = 0
        return layers  # (still decided: no later call makes them again)

    def release(self) -> None:
        """Drop every copy (unpatching); a later graphed call may make them again."""
        self.give_up()
        self.decided = False

    def _drop(self, module) -> None:
        module.__dict__.pop(DEQUANTIZED, None)
        del self.sources[module]


def eligible(module: torch.nn.Module) -> bool:
    """A 4-bit linear whose call `linear_4bit` stands in for, with its compute dtype set."""
    return (runs_as_tensor_ops(module) and module.compute_dtype is not None
            and module.compute_dtype.is_floating_point)
