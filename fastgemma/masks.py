"""Attention masks: mask functions, per-token segment ids, block masks and dense masks.

A mask is described once, by a *mask function* in the flex_attention signature
``mask_mod(batch, head, q_idx, kv_idx) -> bool``. The same function drives both
backends: flex_attention evaluates it inside its kernel, and the dense backends
evaluate it on broadcast index grids (``dense_mask``).

Packed documents and padding are carried as *segment ids*: one integer per token,
equal for tokens of the same document, ``PAD_SEGMENT`` (-1) for padding. A token
sees a key only when both have the same non-negative segment id.

Model-agnostic: nothing here knows about Gemma 2.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

logger = logging.getLogger("fastgemma")

PAD_SEGMENT = -1
BLOCK_SIZE = 128  # flex_attention's sparse block size

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------
# Mask functions (flex_attention's mask_mod signature)
# --------------------------------------------------------------------------------------
def causal(b, h, q_idx, kv_idx):
    """A query sees itself and every earlier key."""
    return q_idx >= kv_idx


def sliding_window(window: int) -> MaskMod:
    """Causal, and a query sees exactly `window` keys, itself included: ``0 <= q - k < window``.

    This is Hugging Face's Gemma 2 definition (some peers use ``<=`` and see one key more).
    """

    def sliding_window_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return sliding_window_causal


def within_segments(segment_ids: torch.Tensor, inner: MaskMod) -> MaskMod:
    """`inner`, restricted to pairs in the same segment (document); padding (-1) sees nothing.

    `segment_ids` is (batch, length) and must cover every index the kernel may ask about,
    so callers pad it to a multiple of BLOCK_SIZE with PAD_SEGMENT.
    """

    def same_segment(b, h, q_idx, kv_idx):
        q_seg = segment_ids[b, q_idx]
        kv_seg = segment_ids[b, kv_idx]
        return inner(b, h, q_idx, kv_idx) & (q_seg == kv_seg) & (kv_seg >= 0)

    return same_segment


def causal_mask_mod(window: Optional[int]) -> MaskMod:
    """Plain causal, or causal with a sliding window when `window` is set.

    The window stays a Python int, so sliding and global layers compile separately.
    Capturing it as a 0-d tensor instead, to share one kernel, gave wrong gradients in
    torch 2.11's compiled flex_attention backward (forward outputs were right).
    """
    return causal if window is None else sliding_window(window)


# --------------------------------------------------------------------------------------
# Segment ids from what a batch carries
# --------------------------------------------------------------------------------------
def segments_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of every token of each row: a new document starts wherever the position does not
    follow the previous one by 1 (TRL's and HF's padding-free batches restart positions at 0 for each).

    A row holding one document gets all zeros, which masks exactly as plain causal attention: telling
    the two apart would read a GPU value back (a host sync, which at each micro-step waits for the
    previous backward), and one kind of mask for every batch keeps one compiled variant.
    """
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be (batch, length), got shape {tuple(position_ids.shape)}")
    step = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1)
    return (step != 1).cumsum(-1)


def segments_from_cu_seqlens(cu_seqlens: torch.Tensor, length: int, deferred: Optional[list] = None) -> torch.Tensor:
    """Document index of every token of one packed row from cumulative lengths ``[0, l0, l0+l1, ..., T]``.

    The lengths are checked at once, unless `deferred` (a list) is given and they live on a GPU: then a
    `DeferredCheck` is appended to it, for the caller to run once the batch's work is queued. Reading a GPU
    value now would make the host wait for all the work queued before it (at each micro-step, the previous
    backward), leaving the GPU idle while the host then prepares this forward. The segment ids themselves
    need no value read back.
    """
    cu = cu_seqlens.to(torch.long).flatten()
    if cu.numel() < 2:
        raise ValueError(f"cu_seq_lens must hold at least [0, {length}], got {cu.numel()} value(s)")
    valid = (cu[0] == 0) & (cu[-1] == length) & (cu.diff() >= 0).all()
    check = DeferredCheck(valid, lambda: f"cu_seq_lens must start at 0, never decrease and end at the packed "
                                         f"length {length}; got {cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''}")
    if deferred is None or cu.device.type != "cuda":
        check.raise_if_failed()
    else:
        deferred.append(check)
    # Token t is in document i when cu[i] <= t < cu[i+1]; searchsorted needs no output size from the host
    # (repeat_interleave would read the lengths' sum back).
    tokens = torch.arange(length, device=cu.device)
    return torch.searchsorted(cu[1:].contiguous(), tokens, right=True)[None]


class DeferredCheck:
    """A condition computed on the device, read on the host later without stalling the queue.

    On a GPU the flag's copy to pinned host memory is queued behind the kernels computing it, so
    `raise_if_failed`, called once the batch's work is queued, waits for the copy and not for the
    work queued after it. Elsewhere the flag is read directly.
    """

    def __init__(self, ok: torch.Tensor, message):
        self.message = message  # a string, or a function making one (it may read device values: error path only)
        self.event = None
        if ok.device.type == "cuda":
            self.flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.flag.copy_(ok, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.flag = ok

    def raise_if_failed(self) -> None:
        if self.event is not None:
            self.event.synchronize()
        if not bool(self.flag):
            raise ValueError(self.message() if callable(self.message) else self.message)


def segments_from_padding_mask(attention_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Segment ids for a 2D keep-mask (1 = real token), or None when the batch is right-padded.

    Right padding needs no mask beyond causal: real tokens come first, so causality alone
    keeps them from seeing the padding after them, and padded positions carry no loss.
    Anything else (left padding, holes) gets per-token segments: real tokens 0, padding -1.
    """
    keep = attention_mask.bool()
    if bool((keep[:, 1:] <= keep[:, :-1]).all()):  # every row is 1...1 0...0
        return None
    return torch.where(keep, 0, PAD_SEGMENT)


def pad_segments(segment_ids: torch.Tensor, length: int) -> torch.Tensor:
    """Pad segment ids on the right with PAD_SEGMENT to `length` (a block multiple)."""
    missing = length - segment_ids.shape[-1]
    if missing <= 0:
        return segment_ids
    return torch.nn.functional.pad(segment_ids, (0, missing), value=PAD_SEGMENT)


# --------------------------------------------------------------------------------------
# Block-level sparsity, computed directly (no mask_mod evaluation over the full grid)
# --------------------------------------------------------------------------------------
def _block_grids(num_blocks, valid_length, window, segment_ids, device):
    """Which (q_block, kv_block) tiles have some allowed pair ("partial") and which have all pairs allowed.

    Tiles past `valid_length` are empty, so a mask padded to a fixed length costs nothing
    there. Each test bounds a whole tile: `partial` may include a tile with no allowed pair
    (harmless, the kernel applies the mask there); `full` is exact.
    """
    blocks = torch.arange(num_blocks, device=device)
    q_block, kv_block = blocks[:, None], blocks[None, :]
    valid_blocks = math.ceil(valid_length / BLOCK_SIZE)
    # causal: a tile has an allowed pair when kv_block <= q_block, all pairs when kv_block < q_block
    partial = (kv_block <= q_block) & (q_block < valid_blocks)
    full = (kv_block < q_block) & (q_block < valid_blocks)
    if window is not None:
        min_distance = (q_block - kv_block) * BLOCK_SIZE - (BLOCK_SIZE - 1)
        max_distance = (q_block - kv_block) * BLOCK_SIZE + (BLOCK_SIZE - 1)
        partial = partial & (min_distance < window)
        full = full & (max_distance < window)
    partial, full = partial[None, None], full[None, None]  # (1, 1, n, n)
    if segment_ids is not None:
        tiles = segment_ids.view(segment_ids.shape[0], num_blocks, BLOCK_SIZE)
        seg_min, seg_max = tiles.amin(-1), tiles.amax(-1)  # (B, n)
        q_min, q_max = seg_min[:, :, None], seg_max[:, :, None]
        kv_min, kv_max = seg_min[:, None, :], seg_max[:, None, :]
        overlap = (kv_max >= 0) & (kv_min <= q_max) & (q_min <= kv_max)
        one_segment = (q_min == q_max) & (kv_min == kv_max) & (q_min == kv_min) & (kv_min >= 0)
        partial = partial & overlap[:, None]
        full = full & one_segment[:, None]
    return partial, full


def _to_block_indices(blocks: torch.Tensor):
    """(..., rows, cols) bool tiles -> (count per row, column indices with the used ones first)."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, indices


def make_block_mask(partial: torch.Tensor, full: torch.Tensor, mask_mod: MaskMod, length: int):
    """Assemble a flex_attention BlockMask from (B, H, n, n) tile grids; only non-full tiles run `mask_mod`.

    All four index lists (key-major for the forward, query-major for the backward) come
    from one sort of the stacked grids and their transposes: a handful of kernel launches,
    far cheaper than torch's generic transposition of index lists.
    """
    from torch.nn.attention.flex_attention import BlockMask

    partial = partial & ~full
    batch = max(partial.shape[0], full.shape[0])
    grids = [g.expand(batch, *g.shape[1:]) for g in (partial, full, partial.transpose(-1, -2), full.transpose(-1, -2))]
    counts, indices = _to_block_indices(torch.stack(grids))
    kv_blocks = (counts[0], indices[0], counts[1], indices[1])
    try:
        block_mask = BlockMask.from_kv_blocks(
            *kv_blocks, BLOCK_SIZE=BLOCK_SIZE, mask_mod=mask_mod, seq_lengths=(length, length), compute_q_blocks=False
        )
    except TypeError:  # torch without compute_q_blocks: let it transpose
        return BlockMask.from_kv_blocks(*kv_blocks, BLOCK_SIZE=BLOCK_SIZE, mask_mod=mask_mod, seq_lengths=(length, length))
    block_mask.q_num_blocks, block_mask.q_indices = counts[2], indices[2]
    block_mask.full_q_num_blocks, block_mask.full_q_indices = counts[3], indices[3]
    return block_mask


def split_kv_blocks(block_mask, kv_block: int):
    """The same BlockMask with every key block cut into blocks of `kv_block` keys (query blocks unchanged).

    A tile of a partial block stays partial (the mask function decides inside it, and a part with no
    allowed pair costs a skipped tile), a full block's parts are full. Key indices stay sorted with the
    used ones first, as `make_block_mask` lays them out.
    """
    from torch.nn.attention.flex_attention import BlockMask

    q_block, old_kv_block = block_mask.BLOCK_SIZE
    if kv_block <= 0 or old_kv_block % kv_block:
        raise ValueError(f"kv_block must divide the block mask's key block of {old_kv_block}, got {kv_block}")
    parts = old_kv_block // kv_block

    def split(counts, indices):
        if counts is None:
            return None, None
        offsets = torch.arange(parts, device=indices.device, dtype=indices.dtype)
        return counts * parts, (indices[..., None] * parts + offsets).flatten(-2)

    return BlockMask.from_kv_blocks(
        *split(block_mask.kv_num_blocks, block_mask.kv_indices),
        *split(block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
        BLOCK_SIZE=(q_block, kv_block), mask_mod=block_mask.mask_mod, seq_lengths=block_mask.seq_lengths,
    )


def dense_mask(mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Evaluate `mask_mod` on broadcast index grids: a (batch, 1, q_len, kv_len) bool tensor."""
    b = torch.arange(batch, device=device)[:, None, None, None]
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q = torch.arange(q_len, device=device)[None, None, :, None]
    kv = torch.arange(kv_len, device=device)[None, None, None, :]
    allowed = mask_mod(b, h, q, kv)
    return allowed.expand(batch, 1, q_len, kv_len)


def round_up(length: int, multiple: int = BLOCK_SIZE) -> int:
    return math.ceil(length / multiple) * multiple


# --------------------------------------------------------------------------------------
# Cache of the plain causal / sliding block masks
# --------------------------------------------------------------------------------------
class BlockMaskCache:
    """Block masks at one fixed length, shared by all layers and steps.

    flex_attention is compiled for static shapes: every batch is padded to `length`
    (max_seq_length rounded up to a block), so batches of any shorter length reuse one
    compiled kernel. Tiles past a batch's real length are empty, so the padding costs no
    attention work. The causal and sliding tile grids are built once per (length, window,
    device); each batch length only masks off the tail. A batch longer than `length` grows
    it (doubling, with a warning: one recompile) rather than being wrong.
    """

    MAX_KEPT = 64  # distinct batch lengths whose BlockMask is kept

    def __init__(self, max_seq_length: int, headroom_blocks: int = 0):
        if not isinstance(max_seq_length, int) or isinstance(max_seq_length, bool) or max_seq_length <= 0:
            raise ValueError(f"max_seq_length must be a positive int, got {max_seq_length!r}")
        self.max_seq_length = max_seq_length
        # Empty blocks past the longest batch (they cost no attention work): a compiled layer whose
        # batches sometimes fill the fixed length exactly would otherwise compile a second variant
        # (flex's inputs need no padding then), as the CUDA-graphed layers' longest bucket does.
        self.length = round_up(max_seq_length) + headroom_blocks * BLOCK_SIZE
        self._grids: dict = {}
        self._masks: dict = {}

    def __getstate__(self):
        # Cached block masks hold mask functions (closures) and device tensors: a deep copy or an
        # unpickled model rebuilds its own on first use.
        return {**self.__dict__, "_grids": {}, "_masks": {}}

    def length_for(self, length: int) -> int:
        """The fixed length a batch of `length` tokens is padded to (grown if needed)."""
        if length > self.length:
            new_length = self.length
            while new_length < length:
                new_length *= 2
            logger.warning(
                "fastgemma: batch of %d tokens exceeds max_seq_length=%d; growing the block masks to %d "
                "(flex_attention recompiles once). Pass a larger max_seq_length to patch_model to avoid this.",
                length, self.max_seq_length, new_length,
            )
            self.length = new_length
            self._grids.clear()
            self._masks.clear()
        return self.length

    def get(self, length: int, window: Optional[int], device):
        """The causal (or sliding, when `window` is set) BlockMask for a batch of `length` tokens."""
        padded = self.length_for(length)
        key = (length, window, str(device))
        mask = self._masks.get(key)
        if mask is None:
            grid_key = (padded, window, str(device))
            if grid_key not in self._grids:
                self._grids[grid_key] = _block_grids(padded // BLOCK_SIZE, padded, window, None, device)
            partial, full = self._grids[grid_key]
            valid = torch.arange(padded // BLOCK_SIZE, device=device) < math.ceil(length / BLOCK_SIZE)
            valid_rows = valid[:, None]  # tiles of padding queries: nothing to compute
            mask = make_block_mask(partial & valid_rows, full & valid_rows, causal_mask_mod(window), padded)
            if len(self._masks) >= self.MAX_KEPT:
                self._masks.pop(next(iter(self._masks)))
            self._masks[key] = mask
        return mask


# --------------------------------------------------------------------------------------
# The mask object handed to attention layers
# --------------------------------------------------------------------------------------
@dataclass(eq=False)
class AttentionMask:
    """Everything an attention layer needs to know about one batch's mask, for one layer type.

    Queries and keys both start at position 0 (training, or a prefill with an empty cache).
    `segment_ids` is None for a plain causal batch (no packing, no padding that matters),
    else (batch, length) ids per document with -1 for padding. Block and dense masks are
    built lazily, once, and shared by every layer this object is handed to.
    """

    q_len: int
    kv_len: int
    window: Optional[int] = None
    segment_ids: Optional[torch.Tensor] = None
    cache: Optional[BlockMaskCache] = None
    _block_mask: object = field(default=None, repr=False)
    _dense: Optional[torch.Tensor] = field(default=None, repr=False)
    _narrow_block_masks: dict = field(default_factory=dict, repr=False)  # kv_block -> BlockMask

    def __post_init__(self):
        if self.q_len != self.kv_len:
            raise ValueError(f"AttentionMask needs q_len == kv_len, got {self.q_len} and {self.kv_len}")
        if self.segment_ids is not None and (self.segment_ids.dim() != 2 or self.segment_ids.shape[-1] != self.kv_len):
            raise ValueError(f"segment_ids must be (batch, {self.kv_len}), got {tuple(self.segment_ids.shape)}")

    @property
    def padded_length(self) -> int:
        """The length flex_attention runs at: the cache's fixed length, or the next block multiple."""
        return self.cache.length_for(self.kv_len) if self.cache is not None else round_up(self.kv_len)

    def _segments(self, device, length):
        return pad_segments(self.segment_ids.to(device=device, dtype=torch.int32), length)

    def mask_mod(self, device) -> MaskMod:
        """This batch's mask as a mask function (what the dense backends evaluate)."""
        inner = causal_mask_mod(self.window)
        if self.segment_ids is None:
            return inner
        return within_segments(self._segments(device, round_up(self.kv_len)), inner)

    def block_mask(self, device, kv_block: Optional[int] = None):
        """The flex_attention BlockMask at `padded_length` (batch 1 and broadcast when plain).

        `kv_block`: key blocks of that many keys (a divisor of BLOCK_SIZE) instead of BLOCK_SIZE, for
        kernels whose tiles span fewer keys (`split_kv_blocks`); built from the same mask, kept apart.
        """
        if kv_block is not None and kv_block != BLOCK_SIZE:
            if kv_block not in self._narrow_block_masks:
                self._narrow_block_masks[kv_block] = split_kv_blocks(self.block_mask(device), kv_block)
            return self._narrow_block_masks[kv_block]
        if self._block_mask is None:
            length = self.padded_length
            if self.segment_ids is None:
                cache = self.cache or BlockMaskCache(length)
                self._block_mask = cache.get(self.kv_len, self.window, device)
            else:
                segments = self._segments(device, length)
                partial, full = _block_grids(length // BLOCK_SIZE, length, self.window, segments, device)
                mask_mod = within_segments(segments, causal_mask_mod(self.window))
                self._block_mask = make_block_mask(partial, full, mask_mod, length)
        return self._block_mask

    def dense(self, device) -> torch.Tensor:
        """A (batch or 1, 1, q_len, kv_len) bool mask for the dense backends."""
        if self._dense is None:
            batch = 1 if self.segment_ids is None else self.segment_ids.shape[0]
            self._dense = dense_mask(self.mask_mod(device), batch, self.q_len, self.kv_len, device)
        return self._dense
