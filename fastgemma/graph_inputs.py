"""Static rotary tables and masks for CUDA-graphed decoder layers: what a layer receives besides its input.

Any decoder layer that takes ``position_embeddings=(cos, sin)`` and an `AttentionMask` binds its per-batch
inputs this way (one set of static buffers per mask kind and bucket length; see fastgemma.graphs).
Stateless, so a patched model's graph machinery pickles without the model.
"""

from __future__ import annotations

import copy

from .graphs import StaticBinder
from .masks import AttentionMask, flex_mask_mod
from .ops.compile import mark_dynamic
from .static_buffers import copy_padded, static_like


class RotaryMaskInputs(StaticBinder):
    """Binds ``(cos, sin, mask, flex)``: copies of the rotary tables and of the mask's block masks (`flex`
    True: the attention runs flex_attention) or dense mask."""

    BLOCK_MASK_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")

    def key(self, sources, length):
        cos, sin, mask, flex = sources
        if flex:
            block = mask.block_mask(cos.device)
            kind = ("flex", mask.kind, tuple(block.kv_indices.shape), block.seq_lengths)
        else:
            dense = mask.dense(cos.device)
            kind = ("dense", tuple(dense.shape[:2]), dense.dtype)  # int8 for padded batches (uniform rows)
        return (mask.window, kind, tuple(cos.shape[:1]), cos.shape[-1], cos.dtype, str(cos.device), length)

    def make(self, sources, length):
        cos, sin, mask, flex = sources
        device = cos.device
        static = {"cos": static_like(cos, length), "sin": static_like(sin, length)}
        for tensor in (static["cos"], static["sin"]):
            mark_dynamic(tensor)
        if flex:
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
        cos, sin, mask, _ = sources
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
