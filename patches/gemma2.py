"""Gemma 2 glue: the replacement attention forward and the per-batch mask builder.

Instance-level patches (the class is never touched, so two models in one process stay
independent; each patched module gets its own ``forward`` attribute, a ``PatchedForward``):

- each ``Gemma2Attention.forward`` keeps Hugging Face's projections (module calls, so
  LoRA and 4-bit linears work), RoPE and KV-cache update, then calls
  ``fastgemma.attention.softcap_attention`` instead of HF's eager attention;
- each ``Gemma2DecoderLayer.forward`` fuses Gemma's sandwich norms with the residual adds
  and keeps HF's gradient checkpointing (wherever this transformers version runs it); with
  ``compile_layers`` the whole layer, checkpointing included, is one compiled region while training;
- ``Gemma2Model.forward`` first describes the batch's masks as ``AttentionMask`` objects
  (causal / sliding, with packed documents as segment ids, padding as real-token flags) and hands them to
  HF's forward as a prepared mask mapping, so HF never materialises its dense
  (batch, 1, T, T) masks. While decoding with a filled KV cache it leaves masks to HF.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field

import torch
from transformers.models.gemma2 import modeling_gemma2

from fastgemma.attention import (
    _RECOMPILE_LIMIT_KEY,
    FLEX_RECOMPILE_LIMIT,
    auto_picks_flex,
    dense_softcap_attention,
    softcap_attention,
)
from fastgemma.graphs import AUTO_MAX_TOKENS, GraphedLayers, StaticBinder, bucket_length, copy_padded, static_like
from fastgemma.masks import (
    AttentionMask,
    BlockMaskCache,
    flex_mask_mod,
    real_tokens_from_padding_mask,
    segments_from_cu_seqlens,
    segments_from_position_ids,
)
from fastgemma.ops.compile import compile_function
from fastgemma.ops.lora import plain_lora_parts
from fastgemma.ops import (
    gelu_tanh_gate,
    lora_linear,
    mark_dynamic,
    norm_add,
    norm_add_norm,
    rms_norm,
    rotate_pairs,
)

from .gemma2_check import self_check  # noqa: F401  (the patcher's check for untested versions)

logger = logging.getLogger("fastgemma")

NAME = "Gemma 2"

# The models patch_model accepts (plain or PEFT-wrapped): heads whose maths on top of the
# backbone is per token or reads real tokens only, so fastgemma's masks give HF's results.
SUPPORTED_MODELS = (
    modeling_gemma2.Gemma2ForCausalLM,
    modeling_gemma2.Gemma2Model,
    modeling_gemma2.Gemma2ForSequenceClassification,
    modeling_gemma2.Gemma2ForTokenClassification,
)


def find_modules(model: torch.nn.Module):
    """The Gemma2Model backbones and Gemma2Attention layers inside `model` (plain, PEFT or 4-bit)."""
    backbones = [m for m in model.modules() if isinstance(m, modeling_gemma2.Gemma2Model)]
    attentions = [m for m in model.modules() if isinstance(m, modeling_gemma2.Gemma2Attention)]
    return backbones, attentions


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (PeftModel -> LoraModel -> model), or `model` itself."""
    while hasattr(model, "get_base_model") and callable(model.get_base_model):
        inner = model.get_base_model()
        if inner is model:
            break
        model = inner
    return model


def matches(model: torch.nn.Module) -> bool:
    """Whether `model` contains Gemma 2 (it may still be a kind `check_supported` refuses)."""
    backbones, attentions = find_modules(model)
    return bool(backbones) and bool(attentions)


def check_supported(model: torch.nn.Module) -> None:
    """Refuse models whose Gemma 2 backbone is used in a way fastgemma does not reproduce."""
    root = unwrapped(model)
    if type(root) not in SUPPORTED_MODELS:
        names = ", ".join(cls.__name__ for cls in SUPPORTED_MODELS)
        raise ValueError(
            f"fastgemma supports {names} (plain, PEFT-wrapped or 4-bit); got {type(root).__name__}, which contains "
            "Gemma 2 but may mask or use it differently. Patch the Gemma 2 model itself, before wrapping it."
        )
    if any(not getattr(attention, "is_causal", True) for attention in find_modules(model)[1]):
        # fastgemma's masks are causal; a bidirectional Gemma 2 variant would be silently wrong.
        raise ValueError("fastgemma supports causal Gemma 2 models only; this one uses bidirectional attention "
                         "(config.use_bidirectional_attention=True)")


@dataclass
class PatchState:
    """What patch_model did to one backbone, so it can be adjusted or undone."""

    backend: str
    fused_ops: object  # True, False or "auto" (fused on CUDA)
    cache: BlockMaskCache
    original_attn_implementation: object
    patched: dict = field(default_factory=dict)  # module -> its own `forward` attribute before, or None
    graphs: object = None  # fastgemma.graphs.GraphedLayers when cuda_graphs is on or "auto"
    graph_mode: object = False  # patch_model's cuda_graphs: "auto", True or False


# The per-module settings `patch` sets (and `unpatch` removes) beside the patched forwards.
SETTING_ATTRIBUTES = ("_fastgemma_backend", "_fastgemma_fused", "_fastgemma_kernel_options", "_fastgemma_softcap_tanh",
                      "_fastgemma_compile_layers", "_fastgemma_graph_state")


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


# --------------------------------------------------------------------------------------
# The attention forward
# --------------------------------------------------------------------------------------
def _fused(module, x: torch.Tensor) -> bool:
    """Whether this call runs the fused (compiled) elementwise ops: when training (grad enabled),
    on CUDA under "auto". Inference and decoding run the same maths eagerly, without compiles."""
    setting = module._fastgemma_fused
    if setting is False or not torch.is_grad_enabled():
        return False
    return setting is True or x.device.type == "cuda"


def cache_in(kwargs: dict):
    """The KV cache in a forward's keyword arguments, under either of its names, or None.

    transformers 5.24 renamed it from ``past_key_values`` to ``cache`` throughout Gemma 2's forwards
    (the old name still reaches HF's own forwards, with a deprecation warning); a forward that reads
    only one name sees no cache while decoding on the other versions.
    """
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def pop_cache(kwargs: dict):
    """`cache_in(kwargs)`, with both names removed from `kwargs`."""
    cache = cache_in(kwargs)
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    return cache


# What this transformers calls the KV cache in Gemma 2's forwards.
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(modeling_gemma2.Gemma2Model.forward).parameters \
    else "past_key_values"


def attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """Gemma2Attention.forward with fastgemma's softcapped attention core.

    Returns ``(output, weights)``: weights are None unless the caller asked for
    ``output_attentions``; then this layer runs the dense path, which can return them.
    """
    legacy = pop_cache(kwargs)
    cache = cache if cache is not None else legacy
    fused = _fused(self, hidden_states)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = lora_linear(self.q_proj, hidden_states, fused).view(hidden_shape).transpose(1, 2)
    key = lora_linear(self.k_proj, hidden_states, fused).view(hidden_shape).transpose(1, 2)
    value = lora_linear(self.v_proj, hidden_states, fused).view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    if fused:
        query, key = rotate_pairs(query, key, cos, sin)
    else:  # HF's own function, so anything that replaces it (a hub kernel, another patch) still applies
        query, key = modeling_gemma2.apply_rotary_pos_emb(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)

    dropout_p = self.attention_dropout if self.training else 0.0
    weights = None
    if kwargs.get("output_attentions"):
        mask = attention_mask.dense(query.device) if isinstance(attention_mask, AttentionMask) else attention_mask
        output, weights = dense_softcap_attention(
            query, key, value, mask, self.scaling, self.attn_logit_softcapping, dropout_p, return_weights=True,
        )
    else:
        output = softcap_attention(
            query,
            key,
            value,
            attention_mask,
            scale=self.scaling,
            softcap=self.attn_logit_softcapping,
            backend=self._fastgemma_backend,
            dropout_p=dropout_p,
            kernel_options=self._fastgemma_kernel_options,
            softcap_tanh=self._fastgemma_softcap_tanh,
        )
    output = output.transpose(1, 2).reshape(*input_shape, -1)
    return lora_linear(self.o_proj, output, fused), weights


# --------------------------------------------------------------------------------------
# The decoder layer, MLP and norms: Gemma 2's "sandwich" norms fused with the residual adds
# --------------------------------------------------------------------------------------
UNIT_OFFSET = 1.0  # Gemma's RMSNorm scales by (1 + weight)


def hf_checkpoints_in_forward() -> bool:
    """Where this transformers version runs a layer's gradient checkpointing.

    transformers >= 5.2x wraps each ``GradientCheckpointingLayer`` subclass's *class* ``forward``
    (so module hooks stay outside the checkpoint); older 5.x checkpointed in ``__call__``. An
    instance-level ``forward`` bypasses the first layout, so there our forward checkpoints itself;
    in the second, ``__call__`` already wraps it and checkpointing again would recompute twice.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    return "__call__" not in vars(GradientCheckpointingLayer)


def decoder_layer_forward(self, hidden_states, *args, **kwargs):
    """Gemma2DecoderLayer.forward with fused norms, under HF's gradient checkpointing when it is on;
    one compiled region per layer while training when patch_model's `compile_layers` is set, replayed
    as CUDA graphs when its `cuda_graphs` is."""
    graph_state = getattr(self, "_fastgemma_graph_state", None)
    if graph_state is not None and _graphs_apply(self, graph_state, hidden_states, kwargs):
        return _graphed_layer(self, graph_state, hidden_states, kwargs)
    if getattr(self, "_fastgemma_compile_layers", False) and _region_applies(self, hidden_states):
        _prepare_masks(self, hidden_states, kwargs.get("attention_mask"))
        for tensor in (hidden_states, *(kwargs.get("position_embeddings") or ())):
            mark_dynamic(tensor)  # batch and tokens vary; features do not
        checkpoint = recompute_everything_checkpoint(getattr(self, "_gradient_checkpointing_func", None))
        return _compiled_layer()(self, hidden_states, *args, checkpoint=checkpoint, **kwargs)
    return checkpointed_layer(self, hidden_states, *args, **kwargs)


def checkpointed_layer(self, hidden_states, *args, checkpoint=None, **kwargs):
    """The layer under HF's gradient checkpointing when it is on (`checkpoint` replaces HF's function).

    Mirrors HF's checkpointing wrapper: only while training, with the cache switched off
    (the backward replay must not update it twice), and `hidden_states` passed positionally
    (reentrant checkpointing only tracks gradients of positional inputs).
    """
    if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and hf_checkpoints_in_forward():
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        cache = pop_cache(kwargs)
        if getattr(self, "_can_checkpoint_with_cache", False):
            kwargs["cache"] = cache
        return (checkpoint or self._gradient_checkpointing_func)(
            functools.partial(decoder_layer_body, self, *args, **kwargs), hidden_states
        )
    return decoder_layer_body(self, hidden_states, *args, **kwargs)


def decoder_layer_body(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None,
                       **kwargs):
    """norm -> attention -> norm + add + norm -> MLP -> norm + add (Gemma 2's decoder layer)."""
    cache = pop_cache(kwargs)
    fused = _fused(self, hidden_states)
    eps = self.input_layernorm.eps
    normed = rms_norm(hidden_states, self.input_layernorm.weight, eps, UNIT_OFFSET, fused=fused)
    attended, _ = call_module(
        self.self_attn,
        hidden_states=normed,
        position_embeddings=position_embeddings,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        **kwargs,
    )
    stream, normed = norm_add_norm(
        attended, hidden_states, self.post_attention_layernorm.weight, self.pre_feedforward_layernorm.weight,
        eps, UNIT_OFFSET, fused=fused,
    )
    return norm_add(call_module(self.mlp, normed), stream, self.post_feedforward_layernorm.weight, eps, UNIT_OFFSET,
                    fused=fused)


# --------------------------------------------------------------------------------------
# One compiled region per decoder layer (patch_model's compile_layers)
# --------------------------------------------------------------------------------------
def _own_hooks(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as nn_module

    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks)


def _has_hooks(module) -> bool:
    return _own_hooks(module) or _global_hooks()


def call_module(module, *args, **kwargs):
    """``module(*args, **kwargs)``, going straight to fastgemma's function when no hook watches the call.

    Inside a compiled layer, a call through ``nn.Module.__call__`` reaches each module's own
    PatchedForward object, and torch.compile guards on that object: every layer would compile anew.
    """
    forward = module.__dict__.get("forward")
    if isinstance(forward, PatchedForward) and not _has_hooks(module):
        return forward.function(module, *args, **kwargs)
    return module(*args, **kwargs)


def _region_applies(layer, hidden_states) -> bool:
    """Training with fused ops, and gradient checkpointing (if on) of the non-reentrant kind, which
    torch.compile traces; reentrant checkpointing and inference run the layer as usual."""
    if not _fused(layer, hidden_states):
        return False
    if layer.gradient_checkpointing and layer.training:
        checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
        if getattr(checkpoint, "keywords", {}).get("use_reentrant", True) is not False:
            return False
    return True


def _prepare_masks(layer, hidden_states, mask) -> None:
    """Build the mask the attention will read before entering the compiled region (building it caches
    it on the AttentionMask, a side effect torch.compile would split the region at)."""
    if not isinstance(mask, AttentionMask):
        return
    length = hidden_states.shape[-2]
    if mask.q_len != length or mask.kv_len != length:
        raise ValueError(f"attention mask built for {mask.q_len} queries / {mask.kv_len} keys, got {length} tokens")
    device = hidden_states.device
    if _reads_block_masks(layer.self_attn, device):
        mask.block_mask(device)  # at the fixed padded length: no token dimension to mark
    else:  # (batch or 1, 1, queries, keys): batch and tokens vary like the hidden states'
        mark_dynamic(mask.dense(device), (0, 2, 3))


def _reads_block_masks(attention, device) -> bool:
    """Whether this attention layer runs flex (block masks) on `device`, rather than a dense backend (dense masks)."""
    backend = attention._fastgemma_backend
    dropout = attention.attention_dropout if attention.training else 0.0
    return backend == "flex" or (backend == "auto" and dropout == 0.0 and auto_picks_flex(device, attention.head_dim))


def _recompute_every_op():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(lambda ctx, op, *args, **kwargs: CheckpointPolicy.MUST_RECOMPUTE)


_RECOMPUTING_CHECKPOINTS: dict = {}  # id(HF's checkpoint function) -> (it, its recompute-everything twin)


def recompute_everything_checkpoint(checkpoint):
    """HF's non-reentrant checkpoint function with a policy that recomputes every op of the layer.

    Inside torch.compile a checkpointed region is only a hint to the partitioner, which may keep the
    activations anyway: with torch 2.11 on an H100 the compiled layers kept their GeGLU inputs and
    projections (3 GiB over 26 layers at 2,048 tokens, against 0.25 GiB op by op). Marking every op
    must-recompute makes the compiled layer save what eager checkpointing saves. A user's own
    selective-checkpointing policy (a `context_fn`) is kept as it is.
    """
    if not isinstance(checkpoint, functools.partial) or "context_fn" in checkpoint.keywords:
        return checkpoint
    known = _RECOMPUTING_CHECKPOINTS.get(id(checkpoint))
    if known is None or known[0] is not checkpoint:
        twin = functools.partial(checkpoint.func, *checkpoint.args, **checkpoint.keywords,
                                 context_fn=_recompute_every_op)
        known = _RECOMPUTING_CHECKPOINTS[id(checkpoint)] = (checkpoint, twin)
    return known[1]


@functools.lru_cache(maxsize=None)
def _compiled_layer():
    # One compiled function for every layer: torch.compile treats each layer's parameters as inputs, so
    # layers of one kind (sliding or global: their masks differ) share a graph; token counts are dynamic.
    return compile_function(checkpointed_layer)


# --------------------------------------------------------------------------------------
# CUDA-graphed layers (patch_model's cuda_graphs): fastgemma.graphs around the compiled layer body
# --------------------------------------------------------------------------------------
_graph_choices: set = set()


def _say_once(key, level, message: str, *args) -> None:
    """Log a choice of the graphed path once per kind of choice (a silent fallback hid one such case)."""
    if key not in _graph_choices:
        _graph_choices.add(key)
        logger.log(level, message, *args)


def _refuse_graphs(reason: str, level=logging.WARNING, auto: bool = False) -> bool:
    if auto:  # the default: fall back to the op-by-op layers, which is what auto would pick where graphs don't help
        _say_once(("auto", reason), logging.INFO, "fastgemma: cuda_graphs=auto: %s; those layers run op by op",
                  reason)
    else:
        _say_once(reason, level, "fastgemma: cuda_graphs: %s; those layers run as compiled regions instead", reason)
    return False


def auto_graphs_decline(device_type: str, tokens: int, processes: int) -> str | None:
    """Why cuda_graphs="auto" leaves a training call op by op, or None: graphs pay off only where the host's
    kernel launches bound the step (short micro-steps on a CUDA GPU)."""
    if device_type != "cuda":
        return "not on a CUDA GPU"
    if processes > 1:
        return "several processes (the graphed layers are measured on one GPU only)"
    if tokens > AUTO_MAX_TOKENS:
        return f"micro-steps of more than {AUTO_MAX_TOKENS} tokens keep the GPU busy without graphs"
    return None


def _auto_declines(hidden_states) -> str | None:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return auto_graphs_decline(hidden_states.device.type, hidden_states.shape[0] * hidden_states.shape[1],
                               torch.distributed.get_world_size() if distributed else 1)


def _graphs_apply(layer, state, hidden_states, kwargs) -> bool:
    """Training with gradient checkpointing (the graphs checkpoint: they keep each layer's input only),
    fused ops, a batch fastgemma masks, and layers whose every call computes the same function; under
    cuda_graphs="auto", also only where the host would bind the step."""
    if not (layer.training and _fused(layer, hidden_states)):
        return False  # inference: the usual path
    auto = state.graph_mode == "auto"
    if auto:
        declined = _auto_declines(hidden_states)
        if declined is not None:
            return _refuse_graphs(declined, auto=True)
    refuse = functools.partial(_refuse_graphs, auto=auto)
    if not layer.gradient_checkpointing:
        return refuse("gradient checkpointing is off (the graphed backward recomputes each layer, as "
                      "checkpointing does)", logging.INFO)
    if hidden_states.dim() != 3 or not isinstance(kwargs.get("attention_mask"), AttentionMask):
        return refuse("the batch comes with a mask of its own (a 4D mask or BlockMask)", logging.INFO)
    rotary = kwargs.get("position_embeddings")
    if not (isinstance(rotary, tuple) and len(rotary) == 2 and all(isinstance(t, torch.Tensor) for t in rotary)):
        return refuse("the layer was not handed its rotary tables (position_embeddings)", logging.INFO)
    # (Other keyword arguments, such as TRL's packed-sequence lengths for flash attention, are not read by
    # fastgemma's layer: the batch's masks were built from them already.)
    if cache_in(kwargs) is not None or kwargs.get("output_attentions"):
        return refuse("a KV cache or output_attentions is in use", logging.INFO)
    if _global_hooks():
        return refuse("global module hooks are set, which a graph would not call")
    plan = state.graphs.plan(layer)
    if any(_own_hooks(module) or "_hf_hook" in module.__dict__ for module in plan.modules):
        return refuse("a module of the decoder layer has hooks, which a graph would not call")
    lora_state = (plan.signature[0], plan.signature[2])  # modules and adapter states
    if lora_state not in _PLAIN_LORA_STATES:  # checked once per such state, not per call
        if not all(plain_lora_parts(m) is not None for m in plan.modules if "lora_A" in m._modules):
            return refuse("a LoRA layer is not in its plain state (dropout, several adapters, DoRA or merged), "
                          "and a graph would replay one random draw")
        _PLAIN_LORA_STATES.add(lora_state)
    if not state.graphs.accepts_length(_graph_length(state, hidden_states)):
        return refuse(f"batches came at more than {state.graphs.max_buckets} bucket lengths")
    kwargs["_fastgemma_plan"] = plan
    if auto:
        _say_once("auto on", logging.INFO, "fastgemma: cuda_graphs=auto: training on %s with checkpointing and "
                  "micro-steps of <= %d tokens: decoder layers run as CUDA graphs (the first steps record them)",
                  hidden_states.device, AUTO_MAX_TOKENS)
    return True


def _graph_length(state, hidden_states) -> int:
    """The bucket length this batch runs at: max_seq_length split into steps (the block masks' fixed length
    is one block longer, so no bucket fills it: see BlockMaskCache's headroom)."""
    return bucket_length(hidden_states.shape[1], state.cache.max_seq_length)


def _graphed_layer(layer, state, hidden_states, kwargs):
    cos, sin = kwargs["position_embeddings"]
    sources = (cos, sin, kwargs["attention_mask"])
    longest = state.cache.max_seq_length
    return state.graphs(layer, hidden_states, sources, _graph_length(state, hidden_states),
                        kwargs.pop("_fastgemma_plan", None), capacity=bucket_length(longest, longest))


def _graphed_body(layer, x, position_embeddings, attention_mask):
    # Sliding and global layers (and packed or not, and each autocast setting) are separate graphs: head-room
    # beyond torch's default limit, so a process that trains several ways never falls back to eager. The
    # graphs record both directions with autograd on (fastgemma.graphs), so the fused ops always run here.
    with torch._dynamo.config.patch(**{_RECOMPILE_LIMIT_KEY: FLEX_RECOMPILE_LIMIT}):
        return _compiled_body()(layer, x, position_embeddings=position_embeddings, attention_mask=attention_mask)


@functools.lru_cache(maxsize=None)
def _compiled_body():
    # The layer without checkpointing: the graphed backward recomputes it itself.
    return compile_function(decoder_layer_body)


_PLAIN_LORA_STATES: set = set()  # adapter states (_lora_states) whose LoRA layers were all found plain


def _lora_states(layer) -> tuple:
    """What a layer's graphs bake in beyond its modules and weights: each LoRA layer's adapter state
    (its modules, which adapters are on, merged or not, dropout modules and train mode)."""
    states = []
    stack = [layer]
    while stack:
        module = stack.pop()
        children = module._modules
        if "lora_A" in children:
            states.append((id(module), module._disable_adapters, tuple(module.merged_adapters),
                           str(module._active_adapter), module.training))
        else:
            stack.extend(child for child in children.values() if child is not None)
    return tuple(states)


class Gemma2GraphInputs(StaticBinder):
    """Static rotary tables and masks for graphed Gemma 2 layers (one set per mask kind and bucket)."""

    BLOCK_MASK_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")

    def __init__(self, attention):
        self.attention = attention  # whose backend setting decides flex (block masks) or dense masks

    def key(self, sources, length):
        cos, sin, mask = sources
        if _reads_block_masks(self.attention, cos.device):
            block = mask.block_mask(cos.device)
            kind = ("flex", mask.kind, tuple(block.kv_indices.shape), block.seq_lengths)
        else:
            dense = mask.dense(cos.device)
            kind = ("dense", tuple(dense.shape[:2]), dense.dtype)  # int8 for padded batches (uniform rows)
        return (mask.window, kind, tuple(cos.shape[:1]), cos.shape[-1], cos.dtype, str(cos.device), length)

    def make(self, sources, length):
        cos, sin, mask = sources
        device = cos.device
        static = {"cos": static_like(cos, length), "sin": static_like(sin, length)}
        for tensor in (static["cos"], static["sin"]):
            mark_dynamic(tensor)
        if _reads_block_masks(self.attention, device):
            import copy

            block = copy.copy(mask.block_mask(device))
            for name in self.BLOCK_MASK_TENSORS:
                tensor = getattr(block, name)
                if tensor is not None:
                    setattr(block, name, tensor.clone())
            # the mask (and a padded batch's score) function reads the batch's segments: static copies
            static["flex_inputs"] = {name: t.clone() for name, t in mask.flex_inputs(device).items()}
            if static["flex_inputs"]:
                block.mask_mod = flex_mask_mod(static["flex_inputs"], mask.window)
            static["block"] = block
            static_mask = AttentionMask(length, length, window=mask.window, _block_mask=block,
                                        _flex_inputs=static["flex_inputs"])
        else:
            dense = mask.dense(device)
            static["dense"] = static_like(dense, length, dims=(2, 3), fill=False)
            mark_dynamic(static["dense"], (0, 2, 3))
            static_mask = AttentionMask(length, length, window=mask.window, _dense=static["dense"])
        return static, {"position_embeddings": (static["cos"], static["sin"]), "attention_mask": static_mask}

    def load(self, static, sources):
        cos, sin, mask = sources
        copy_padded(static["cos"], cos)
        copy_padded(static["sin"], sin)
        if "block" in static:
            block = mask.block_mask(cos.device)
            for name in self.BLOCK_MASK_TENSORS:
                target = getattr(static["block"], name)
                if target is not None:
                    target.copy_(getattr(block, name))
            inputs = mask.flex_inputs(cos.device)
            for name, target in static["flex_inputs"].items():
                target.copy_(inputs[name])
        else:
            copy_padded(static["dense"], mask.dense(cos.device), dims=(2, 3), fill=False)


def mlp_forward(self, x):
    """Gemma2MLP.forward with the GeGLU gate fused (and LoRA adapters added inside their GEMMs)."""
    fused = _fused(self, x)
    gate, up = lora_linear(self.gate_proj, x, fused), lora_linear(self.up_proj, x, fused)
    return lora_linear(self.down_proj, gelu_tanh_gate(gate, up, fused=fused), fused)


def norm_forward(self, x):
    """Gemma2RMSNorm.forward, fused."""
    return rms_norm(x, self.weight, self.eps, UNIT_OFFSET, fused=_fused(self, x))


def _fusable(module) -> bool:
    """Layers whose maths our fused forwards reproduce; anything else (a custom subclass,
    another activation) keeps its own forward."""
    if type(module) is modeling_gemma2.Gemma2MLP:
        return getattr(module.config, "hidden_activation", None) == "gelu_pytorch_tanh"
    if type(module) is modeling_gemma2.Gemma2DecoderLayer:
        norms = (module.input_layernorm, module.post_attention_layernorm, module.pre_feedforward_layernorm,
                 module.post_feedforward_layernorm)
        return all(type(n) is modeling_gemma2.Gemma2RMSNorm and n.eps == norms[0].eps for n in norms)
    return type(module) is modeling_gemma2.Gemma2RMSNorm


# --------------------------------------------------------------------------------------
# The backbone forward: build the batch's masks once
# --------------------------------------------------------------------------------------
def build_mask_mapping(config, cache, batch, length, device, attention_mask, position_ids, kv_cache, extra,
                       deferred=None):
    """{"full_attention": AttentionMask, "sliding_attention": AttentionMask}, or None to leave masks to HF.

    Checks of GPU values that need not hold up the batch go into `deferred` (fastgemma.masks.DeferredCheck),
    when it is given, for the caller to run after the forward is queued.

    Mirrors HF's rules: a 2D `attention_mask` means padding; without one (and without a
    filled KV cache), packed documents come from `cu_seq_lens_q`, `seq_idx` or `position_ids`
    resets. Unlike HF 5.23, packing is detected with `use_cache=True` too (HF builds its
    cache before its masks there and so lets packed documents see each other).
    """
    if kv_cache is not None and not _cache_is_plain(kv_cache, length, config):
        return None  # decoding, or a static cache's fixed key length: HF's dense masks
    segments = real_tokens = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            return None  # a custom 4D mask or BlockMask: HF passes it through
        if attention_mask.shape != (batch, length):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, length) = {(batch, length)}"
            )
        real_tokens = real_tokens_from_padding_mask(attention_mask.to(device))
    elif kv_cache is None:
        cu_seqlens = extra.get("cu_seq_lens_q")
        seq_idx = extra.get("seq_idx")
        if cu_seqlens is not None and batch == 1:
            # Even a single-document row keeps segment ids: packed training then runs one
            # compiled mask variant throughout instead of recompiling for the odd plain row.
            segments = segments_from_cu_seqlens(cu_seqlens.to(device), length, deferred)
        elif seq_idx is not None and tuple(seq_idx.shape) == (batch, length):
            segments = seq_idx.to(device) if bool((seq_idx != seq_idx[:, :1]).any()) else None
        elif position_ids is not None:
            segments = segments_from_position_ids(position_ids.to(device).expand(batch, length))
    return {
        layer_type: AttentionMask(
            length, length, window=config.sliding_window if layer_type == "sliding_attention" else None,
            segment_ids=segments, cache=cache, real_tokens=real_tokens,
        )
        for layer_type in ("full_attention", "sliding_attention")
    }


def _cache_is_plain(kv_cache, length: int, config) -> bool:
    """Whether every layer's attention will see exactly this call's `length` keys from position 0: an empty
    dynamic cache does, a filled one (decoding) or a static one (keys padded to its capacity) does not."""
    if kv_cache.get_seq_length() > 0:
        return False
    layer_types = getattr(config, "layer_types", None) or ()
    first_of_each = {kind: layer_types.index(kind) for kind in set(layer_types)}.values() or (0,)
    return all(tuple(kv_cache.get_mask_sizes(length, index)) == (length, 0) for index in first_of_each)


@functools.lru_cache(maxsize=None)
def _positional_parameters(forward) -> tuple:
    """Names a forward takes positionally (after self), to turn positional calls into keywords."""
    return tuple(
        name for name, parameter in inspect.signature(forward).parameters.items()
        if name != "self" and parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    )


def backbone_forward(self, *args, **kwargs):
    """Gemma2Model.forward that prepares fastgemma masks, then runs HF's forward."""
    state = self._fastgemma_state
    previous = state.patched.get(self)  # a forward someone installed before us (e.g. accelerate's hooks)
    original = previous if previous is not None else type(self).forward.__get__(self)
    kwargs.update(zip(_positional_parameters(type(self).forward), args))
    if kwargs.get("output_attentions", getattr(self.config, "output_attentions", False)):
        kwargs["output_attentions"] = True  # reaches every attention layer, which then returns its weights
    # Read under either name, handed on as the caller named it (HF's own forward warns about the old name).
    kv_cache = cache_in(kwargs)
    attention_mask = kwargs.get("attention_mask")
    deferred = []  # checks of the batch's GPU values, run once the forward is queued (no stall before it)
    if not isinstance(attention_mask, dict):
        embeds = kwargs.get("inputs_embeds")
        tokens = kwargs.get("input_ids")
        reference = tokens if tokens is not None else embeds
        if reference is not None:
            masks = build_mask_mapping(
                self.config, state.cache, reference.shape[0], reference.shape[1], reference.device,
                attention_mask, kwargs.get("position_ids"), kv_cache, kwargs, deferred,
            )
            if masks is not None:
                kwargs["attention_mask"] = masks
    output = original(**kwargs)
    for check in deferred:  # a bad batch raises before anyone uses this output
        check.raise_if_failed()
    return output


# --------------------------------------------------------------------------------------
# Patch / unpatch
# --------------------------------------------------------------------------------------
def _swap_forward(module, new_forward, state: PatchState):
    state.patched[module] = module.__dict__.get("forward")
    module.forward = PatchedForward(new_forward, module)


def patch(model: torch.nn.Module, max_seq_length: int, backend: str, fused_ops="auto",
          flex_kernel_options="auto", softcap_tanh="auto", compile_layers=False, cuda_graphs=False) -> dict:
    """Patch every Gemma 2 backbone and its attention layers in `model`; returns a summary for logging."""
    check_supported(model)
    backbones, _ = find_modules(model)
    summary = {"layers": 0, "sliding": 0, "global": 0, "already": False}
    for backbone in backbones:
        attentions = [m for m in backbone.modules() if isinstance(m, modeling_gemma2.Gemma2Attention)]
        state = backbone.__dict__.get("_fastgemma_state")
        if state is not None:  # patched before: only update the settings
            summary["already"] = True
            state.backend = backend
            state.fused_ops = fused_ops
            if state.cache.max_seq_length != max_seq_length or bool(state.graphs) != bool(cuda_graphs):
                state.cache = BlockMaskCache(max_seq_length, headroom_blocks=1 if cuda_graphs else 0)
                state.graphs = None  # its bucket lengths came from the old length: record anew
        else:
            config = backbone.config
            state = PatchState(
                backend=backend,
                fused_ops=fused_ops,
                cache=BlockMaskCache(max_seq_length, headroom_blocks=1 if cuda_graphs else 0),
                original_attn_implementation=config._attn_implementation,
            )
            # Masks that HF still builds (decoding with a cache) must arrive dense, which is
            # what the eager implementation produces.
            config._attn_implementation = "eager"
            _swap_forward(backbone, backbone_forward, state)
            for attention in attentions:
                _swap_forward(attention, attention_forward, state)
            for module in backbone.modules():
                if _fusable(module):
                    forward = {modeling_gemma2.Gemma2DecoderLayer: decoder_layer_forward,
                               modeling_gemma2.Gemma2MLP: mlp_forward}.get(type(module), norm_forward)
                    _swap_forward(module, forward, state)
            backbone._fastgemma_state = state
        state.graph_mode = cuda_graphs
        if cuda_graphs and state.graphs is None and attentions:
            state.graphs = GraphedLayers(_graphed_body, Gemma2GraphInputs(attentions[0]), _lora_states)
        elif not cuda_graphs:
            state.graphs = None
        for module in state.patched:
            module._fastgemma_fused = fused_ops
            if isinstance(module, modeling_gemma2.Gemma2DecoderLayer):
                # Under "auto" a layer is graphed or op by op, never a compiled region without graphs.
                module._fastgemma_compile_layers = compile_layers or cuda_graphs is True
                module._fastgemma_graph_state = state if cuda_graphs else None
        for attention in attentions:
            attention._fastgemma_backend = backend
            attention._fastgemma_kernel_options = flex_kernel_options
            attention._fastgemma_softcap_tanh = softcap_tanh
            summary["layers"] += 1
            summary["sliding" if attention.sliding_window is not None else "global"] += 1
    # The causal-LM training loss without the full logits: patches/gemma2_loss.py.
    from . import gemma2_loss
    gemma2_loss.patch(model)
    return summary


def unpatch(model: torch.nn.Module) -> int:
    """Restore every module patched by `patch`; returns how many forwards were restored."""
    from . import gemma2_loss  # (patches/gemma2_loss.py)
    gemma2_loss.unpatch(model)
    backbones, _ = find_modules(model)
    restored = 0
    for backbone in backbones:
        state = backbone.__dict__.get("_fastgemma_state")
        if state is None:
            continue
        for module, previous in state.patched.items():
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
            for name in SETTING_ATTRIBUTES:
                module.__dict__.pop(name, None)
            restored += 1
        backbone.config._attn_implementation = state.original_attn_implementation
        del backbone._fastgemma_state
    return restored


def graph_lengths(model: torch.nn.Module) -> list:
    """The bucket lengths at which cuda_graphs has recorded this model's layers so far."""
    backbones, _ = find_modules(model)
    states = [b.__dict__.get("_fastgemma_state") for b in backbones]
    return sorted({n for state in states if state is not None and state.graphs is not None
                   for n in state.graphs._lengths})


def is_patched(model: torch.nn.Module) -> bool:
    backbones, _ = find_modules(model)
    return any("_fastgemma_state" in b.__dict__ for b in backbones)
