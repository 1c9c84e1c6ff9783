"""fastgemma.ops.linear_cross_entropy against the unfused reference: the logits, then HF's loss function."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.loss.loss_utils import ForCausalLMLoss, fixed_cross_entropy

from conftest import relative_error
from fastgemma.ops import linear_cross_entropy as lce

TOKENS, FEATURES, VOCAB = 203, 24, 331  # vocabulary and token count multiples of nothing in sight


@pytest.fixture
def small_chunks(monkeypatch):
    """64 tokens per chunk: four chunks of 203 tokens, the last one short."""
    monkeypatch.setattr(lce, "CHUNK_LOGITS", 64 * VOCAB + 5)
    assert lce.chunk_rows(VOCAB) == 64


def random_problem(dtype, seed=0, ignored=0.3, bias=False):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, FEATURES, generator=generator, dtype=dtype).requires_grad_()
    weight = (torch.randn(VOCAB, FEATURES, generator=generator, dtype=dtype) * 0.7).requires_grad_()
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    targets[torch.rand(TOKENS, generator=generator) < ignored] = -100
    bias = torch.randn(VOCAB, generator=generator, dtype=dtype).requires_grad_() if bias else None
    return hidden, weight, bias, targets


def hf_loss(hidden, weight, bias, targets, softcap, num_items_in_batch):
    """Gemma 2's logits, then HF's loss: ForCausalLMLoss (float32 upcast) given the shifted labels; in float64,
    its cross-entropy without the upcast (fixed_cross_entropy), so the comparison runs at float64's precision."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if logits.dtype == torch.float64:
        return fixed_cross_entropy(logits, targets, num_items_in_batch)
    return ForCausalLMLoss(logits, None, VOCAB, num_items_in_batch, shift_labels=targets)


def loss_and_grads(fn, hidden, weight, bias, targets, scale=1.7, **kwargs):
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    loss = fn(hidden, weight, bias, targets, **kwargs)
    return (loss.detach(), *torch.autograd.grad(loss * scale, inputs))


def chunked(hidden, weight, bias, targets, softcap, num_items_in_batch, fused=False):
    return lce.linear_cross_entropy(hidden, weight, targets, bias, softcap=softcap,
                                    num_items_in_batch=num_items_in_batch, fused=fused)


TOLERANCE = {torch.float64: 1e-12, torch.float32: 3e-6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("softcap", [None, 30.0, 2.0], ids=["no-cap", "cap30", "cap2"])
@pytest.mark.parametrize("num_items_in_batch", [None, 150, "tensor"], ids=["mean", "int-items", "tensor-items"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_loss_and_gradients_are_hf_s(small_chunks, dtype, softcap, num_items_in_batch, bias):
    if num_items_in_batch == "tensor":
        num_items_in_batch = torch.tensor(97)
    for seed in range(2):
        problem = random_problem(dtype, seed=seed, bias=bias)
        expected = loss_and_grads(hf_loss, *problem, softcap=softcap, num_items_in_batch=num_items_in_batch)
        got = loss_and_grads(chunked, *problem, softcap=softcap, num_items_in_batch=num_items_in_batch)
        assert got[0].dtype == expected[0].dtype
        for name, a, b in zip(("loss", "hidden", "weight", "bias"), got, expected):
            assert relative_error(a, b) < TOLERANCE[dtype], (name, relative_error(a, b))


def test_a_frozen_weight_gets_no_gradient_and_the_hidden_states_still_do(small_chunks):
    hidden, weight, _, targets = random_problem(torch.float64)
    weight.requires_grad_(False)
    loss = chunked(hidden, weight, None, targets, 30.0, None)
    (got,) = torch.autograd.grad(loss, hidden)
    (expected,) = torch.autograd.grad(hf_loss(hidden, weight, None, targets, 30.0, None), hidden)
    assert relative_error(got, expected) < 1e-12


@pytest.mark.parametrize("num_items_in_batch", [None, 0, 5])
def test_a_batch_without_counted_tokens_gives_hf_s_result(num_items_in_batch):
    """HF: nan for the mean over no token (0 / 0), 0 with a token count; zero gradients either way."""
    hidden, weight, _, targets = random_problem(torch.float32, ignored=1.1)
    got = loss_and_grads(chunked, hidden, weight, None, targets, softcap=30.0, num_items_in_batch=num_items_in_batch)
    expected = loss_and_grads(hf_loss, hidden, weight, None, targets, softcap=30.0,
                              num_items_in_batch=num_items_in_batch)
    assert torch.equal(got[0].isnan(), expected[0].isnan()) and got[0].isnan() == (num_items_in_batch in (None, 0))
    for a, b in zip(got, expected):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    assert not got[1].any() and not got[2].any()


def test_bf16_is_as_close_to_float64_as_hf_s_bf16():
    """In bf16 the logits round differently from HF's (its softcap runs in bf16, ours in float32): both are
    compared with the float64 loss, and ours must be about as close as HF's own bf16 result, or closer."""
    hidden, weight, _, targets = random_problem(torch.float64)
    exact = loss_and_grads(hf_loss, hidden, weight, None, targets, softcap=30.0, num_items_in_batch=None)
    low = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight)]
    hf = loss_and_grads(hf_loss, *low[:2], None, targets, softcap=30.0, num_items_in_batch=None)
    ours = loss_and_grads(chunked, *low[:2], None, targets, softcap=30.0, num_items_in_batch=None)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == torch.bfloat16
    for name, a, b, reference in zip(("loss", "hidden", "weight"), ours, hf, exact):
        assert relative_error(a, reference) < 1e-2, name
        assert relative_error(a, reference) <= 2 * relative_error(b, reference) + 1e-4, name


def test_autocast_dtype_runs_the_gemms_in_bf16_and_returns_float32_gradients():
    hidden, weight, _, targets = random_problem(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loss_and_grads(hf_loss, hidden, weight, None, targets, softcap=30.0, num_items_in_batch=None)
    got = loss_and_grads(lambda h, w, b, t: lce.linear_cross_entropy(h, w, t, softcap=30.0, dtype=torch.bfloat16,
                                                                      fused=False), hidden, weight, None, targets)
    assert got[1].dtype == got[2].dtype == torch.float32
    for name, a, b in zip(("loss", "hidden", "weight"), got, expected):
        assert relative_error(a, b) < 1e-2, name


def test_compiled_chunks_match_the_eager_ones(small_chunks):
    problem = random_problem(torch.float32)
    eager = loss_and_grads(chunked, *problem, softcap=30.0, num_items_in_batch=None)
    compiled = loss_and_grads(chunked, *problem, softcap=30.0, num_items_in_batch=None, fused=True)
    for a, b in zip(compiled, eager):
        assert relative_error(a, b) < 1e-6


def test_a_retained_graph_gives_the_same_gradients_again(small_chunks):
    hidden, weight, _, targets = random_problem(torch.float32)
    loss = chunked(hidden, weight, None, targets, 30.0, None)
    loss.backward(retain_graph=True)
    first = hidden.grad.clone(), weight.grad.clone()
    loss.backward()
    for accumulated, once in zip((hidden.grad, weight.grad), first):
        assert torch.allclose(accumulated, 2 * once)


@pytest.mark.parametrize("tied", [False, True], ids=["own-weight", "weight-also-makes-the-hidden-states"])
def test_gradients_of_gradients_are_hf_s(small_chunks, tied):
    """create_graph=True recomputes the loss differentiably, so second-order gradients are HF's too, also when
    the weight reaches the hidden states by another path (an LM head tied to the embedding)."""
    def second_order(fn):
        inputs, weight, _, targets = random_problem(torch.float64)
        hidden = torch.tanh(inputs @ weight[:FEATURES]) if tied else inputs
        grads = torch.autograd.grad(fn(hidden, weight, None, targets, 30.0, 150), (inputs, weight), create_graph=True)
        return (*grads, *torch.autograd.grad(sum(g.square().sum() for g in grads), (inputs, weight)))

    for a, b in zip(second_order(chunked), second_order(hf_loss)):
        assert relative_error(a, b) < 1e-12


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_holds_more_than_one_chunk_of_logits(small_chunks):
    hidden, weight, _, targets = random_problem(torch.float32)
    with LargestTensor() as chunked_run:
        chunked(hidden, weight, None, targets, 30.0, None).backward()
    with LargestTensor() as hf_run:
        hf_loss(hidden, weight, None, targets, 30.0, None).backward()
    assert hf_run.largest == TOKENS * VOCAB
    assert chunked_run.largest == 64 * VOCAB  # one chunk's logits; the weight (VOCAB x 24) is smaller


def test_chunk_rows_bound_the_logits_and_stay_gemm_friendly():
    assert lce.chunk_rows(256000) == 256  # Gemma's vocabulary: 256 tokens, 65.5M logits
    assert lce.chunk_rows(256000) * 256000 <= lce.CHUNK_LOGITS
    assert lce.chunk_rows(lce.CHUNK_LOGITS * 2) == 1
    assert lce.chunk_rows(97) % 64 == 0
