"""fastgemma.ops.lora_linears: LoRA projections of one input, one backward node, PEFT's results."""

import pytest
import torch

from conftest import relative_error
from fastgemma.ops import lora_linears

FP32_TOLERANCE = 1e-5
BF16_TOLERANCE = 1e-2


class Projections(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.q, self.k, self.v = linear(24, 40), linear(24, 16), linear(24, 16)


def peft_projections(linear=lambda i, o: torch.nn.Linear(i, o), dropout=0.0, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(Projections(linear), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k", "v"],
                                                           lora_dropout=dropout, init_lora_weights=False))
    inner = model.base_model.model
    return [inner.q, inner.k, inner.v]


def adapter_weights(modules):
    return [weight for module in modules for weight in (module.lora_A["default"].weight, module.lora_B["default"].weight)]


def producers(outputs) -> set:
    """The backward nodes that made `outputs`, past the reshaping views."""
    nodes = set()
    for output in outputs:
        node = output.grad_fn
        while node is not None and type(node).__name__ in ("ViewBackward0", "UnsafeViewBackward0"):
            node = node.next_functions[0][0]
        nodes.add(node)
    return nodes


def outputs_and_gradients(call, modules, x):
    for weight in adapter_weights(modules):
        weight.grad = None
    x = x.detach().requires_grad_()
    outputs = call(x)
    sum(output.float().square().sum() * (index + 1) for index, output in enumerate(outputs)).backward()
    return outputs, [x.grad, *(weight.grad for weight in adapter_weights(modules))]


def test_lora_linears_match_peft_forward_and_backward_with_one_backward_node():
    modules = peft_projections()
    x = torch.randn(3, 7, 24)
    expected, expected_grads = outputs_and_gradients(lambda x: [module(x) for module in modules], modules, x)
    actual, actual_grads = outputs_and_gradients(lambda x: lora_linears(modules, x), modules, x)
    assert len(producers(actual)) == 1  # one node: the input's gradient is summed inside it
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and relative_error(a, e) < FP32_TOLERANCE
    for a, e in zip(actual_grads, expected_grads):
        assert relative_error(a, e) < FP32_TOLERANCE


def test_lora_linears_on_4bit_bases_under_autocast_match_peft():
    """QLoRA as TRL runs it: bf16 activations, 4-bit bases computing in bf16, float32 adapters under autocast."""
    bnb = pytest.importorskip("bitsandbytes")

    def quantized(in_features, out_features):
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                                  quant_type="nf4", compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.2,
                                         requires_grad=False, quant_type="nf4", compress_statistics=True)
        try:
            return layer.to("cpu")
        except Exception as error:  # a bitsandbytes build without a CPU 4-bit backend
            pytest.skip(f"bitsandbytes cannot quantize on this machine: {error}")

    modules = peft_projections(quantized)
    assert all(module.lora_A["default"].weight.dtype == torch.float32 for module in modules)
    x = torch.randn(3, 7, 24, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = outputs_and_gradients(lambda x: [module(x) for module in modules], modules, x)
        actual, actual_grads = outputs_and_gradients(lambda x: lora_linears(modules, x), modules, x)
    assert len(producers(actual)) == 1
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype == torch.bfloat16 and relative_error(a, e) < BF16_TOLERANCE
    for a, e in zip(actual_grads, expected_grads):
        assert a.dtype == e.dtype and relative_error(a, e) < BF16_TOLERANCE


def test_lora_linears_leave_dropout_and_no_grad_to_the_modules():
    modules = peft_projections(dropout=0.1)
    for module in modules:
        module.train()
    x = torch.randn(2, 5, 24, requires_grad=True)
    assert len(producers(lora_linears(modules, x))) == 3
    plain = peft_projections()
    with torch.no_grad():
        outputs = lora_linears(plain, x)
    assert all(output.grad_fn is None for output in outputs)
    expected = [module(x) for module in plain]
    assert all(relative_error(a, e) < FP32_TOLERANCE for a, e in zip(outputs, expected))
