"""Attention masks: mask functions, per-token segment ids, block masks and dense masks.

A mask is described once, by a *mask function* in the flex_attention signature
``mask_mod(batch, head, q_idx, kv_idx) -> bool``. The same function drives both
backends: flex_attention evaluates it inside its kernel, and the dense backends
evaluate it on broadcast index grids (``dense_mask``).

Packed documents are carried as *segment ids*: one integer per token, equal for tokens
of the same document. Padding (a 2D ``attention_mask``'s zeros) is carried apart, as a
per-token flag, and follows Hugging Face eager exactly: it hides keys only. A padded query
still sees the real keys before it (causal, within the window and its document); a query
left with no real key at all averages every key of its row uniformly (see `padding_ids`).

Model-agnostic: nothing here knows about Gemma 2.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

logger = logging.getLogger("fastgemma")

PAD_SEGMENT = -1  # segment id of keys never seen: padding, and the fill past a batch's tokens
BLOCK_SIZE = 128  # flex_attention's sparse block size

# Ids of padded batches (`padding_ids`) beside documents (>= 0) and PAD_SEGMENT:
UNIFORM_ROW = -3  # a query with no real key to see: it averages every key of its row uniformly
_TAIL_KEY = -2  # a key past the batch's tokens (the fill to a block multiple): never seen
_TAIL_QUERY = -4  # a query past the batch's tokens: sees nothing

# Entries of a padded batch's dense mask (int8): hidden, allowed, or a key of a uniform row.
DENSE_UNIFORM = 2

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
    """`inner`, restricted to pairs in the same segment (document); PAD_SEGMENT (-1) sees nothing.

    `segment_ids` is (batch, length) and must cover every index the kernel may ask about,
    so callers pad it to a multiple of BLOCK_SIZE with PAD_SEGMENT.
    """

    def same_segment(b, h, q_idx, kv_idx):
        q_seg = segment_ids[b, q_idx]
        kv_seg = segment_ids[b, kv_idx]
        return inner(b, h, q_idx, kv_idx) & (q_seg == kv_seg) & (kv_seg >= 0)

    return same_segment


def real_keys(query_ids: torch.Tensor, key_ids: torch.Tensor, inner: MaskMod) -> MaskMod:
    """`inner`, restricted to the real keys of the query's document; a UNIFORM_ROW query sees every key of its row.

    `query_ids` and `key_ids` come from `padding_ids`: padded keys (PAD_SEGMENT) match no query's document.
    The uniform rows' keys are all those before the tail, future ones included, as in HF eager's softmax
    over a row of equal scores; `uniform_rows` makes those scores equal.
    """

    def real_keys_of_the_document(b, h, q_idx, kv_idx):
        q_id, kv_id = query_ids[b, q_idx], key_ids[b, kv_idx]
        return (inner(b, h, q_idx, kv_idx) & (q_id == kv_id)) | ((q_id == UNIFORM_ROW) & (kv_id >= PAD_SEGMENT))

    return real_keys_of_the_document


def uniform_rows(query_ids: torch.Tensor, score_mod=None):
    """`score_mod` (or the raw score), with every score of a UNIFORM_ROW query set to exactly 0, gradients kept.

    ``s - s.detach()`` is 0, so the row's softmax is exactly uniform, while its derivative is 1: the
    backward is that of HF eager's ``softmax(s + finfo.min)``, whose sum rounds to one value for every key
    but passes gradients through the scores unchanged. (Checked on compiled flex_attention's GPU backward.)
    """

    def uniform_row_scores(score, b, h, q_idx, kv_idx):
        if score_mod is not None:
            score = score_mod(score, b, h, q_idx, kv_idx)
        return torch.where(query_ids[b, q_idx] == UNIFORM_ROW, score - score.detach(), score)

    return uniform_row_scores


def causal_mask_mod(window: Optional[int]) -> MaskMod:
    """Plain causal, or causal with a sliding window when `window` is set.

    The window stays a Python int, so sliding and global layers compile separately (where a call is no
    longer than the window, fastgemma.mask_mapping gives both kinds the causal mask, and they compile once).
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


def real_tokens_from_padding_mask(attention_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """The real tokens (bool) of a 2D padding mask (1 = real token), or None when no token is padding.

    Padding on any side needs its own mask: padded queries still attend to the real keys before them,
    as in HF eager, so not even right padding reduces to plain causal attention.
    """
    real = attention_mask.bool()
    if bool(real.all()):
        return None
    return real


def padding_ids(real_tokens: torch.Tensor, segment_ids: Optional[torch.Tensor], window: Optional[int],
                length: Optional[int] = None):
    """(query_ids, key_ids): what a padded batch's mask reads, each (batch, length) int32.

    key_ids: the key's document, or PAD_SEGMENT for padding (hidden from every query). query_ids: the
    query's document, or UNIFORM_ROW when it sees no real key: causality (and the window) leaves it only
    padding, as for left padding before the first real token. HF eager then adds finfo.min to every score
    of that row, and the softmax averages all of the row's keys uniformly, future ones included; fastgemma
    computes exactly that, gradients included (`real_keys`, `uniform_rows`), rather than an output of 0,
    so that every position (the last left pad predicts the first real token) matches HF eager. It costs
    attention over the whole row for those queries only. Past the batch's tokens, up to `length`, the ids
    are _TAIL_QUERY and _TAIL_KEY: nothing there is seen.

    Documents (`segment_ids`, None for one per row) are contiguous runs of tokens.
    """
    batch, tokens = real_tokens.shape
    device = real_tokens.device
    positions = torch.arange(tokens, device=device)
    documents = torch.zeros(batch, tokens, dtype=torch.int32, device=device) if segment_ids is None \
        else segment_ids.to(device=device, dtype=torch.int32)
    key_ids = torch.where(real_tokens, documents, PAD_SEGMENT)
    # The nearest real key a query may see is the last real token at or before it.
    last_real = torch.cummax(torch.where(real_tokens, positions, -1), dim=-1).values
    sees_a_key = last_real >= 0
    if segment_ids is not None:
        sees_a_key &= documents.gather(-1, last_real.clamp_min(0)) == documents
    if window is not None:
        sees_a_key &= positions - last_real < window
    query_ids = torch.where(sees_a_key, documents, UNIFORM_ROW)
    missing = (length or tokens) - tokens
    if missing > 0:
        key_ids = torch.nn.functional.pad(key_ids, (0, missing), value=_TAIL_KEY)
        query_ids = torch.nn.functional.pad(query_ids, (0, missing), value=_TAIL_QUERY)
    return query_ids.to(torch.int32), key_ids.to(torch.int32)


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


def _padded_block_grids(num_blocks, window, query_ids, key_ids, device):
    """`_block_grids` for a padded batch (`padding_ids`): documents from the real keys and the queries that see one,
    plus, for query tiles holding a UNIFORM_ROW query, every key tile before the tail (future ones included)."""
    partial, full = _block_grids(num_blocks, num_blocks * BLOCK_SIZE, window, None, device)
    batch = query_ids.shape[0]
    q_tiles = query_ids.view(batch, num_blocks, BLOCK_SIZE)
    kv_tiles = key_ids.view(batch, num_blocks, BLOCK_SIZE)
    beyond = torch.iinfo(torch.int32).max
    # document ranges of the queries that see real keys, and of the real keys (negative ids left out)
    q_lo, q_hi = torch.where(q_tiles >= 0, q_tiles, beyond).amin(-1), q_tiles.amax(-1)
    kv_lo, kv_hi = torch.where(kv_tiles >= 0, kv_tiles, beyond).amin(-1), kv_tiles.amax(-1)
    overlap = ((q_hi[:, :, None] >= 0) & (kv_hi[:, None, :] >= 0)
               & (kv_lo[:, None, :] <= q_hi[:, :, None]) & (q_lo[:, :, None] <= kv_hi[:, None, :]))
    # full: every query and every key of the tile in one document (so no padding, no uniform row)
    one_document = ((q_tiles.amin(-1) == q_hi)[:, :, None] & (kv_tiles.amin(-1) == kv_hi)[:, None, :]
                    & (q_hi[:, :, None] == kv_hi[:, None, :]) & (kv_hi[:, None, :] >= 0))
    uniform = (q_tiles == UNIFORM_ROW).any(-1)[:, :, None] & (kv_tiles >= PAD_SEGMENT).any(-1)[:, None, :]
    return (partial & overlap[:, None]) | uniform[:, None], full & one_document[:, None]


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
    (max_row_tokens rounded up to a block), so batches of any shorter length reuse one
    compiled kernel. Tiles past a batch's real length are empty, so the padding costs no
    attention work. The causal and sliding tile grids are built once per (length, window,
    device); each batch length only masks off the tail. A batch longer than `length` grows
    it (doubling, with a warning: one recompile) rather than being wrong.
    """

    MAX_KEPT = 64  # distinct batch lengths whose BlockMask is kept

    def __init__(self, max_row_tokens: int, headroom_blocks: int = 0):
        if not isinstance(max_row_tokens, int) or isinstance(max_row_tokens, bool) or max_row_tokens <= 0:
            raise ValueError(f"max_row_tokens must be a positive int, got {max_row_tokens!r}")
        self.max_row_tokens = max_row_tokens
        # Empty blocks past the longest batch (they cost no attention work): a compiled layer whose
        # batches sometimes fill the fixed length exactly would otherwise compile a second variant
        # (flex's inputs need no padding then), as the CUDA-graphed layers' longest bucket does.
        self.length = round_up(max_row_tokens) + headroom_blocks * BLOCK_SIZE
        self._grids: dict = {}
        self._masks: dict = {}

    def __getstate__(self):
        # Cached block masks hold mask functions (closures) and device tensors: a deep copy or an
        # unpickled model rebuilds its own on first use.
        return {**self.__dict__, "_grids": {}, "_masks": {}}

    def padded_length_for(self, length: int) -> int:
        """The fixed length a batch of `length` tokens would be padded to, the cache unchanged."""
        padded = self.length
        while padded < length:
            padded *= 2
        return padded

    def length_for(self, length: int) -> int:
        """The fixed length a batch of `length` tokens is padded to (grown if needed)."""
        if length > self.length:
            new_length = self.padded_length_for(length)
            logger.warning(
                "fastgemma: batch of %d tokens exceeds max_row_tokens=%d; growing the block masks to %d "
                "(flex_attention recompiles once). Pass a larger max_row_tokens to patch_model to avoid this.",
                length, self.max_row_tokens, new_length,
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
            valid_rows = valid[:, None]  # query tiles past the batch's tokens: nothing to compute
            mask = make_block_mask(partial & valid_rows, full & valid_rows, causal_mask_mod(window), padded)
            if len(self._masks) >= self.MAX_KEPT:
                self._masks.pop(next(iter(self._masks)))
            self._masks[key] = mask
        return mask


# --------------------------------------------------------------------------------------
# The mask object handed to attention layers
# --------------------------------------------------------------------------------------
def flex_mask_mod(inputs: dict, window: Optional[int]) -> MaskMod:
    """The mask function over `AttentionMask.flex_inputs`-style tensors: plain, packed, or padded."""
    inner = causal_mask_mod(window)
    if "query_ids" in inputs:
        return real_keys(inputs["query_ids"], inputs["key_ids"], inner)
    if "segments" in inputs:
        return within_segments(inputs["segments"], inner)
    return inner


@dataclass(eq=False)
class AttentionMask:
    """Everything an attention layer needs to know about one batch's mask, for one layer type.

    Queries and keys both start at position 0 (training, or a prefill with an empty cache).
    `segment_ids` is None for one document per row, else (batch, length) document ids (>= 0,
    each document a contiguous run). `real_tokens` is None without padding, else (batch, length)
    bool, False for padding (see `padding_ids` for what padded positions see). Block and dense
    masks are built lazily, once, and shared by every layer this object is handed to.
    """

    q_len: int
    kv_len: int
    window: Optional[int] = None
    segment_ids: Optional[torch.Tensor] = None
    cache: Optional[BlockMaskCache] = None
    real_tokens: Optional[torch.Tensor] = None
    _block_mask: object = field(default=None, repr=False)
    _dense: Optional[torch.Tensor] = field(default=None, repr=False)
    _narrow_block_masks: dict = field(default_factory=dict, repr=False)  # kv_block -> BlockMask
    _flex_inputs: Optional[dict] = field(default=None, repr=False)

    def __post_init__(self):
        if self.q_len != self.kv_len:
            raise ValueError(f"AttentionMask needs q_len == kv_len, got {self.q_len} and {self.kv_len}")
        for name in ("segment_ids", "real_tokens"):
            tensor = getattr(self, name)
            if tensor is not None and (tensor.dim() != 2 or tensor.shape[-1] != self.kv_len):
                raise ValueError(f"{name} must be (batch, {self.kv_len}), got {tuple(tensor.shape)}")

    @property
    def kind(self) -> str:
        """"plain", "packed" or "padded": which mask function (and compiled kernel) the batch needs."""
        if self.real_tokens is not None or "query_ids" in (self._flex_inputs or {}):
            return "padded"
        return "packed" if self.segment_ids is not None or self._flex_inputs else "plain"

    @property
    def padded_length(self) -> int:
        """The length flex_attention runs at: the cache's fixed length, or the next block multiple."""
        return self.cache.length_for(self.kv_len) if self.cache is not None else round_up(self.kv_len)

    def _segments(self, device, length):
        return pad_segments(self.segment_ids.to(device=device, dtype=torch.int32), length)

    def _padding_ids(self, device, length):
        real = self.real_tokens.to(device=device, dtype=torch.bool)
        segments = None if self.segment_ids is None else self.segment_ids.to(device)
        return padding_ids(real, segments, self.window, length)

    def _inputs(self, device, length) -> dict:
        """The batch's tensors a mask function reads, padded to `length`: {} (plain), {"segments"} (packed)
        or {"query_ids", "key_ids"} (padded)."""
        if self.real_tokens is not None:
            query_ids, key_ids = self._padding_ids(device, length)
            return {"query_ids": query_ids, "key_ids": key_ids}
        if self.segment_ids is not None:
            return {"segments": self._segments(device, length)}
        return {}

    def flex_inputs(self, device) -> dict:
        """`_inputs` at `padded_length`, built once: what the flex mask and score functions read."""
        if self._flex_inputs is None:
            self._flex_inputs = self._inputs(device, self.padded_length)
        return self._flex_inputs

    def mask_mod(self, device) -> MaskMod:
        """This batch's mask as a mask function (uniform rows of a padded batch see their whole row)."""
        return flex_mask_mod(self._inputs(device, round_up(self.kv_len)), self.window)

    def block_mask(self, device, kv_block: Optional[int] = None):
        """The flex_attention BlockMask at `padded_length` (batch 1 and broadcast when plain).

        `kv_block`: key blocks of that many keys (a divisor of BLOCK_SIZE) instead of BLOCK_SIZE, for
        kernels whose tiles span fewer keys (`split_kv_blocks`); built from the same mask, kept apart.
        A padded batch's flex call also needs `uniform_rows` over its query ids (flex_inputs).
        """
        if kv_block is not None and kv_block != BLOCK_SIZE:
            if kv_block not in self._narrow_block_masks:
                self._narrow_block_masks[kv_block] = split_kv_blocks(self.block_mask(device), kv_block)
            return self._narrow_block_masks[kv_block]
        if self._block_mask is None:
            length = self.padded_length
            inputs = self.flex_inputs(device)
            if not inputs:
                cache = self.cache or BlockMaskCache(length)
                self._block_mask = cache.get(self.kv_len, self.window, device)
            else:
                if "query_ids" in inputs:
                    partial, full = _padded_block_grids(length // BLOCK_SIZE, self.window, inputs["query_ids"],
                                                        inputs["key_ids"], device)
                else:
                    partial, full = _block_grids(length // BLOCK_SIZE, length, self.window, inputs["segments"], device)
                self._block_mask = make_block_mask(partial, full, flex_mask_mod(inputs, self.window), length)
        return self._block_mask

    def dense(self, device) -> torch.Tensor:
        """A (batch or 1, 1, q_len, kv_len) mask for the dense backends: bool (allowed), or for a padded
        batch int8: 1 allowed, 0 hidden, DENSE_UNIFORM for every key of a uniform row (see `padding_ids`)."""
        if self._dense is None:
            inputs = self._inputs(device, self.kv_len)
            batch = next(iter(inputs.values())).shape[0] if inputs else 1
            allowed = dense_mask(flex_mask_mod(inputs, self.window), batch, self.q_len, self.kv_len, device)
            if "query_ids" in inputs:
                uniform = (inputs["query_ids"] == UNIFORM_ROW)[:, None, :, None]
                allowed = torch.where(uniform, DENSE_UNIFORM, allowed.to(torch.int8)).to(torch.int8)
            self._dense = allowed
        return self._dense
