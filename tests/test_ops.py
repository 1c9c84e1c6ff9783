"""Fused elementwise ops and the fused LoRA linear, on CPU: against float64 definitions and against
Hugging Face / PEFT, forward and backward; and a whole patched model training with every op fused."""

import copy

import pytest
import torch

import fastgemma
from conftest import random_gemma2, relative_error, tiny_gemma2_config
from fastgemma.ops import (
    gelu_tanh_gate,
    lora_linear,
    norm_add,
    norm_add_norm,
    rms_norm,
    rotate_pairs,
    rotated_heads,
)

FP32_TOLERANCE = 1e-5


def leaves(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, requires_grad=True) for shape in shapes]


def check_against_float64(op, definition, inputs, fused):
    """op(*inputs) (float32) and definition(*inputs in float64): outputs and input gradients agree."""
    doubles = [t.detach().double().requires_grad_() for t in inputs]
    actual, expected = op(*inputs, fused=fused), definition(*doubles)
    actual = actual if isinstance(actual, tuple) else (actual,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    seeds = [torch.randn_like(e) for e in expected]
    sum((a * s.float()).sum() for a, s in zip(actual, seeds)).backward()
    sum((e * s).sum() for e, s in zip(expected, seeds)).backward()
    for a, e in zip(actual, expected):
        assert relative_error(a, e) < FP32_TOLERANCE
    for leaf, double in zip(inputs, doubles):
        assert relative_error(leaf.grad, double.grad) < FP32_TOLERANCE


def gemma_norm(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + weight)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("length", [7, 33])  # a second length must not need a new graph (see below)
def test_norm_ops_match_float64(fused, length):
    x, residual, weight, next_weight = leaves((2, length, 48), (2, length, 48), (48,), (48,), seed=length)
    check_against_float64(lambda x, w, fused: rms_norm(x, w, 1e-6, 1.0, fused=fused), gemma_norm, [x, weight], fused)
    x, residual, weight, next_weight = leaves((2, length, 48), (2, length, 48), (48,), (48,), seed=length + 1)
    check_against_float64(
        lambda x, r, w, fused: norm_add(x, r, w, 1e-6, 1.0, fused=fused),
        lambda x, r, w: r + gemma_norm(x, w), [x, residual, weight], fused,
    )
    x, residual, weight, next_weight = leaves((2, length, 48), (2, length, 48), (48,), (48,), seed=length + 2)

    def two_norms(x, r, w, v):
        stream = r + gemma_norm(x, w)
        return stream, gemma_norm(stream, v)

    check_against_float64(
        lambda x, r, w, v, fused: norm_add_norm(x, r, w, v, 1e-6, 1.0, fused=fused), two_norms,
        [x, residual, weight, next_weight], fused,
    )


@pytest.mark.parametrize("fused", [False, True])
def test_gelu_tanh_gate_matches_float64(fused):
    def definition(gate, up):
        inner = (2 / torch.pi) ** 0.5 * (gate + 0.044715 * gate**3)
        return 0.5 * gate * (1 + torch.tanh(inner)) * up

    check_against_float64(gelu_tanh_gate, definition, leaves((2, 9, 40), (2, 9, 40)), fused)


@pytest.mark.parametrize("fused", [False, True])
def test_rotate_pairs_matches_hf(fused):
    from transformers.models.gemma2.modeling_gemma2 import apply_rotary_pos_emb

    query, key, cos, sin = leaves((2, 4, 11, 16), (2, 2, 11, 16), (2, 11, 16), (2, 11, 16))
    check_against_float64(lambda q, k, c, s, fused: rotate_pairs(q, k, c, s, fused=fused),
                          lambda q, k, c, s: apply_rotary_pos_emb(q, k, c, s), [query, key, cos, sin], fused)


@pytest.mark.parametrize("fused", [False, True])
def test_rotated_heads_are_hf_rope_padded_with_zero_rows(fused):
    from transformers.models.gemma2.modeling_gemma2 import apply_rotary_pos_emb

    def definition(q, k, v, c, s):
        def heads(x):
            return x.view(2, 11, -1, 16).transpose(1, 2)

        rows = (0, 0, 0, 32 - 11)
        return tuple(torch.nn.functional.pad(t, rows) for t in (*apply_rotary_pos_emb(heads(q), heads(k), c, s),
                                                                   heads(v)))

    inputs = leaves((2, 11, 4 * 16), (2, 11, 2 * 16), (2, 11, 2 * 16), (2, 11, 16), (2, 11, 16))
    check_against_float64(lambda q, k, v, c, s, fused: rotated_heads(q, k, v, c, s, 16, 32, fused=fused),
                          definition, inputs, fused)
    outputs = rotated_heads(*inputs, 16, 32, fused=fused)
    assert all(t.is_contiguous() and t.shape[2] == 32 for t in outputs)


def test_rotated_heads_compile_once_and_give_the_projections_contiguous_gradients():
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    for length in (5, 9, 17):
        q, k, v, cos, sin = leaves((1, length, 64), (1, length, 32), (1, length, 32), (1, length, 16),
                                   (1, length, 16), seed=length)
        sum(t.sum() for t in rotated_heads(q, k, v, cos, sin, 16, 20)).backward()
        assert all(t.grad.is_contiguous() for t in (q, k, v))
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1
    with pytest.raises(ValueError, match="cannot pad 17 tokens to 8"):
        rotated_heads(q, k, v, cos, sin, 16, 8)


def test_norm_matches_hf_module_in_bf16():
    """Same rounding as Gemma2RMSNorm: float32 inside, one cast back at the end."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    module = Gemma2RMSNorm(64)
    torch.nn.init.normal_(module.weight)
    x = torch.randn(3, 5, 64).to(torch.bfloat16)
    assert torch.equal(rms_norm(x, module.weight, module.eps, 1.0, fused=False), module(x))


def test_fused_ops_compile_once_for_all_lengths():
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    weight = torch.randn(32, requires_grad=True)
    for length in (5, 9, 17, 40):
        x = torch.randn(1, length, 32, requires_grad=True)
        rms_norm(x, weight, 1e-6, 1.0, fused=True).sum().backward()
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1


def lora_layer(dropout=0.0, **extra):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=dropout,
                                             init_lora_weights=False, **extra))
    return model.base_model.model[0]


def test_lora_linear_matches_peft_forward_and_backward():
    layer = lora_layer()
    x = torch.randn(3, 7, 24, requires_grad=True)
    expected = layer(x)
    expected.square().sum().backward()
    expected_grads = [p.grad.clone() for p in (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    x.grad = None
    layer.zero_grad()
    actual = lora_linear(layer, x)
    actual.square().sum().backward()
    assert relative_error(actual, expected) < FP32_TOLERANCE
    for grad, leaf in zip(expected_grads, (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight)):
        assert relative_error(leaf.grad, grad) < FP32_TOLERANCE


def test_lora_linear_adds_the_adapter_into_the_base_output_without_copying_it():
    layer = lora_layer()
    outputs = []
    layer.base_layer.register_forward_hook(lambda module, args, output: outputs.append(output))
    x = torch.randn(3, 7, 24, requires_grad=True)
    base_only = layer.base_layer(x).detach()
    outputs.clear()
    actual = lora_linear(layer, x)
    assert actual.untyped_storage().data_ptr() == outputs[0].untyped_storage().data_ptr()
    assert relative_error(actual, base_only) > 1e-3  # the adapter did change it
    actual.sum().backward()
    assert x.grad is not None and layer.lora_B["default"].weight.grad is not None


def test_lora_linear_leaves_other_states_to_peft(monkeypatch):
    """Dropout while training, DoRA, merged or disabled adapters, hooks (its own or accelerate's), or
    adapter weights of another dtype without autocast: PEFT's own forward runs, and gives PEFT's result."""
    from fastgemma.ops.lora import plain_lora_parts

    x = torch.randn(2, 5, 24)
    assert plain_lora_parts(lora_layer()) is not None
    merged, disabled, hooked, accelerated, half = lora_layer(), lora_layer(), lora_layer(), lora_layer(), lora_layer()
    merged.merge()
    disabled.enable_adapters(False)
    hooked.register_forward_pre_hook(lambda *args: None)
    accelerated._hf_hook = object()  # what accelerate's add_hook_to_module leaves on a module
    half.lora_A["default"].to(torch.float64)
    half.lora_B["default"].to(torch.float64)
    cases = {"dropout": lora_layer(dropout=0.1).train(), "dora": lora_layer(use_dora=True), "merged": merged,
             "disabled": disabled, "hooked": hooked, "accelerate": accelerated}
    for name, layer in cases.items():
        assert plain_lora_parts(layer) is None, name
    cases["other dtype"] = half
    for name, layer in cases.items():
        calls = []
        original = type(layer).forward
        monkeypatch.setattr(type(layer), "forward",
                            lambda self, *a, calls=calls, original=original, **k: calls.append(1) or original(self, *a, **k))
        torch.manual_seed(0)
        with torch.no_grad():
            actual = lora_linear(layer, x)
            torch.manual_seed(0)
            expected = original(layer, x)
        monkeypatch.undo()
        assert calls == [1], name
        if name != "dropout":  # dropout draws random masks
            assert torch.equal(actual, expected), name
    plain = lora_layer()
    monkeypatch.setattr(type(plain), "forward", lambda *args, **kwargs: pytest.fail("PEFT forward called"))
    lora_linear(plain, x)  # the fused path never calls PEFT's forward


@pytest.mark.parametrize("checkpointing", [False, True])
def test_patched_model_with_every_op_fused_trains_like_hf_eager(checkpointing):
    """fused_ops=True on CPU: packed LoRA training steps equal HF eager + PEFT (float32), with and
    without gradient checkpointing (whose recompute runs the fused ops a second time)."""
    from peft import LoraConfig, get_peft_model

    reference = random_gemma2(tiny_gemma2_config(window=16))
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=128, backend="eager", fused_ops=True)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(0)
    reference = get_peft_model(reference, lora)
    torch.manual_seed(0)
    patched = get_peft_model(patched, lora)
    if checkpointing:
        for model in (reference, patched):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
            model.train()
    lengths = [40, 9, 30]  # packed documents, some longer than the window
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    for step in range(2):  # the second, different length reuses the compiled graphs
        ids = torch.randint(0, 97, (1, sum(lengths)), generator=torch.Generator().manual_seed(step))
        outputs = []
        for model in (reference, patched):
            model.zero_grad(set_to_none=True)
            out = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
            out.loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            outputs.append((out.logits.detach(), out.loss.detach(), grads))
        (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = outputs
        assert relative_error(logits, ref_logits) < 1e-4 and relative_error(loss, ref_loss) < 1e-4
        assert grads.keys() == ref_grads.keys() and len(grads) == 4 * 7 * 2  # layers x projections x (A, B)
        for name in grads:
            assert relative_error(grads[name], ref_grads[name]) < 1e-3, name
        lengths = [25, 50]
        positions = torch.cat([torch.arange(n) for n in lengths])[None]


def test_fused_norm_takes_any_number_of_leading_dimensions():
    weight = torch.randn(16)
    for shape in ((7, 16), (2, 3, 16), (2, 2, 3, 16)):
        x = torch.randn(*shape)
        assert relative_error(rms_norm(x, weight, 1e-6, 1.0, fused=True), gemma_norm(x.double(), weight.double())) < 1e-6


def test_lora_linear_keeps_peft_arithmetic_when_the_base_layer_changes_dtype():
    layer = lora_layer()
    layer.base_layer.to(torch.float64)
    layer.base_layer.register_forward_pre_hook(lambda module, args: (args[0].double(),))
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        actual = lora_linear(layer, x)
        expected = layer(x)
    assert actual.dtype == expected.dtype == torch.float64
    assert relative_error(actual, expected) < 1e-6
