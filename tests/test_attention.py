"""The attention core against a float64 reference, for every backend that runs on CPU."""

import pytest
import torch

from conftest import reference_attention, relative_error
from fastgemma.attention import (
    check_kernel_options,
    flex_head_dim_ok,
    resolve_backend,
    softcap_attention,
    tuned_flex_kernel_options,
)
from fastgemma.masks import PAD_SEGMENT, AttentionMask

FP32_TOLERANCE = 1e-5


def random_qkv(heads, kv_heads, length, head_dim, seed, batch=1):
    generator = torch.Generator().manual_seed(seed)
    # large enough that many scores sit in the softcap's curved region
    query = torch.randn(batch, heads, length, head_dim, generator=generator) * 3
    key = torch.randn(batch, kv_heads, length, head_dim, generator=generator) * 3
    value = torch.randn(batch, kv_heads, length, head_dim, generator=generator)
    return [t.requires_grad_() for t in (query, key, value)]


def packed_segments(lengths, pad=0):
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return torch.cat([ids, torch.full((pad,), PAD_SEGMENT)])[None]


CASES = {
    "causal-gqa2": dict(heads=4, kv_heads=2, length=200, head_dim=32, window=None, segments=None),
    "sliding-gqa4": dict(heads=8, kv_heads=2, length=300, head_dim=16, window=77, segments=None),
    "packed-sliding": dict(heads=4, kv_heads=1, length=260, head_dim=32, window=50, segments=[100, 30, 130]),
    "left-padded": dict(heads=4, kv_heads=2, length=140, head_dim=16, window=None, segments="left"),
}


def build(case, seed):
    spec = CASES[case]
    tensors = random_qkv(spec["heads"], spec["kv_heads"], spec["length"], spec["head_dim"], seed)
    segments = spec["segments"]
    if segments == "left":
        segments = torch.cat([torch.full((13,), PAD_SEGMENT), torch.zeros(spec["length"] - 13, dtype=torch.long)])[None]
    elif segments is not None:
        segments = packed_segments(segments)
    mask = AttentionMask(spec["length"], spec["length"], window=spec["window"], segment_ids=segments)
    return tensors, mask, spec["head_dim"] ** -0.5


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_match_float64(case, backend):
    (query, key, value), mask, scale = build(case, seed=hash(case) % 1000)
    out = softcap_attention(query, key, value, mask, scale=scale, softcap=50.0, backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    leaves = [t.detach().double().requires_grad_() for t in (query, key, value)]
    expected = reference_attention(*leaves, mask.dense("cpu"), scale, 50.0)
    expected.backward(grad_out.double())
    valid = expected.abs().sum(-1) > 0  # left padding: query rows with no key
    assert not torch.isnan(out).any()
    assert relative_error(out[valid], expected[valid]) < FP32_TOLERANCE
    for tensor, leaf in zip((query, key, value), leaves):
        assert relative_error(tensor.grad, leaf.grad) < 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_flex_forward_on_cpu_matches_float64(case):
    (query, key, value), mask, scale = build(case, seed=7)
    with torch.no_grad():
        out = softcap_attention(query, key, value, mask, scale=scale, softcap=50.0, backend="flex")
    expected = reference_attention(query.double(), key.double(), value.double(), mask.dense("cpu"), scale, 50.0)
    assert not torch.isnan(out).any()
    assert relative_error(out, expected) < FP32_TOLERANCE


def test_dense_mask_from_the_caller_for_decoding():
    """Queries after cached keys: the caller's additive mask is honoured; without one, every key is seen."""
    (query, key, value) = [t.detach() for t in random_qkv(4, 2, 40, 16, seed=3)]
    query = query[:, :, -1:]  # one new token over 40 keys
    allowed = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    allowed[..., :5] = False
    additive = torch.zeros(1, 1, 1, 40).masked_fill(~allowed, torch.finfo(torch.float32).min)
    expected = reference_attention(query, key, value, allowed, 0.25, 50.0)
    for mask in (allowed, additive):
        out = softcap_attention(query, key, value, mask, scale=0.25, softcap=50.0)
        assert relative_error(out, expected) < FP32_TOLERANCE
    everything = reference_attention(query, key, value, torch.ones_like(allowed), 0.25, 50.0)
    assert relative_error(softcap_attention(query, key, value, None, scale=0.25, softcap=50.0), everything) < 1e-5


def test_fully_masked_rows_give_no_nan():
    query, key, value = random_qkv(2, 2, 20, 16, seed=1)
    mask = AttentionMask(20, 20, segment_ids=torch.full((1, 20), PAD_SEGMENT))
    for backend in ("eager", "compiled"):
        out = softcap_attention(query, key, value, mask, scale=0.25, softcap=50.0, backend=backend)
        out.sum().backward()
        assert not torch.isnan(out).any() and not torch.isnan(query.grad).any()
    with torch.no_grad():
        assert not torch.isnan(softcap_attention(query, key, value, mask, scale=0.25, softcap=50.0, backend="flex")).any()


def test_auto_backend_choice_on_cpu():
    query, key, _ = random_qkv(2, 2, 8, 16, seed=0)
    mask = AttentionMask(8, 8)
    assert resolve_backend("auto", query, key, mask) == "compiled"
    assert resolve_backend("auto", query, key, torch.ones(1, 1, 8, 8, dtype=torch.bool)) == "eager"
    assert resolve_backend("auto", query, key, mask, dropout_p=0.1) == "eager"
    assert flex_head_dim_ok(128) and flex_head_dim_ok(256) and not flex_head_dim_ok(24) and not flex_head_dim_ok(8)


def test_clear_errors():
    query, key, value = random_qkv(2, 2, 8, 16, seed=0)
    mask = AttentionMask(8, 8)
    with pytest.raises(ValueError, match="unknown attention backend"):
        softcap_attention(query, key, value, mask, scale=1.0, softcap=50.0, backend="sdpa")
    with pytest.raises(NotImplementedError, match="no CPU backward"):
        softcap_attention(query, key, value, mask, scale=1.0, softcap=50.0, backend="flex")
    with pytest.raises(ValueError, match="multiple of key heads"):
        softcap_attention(query, key[:, :1].expand(1, 1, 8, 16)[:, :, :, :16].repeat(1, 3, 1, 1), value, mask,
                          scale=1.0, softcap=50.0)
    with pytest.raises(ValueError, match="built for 9 queries"):
        softcap_attention(query, key, value, AttentionMask(9, 9), scale=1.0, softcap=50.0, backend="eager")


class _QueryOn:
    """Stands in for a query tensor on a device this machine may not have."""

    def __init__(self, device, head_dim, dtype=torch.bfloat16):
        self.device, self.shape, self.dtype = torch.device(device), (1, 8, 128, head_dim), dtype


@pytest.mark.parametrize("capability,head_dim,dtype,expected", [
    ((9, 0), 256, torch.bfloat16, {"bwd_num_warps": 8}),
    ((9, 0), 256, torch.float16, {"bwd_num_warps": 8}),
    ((9, 0), 128, torch.bfloat16, None),  # torch already picks 8 warps for head_dim 128
    ((9, 0), 256, torch.float32, None),
    ((8, 0), 256, torch.bfloat16, None),  # measured on Hopper only
    ((10, 0), 256, torch.bfloat16, None),
])
def test_tuned_flex_kernel_options_only_where_measured(monkeypatch, capability, head_dim, dtype, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert tuned_flex_kernel_options(_QueryOn("cuda", head_dim, dtype)) == expected
    assert tuned_flex_kernel_options(_QueryOn("cpu", head_dim, dtype)) is None


def test_kernel_options_are_checked():
    assert check_kernel_options("auto") == "auto" and check_kernel_options(None) is None
    assert check_kernel_options({"bwd_num_warps": 8}) == {"bwd_num_warps": 8}
    for bad in ("fast", 8, {8: 8}, ["bwd_num_warps"]):
        with pytest.raises(ValueError, match="flex_kernel_options must be"):
            check_kernel_options(bad)
    query, key, value = random_qkv(2, 2, 8, 16, seed=0)
    with pytest.raises(ValueError, match="flex_kernel_options must be"):
        softcap_attention(query, key, value, AttentionMask(8, 8), scale=1.0, softcap=50.0, kernel_options="fast")


def test_full_length_batches_reach_flex_in_the_padded_layout():
    """A batch that fills the padded length exactly must not change the strides flex sees
    (a stride change recompiles the static-shape kernel: seen as a 28 s step at 64K tokens)."""
    from fastgemma.attention import _pad_length

    transposed = torch.randn(1, 256, 8, 64).transpose(1, 2)  # (B, H, S, D) view, as the layers pass it
    padded = _pad_length(transposed[:, :, :200], 256)
    full = _pad_length(transposed, 256)
    assert full.shape == padded.shape and full.stride() == padded.stride()
    assert torch.equal(full, transposed) and torch.equal(padded[:, :, :200], transposed[:, :, :200])
