"""fastgemma.dense_weights on CPU (PatchOptions(hold_dequantized_weights=True)): graphed QLoRA steps that multiply
with dequantised copies of the 4-bit weights train exactly like bitsandbytes' own layers, hold copies only within their share of memory, drop a copy whose
weight was replaced, and leave nothing behind when unpatched. (The GPU tests replay the copies in real graphs.)"""

import copy
import logging

import pytest
import torch

import fastgemma
from conftest import relative_error
from fake_memory import FakeMemory
from fastgemma import regions
from fastgemma.memory_budget import GiB
from fastgemma.ops.nf4 import DEQUANTIZED, holds_dequantized
from fastgemma.patches import gemma2 as glue
from test_compile_layers import packed_step

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def base_4bit():
    from transformers import BitsAndBytesConfig, Gemma2ForCausalLM

    from test_patch import _saved_tiny_model

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    try:
        return Gemma2ForCausalLM.from_pretrained(_saved_tiny_model(), quantization_config=quantization,
                                                 dtype=torch.float32)
    except Exception as error:  # bitsandbytes builds without a CPU 4-bit backend
        pytest.skip(f"4-bit loading not available on this machine: {error}")


@pytest.fixture
def eager_body(monkeypatch):
    """The graphed layer body uncompiled (the copies are what these tests check; compiling on a CPU is slow)."""
    monkeypatch.setattr(regions, "compiled", lambda function: function)


def qlora_model(base, memory, **patch):
    """A patched, graphed QLoRA copy of `base` whose memory budget reads `memory` (a FakeMemory)."""
    from peft import LoraConfig, get_peft_model

    options = fastgemma.PatchOptions(**{"max_row_tokens": 128, "fused_ops": True, "cuda_graphs": True,
                                        "hold_dequantized_weights": True, **patch})
    model = fastgemma.patch_model(copy.deepcopy(base), options=options)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    if state(model).budget is not None:
        state(model).budget.memory = memory
    return model.train()


def state(model):
    return next(m for m in model.modules() if "_fastgemma_state" in m.__dict__)._fastgemma_state


def four_bit_layers(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def held_layers(model):
    layers = model.base_model.model.model.layers
    return [all(holds_dequantized(m) for m in four_bit_layers(layer)) for layer in layers]


def weights_bytes(layer) -> int:
    return sum(2 * m.weight.numel() * m.compute_dtype.itemsize for m in four_bit_layers(layer))


def assert_same_steps(model, reference, steps=((40, 9, 30), (25, 50), (7, 33, 12, 20))):
    for seed, lengths in enumerate(steps):
        logits, loss, grads = packed_step(model, list(lengths), seed)
        ref_logits, ref_loss, ref_grads = packed_step(reference, list(lengths), seed)
        assert relative_error(logits, ref_logits) < 1e-6 and relative_error(loss, ref_loss) < 1e-6
        assert grads.keys() == ref_grads.keys() and len(grads) == 4 * 7 * 2
        for name in grads:
            assert relative_error(grads[name], ref_grads[name]) < 1e-6, name


def test_graphed_steps_with_copies_train_exactly_like_bitsandbytes_layers(base_4bit, eager_body, caplog):
    with caplog.at_level(logging.INFO, logger="fastgemma"):
        held = qlora_model(base_4bit, FakeMemory(limit=100 * GiB))
        without = qlora_model(base_4bit, FakeMemory(limit=100 * GiB), memory_budget=None)  # no budget: no copies
        assert_same_steps(held, without)
    assert held_layers(held) == [True] * 4 and not any(held_layers(without))
    copy_of = four_bit_layers(held)[0]
    expected = bnb.functional.dequantize_4bit(copy_of.weight.data, copy_of.weight.quant_state)
    assert torch.equal(getattr(copy_of, DEQUANTIZED), expected.to(copy_of.compute_dtype))
    assert "dequantised copies of 4 of 4 layers' 4-bit weights" in caplog.text
    getattr(copy_of, DEQUANTIZED).mul_(2)  # the steps multiply with the copy, not the packed weight
    _, loss, _ = packed_step(held, [30, 20], 9)
    _, ref_loss, _ = packed_step(without, [30, 20], 9)
    assert relative_error(loss, ref_loss) > 1e-4


def test_copies_stay_within_half_the_memory_and_are_of_the_first_layers(base_4bit, eager_body):
    layer = base_4bit.model.layers[0]
    allocated = 10 * 2 ** 20
    memory = FakeMemory(limit=2 * (allocated + 2 * weights_bytes(layer)) + 1, allocated=allocated)  # room for two
    model = qlora_model(base_4bit, memory)
    packed_step(model, [30, 20], 0)
    assert held_layers(model) == [True, True, False, False]
    memory.limit_bytes = 100 * GiB  # made at the first graphed call only: more room later makes none
    packed_step(model, [30, 20], 1)
    assert held_layers(model) == [True, True, False, False]


def test_a_cap_on_the_budget_bounds_the_copies(base_4bit, eager_body):
    model = qlora_model(base_4bit, FakeMemory(limit=100 * GiB), memory_budget=2 * weights_bytes(base_4bit.model.layers[0]))
    packed_step(model, [30, 20], 0)
    assert held_layers(model) == [True, False, False, False]


@pytest.mark.parametrize("setting", [{"cuda_graphs": False}, {"hold_dequantized_weights": False}],
                         ids=["op-by-op", "by-default"])
def test_op_by_op_calls_and_the_default_make_no_copies(base_4bit, setting):
    model = qlora_model(base_4bit, FakeMemory(limit=100 * GiB), **setting)
    packed_step(model, [30, 20], 0)
    assert not any(held_layers(model))


def test_a_replaced_weight_drops_its_copy_and_the_layer_records_again(base_4bit, eager_body):
    held = qlora_model(base_4bit, FakeMemory(limit=100 * GiB))
    without = qlora_model(base_4bit, FakeMemory(limit=100 * GiB), memory_budget=None)
    assert_same_steps(held, without, steps=[(30, 20)])
    captures = state(held).graphs.captures
    for model in (held, without):  # as PEFT's merge does: a new packed weight object (here the same values)
        target = model.base_model.model.model.layers[1].self_attn.q_proj.base_layer
        target.weight = bnb.nn.Params4bit(target.weight.data, requires_grad=False, quant_state=target.weight.quant_state,
                                          bnb_quantized=True)
    assert_same_steps(held, without, steps=[(25, 25)])
    target = held.base_model.model.model.layers[1].self_attn.q_proj.base_layer
    assert not holds_dequantized(target) and target not in state(held).dense_weights.sources
    assert held_layers(held) == [True, False, True, True]
    assert state(held).graphs.captures > captures


@pytest.mark.parametrize("undo", ["unpatch", "no-budget", "no-graphs", "not-asked"])
def test_unpatching_or_patching_without_a_budget_or_graphs_drops_every_copy(base_4bit, eager_body, undo):
    model = qlora_model(base_4bit, FakeMemory(limit=100 * GiB))
    packed_step(model, [30, 20], 0)
    assert all(held_layers(model))
    if undo == "unpatch":
        fastgemma.unpatch_model(model)
    else:
        setting = {"no-budget": {"memory_budget": None}, "no-graphs": {"cuda_graphs": False},
                   "not-asked": {"hold_dequantized_weights": False}}[undo]
        fastgemma.patch_model(model, options=fastgemma.PatchOptions(
            **{"max_row_tokens": 128, "fused_ops": True, "hold_dequantized_weights": True, **setting}))
    assert not any(DEQUANTIZED in m.__dict__ for m in model.modules())
    if undo == "no-budget":  # and makes none again
        packed_step(model, [30, 20], 1)
        assert not any(held_layers(model))


def test_layers_holding_copies_share_one_compile_of_the_graphed_body(base_4bit, monkeypatch):
    """The copies are module attributes the compiled body reads as inputs: holding them must not make every
    layer compile its own graph."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(glue.decoder_layer_body, backend=counter)
    monkeypatch.setattr(regions, "compiled", lambda function: compiled if function is glue.decoder_layer_body
                        else pytest.fail(f"compiled {function.__name__}"))
    model = qlora_model(base_4bit, FakeMemory(limit=100 * GiB))
    for step, lengths in enumerate([[40, 9, 30], [25, 50]]):
        packed_step(model, lengths, step)
    assert all(held_layers(model))
    assert counter.frame_count == 1, f"the layer body compiled {counter.frame_count} times"


def test_a_forward_out_of_memory_while_holding_copies_drops_them_and_runs_again(base_4bit, eager_body, monkeypatch,
                                                                                caplog):
    """A later step runs short of memory (a longer batch, another process): the copies go for good, the forward
    runs again, and the steps train as without copies."""
    held = qlora_model(base_4bit, FakeMemory(limit=100 * GiB))
    without = qlora_model(base_4bit, FakeMemory(limit=100 * GiB), memory_budget=None)
    assert_same_steps(held, without, steps=[(30, 20)])
    assert all(held_layers(held))
    layer = held.base_model.model.model.layers[2]
    forward, calls = layer.forward, []

    def short_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", short_of_memory)
    with caplog.at_level(logging.WARNING, logger="fastgemma"):
        assert_same_steps(held, without, steps=[(25, 25), (40, 9)])
    assert not any(held_layers(held)) and len(calls) == 3  # the failed call, its rerun, the next step
    assert "holding dequantised copies of 4 layers' 4-bit weights; they are dropped" in caplog.text


def test_a_forward_out_of_memory_without_copies_or_kept_layers_still_raises(base_4bit, eager_body, monkeypatch):
    model = qlora_model(base_4bit, FakeMemory(limit=100 * GiB), hold_dequantized_weights=False)

    def short_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model.base_model.model.model.layers[2], "forward", short_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        packed_step(model, [30, 20], 0)
