"""A training step's activations under a memory budget: which decoder layers keep theirs (no recompute), which
are checkpointed, and which checkpointed inputs wait in pinned CPU memory (fastgemma.offload).

Decided for each training call of a backbone from what the allocator measures, never from a guess of the GPU:

- the budget is what this process may hold on the device (what is allocated, plus what is free on the device and
  cached by torch's allocator, within its share under `torch.cuda.set_per_process_memory_fraction`), less a
  margin for fragmentation, capped by the user's `memory_budget`;
- what a step needs beyond its layers' saved tensors ("the rest": the loss, the backward's transients) is learned
  per token from the allocator's peak after each step that set a new one;
- what a kept layer saves is counted once, on a call that keeps one layer (the last: backward frees it first),
  less what its attention saves at a fixed padded length (flex's queries, keys, values, output and log-sum-exp),
  which the caller works out exactly for each call; a kept CUDA-graphed layer's activations live in its graphs'
  own memory pool, which the caller counts instead (cached by the allocator, so the budget's limit holds it);
- checkpointed inputs are exact: tokens x hidden size x bytes per element, one per layer.

Until something is measured a call checkpoints every layer, as without a budget, so the budget never runs out of
memory where checkpointing everything fits; a forward that still runs out of memory with layers kept (the
allocator's fragmentation beyond the margin, or something else took the room) is run again checkpointing every
layer, and later plans take another margin off the budget; after MAX_BACK_OFFS such forwards the budget keeps none.
Kept layers are the last ones; offloaded inputs the first ones (their recompute comes last, so their copy back has
the whole backward to overlap with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

GiB = 2 ** 30
MARGIN_FRACTION = 0.10  # of the device's memory, at least MIN_MARGIN: what fragmentation and other allocations need
MIN_MARGIN = 2 * GiB
# One layer's saved activations before any was counted, in copies of its input: a transformer decoder layer saves
# some 20-35 (attention projections, a gated MLP's 4-8x wide tensors, norms); the first count replaces this.
LAYER_GUESS_COPIES = 64


@dataclass(frozen=True)
class StepPlan:
    """How one training call of a backbone treats its `layers` decoder layers' activations."""

    tokens: int
    layers: int
    kept: int = 0  # the last `kept` layers save their activations: no recompute in the backward
    offloaded: int = 0  # the first `offloaded` checkpointed layers' inputs go to pinned CPU memory
    budget: int = 0  # bytes this process may hold on the device (0: no budget applies)
    why: str = ""
    attention_saved: int = 0  # the layers before the kept ones save their attention: its recompute is skipped
    padded_bytes: int = 0  # what a layer's attention saves at its fixed padded length (flex), whatever the tokens

    @property
    def checkpointed(self) -> int:
        """Layers that save their input only (the whole layer is recomputed)."""
        return self.layers - self.kept - self.attention_saved

    @property
    def counts_layer(self) -> bool:
        """Whether this call counts a layer's saved bytes (the first that keeps one, or saves one's attention)."""
        return self.why in (PROBE, PROBE_ATTENTION)

    def describe(self) -> str:
        text = f"{self.tokens:,}-token steps keep {self.kept} of {self.layers} layers' activations, "
        if self.attention_saved:
            text += f"save the attention of {self.attention_saved} more, "
        text += f"checkpoint {self.checkpointed}"
        if self.offloaded:
            text += f" ({self.offloaded} of their inputs offloaded to CPU)"
        if self.budget:
            text += f", within a {self.budget / GiB:.1f} GiB budget"
        return text + (f" ({self.why})" if self.why else "")


PROBE = "counting one kept layer's activations"
PROBE_ATTENTION = "counting what one layer saving its attention keeps"
OUT_OF_MEMORY = "a forward ran out of memory with layers kept"
# Forwards that may run out of memory with layers kept before the budget keeps none: each one before the last lowers
# the budget by another margin (at 9B, 4 x 4096 on an 80 GB GPU the allocator's fragmentation reached 7.7 GiB).
MAX_BACK_OFFS = 2
# What a layer saving its attention keeps before it was counted, in copies of its input: with flex attention,
# its input, queries, keys, values, output and log-sum-exp come to some 3-4; the first count replaces this.
ATTENTION_GUESS_COPIES = 8


class DeviceMemory:
    """The allocator's view of one CUDA device; tests put a fake in its place."""

    def __init__(self, device: torch.device):
        # torch.cuda's memory-fraction calls need an index: "cuda" means the current device
        self.device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        self._physical = torch.cuda.mem_get_info(self.device)[1]  # read once: each read is a driver call

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def limit(self) -> int:
        """The most this process could hold: what it holds, what its allocator caches and what the device has
        free, within the share `torch.cuda.set_per_process_memory_fraction` allows it."""
        free, _ = torch.cuda.mem_get_info(self.device)
        return min(free + torch.cuda.memory_reserved(self.device), self.total())

    def total(self) -> int:
        """The device's memory, or this process's share of it."""
        fraction = torch.cuda.get_per_process_memory_fraction(self.device)
        return int(self._physical * fraction)


def check_budget(value) -> None:
    if value is None or (isinstance(value, str) and value == "auto"):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"memory_budget must be 'auto', None or a positive number of bytes (e.g. 20 * 2**30), "
                         f"got {value!r}")


class MemoryBudget:
    """One backbone's budget and what it has measured (per token, so every micro-step length shares it)."""

    def __init__(self, cap: Optional[int] = None, force_offload: bool = False):
        self.cap, self.force_offload = cap, force_offload
        self.memory = None  # DeviceMemory of the device the last call ran on (or a test's fake)
        self.rest_per_token: Optional[float] = None
        self.layer_per_token: Optional[float] = None
        self.attention_per_token: Optional[float] = None  # what a layer saving its attention keeps
        self.last_plan: Optional[StepPlan] = None
        self.back_offs = 0  # forwards that ran out of memory with layers kept
        self.lowered = 0  # bytes those forwards took off the budget
        self._rerun = False  # the next call runs a failed forward again: it checkpoints every layer
        self._after_call = None  # (the peak when the last call's forward ended, allocated then, its tokens)

    def __getstate__(self):  # measurements belong to one process and device: a copy measures its own
        return {"cap": self.cap, "force_offload": self.force_offload}

    def __setstate__(self, state):
        self.__init__(**state)

    @property
    def backed_off(self) -> bool:
        """MAX_BACK_OFFS forwards ran out of memory with layers kept: every layer is checkpointed from then on."""
        return self.back_offs >= MAX_BACK_OFFS

    def margin(self) -> int:
        """What the budget leaves free for fragmentation and other allocations."""
        return max(MIN_MARGIN, int(MARGIN_FRACTION * self.memory.total()))

    def budget(self) -> int:
        limit = self.memory.limit()
        usable = self.memory.allocated() + max(0, limit - self.memory.allocated() - self.margin() - self.lowered)
        return usable if self.cap is None else min(self.cap, usable)

    def learn(self) -> None:
        """Learn the rest of the previous step from the allocator's peak, if that step set it."""
        if self._after_call is None:
            return
        peak_before, allocated_after_forward, tokens = self._after_call
        self._after_call = None
        peak = self.memory.peak()
        if peak > peak_before:  # the previous step's peak is the peak: what it needed beyond its forward is exact
            self.rest_per_token = max(0, peak - allocated_after_forward) / tokens
        elif self.rest_per_token is None and peak >= allocated_after_forward:  # a bound (a reset lowers the peak)
            self.rest_per_token = (peak - allocated_after_forward) / tokens

    def plan(self, tokens: int, layers: int, input_bytes: int, save_attention: bool = False,
             padded_bytes: int = 0) -> StepPlan:
        """The plan for a training call of `tokens` tokens through `layers` checkpointing layers, each input
        `input_bytes` bytes; `save_attention`: layers may save their attention's inputs and output instead of
        recomputing it;
        `padded_bytes`: what one layer's attention saves at its padded length, if it does not recompute it."""
        self.learn()
        rerun, self._rerun = self._rerun, False
        if self.force_offload:
            return self._remember(StepPlan(tokens, layers, offloaded=layers, why="offload forced"))
        budget, allocated = self.budget(), self.memory.allocated()
        rest = (self.rest_per_token or 0.0) * tokens
        measured_layer = self.layer_per_token is not None
        per_token_part = self.layer_per_token * tokens if measured_layer else LAYER_GUESS_COPIES * input_bytes
        layer_bytes = per_token_part + padded_bytes

        def need(kept: int) -> float:
            return allocated + (layers - kept) * input_bytes + kept * layer_bytes + rest

        kept, saved, why = 0, 0, ""
        if self.backed_off or rerun:
            why = OUT_OF_MEMORY
        elif self.rest_per_token is None:
            why = "the first step measures the rest of the step"
        elif not measured_layer:
            kept, why = (1, PROBE) if need(1) + layer_bytes <= budget else (0, "no room for one more layer")
        else:
            kept, saved, why = self._kept_and_saved(budget - need(0), tokens, layers, input_bytes, layer_bytes,
                                                    save_attention, padded_bytes)
        offloaded = 0
        if kept == 0 and saved == 0:
            # Checkpointed inputs that do not fit, with one layer's recompute besides, wait on the CPU.
            over = need(0) + (0 if self.rest_per_token is not None else layer_bytes) - budget
            if over > 0:
                offloaded = min(layers, math.ceil(over / input_bytes))
                why = "checkpointed inputs beyond the budget wait in CPU memory"
        return self._remember(StepPlan(tokens, layers, kept, offloaded, int(budget), why, saved, padded_bytes))

    def _kept_and_saved(self, room: float, tokens: int, layers: int, input_bytes: int, layer_bytes: float,
                        save_attention: bool, padded_bytes: int) -> tuple:
        """(layers kept, layers saving their attention, why) within `room` bytes beyond checkpointing every layer.

        Every layer kept if they fit; otherwise, where attention may be saved (its saved tensors grow with the
        tokens, as flex attention's do), first every layer saves its attention, as far as that fits, then the
        room left keeps whole layers: skipping the attention's recompute costs a few inputs per layer, keeping a
        layer some twenty."""
        extra_kept = max(1.0, layer_bytes - input_bytes)
        whole_layers = max(0, min(layers, math.floor(room / extra_kept)))
        if room >= layers * extra_kept or not save_attention:
            return whole_layers, 0, ""
        if self.attention_per_token is None:  # one layer saves its attention, and counts what that keeps
            kept = whole_layers
            guess = (ATTENTION_GUESS_COPIES - 1) * input_bytes + padded_bytes
            if room - kept * extra_kept < guess and kept > 0:
                kept -= 1  # one kept layer fewer makes room for it
            probe = room - kept * extra_kept >= guess
            return kept, int(probe), PROBE_ATTENTION if probe else ""
        attention_bytes = self.attention_per_token * tokens + padded_bytes
        if attention_bytes >= layer_bytes:  # saving attention keeps as much as keeping the layer: no middle tier
            return whole_layers, 0, ""
        saved = max(0, min(layers, math.floor(room / max(1.0, attention_bytes - input_bytes))))
        if saved < layers:
            return 0, saved, ""
        left = room - layers * max(0.0, attention_bytes - input_bytes)
        kept = max(0, min(layers, math.floor(left / max(1.0, layer_bytes - attention_bytes))))
        return kept, layers - kept, ""

    def back_off(self, plan: StepPlan) -> bool:
        """A call planned as `plan` ran out of memory in its forward: whether it kept layers (or saved attention)
        and so may fit checkpointing every layer, as the next plan (its rerun) does. Later plans then have another
        margin less room, or, after MAX_BACK_OFFS such forwards, keep no layers."""
        if plan.kept + plan.attention_saved == 0:
            return False
        self.back_offs += 1
        if not self.backed_off:
            self.lowered += self.margin()
        self._rerun = True
        self._after_call = None  # the failed forward's peak is no step's
        return True

    def _remember(self, plan: StepPlan) -> StepPlan:
        self.last_plan = plan
        return plan

    def finish_forward(self, plan: StepPlan, layer_bytes_counted: Optional[int], input_bytes: int) -> None:
        """After a planned call's forward: note what it left allocated (the next call learns the rest from the
        peak), and a kept layer's saved bytes if this call counted them."""
        if layer_bytes_counted is not None and plan.why == PROBE_ATTENTION:
            kept_bytes = plan.kept * (self.layer_per_token * plan.tokens + plan.padded_bytes)
            own = layer_bytes_counted - plan.checkpointed * input_bytes - kept_bytes - plan.padded_bytes
            self.attention_per_token = max(own, float(input_bytes)) / plan.tokens
        elif layer_bytes_counted is not None and plan.kept:
            # the rest are the checkpointed inputs; the padded part is the next call's to work out
            own = layer_bytes_counted - plan.checkpointed * input_bytes - plan.kept * plan.padded_bytes
            self.layer_per_token = max(own / plan.kept, float(input_bytes)) / plan.tokens
        self._after_call = (self.memory.peak(), self.memory.allocated(), plan.tokens)
