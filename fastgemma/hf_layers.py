"""What every transformers decoder stack shares, whichever the model: the KV cache's keyword names, and where
(and how) a layer's gradient checkpointing runs."""

from __future__ import annotations

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

    transformers >= 5.2x wraps each ``GradientCheckpointingLayer`` subclass's *class* ``forward``
    (so module hooks stay outside the checkpoint); older 5.x checkpointed in ``__call__``. An
    instance-level ``forward`` bypasses the first layout, so there our forward checkpoints itself;
    in the second, ``__call__`` already wraps it and checkpointing again would recompute twice.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    return "__call__" not in vars(GradientCheckpointingLayer)


def run_checkpointed(layer, body, hidden_states, *args, checkpoint=None, **kwargs):
    """``body(layer, hidden_states, ...)`` under HF's gradient checkpointing when it is on (`checkpoint`
    replaces HF's function).

    Mirrors HF's checkpointing wrapper: only while training, with the cache switched off
    (the backward replay must not update it twice), and `hidden_states` passed positionally
    (reentrant checkpointing only tracks gradients of positional inputs).
    """
    if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled() and hf_checkpoints_in_forward():
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        cache = pop_cache(kwargs)
        if getattr(layer, "_can_checkpoint_with_cache", False):
            kwargs["cache"] = cache
        return (checkpoint or layer._gradient_checkpointing_func)(
            functools.partial(body, layer, *args, **kwargs), hidden_states
        )
    return body(layer, hidden_states, *args, **kwargs)
