"""fastgemma.ops.nf4: bitsandbytes' 4-bit linear as tensor ops, bit for bit against bitsandbytes."""

import pytest
import torch

from fastgemma.ops.nf4 import dequantize_4bit, linear_4bit, supports_4bit_linear

bnb = pytest.importorskip("bitsandbytes")


def quantized_linear(in_features, out_features, quant_type, double_quant, bias=False, seed=0):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(in_features, out_features, bias=bias, dtype=torch.bfloat16)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.bfloat16,
                              compress_statistics=double_quant, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant)
    if bias:
        layer.bias = torch.nn.Parameter(dense.bias.data.clone())
    try:
        layer = layer.to("cpu")  # moving a Params4bit quantizes it
    except Exception as error:  # a bitsandbytes build without a CPU 4-bit backend
        pytest.skip(f"bitsandbytes cannot quantize on this machine: {error}")
    assert layer.weight.dtype == torch.uint8
    return layer


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
@pytest.mark.parametrize("shape", [(384, 512), (128, 72)], ids=["whole-blocks", "partial-blocks"])
def test_dequantize_4bit_is_bitsandbytes_bit_for_bit(quant_type, double_quant, shape):
    # (128, 72): 9,216 values, 144 absmaxes: the last block of double quantisation's 256 is partial
    layer = quantized_linear(shape[1], shape[0], quant_type, double_quant)
    assert supports_4bit_linear(layer)
    state = layer.weight.quant_state
    expected = bnb.functional.dequantize_4bit(layer.weight.data, state)
    actual = dequantize_4bit(layer.weight.data, state)
    assert actual.dtype == expected.dtype == torch.bfloat16 and actual.shape == expected.shape == shape
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_4bit_matches_the_module_forward_and_backward(bias):
    layer = quantized_linear(256, 192, "nf4", True, bias=bias).train()
    x = torch.randn(3, 17, 256, dtype=torch.bfloat16, requires_grad=True)
    expected = layer(x)
    (grad_expected,) = torch.autograd.grad(expected.float().square().sum(), x)
    actual = linear_4bit(layer, x)
    (grad_actual,) = torch.autograd.grad(actual.float().square().sum(), x)
    assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    assert torch.equal(grad_actual, grad_expected)


def test_other_layers_are_not_taken():
    assert not supports_4bit_linear(torch.nn.Linear(64, 64))
    layer = quantized_linear(64, 64, "nf4", True)
    layer.weight.quant_state.packing_format_for_cpu = True  # bitsandbytes' CPU inference repacking
    assert not supports_4bit_linear(layer)
