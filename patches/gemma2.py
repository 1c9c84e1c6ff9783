"""Gemma 2 glue: its forwards, what of it is fusable, and the patch / unpatch wiring.

Instance-level patches (`fastgemma.patching`: the class is never touched, so two models in one process stay
independent):

- each ``Gemma2Attention.forward`` keeps Hugging Face's projections (module calls, so LoRA and 4-bit
  linears work), RoPE and KV-cache update, then calls ``fastgemma.attention.softcap_attention`` instead of
  HF's eager attention;
- each ``Gemma2DecoderLayer.forward`` fuses Gemma's sandwich norms with the residual adds and keeps HF's
  gradient checkpointing; while training it runs as CUDA graphs or one compiled region when the options
  say so (`fastgemma.graph_policy`, `fastgemma.regions`);
- ``Gemma2Model.forward`` first describes the batch's masks as ``AttentionMask`` objects and hands them
  to HF's forward as a prepared mask mapping (`fastgemma.backbone.backbone_forward`).
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers.models.gemma2 import modeling_gemma2

from fastgemma.attention import dense_softcap_attention, flex_padded_length, softcap_attention
from fastgemma.backbone import backbone_forward
from fastgemma.graph_policy import graphed_layers, graphs_apply, run_graphed
from fastgemma.hf_layers import cache_in, checkpoint_function, pop_cache, run_checkpointed
from fastgemma.mask_mapping import mask_cache
from fastgemma.masks import AttentionMask
from fastgemma.ops import gelu_tanh_gate, lora_linears, norm_add, norm_add_norm, rms_norm, rotate_pairs, rotated_heads
from fastgemma.options import PatchOptions, fused_here
from fastgemma.patching import (
    PatchState,
    call_module,
    has_global_hooks,
    has_own_hooks,
    restore_forwards,
    set_state,
    state_of,
    swap_forward,
    unwrapped,
)
from fastgemma.regions import region_applies, run_region
from fastgemma.step_memory import set_budget

from .gemma2_check import self_check  # noqa: F401  (the patcher's check for untested versions)
from . import gemma2_loss

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


# What this transformers calls the KV cache in Gemma 2's forwards.
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(modeling_gemma2.Gemma2Model.forward).parameters \
    else "past_key_values"


# --------------------------------------------------------------------------------------
# The attention forward
# --------------------------------------------------------------------------------------
def attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """Gemma2Attention.forward with fastgemma's softcapped attention core.

    Returns ``(output, weights)``: weights are None unless the caller asked for
    ``output_attentions``; then this layer runs the dense path, which can return them.
    """
    legacy = pop_cache(kwargs)
    cache = cache if cache is not None else legacy
    padded = None if cache is not None or kwargs.get("output_attentions") else \
        flex_length(self, attention_mask, hidden_states)
    query, key, value = queries_keys_values(self, hidden_states, position_embeddings, padded)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    output, weights = attention_core(self, query, key, value, attention_mask, kwargs.get("output_attentions"))
    return attention_output(self, output, hidden_states), weights


def flex_length(self, attention_mask, hidden_states):
    """The length to write query, key and value padded to for flex (`flex_padded_length`), where RoPE runs fused
    op by op; None elsewhere (a compiled region fuses flex's own padding)."""
    if not fused_here(self, hidden_states) or torch.compiler.is_compiling():
        return None
    return flex_padded_length(attention_mask, state_of(self).options.backend, hidden_states.device, self.head_dim,
                              attention_dropout(self))


def queries_keys_values(self, hidden_states, position_embeddings, padded_length=None):
    """The projections (module calls: LoRA and 4-bit linears work) and RoPE, as (batch, heads, tokens, dim); with
    `padded_length` (fused only), contiguous and padded with zero rows to that many tokens."""
    fused = fused_here(self, hidden_states)
    hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    projections = lora_linears((self.q_proj, self.k_proj, self.v_proj), hidden_states, fused)
    cos, sin = position_embeddings
    if fused and padded_length is not None:
        return rotated_heads(*projections, cos, sin, self.head_dim, padded_length)
    query, key, value = (projection.view(hidden_shape).transpose(1, 2) for projection in projections)
    if fused:
        return (*rotate_pairs(query, key, cos, sin), value)
    # HF's own function, so anything that replaces it (a hub kernel, another patch) still applies
    return (*modeling_gemma2.apply_rotary_pos_emb(query, key, cos, sin), value)


def attention_dropout(self) -> float:
    """The attention's dropout probability for this call: it decides the backend, so whether RoPE pads for flex."""
    return self.attention_dropout if self.training else 0.0


def attention_core(self, query, key, value, attention_mask, output_attentions=False):
    """Softcapped attention (the dense path when the caller wants the weights): (output, weights or None)."""
    options = state_of(self).options
    dropout_p = attention_dropout(self)
    if output_attentions:
        mask = attention_mask.dense(query.device) if isinstance(attention_mask, AttentionMask) else attention_mask
        return dense_softcap_attention(
            query, key, value, mask, self.scaling, self.attn_logit_softcapping, dropout_p, return_weights=True,
        )
    output = softcap_attention(
        query,
        key,
        value,
        attention_mask,
        scale=self.scaling,
        softcap=self.attn_logit_softcapping,
        backend=options.backend,
        dropout_p=dropout_p,
        kernel_options=options.flex_kernel_options,
        softcap_tanh=options.softcap_tanh,
    )
    return output, None


def attention_output(self, output, hidden_states):
    """The heads joined and projected back (o_proj) to `hidden_states`' shape."""
    output = output.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
    return lora_linears((self.o_proj,), output, fused_here(self, hidden_states))[0]


# --------------------------------------------------------------------------------------
# The decoder layer, MLP and norms: Gemma 2's "sandwich" norms fused with the residual adds
# --------------------------------------------------------------------------------------
UNIT_OFFSET = 1.0  # Gemma's RMSNorm scales by (1 + weight)


def decoder_layer_forward(self, hidden_states, *args, **kwargs):
    """Gemma2DecoderLayer.forward with fused norms, under HF's gradient checkpointing when it is on; while
    training, replayed as CUDA graphs or run as one compiled region when the patch options say so."""
    state = state_of(self)
    if state.graphs is not None and graphs_apply(self, state, hidden_states, kwargs):
        return run_graphed(self, self.self_attn, state, hidden_states, kwargs)
    if state.options.compiles_layers and region_applies(self, hidden_states):
        return run_region(checkpointed_layer, self, self.self_attn, hidden_states, *args, **kwargs)
    if self in state.attention_saved_layers:  # the memory budget saves this layer's attention
        return attention_saved_layer(self, hidden_states, *args, **kwargs)
    return checkpointed_layer(self, hidden_states, *args, **kwargs)


def checkpointed_layer(self, hidden_states, *args, checkpoint=None, **kwargs):
    """The layer body under HF's gradient checkpointing when it is on (`checkpoint` replaces HF's function)."""
    return run_checkpointed(self, decoder_layer_body, hidden_states, *args, checkpoint=checkpoint, **kwargs)


def decoder_layer_body(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None,
                       **kwargs):
    """norm -> attention -> norm + add + norm -> MLP -> norm + add (Gemma 2's decoder layer)."""
    cache = pop_cache(kwargs)
    fused = fused_here(self, hidden_states)
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
    return after_attention(self, attended, hidden_states)


def after_attention(self, attended, hidden_states):
    """norm + add + norm -> MLP -> norm + add: the layer's second half, from its attention's projected output."""
    fused, eps = fused_here(self, hidden_states), self.input_layernorm.eps
    stream, normed = norm_add_norm(
        attended, hidden_states, self.post_attention_layernorm.weight, self.pre_feedforward_layernorm.weight,
        eps, UNIT_OFFSET, fused=fused,
    )
    return norm_add(call_module(self.mlp, normed), stream, self.post_feedforward_layernorm.weight, eps, UNIT_OFFSET,
                    fused=fused)


def attention_saved_layer(self, hidden_states, *args, position_embeddings=None, attention_mask=None, **kwargs):
    """The layer checkpointed in two pieces around its attention, whose inputs and output stay saved: the backward
    recomputes the norms, projections and MLP, not the attention. Where its attention module is hooked (or the
    call is not the usual training call) the whole layer is checkpointed instead."""
    checkpoint = checkpoint_function(self)
    if args or cache_in(kwargs) is not None or kwargs.get("output_attentions") or has_global_hooks() \
            or has_own_hooks(self.self_attn):
        body = functools.partial(decoder_layer_body, self, *args, position_embeddings=position_embeddings,
                                 attention_mask=attention_mask, **kwargs)
        return checkpoint(body, hidden_states)
    padded = flex_length(self.self_attn, attention_mask, hidden_states)
    query, key, value = checkpoint(functools.partial(_attention_inputs, self, position_embeddings, padded),
                                   hidden_states)
    output, _ = attention_core(self.self_attn, query, key, value, attention_mask)
    return checkpoint(functools.partial(_after_attention, self), output, hidden_states)


def _attention_inputs(self, position_embeddings, padded_length, hidden_states):
    normed = rms_norm(hidden_states, self.input_layernorm.weight, self.input_layernorm.eps, UNIT_OFFSET,
                      fused=fused_here(self, hidden_states))
    return queries_keys_values(self.self_attn, normed, position_embeddings, padded_length)


def _after_attention(self, output, hidden_states):
    return after_attention(self, attention_output(self.self_attn, output, hidden_states), hidden_states)


def mlp_forward(self, x):
    """Gemma2MLP.forward with the GeGLU gate fused (and LoRA adapters added inside their GEMMs)."""
    fused = fused_here(self, x)
    gate, up = lora_linears((self.gate_proj, self.up_proj), x, fused)
    return lora_linears((self.down_proj,), gelu_tanh_gate(gate, up, fused=fused), fused)[0]


def norm_forward(self, x):
    """Gemma2RMSNorm.forward, fused."""
    return rms_norm(x, self.weight, self.eps, UNIT_OFFSET, fused=fused_here(self, x))


def fusable(module) -> bool:
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
# Patch / unpatch
# --------------------------------------------------------------------------------------
FORWARDS = {modeling_gemma2.Gemma2DecoderLayer: decoder_layer_forward, modeling_gemma2.Gemma2MLP: mlp_forward,
            modeling_gemma2.Gemma2RMSNorm: norm_forward}


def patch(model: torch.nn.Module, options: PatchOptions) -> dict:
    """Patch every Gemma 2 backbone and its attention layers in `model`; returns a summary for logging."""
    check_supported(model)
    backbones, _ = find_modules(model)
    summary = {"layers": 0, "sliding": 0, "global": 0, "already": False}
    for backbone in backbones:
        attentions = [m for m in backbone.modules() if isinstance(m, modeling_gemma2.Gemma2Attention)]
        state = state_of(backbone)
        if state is not None:  # patched before: only update the settings
            summary["already"] = True
            before, state.options = state.options, options
            if (before.max_row_tokens != options.max_row_tokens
                    or bool(before.layer_graphs) != bool(options.layer_graphs)):
                state.cache = mask_cache(options)
                state.graphs = None  # its bucket lengths came from the old length: record anew
        else:
            config = backbone.config
            state = PatchState(options=options, cache=mask_cache(options),
                               original_attn_implementation=config._attn_implementation)
            # Masks that HF still builds (decoding with a cache) must arrive dense, which is
            # what the eager implementation produces.
            config._attn_implementation = "eager"
            swap_forward(backbone, backbone_forward, state.patched)
            for attention in attentions:
                swap_forward(attention, attention_forward, state.patched)
            for module in backbone.modules():
                if fusable(module):
                    swap_forward(module, FORWARDS[type(module)], state.patched)
            for module in state.patched:
                set_state(module, state)
        if options.layer_graphs and state.graphs is None and attentions:
            state.graphs = graphed_layers(decoder_layer_body)
        elif not options.layer_graphs:
            state.graphs = None
        set_budget(state, options)
        for attention in attentions:
            summary["layers"] += 1
            summary["sliding" if attention.sliding_window is not None else "global"] += 1
    gemma2_loss.patch(model)  # the causal-LM training loss without the full logits
    return summary


def unpatch(model: torch.nn.Module) -> int:
    """Restore every module patched by `patch`; returns how many forwards were restored."""
    gemma2_loss.unpatch(model)
    backbones, _ = find_modules(model)
    restored = 0
    for backbone in backbones:
        state = state_of(backbone)
        if state is None:
            continue
        restored += restore_forwards(state.patched)
        state.dense_weights.release()
        backbone.config._attn_implementation = state.original_attn_implementation
    return restored


def graph_lengths(model: torch.nn.Module) -> list:
    """The bucket lengths at which cuda_graphs has recorded this model's layers so far."""
    backbones, _ = find_modules(model)
    states = [state_of(b) for b in backbones]
    return sorted({n for state in states if state is not None and state.graphs is not None
                   for n in state.graphs.lengths})


def is_patched(model: torch.nn.Module) -> bool:
    backbones, _ = find_modules(model)
    return any(state_of(b) is not None for b in backbones)
