"""Masks: block sparsity matches the mask function exactly; segment ids from what batches carry."""

import itertools
import math

import pytest
import torch

from fastgemma.masks import (
    BLOCK_SIZE,
    DENSE_UNIFORM,
    AttentionMask,
    BlockMaskCache,
    DeferredCheck,
    real_tokens_from_padding_mask,
    segments_from_cu_seqlens,
    segments_from_position_ids,
)


def tiles_of(block_mask, num_q_blocks, num_kv_blocks):
    """(partial, full) tile grids read back from a BlockMask's index lists."""
    def grid(counts, indices):
        dense = torch.zeros(*counts.shape, num_kv_blocks, dtype=torch.bool)
        for index in itertools.product(*(range(n) for n in counts.shape)):
            dense[index][indices[index][: counts[index]].long()] = True
        return dense

    full = grid(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    partial = grid(block_mask.kv_num_blocks, block_mask.kv_indices)
    return partial[..., :num_q_blocks, :], full[..., :num_q_blocks, :]


def random_segments(batch, length, generator):
    rows = []
    for _ in range(batch):
        cuts = torch.sort(torch.randint(1, max(length, 2), (3,), generator=generator)).values
        rows.append(torch.bucketize(torch.arange(length), cuts, right=True))
    return torch.stack(rows)


def random_padding(batch, length, generator, kind):
    """(batch, length) real-token flags: "right" / "left" padding of random length (whole rows included), or
    "holes" (random runs of padding, and one row padded at both ends)."""
    rows = []
    for row in range(batch):
        real = torch.ones(length, dtype=torch.bool)
        pad = int(torch.randint(0, length + 1, (1,), generator=generator)) if row else length // 2
        if kind == "right":
            real[length - pad:] = False
        elif kind == "left":
            real[:pad] = False
        else:
            starts = torch.rand(length, generator=generator) < 0.03
            runs = torch.randint(1, 150, (length,), generator=generator)
            for start in starts.nonzero().flatten().tolist():
                real[start:start + int(runs[start])] = False
            if row == 0:
                real[: length // 4] = False
                real[-(length // 4):] = False
        rows.append(real)
    return torch.stack(rows)


@pytest.mark.parametrize("length", [1, 127, 128, 300, 777])
@pytest.mark.parametrize("window", [None, 1, 100, 128, 200])
@pytest.mark.parametrize("kind", ["plain", "packed", "right", "left", "holes", "packed-holes"])
def test_block_mask_tiles_agree_with_the_mask_function(length, window, kind):
    """Every tile with an allowed pair is visited (padded queries' tiles included); a tile marked full
    has every pair allowed."""
    generator = torch.Generator().manual_seed(length * 7 + (window or 0))
    segments = random_segments(2, length, generator) if kind.startswith("packed") else None
    real = random_padding(2, length, generator, kind.split("-")[-1]) if kind not in ("plain", "packed") else None
    mask = AttentionMask(length, length, window=window, segment_ids=segments, real_tokens=real)
    block_mask = mask.block_mask("cpu")
    n = math.ceil(length / BLOCK_SIZE)
    partial, full = tiles_of(block_mask, n, n)
    allowed = mask.dense("cpu") != 0  # (B, 1, L, L); a uniform row's keys are all of its row
    if real is not None:  # and agrees with the block mask's own mask function
        from torch.nn.attention.flex_attention import create_mask

        pairs = create_mask(block_mask.mask_mod, 2, 1, n * BLOCK_SIZE, n * BLOCK_SIZE, device="cpu")
        assert torch.equal(pairs[..., :length, :length], allowed) and not pairs[..., length:, :].any()
    padded = torch.zeros(allowed.shape[0], 1, n * BLOCK_SIZE, n * BLOCK_SIZE, dtype=torch.bool)
    padded[..., :length, :length] = allowed
    tiles = padded.view(allowed.shape[0], 1, n, BLOCK_SIZE, n, BLOCK_SIZE)
    any_allowed = tiles.any(dim=(3, 5))
    all_allowed = tiles.all(dim=(3, 5))
    assert not (partial & full).any(), "a tile is listed both as partial and as full"
    assert ((partial | full) >= any_allowed).all(), "a tile with allowed pairs would be skipped"
    in_range = torch.zeros(n, n, dtype=torch.bool)
    in_range[: length // BLOCK_SIZE, : length // BLOCK_SIZE] = True  # tiles with no out-of-range index
    assert (~full | all_allowed | ~in_range).all(), "a tile marked full has masked pairs"


@pytest.mark.parametrize("window", [None, 64])
def test_dense_mask_follows_the_definition(window):
    length = 150
    segments = torch.tensor([[0] * 50 + [1] * 100])
    allowed = AttentionMask(length, length, window=window, segment_ids=segments).dense("cpu")[0, 0]
    for q in range(length):
        for k in range(length):
            expected = k <= q and (window is None or q - k < window) and segments[0, q] == segments[0, k]
            assert bool(allowed[q, k]) == expected, (q, k)


@pytest.mark.parametrize("window", [None, 30])
@pytest.mark.parametrize("packed", [False, True])
def test_padded_dense_mask_is_hf_eager_s(window, packed):
    """HF eager (masking_utils.sdpa_mask + padding_mask_function): padding hides keys only, so a padded query
    sees the real keys before it; a query with none sees all of its row's keys, uniformly (DENSE_UNIFORM)."""
    length = 150
    segments = torch.tensor([[0] * 70 + [1] * 80]) if packed else None
    real = torch.ones(1, length, dtype=torch.bool)
    real[0, :12] = False  # left padding
    real[0, 40:80] = False  # a hole longer than the window, across the document boundary
    real[0, 120:] = False  # right padding
    dense = AttentionMask(length, length, window=window, segment_ids=segments, real_tokens=real).dense("cpu")[0, 0]
    assert dense.dtype == torch.int8
    documents = segments[0] if packed else torch.zeros(length, dtype=torch.long)
    for q in range(length):
        expected = [k <= q and (window is None or q - k < window) and documents[q] == documents[k] and bool(real[0, k])
                    for k in range(length)]
        if any(expected):
            assert dense[q].tolist() == [int(e) for e in expected], q
        else:
            assert (dense[q] == DENSE_UNIFORM).all(), q
    assert (dense[:12] == DENSE_UNIFORM).all() and (dense[12] != DENSE_UNIFORM).all()


def test_cache_builds_grids_once_and_masks_the_tail():
    cache = BlockMaskCache(1000)
    first = cache.get(300, 64, "cpu")
    assert first.seq_lengths == (1024, 1024)  # one fixed (padded) length for every batch
    assert cache.get(300, 64, "cpu") is first
    cache.get(1000, 64, "cpu")
    cache.get(1000, None, "cpu")
    assert len(cache._grids) == 2  # one per window, not per batch length
    # rows of padding queries are empty; real rows match a mask built for exactly 300 tokens
    exact = BlockMaskCache(300).get(300, 64, "cpu")
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        ours, expected = getattr(first, name)[..., :3], getattr(exact, name)
        assert torch.equal(ours, expected), name
    assert first.kv_num_blocks[..., 3:].sum() == 0 and first.full_kv_num_blocks[..., 3:].sum() == 0


def test_q_indices_are_the_transpose_of_kv_indices():
    segments = torch.repeat_interleave(torch.arange(4), torch.tensor([200, 90, 300, 150]))[None]
    fast = AttentionMask(740, 740, window=250, segment_ids=segments).block_mask("cpu")
    from torch.nn.attention.flex_attention import BlockMask

    generic = BlockMask.from_kv_blocks(fast.kv_num_blocks, fast.kv_indices, fast.full_kv_num_blocks,
                                       fast.full_kv_indices, BLOCK_SIZE=BLOCK_SIZE, seq_lengths=fast.seq_lengths)
    for name in ("q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(fast, name), getattr(generic, name))
    for counts, name in (("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        for row in itertools.product(*(range(n) for n in getattr(fast, counts).shape)):
            used = int(getattr(fast, counts)[row])
            assert torch.equal(getattr(fast, name)[row][:used].sort().values, getattr(generic, name)[row][:used].sort().values)


def test_cache_grows_past_max_row_tokens_with_a_warning(caplog):
    cache = BlockMaskCache(256)
    with caplog.at_level("WARNING", logger="fastgemma"):
        mask = cache.get(1000, None, "cpu")
    assert cache.length == 1024
    assert mask.seq_lengths == (1024, 1024)
    assert "max_row_tokens=256" in caplog.text


def test_segments_from_position_ids():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert segments_from_position_ids(positions).tolist() == [
        [0, 0, 0, 1, 1, 2, 2, 2, 2],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert segments_from_position_ids(torch.arange(9)[None]).tolist() == [[0] * 9]  # one document: causal
    with pytest.raises(ValueError, match="position_ids"):
        segments_from_position_ids(torch.arange(9))


def test_segments_from_cu_seqlens():
    assert segments_from_cu_seqlens(torch.tensor([0, 2, 5, 6]), 6).tolist() == [[0, 0, 1, 1, 1, 2]]
    # an empty document keeps its index, as repeat_interleave over the lengths numbers them
    assert segments_from_cu_seqlens(torch.tensor([0, 3, 3, 5]), 5).tolist() == [[0, 0, 0, 2, 2]]
    assert segments_from_cu_seqlens(torch.tensor([0, 4], dtype=torch.int32), 4).tolist() == [[0, 0, 0, 0]]
    for bad in ([0, 2, 5], [1, 2, 6], [0, 4, 2, 6], [6]):
        with pytest.raises(ValueError, match="cu_seq_lens"):
            segments_from_cu_seqlens(torch.tensor(bad), 6)
    # off a GPU a deferred check is run at once all the same: nothing is left to run later
    deferred = []
    with pytest.raises(ValueError, match=r"end at the packed length 6; got \[0, 2, 5\]"):
        segments_from_cu_seqlens(torch.tensor([0, 2, 5]), 6, deferred)
    assert deferred == []


def test_deferred_check_raises_only_when_run_and_only_if_false():
    passing, failing = DeferredCheck(torch.tensor(True), "never"), DeferredCheck(torch.tensor(False), lambda: "made late")
    passing.raise_if_failed()
    with pytest.raises(ValueError, match="made late"):
        failing.raise_if_failed()


def test_real_tokens_from_padding_mask():
    assert real_tokens_from_padding_mask(torch.ones(2, 4, dtype=torch.long)) is None  # no padding: plain causal
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # right padding is padding too: padded queries see real keys
    assert real_tokens_from_padding_mask(right).tolist() == [[True, True, True, False], [True] * 4]
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert real_tokens_from_padding_mask(left).tolist() == [[False, True, True, True], [True] * 4]


def test_attention_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="q_len == kv_len"):
        AttentionMask(5, 6)
    with pytest.raises(ValueError, match="segment_ids"):
        AttentionMask(5, 5, segment_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="real_tokens"):
        AttentionMask(5, 5, real_tokens=torch.ones(1, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_row_tokens"):
        BlockMaskCache(0)


@pytest.mark.parametrize("window,segments", [(None, None), (300, None), (None, [300, 500, 224]), (200, [700, 324])])
def test_narrow_key_blocks_mask_the_same_pairs(window, segments):
    """Key blocks cut to 64 keys (FlashAttention 4's Hopper tiles at head_dim 256) allow exactly the same
    (query, key) pairs as the 128-key mask, with full blocks staying full."""
    from torch.nn.attention.flex_attention import create_mask

    from fastgemma.masks import AttentionMask, split_kv_blocks

    seg = None if segments is None else torch.repeat_interleave(
        torch.arange(len(segments)), torch.tensor(segments))[None]
    mask = AttentionMask(1024, 1024, window=window, segment_ids=seg)
    wide, narrow = mask.block_mask("cpu"), mask.block_mask("cpu", kv_block=64)
    assert narrow is mask.block_mask("cpu", kv_block=64) and wide is mask.block_mask("cpu")  # built once each
    assert narrow.BLOCK_SIZE == (128, 64) and wide.BLOCK_SIZE == (128, 128)
    assert torch.equal(wide.to_dense().repeat_interleave(2, -1), narrow.to_dense())
    assert torch.equal(narrow.full_kv_num_blocks, wide.full_kv_num_blocks * 2)
    pairs = create_mask(narrow.mask_mod, 1, 1, 1024, 1024, device="cpu")
    dense_blocks = narrow.to_dense()[0, 0].repeat_interleave(128, 0).repeat_interleave(64, 1).bool()
    assert not (pairs[0, 0] & ~dense_blocks).any()  # every allowed pair lies in a listed block
    with pytest.raises(ValueError, match="must divide"):
        split_kv_blocks(wide, 48)
