"""A patched backbone's forward (a transformers ``*Model``): the batch's mask mapping (fastgemma.mask_mapping) and,
while training, its memory plan (fastgemma.step_memory), around the backbone's own forward."""

from __future__ import annotations

from .hf_layers import checkpointing_in_forward
from .mask_mapping import add_mask_mapping
from .patching import positional_parameters, state_of
from .step_memory import run_planned


def backbone_forward(self, *args, **kwargs):
    """A patched backbone's forward (a transformers ``*Model``): prepares the batch's masks and (while training)
    its memory plan, then runs the backbone's own forward, or the one someone installed before fastgemma (e.g.
    accelerate's hooks)."""
    state = state_of(self)
    previous = state.patched.get(self)
    original = previous if previous is not None else type(self).forward.__get__(self)
    kwargs.update(zip(positional_parameters(type(self).forward), args))
    if kwargs.get("output_attentions", getattr(self.config, "output_attentions", False)):
        kwargs["output_attentions"] = True  # reaches every attention layer, which then returns its weights
    state.dense_weights.drop_stale()  # before any layer multiplies with a copy of a weight replaced since
    deferred = []  # checks of the batch's GPU values, run once the forward is queued (no stall before it)
    add_mask_mapping(self.config, state.cache, kwargs, deferred)
    layers = getattr(self, "layers", ()) if self.training else ()
    with checkpointing_in_forward(layers):  # (where transformers checkpoints around the layers' forwards)
        output = run_planned(self, state, kwargs, original)  # while training: which layers keep, recompute, offload
    for check in deferred:  # a bad batch raises before anyone uses this output
        check.raise_if_failed()
    return output
