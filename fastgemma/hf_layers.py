"""What every transformers decoder stack shares, whichever the model: the KV cache's keyword names, and where
(and how) a layer's gradient checkpointing runs."""

from __future__ import annotations

import contextlib
import functools

import torch


def cache_in(kwargs: dict):
    """The KV cache in a forward's keyword arguments, under either of its names, or None.

    transformers 5.24 renamed it from ``past_key_values`` to ``cache`` throughout its forwards (the old name
    still reaches HF's own forwards, with a deprecation warning); a forward that reads only one name sees no
    cache while decoding on the other versions.
    """
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def pop_cache(kwargs: dict):
    """`cache_in(kwargs)`, with both names removed from `kwargs`."""
    cache = cache_in(kwargs)
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    return cache


def hf_checkpoints_in_forward() -> bool:
    """Where this transformers version runs a layer's gradient checkpointing.

    transformers >= 5.23 wraps each ``GradientCheckpointingLayer`` subclass's *class* ``forward``
    (so module hooks stay outside the checkpoint); older 5.x checkpointed in ``__call__``. An
    instance-level ``forward`` bypasses the first layout, so there our forward checkpoints itself;
    in the second, ``__call__`` already wraps it and checkpointing again would recompute twice.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    return "__call__" not in vars(GradientCheckpointingLayer)


class _CallsThrough:
    """Stands in for a layer's checkpoint function while `checkpointing_in_forward` lasts: HF's ``__call__``
    then runs the layer's forward directly, and the (patched) forward checkpoints with `original` itself."""

    def __init__(self, original):
        self.original = original

    def __call__(self, function, *args, **kwargs):
        return function(*args, **kwargs)


def checkpoint_function(layer):
    """The layer's gradient checkpointing function (HF's, or the one a user set), None where it has none."""
    function = getattr(layer, "_gradient_checkpointing_func", None)
    return function.original if isinstance(function, _CallsThrough) else function


def checkpoints_in_forward(layer) -> bool:
    """Whether the layer's gradient checkpointing (when on) is for its forward to run, not HF's ``__call__``."""
    return hf_checkpoints_in_forward() or isinstance(getattr(layer, "_gradient_checkpointing_func", None),
                                                     _CallsThrough)


@contextlib.contextmanager
def checkpointing_in_forward(layers):
    """Where transformers checkpoints in ``GradientCheckpointingLayer.__call__`` (before 5.23): the layers'
    own forwards checkpoint instead while this lasts, as on newer versions. Otherwise a forward that replays
    CUDA graphs (which recompute in their own backward) or keeps a layer would be recomputed around."""
    swapped = []
    if not hf_checkpoints_in_forward():
        for layer in layers:
            function = getattr(layer, "_gradient_checkpointing_func", None)
            if getattr(layer, "gradient_checkpointing", False) and function is not None \
                    and not isinstance(function, _CallsThrough):
                layer._gradient_checkpointing_func = _CallsThrough(function)
                swapped.append((layer, function))
    try:
        yield
    finally:
        for layer, function in swapped:
            layer._gradient_checkpointing_func = function


def run_checkpointed(layer, body, hidden_states, *args, checkpoint=None, **kwargs):
    """``body(layer, hidden_states, ...)`` under HF's gradient checkpointing when it is on (`checkpoint`
    replaces HF's function).

    Mirrors HF's checkpointing wrapper: only while training, with the cache switched off
    (the backward replay must not update it twice), and `hidden_states` passed positionally
    (reentrant checkpointing only tracks gradients of positional inputs).
    """
    if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled() and checkpoints_in_forward(layer):
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        cache = pop_cache(kwargs)
        if getattr(layer, "_can_checkpoint_with_cache", False):
            kwargs["cache"] = cache
        return (checkpoint or checkpoint_function(layer))(
            functools.partial(body, layer, *args, **kwargs), hidden_states
        )
    return body(layer, hidden_states, *args, **kwargs)
