"""One compiled region per decoder layer while training: when it applies, what it checkpoints, how it runs.

A model's glue supplies the layer's checkpointed call (`fastgemma.hf_layers.run_checkpointed` around its
body); every layer shares one compiled function, since torch.compile treats each layer's parameters as
inputs: layers of one kind (sliding or global: their masks differ) share a graph, token counts are dynamic.
"""

from __future__ import annotations

import functools

from .attention import backend_runs_flex, flex_compile_settings
from .hf_layers import checkpoint_function
from .masks import AttentionMask
from .ops.compile import compile_function, mark_dynamic
from .options import fused_here
from .patching import state_of


@functools.lru_cache(maxsize=None)
def compiled(function):
    """`function` torch.compile'd, once per process (the same object for every layer and call)."""
    return compile_function(function)


def region_applies(layer, hidden_states) -> bool:
    """Training with fused ops, and gradient checkpointing (if on) of the non-reentrant kind, which
    torch.compile traces; reentrant checkpointing and inference run the layer as usual."""
    if not fused_here(layer, hidden_states):
        return False
    if layer.gradient_checkpointing and layer.training:
        checkpoint = checkpoint_function(layer)
        if getattr(checkpoint, "keywords", {}).get("use_reentrant", True) is not False:
            return False
    return True


def reads_block_masks(attention, device) -> bool:
    """Whether a patched attention layer runs flex (block masks) on `device`, rather than a dense backend
    (dense masks)."""
    dropout = attention.attention_dropout if attention.training else 0.0
    return backend_runs_flex(state_of(attention).options.backend, device, attention.head_dim, dropout)


def prepare_masks(attention, hidden_states, mask) -> None:
    """Build the mask `attention` will read before entering the compiled region (building it caches it on the
    AttentionMask, a side effect torch.compile would split the region at)."""
    if not isinstance(mask, AttentionMask):
        return
    length = hidden_states.shape[-2]
    if mask.q_len != length or mask.kv_len != length:
        raise ValueError(f"attention mask built for {mask.q_len} queries / {mask.kv_len} keys, got {length} tokens")
    device = hidden_states.device
    if reads_block_masks(attention, device):
        mask.block_mask(device)  # at the fixed padded length: no token dimension to mark
    else:  # (batch or 1, 1, queries, keys): batch and tokens vary like the hidden states'
        mark_dynamic(mask.dense(device), (0, 2, 3))


def run_region(checkpointed_layer, layer, attention, hidden_states, *args, **kwargs):
    """``checkpointed_layer(layer, hidden_states, ..., checkpoint=...)`` as one compiled region, checkpointing
    (when on) with the recompute-everything twin of HF's function."""
    prepare_masks(attention, hidden_states, kwargs.get("attention_mask"))
    for tensor in (hidden_states, *(kwargs.get("position_embeddings") or ())):
        mark_dynamic(tensor)  # batch and tokens vary; features do not
    checkpoint = recompute_everything_checkpoint(checkpoint_function(layer))
    with flex_compile_settings():  # the region traces flex_attention (on GPUs)
        return compiled(checkpointed_layer)(layer, hidden_states, *args, checkpoint=checkpoint, **kwargs)


def _recompute_every_op():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(lambda ctx, op, *args, **kwargs: CheckpointPolicy.MUST_RECOMPUTE)


_RECOMPUTING_CHECKPOINTS: dict = {}  # id(HF's checkpoint function) -> (it, its recompute-everything twin)


def recompute_everything_checkpoint(checkpoint):
    """HF's non-reentrant checkpoint function with a policy that recomputes every op of the layer.

    Inside torch.compile a checkpointed region is only a hint to the partitioner, which may keep the
    activations anyway (the compiled layers kept their GeGLU inputs and projections, several times what
    op-by-op checkpointing keeps). Marking every op must-recompute makes the compiled layer save what eager
    checkpointing saves. A user's own selective-checkpointing policy (a `context_fn`) is kept as it is.
    """
    if not isinstance(checkpoint, functools.partial) or "context_fn" in checkpoint.keywords:
        return checkpoint
    known = _RECOMPUTING_CHECKPOINTS.get(id(checkpoint))
    if known is None or known[0] is not checkpoint:
        twin = functools.partial(checkpoint.func, *checkpoint.args, **checkpoint.keywords,
                                 context_fn=_recompute_every_op)
        known = _RECOMPUTING_CHECKPOINTS[id(checkpoint)] = (checkpoint, twin)
    return known[1]
