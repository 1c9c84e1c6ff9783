"""Gemma 2 glue: the replacement attention forward and the per-batch mask builder.

Two instance-level patches (the class is never touched, so two models in one process
stay independent):

- each ``Gemma2Attention.forward`` keeps Hugging Face's projections (module calls, so
  LoRA and 4-bit linears work), RoPE and KV-cache update, then calls
  ``fastgemma.attention.softcap_attention`` instead of HF's eager attention;
- ``Gemma2Model.forward`` first describes the batch's masks as ``AttentionMask`` objects
  (causal / sliding, with packed documents or padding as segment ids) and hands them to
  HF's forward as a prepared mask mapping, so HF never materialises its dense
  (batch, 1, T, T) masks. While decoding with a filled KV cache it leaves masks to HF.
"""

from __future__ import annotations

import inspect
import logging
import types
from dataclasses import dataclass, field

import torch
from transformers.models.gemma2 import modeling_gemma2

from fastgemma.attention import softcap_attention
from fastgemma.masks import (
    AttentionMask,
    BlockMaskCache,
    segments_from_cu_seqlens,
    segments_from_padding_mask,
    segments_from_position_ids,
)
from fastgemma.ops import (
    gelu_tanh_gate,
    lora_linear,
    norm_add,
    norm_add_norm,
    rms_norm,
    rotate_pairs,
)

logger = logging.getLogger("fastgemma")

NAME = "Gemma 2"


def find_modules(model: torch.nn.Module):
    """The Gemma2Model backbones and Gemma2Attention layers inside `model` (plain, PEFT or 4-bit)."""
    backbones = [m for m in model.modules() if isinstance(m, modeling_gemma2.Gemma2Model)]
    attentions = [m for m in model.modules() if isinstance(m, modeling_gemma2.Gemma2Attention)]
    return backbones, attentions


def matches(model: torch.nn.Module) -> bool:
    backbones, attentions = find_modules(model)
    return bool(backbones) and bool(attentions)


@dataclass
class PatchState:
    """What patch_model did to one backbone, so it can be adjusted or undone."""

    backend: str
    fused_ops: object  # True, False or "auto" (fused on CUDA)
    cache: BlockMaskCache
    original_attn_implementation: object
    patched: dict = field(default_factory=dict)  # module -> its own `forward` attribute before, or None


# --------------------------------------------------------------------------------------
# The attention forward
# --------------------------------------------------------------------------------------
def _fused(module, x: torch.Tensor) -> bool:
    """Whether this call runs the fused (compiled) elementwise ops: when training (grad enabled),
    on CUDA under "auto". Inference and decoding run the same maths eagerly, without compiles."""
    setting = module._fastgemma_fused
    if not torch.is_grad_enabled() or setting is False:
        return False
    return setting is True or x.device.type == "cuda"


def attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
    """Gemma2Attention.forward with fastgemma's softcapped attention core."""
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
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)

    output = softcap_attention(
        query,
        key,
        value,
        attention_mask,
        scale=self.scaling,
        softcap=self.attn_logit_softcapping,
        backend=self._fastgemma_backend,
        dropout_p=self.attention_dropout if self.training else 0.0,
        kernel_options=self._fastgemma_kernel_options,
    )
    output = output.transpose(1, 2).reshape(*input_shape, -1)
    return lora_linear(self.o_proj, output, fused), None


# --------------------------------------------------------------------------------------
# The decoder layer, MLP and norms: Gemma 2's "sandwich" norms fused with the residual adds
# --------------------------------------------------------------------------------------
UNIT_OFFSET = 1.0  # Gemma's RMSNorm scales by (1 + weight)


def decoder_layer_forward(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None,
                          past_key_values=None, **kwargs):
    """Gemma2DecoderLayer.forward: norm -> attention -> norm + add + norm -> MLP -> norm + add."""
    fused = _fused(self, hidden_states)
    eps = self.input_layernorm.eps
    normed = rms_norm(hidden_states, self.input_layernorm.weight, eps, UNIT_OFFSET, fused=fused)
    attended, _ = self.self_attn(
        hidden_states=normed,
        position_embeddings=position_embeddings,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        **kwargs,
    )
    stream, normed = norm_add_norm(
        attended, hidden_states, self.post_attention_layernorm.weight, self.pre_feedforward_layernorm.weight,
        eps, UNIT_OFFSET, fused=fused,
    )
    return norm_add(self.mlp(normed), stream, self.post_feedforward_layernorm.weight, eps, UNIT_OFFSET, fused=fused)


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
def build_mask_mapping(config, cache, batch, length, device, attention_mask, position_ids, past_key_values, extra):
    """{"full_attention": AttentionMask, "sliding_attention": AttentionMask}, or None to leave masks to HF.

    Mirrors HF's rules: a 2D `attention_mask` means padding; without one (and without a
    KV cache), packed documents come from `cu_seq_lens_q`, `seq_idx` or `position_ids` resets.
    """
    if past_key_values is not None and past_key_values.get_seq_length() > 0:
        return None  # decoding: queries start after the cached keys
    segments = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            return None  # a custom 4D mask or BlockMask: HF passes it through
        if attention_mask.shape != (batch, length):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, length) = {(batch, length)}"
            )
        segments = segments_from_padding_mask(attention_mask.to(device))
    elif past_key_values is None:
        cu_seqlens = extra.get("cu_seq_lens_q")
        seq_idx = extra.get("seq_idx")
        if cu_seqlens is not None and batch == 1:
            # Even a single-document row keeps segment ids: packed training then runs one
            # compiled mask variant throughout instead of recompiling for the odd plain row.
            segments = segments_from_cu_seqlens(cu_seqlens.to(device), length)
        elif seq_idx is not None and tuple(seq_idx.shape) == (batch, length):
            segments = seq_idx.to(device) if bool((seq_idx != seq_idx[:, :1]).any()) else None
        elif position_ids is not None:
            segments = segments_from_position_ids(position_ids.to(device).expand(batch, length))
    return {
        layer_type: AttentionMask(
            length, length, window=config.sliding_window if layer_type == "sliding_attention" else None,
            segment_ids=segments, cache=cache,
        )
        for layer_type in ("full_attention", "sliding_attention")
    }


def make_backbone_forward(original, state: PatchState):
    parameters = list(inspect.signature(original).parameters)
    positional = [p for p in parameters if p != "kwargs"]

    def backbone_forward(self, *args, **kwargs):
        """Gemma2Model.forward that prepares fastgemma masks, then runs HF's forward."""
        kwargs.update(zip(positional, args))
        attention_mask = kwargs.get("attention_mask")
        if not isinstance(attention_mask, dict):
            embeds = kwargs.get("inputs_embeds")
            tokens = kwargs.get("input_ids")
            reference = tokens if tokens is not None else embeds
            if reference is not None:
                masks = build_mask_mapping(
                    self.config, state.cache, reference.shape[0], reference.shape[1], reference.device,
                    attention_mask, kwargs.get("position_ids"), kwargs.get("past_key_values"), kwargs,
                )
                if masks is not None:
                    kwargs["attention_mask"] = masks
        return original(**kwargs)

    return backbone_forward


# --------------------------------------------------------------------------------------
# Patch / unpatch
# --------------------------------------------------------------------------------------
def _swap_forward(module, new_forward, state: PatchState):
    state.patched[module] = module.__dict__.get("forward")
    module.forward = types.MethodType(new_forward, module)


def patch(model: torch.nn.Module, max_seq_length: int, backend: str, fused_ops="auto",
          flex_kernel_options="auto") -> dict:
    """Patch every Gemma 2 backbone and its attention layers in `model`; returns a summary for logging."""
    backbones, attentions = find_modules(model)
    if any(not getattr(attention, "is_causal", True) for attention in attentions):
        # fastgemma's masks are causal; a bidirectional Gemma 2 variant would be silently wrong.
        raise ValueError("fastgemma supports causal Gemma 2 models only; this one uses bidirectional attention "
                         "(config.use_bidirectional_attention=True)")
    summary = {"layers": 0, "sliding": 0, "global": 0, "already": False}
    for backbone in backbones:
        attentions = [m for m in backbone.modules() if isinstance(m, modeling_gemma2.Gemma2Attention)]
        state = backbone.__dict__.get("_fastgemma_state")
        if state is not None:  # patched before: only update the settings
            summary["already"] = True
            state.backend = backend
            state.fused_ops = fused_ops
            if state.cache.max_seq_length != max_seq_length:
                state.cache = BlockMaskCache(max_seq_length)
        else:
            config = backbone.config
            state = PatchState(
                backend=backend,
                fused_ops=fused_ops,
                cache=BlockMaskCache(max_seq_length),
                original_attn_implementation=config._attn_implementation,
            )
            # Masks that HF still builds (decoding with a cache) must arrive dense, which is
            # what the eager implementation produces.
            config._attn_implementation = "eager"
            _swap_forward(backbone, make_backbone_forward(backbone.forward, state), state)
            for attention in attentions:
                _swap_forward(attention, attention_forward, state)
            for module in backbone.modules():
                if _fusable(module):
                    forward = {modeling_gemma2.Gemma2DecoderLayer: decoder_layer_forward,
                               modeling_gemma2.Gemma2MLP: mlp_forward}.get(type(module), norm_forward)
                    _swap_forward(module, forward, state)
            backbone._fastgemma_state = state
        for module in state.patched:
            module._fastgemma_fused = fused_ops
        for attention in attentions:
            attention._fastgemma_backend = backend
            attention._fastgemma_kernel_options = flex_kernel_options
            summary["layers"] += 1
            summary["sliding" if attention.sliding_window is not None else "global"] += 1
    return summary


def unpatch(model: torch.nn.Module) -> int:
    """Restore every module patched by `patch`; returns how many forwards were restored."""
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
            module.__dict__.pop("_fastgemma_backend", None)
            module.__dict__.pop("_fastgemma_fused", None)
            module.__dict__.pop("_fastgemma_kernel_options", None)
            restored += 1
        backbone.config._attn_implementation = state.original_attn_implementation
        del backbone._fastgemma_state
    return restored


def is_patched(model: torch.nn.Module) -> bool:
    backbones, _ = find_modules(model)
    return any("_fastgemma_state" in b.__dict__ for b in backbones)
