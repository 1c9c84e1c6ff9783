"""A batch's masks, built once in the backbone's forward and handed to transformers as a prepared mask mapping.

transformers' decoder stacks take ``attention_mask`` as a mapping from layer type ("full_attention",
"sliding_attention") to the mask its layers read; fastgemma fills it with `AttentionMask` objects (causal or
sliding, packed documents as segment ids, padding as real-token flags), so transformers never materialises
its dense (batch, 1, T, T) masks. While decoding with a filled KV cache it leaves masks to transformers.
"""

from __future__ import annotations

from typing import Optional

import torch

from .hf_layers import cache_in
from .masks import (
    AttentionMask,
    BlockMaskCache,
    real_tokens_from_padding_mask,
    segments_from_cu_seqlens,
    segments_from_position_ids,
)

LAYER_TYPES = ("full_attention", "sliding_attention")


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
    if kv_cache is not None and not cache_is_plain(kv_cache, length, config):
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
    causal = AttentionMask(length, length, segment_ids=segments, cache=cache, real_tokens=real_tokens)
    window = sliding_window_within(config, length)
    if window is None:  # one mask for both kinds: one compiled layer body and one flex kernel serve them all
        return dict.fromkeys(LAYER_TYPES, causal)
    sliding = AttentionMask(length, length, window=window, segment_ids=segments, cache=cache, real_tokens=real_tokens)
    return {"full_attention": causal, "sliding_attention": sliding}


def sliding_window_within(config, length: int) -> Optional[int]:
    """The sliding layers' window where it hides keys from a call of `length` tokens, else None: a query sees
    the keys with ``0 <= q - k < window``, and no two positions of a shorter call are that far apart."""
    window = getattr(config, "sliding_window", None)
    return window if window is not None and length > window else None


def cache_is_plain(kv_cache, length: int, config) -> bool:
    """Whether every layer's attention will see exactly this call's `length` keys from position 0: an empty
    dynamic cache does, a filled one (decoding) or a static one (keys padded to its capacity) does not."""
    if kv_cache.get_seq_length() > 0:
        return False
    layer_types = getattr(config, "layer_types", None) or ()
    first_of_each = {kind: layer_types.index(kind) for kind in set(layer_types)}.values() or (0,)
    return all(tuple(kv_cache.get_mask_sizes(length, index)) == (length, 0) for index in first_of_each)


def mask_cache(options) -> BlockMaskCache:
    """The block-mask cache for a model patched with `options` (a fastgemma.PatchOptions)."""
    # Graphed layers' longest bucket would fill the masks' fixed length exactly: one empty block of head-room.
    return BlockMaskCache(options.max_row_tokens, headroom_blocks=1 if options.layer_graphs else 0)


def add_mask_mapping(config, cache: BlockMaskCache, kwargs: dict, deferred: Optional[list] = None) -> None:
    """Replace a backbone call's ``attention_mask`` in `kwargs` with fastgemma's mask mapping, where it applies
    (see `build_mask_mapping`); a mapping the caller prepared itself is left as it is."""
    attention_mask = kwargs.get("attention_mask")
    if isinstance(attention_mask, dict):
        return
    tokens, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    reference = tokens if tokens is not None else embeds
    if reference is None:
        return
    masks = build_mask_mapping(
        config, cache, reference.shape[0], reference.shape[1], reference.device,
        attention_mask, kwargs.get("position_ids"), cache_in(kwargs), kwargs, deferred,
    )
    if masks is not None:
        kwargs["attention_mask"] = masks
