"""Per-instance forward patching: a module's own ``forward`` swapped for a fastgemma function, and undone.

Classes are never touched, so two models in one process stay independent. Each patched module also holds
its model's patch state (`state_of`): the options and what they built, stored once per model.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch

from .dense_weights import DenseWeights

STATE_ATTRIBUTE = "_fastgemma_state"  # on every patched module: its model's patch state


class PatchedForward:
    """``function(module, *args, **kwargs)``, installed as one module's own ``forward``.

    A plain object rather than a closure or a bound method: a patched model then deep-copies
    and pickles into an independent, still-patched model (each copy calls the function with
    its own module; a closure would keep calling the original's), and ``inspect.signature``
    shows the stock signature, so code that inspects ``forward`` (the Trainer's column
    pruning, HF's generation utilities) sees the arguments HF's forward takes.
    """

    def __init__(self, function, module: torch.nn.Module):
        self.function = function
        self.module = module
        self.__name__ = function.__name__
        self.__doc__ = function.__doc__

    def __call__(self, *args, **kwargs):
        return self.function(self.module, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(type(self.module).forward.__get__(self.module))

    def __repr__(self) -> str:
        return f"<fastgemma {self.function.__name__} of {type(self.module).__name__}>"


def swap_forward(module: torch.nn.Module, function, patched: dict) -> None:
    """Install `function` as `module`'s own forward, recording in `patched` the forward it had (or None)."""
    patched[module] = module.__dict__.get("forward")
    module.forward = PatchedForward(function, module)


def restore_forwards(patched: dict) -> int:
    """Undo `swap_forward` for every module in `patched`, and drop their patch state; returns how many."""
    for module, previous in patched.items():
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous
        module.__dict__.pop(STATE_ATTRIBUTE, None)
    return len(patched)


def state_of(module: torch.nn.Module):
    """The patch state of the model `module` belongs to, or None when fastgemma did not patch it."""
    return getattr(module, STATE_ATTRIBUTE, None)


def set_state(module: torch.nn.Module, state) -> None:
    setattr(module, STATE_ATTRIBUTE, state)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (PeftModel -> LoraModel -> model), or `model` itself."""
    while hasattr(model, "get_base_model") and callable(model.get_base_model):
        inner = model.get_base_model()
        if inner is model:
            break
        model = inner
    return model


@functools.lru_cache(maxsize=None)
def positional_parameters(forward) -> tuple:
    """Names a forward takes positionally (after self), to turn positional calls into keywords."""
    return tuple(
        name for name, parameter in inspect.signature(forward).parameters.items()
        if name != "self" and parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    )


# --------------------------------------------------------------------------------------
# Hooks: a call that skips nn.Module.__call__ (or a graph replay) must not skip a hook
# --------------------------------------------------------------------------------------
def has_own_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def has_global_hooks() -> bool:
    from torch.nn.modules import module as nn_module

    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks)


def call_module(module: torch.nn.Module, *args, **kwargs):
    """``module(*args, **kwargs)``, going straight to fastgemma's function when no hook watches the call.

    Inside a compiled layer, a call through ``nn.Module.__call__`` reaches each module's own
    PatchedForward object, and torch.compile guards on that object: every layer would compile anew.
    """
    forward = module.__dict__.get("forward")
    if isinstance(forward, PatchedForward) and not (has_own_hooks(module) or has_global_hooks()):
        return forward.function(module, *args, **kwargs)
    return module(*args, **kwargs)


@dataclass
class PatchState:
    """What patching did to one backbone, so it can be adjusted or undone; every patched module of the
    backbone holds it (`state_of`)."""

    options: object  # fastgemma.options.PatchOptions
    cache: object  # fastgemma.masks.BlockMaskCache, at options.max_row_tokens
    original_attn_implementation: object
    patched: dict = field(default_factory=dict)  # module -> its own `forward` attribute before, or None
    graphs: object = None  # fastgemma.graphs.GraphedLayers while cuda_graphs is on or "auto"
    budget: object = None  # fastgemma.memory_budget.MemoryBudget unless memory_budget=None
    host_buffers: object = None  # fastgemma.offload.HostBuffers, once an input was offloaded
    attention_saved_layers: frozenset = frozenset()  # during a training call: the layers whose attention the memory
    # budget saves (the glue checkpoints them in two pieces around it)
    graphs_declined: object = None  # during a training call: why cuda_graphs="auto" runs its layers op by op
    dense_weights: object = field(default_factory=DenseWeights)  # fastgemma.dense_weights: dequantised copies
