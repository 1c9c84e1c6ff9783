"""When a decoder layer's training call runs as CUDA graphs (fastgemma.graphs), and running it so.

Graphs replay fixed work: a call runs graphed only when its layer computes the same function every time
(no hooks, no random draws, LoRA in its plain state) and, under cuda_graphs="auto", only where the host's
kernel launches would bound the step. Every other call runs as before, and the log says once why.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

from . import regions
from .attention import flex_compile_settings
from .graph_inputs import RotaryMaskInputs
from .graphs import AUTO_MAX_TOKENS, GraphedLayers, bucket_length
from .hf_layers import cache_in
from .log import say_once
from .masks import AttentionMask
from .ops.lora import plain_lora_parts
from .ops.nf4 import DEQUANTIZED
from .options import fused_here
from .patching import has_global_hooks, has_own_hooks
from .processes import world_size
from .regions import reads_block_masks

def _refuse(reason: str, level=logging.WARNING, auto: bool = False) -> bool:
    if auto:  # the default: fall back to the op-by-op layers, which is what auto would pick where graphs don't help
        say_once(("auto", reason), logging.INFO, "fastgemma: cuda_graphs=auto: %s; those layers run op by op", reason)
    else:
        say_once(reason, level, "fastgemma: cuda_graphs: %s; those layers run as compiled regions instead", reason)
    return False


def auto_graphs_decline(device_type: str, tokens: int, processes: int) -> Optional[str]:
    """Why cuda_graphs="auto" leaves a training call op by op, or None: graphs pay off only where the host's
    kernel launches bound the step (short micro-steps on a CUDA GPU)."""
    if device_type != "cuda":
        return "not on a CUDA GPU"
    if processes > 1:
        return "several processes (the graphed layers are measured on one GPU only)"
    if tokens > AUTO_MAX_TOKENS:
        return f"micro-steps of more than {AUTO_MAX_TOKENS} tokens keep the GPU busy without graphs"
    return None


def graphs_expected(options, device: torch.device, tokens: int) -> bool:
    """Whether a training call of `tokens` tokens on `device` will run its decoder layers as CUDA graphs."""
    graphs = options.layer_graphs
    if not graphs or options.fused_ops is False or (options.fused_ops == "auto" and device.type != "cuda"):
        return False
    if graphs is True:
        return True
    return auto_graphs_decline(device.type, tokens, world_size()) is None


def auto_declines(hidden_states) -> Optional[str]:
    """`auto_graphs_decline` for this call, in this process."""
    return auto_graphs_decline(hidden_states.device.type, hidden_states.shape[0] * hidden_states.shape[1],
                               world_size())


_PLAIN_LORA_STATES: set = set()  # adapter states (lora_states) whose LoRA layers were all found plain


def lora_states(layer) -> tuple:
    """What a layer's graphs bake in beyond its modules and weights: each LoRA layer's adapter state
    (its modules, which adapters are on, merged or not, dropout modules and train mode) and the dequantised
    copy of its base weight that the graphs read, if any (fastgemma.dense_weights)."""
    states = []
    stack = [layer]
    while stack:
        module = stack.pop()
        children = module._modules
        if "lora_A" in children:
            copy = getattr(getattr(module, "base_layer", None), DEQUANTIZED, None)
            states.append((id(module), module._disable_adapters, tuple(module.merged_adapters),
                           str(module._active_adapter), module.training, id(copy)))
        else:
            stack.extend(child for child in children.values() if child is not None)
    return tuple(states)


class GraphBody:
    """The layer body a graph records, compiled once for every layer, with flex's recompile head-room.

    Sliding and global layers at lengths beyond the window (and packed or not, and each autocast setting) are
    separate graphs: head-room beyond torch's default limit, so a process that trains several ways never falls
    back to eager. The graphs record both directions with autograd on (fastgemma.graphs), so the fused ops
    always run here.
    A plain object around a module-level function, so a patched model still pickles.
    """

    def __init__(self, body):
        self.body = body  # body(layer, x, position_embeddings=..., attention_mask=...), without checkpointing

    def __call__(self, layer, x, position_embeddings, attention_mask):
        with flex_compile_settings():
            return regions.compiled(self.body)(layer, x, position_embeddings=position_embeddings,
                                               attention_mask=attention_mask)


def graphed_layers(body) -> GraphedLayers:
    """CUDA-graph machinery for decoder layers running `body`, their rotary tables and masks bound statically."""
    return GraphedLayers(GraphBody(body), RotaryMaskInputs(), lora_states)


def graphs_apply(layer, state, hidden_states, kwargs) -> bool:
    """Training with fused ops, a batch fastgemma masks, and layers whose every call computes the same function;
    under cuda_graphs="auto", also only where the host would bind the step. (A layer with checkpointing on runs
    checkpointed graphs, one without it, or kept by the memory budget, kept graphs.)"""
    if not (layer.training and fused_here(layer, hidden_states)):
        return False  # inference: the usual path
    auto = state.options.layer_graphs == "auto"
    if auto:
        declined = auto_declines(hidden_states) or state.graphs_declined
        if declined is not None:
            return _refuse(declined, auto=True)
    refuse = functools.partial(_refuse, auto=auto)
    if hidden_states.dim() != 3 or not isinstance(kwargs.get("attention_mask"), AttentionMask):
        return refuse("the batch comes with a mask of its own (a 4D mask or BlockMask)", logging.INFO)
    rotary = kwargs.get("position_embeddings")
    if not (isinstance(rotary, tuple) and len(rotary) == 2 and all(isinstance(t, torch.Tensor) for t in rotary)):
        return refuse("the layer was not handed its rotary tables (position_embeddings)", logging.INFO)
    # (Other keyword arguments, such as TRL's packed-sequence lengths for flash attention, are not read by
    # fastgemma's layer: the batch's masks were built from them already.)
    if cache_in(kwargs) is not None or kwargs.get("output_attentions"):
        return refuse("a KV cache or output_attentions is in use", logging.INFO)
    if has_global_hooks():
        return refuse("global module hooks are set, which a graph would not call")
    plan = state.graphs.plan(layer)
    if any(has_own_hooks(module) or "_hf_hook" in module.__dict__ for module in plan.modules):
        return refuse("a module of the decoder layer has hooks, which a graph would not call")
    lora_state = (plan.signature[0], plan.signature[2])  # modules and adapter states
    if lora_state not in _PLAIN_LORA_STATES:  # checked once per such state, not per call
        if not all(plain_lora_parts(m) is not None for m in plan.modules if "lora_A" in m._modules):
            return refuse("a LoRA layer is not in its plain state (dropout, several adapters, DoRA or merged), "
                          "and a graph would replay one random draw")
        _PLAIN_LORA_STATES.add(lora_state)
    if not state.graphs.accepts_length(graph_length(state, hidden_states)):
        return refuse(f"batches came at more than {state.graphs.max_buckets} bucket lengths")
    kwargs["_fastgemma_plan"] = plan
    if auto:
        say_once("auto on", logging.INFO, "fastgemma: cuda_graphs=auto: training on %s with "
                 "micro-steps of <= %d tokens: decoder layers run as CUDA graphs (the first steps record them)",
                 hidden_states.device, AUTO_MAX_TOKENS)
    return True


def graph_length(state, hidden_states) -> int:
    """The bucket length this batch runs at: `graphed_rows(state)` split into steps (the block masks' fixed
    length is one block longer than max_row_tokens, so no bucket fills it: see BlockMaskCache's headroom)."""
    return bucket_length(hidden_states.shape[1], graphed_rows(state))


def graphed_rows(state) -> int:
    """The longest row the graphs are bucketed for: max_row_tokens, or under cuda_graphs="auto" at most
    AUTO_MAX_TOKENS, the longest micro-step auto graphs; buckets split the whole range, so a wider range than
    the calls reach would pad each call to several times its length."""
    longest = state.cache.max_row_tokens
    return min(longest, AUTO_MAX_TOKENS) if state.options.layer_graphs == "auto" else longest


def run_graphed(layer, attention, state, hidden_states, kwargs):
    """The layer's output through its graphs (after `graphs_apply` said yes for these arguments); `attention`:
    its attention module, whose backend decides whether block or dense masks are bound."""
    cos, sin = kwargs["position_embeddings"]
    sources = (cos, sin, kwargs["attention_mask"], reads_block_masks(attention, cos.device))
    longest = graphed_rows(state)
    return state.graphs(layer, hidden_states, sources, graph_length(state, hidden_states),
                        kwargs.pop("_fastgemma_plan", None), capacity=bucket_length(longest, longest),
                        keep=not layer.gradient_checkpointing)
