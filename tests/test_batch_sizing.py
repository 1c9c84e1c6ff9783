"""The recipe's automatic micro-batch: tokens per optimizer step kept, rows per micro-step sized to memory."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from batch_sizing import activation_bytes_per_token, choose_micro_batch  # noqa: E402

GIB = 2**30


def published(size):
    from fastgemma.patches.gemma2_shapes import published_config

    return published_config(size)


def test_estimate_is_close_to_measured_peaks():
    # trl suite, 4 x 4096 packed tokens: 2B peaked at 6.0 GiB with ~2 GiB of nf4 weights and embeddings,
    # 9B at 13.7 GiB with ~6 GiB (benchmarks/RESULTS.md)
    for size, measured_per_token in (("2b", 4.0 * GIB / 16384), ("9b", 7.7 * GIB / 16384)):
        estimate = activation_bytes_per_token(published(size))
        assert 0.8 * measured_per_token < estimate < 1.5 * measured_per_token, size


@pytest.mark.parametrize("size, free_gib, expected_batch", [
    ("2b", 70, 8),   # an 80 GB card: the whole optimizer step in one micro-step
    ("2b", 6, 4),    # a small card
    ("27b", 8, 2),   # 27B on a 24 GB card after its weights
    ("27b", 0.5, 1),  # nothing fits: one row, with a warning in the reason
])
def test_choice_keeps_tokens_per_step_and_fits(size, free_gib, expected_batch):
    config = published(size)
    choice = choose_micro_batch(8, 2048, int(free_gib * GIB), config)
    assert choice.batch_size == expected_batch
    assert choice.batch_size * choice.grad_accum == 8
    assert "16384 tokens per optimizer step" in choice.reason
    fits = choice.batch_size * 2048 * activation_bytes_per_token(config) <= 0.75 * free_gib * GIB
    assert fits == ("may not fit" not in choice.reason)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="positive"):
        choose_micro_batch(0, 2048, GIB, published("2b"))
