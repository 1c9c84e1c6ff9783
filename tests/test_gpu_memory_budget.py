"""GPU tests (`pytest -m gpu`) of the memory budget: the allocator's real measurements, layers kept, inputs
offloaded to pinned memory on a stream of their own, and the memory that saves.

Skipped on machines without a CUDA GPU of compute capability >= 8.0.
"""

import copy
import gc

import pytest
import torch

import fastgemma
from conftest import lora_training_model, random_gemma2, relative_error, tiny_gemma2_config
from fastgemma import offload
from fastgemma.attention import flex_supported
from fastgemma.patching import state_of

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and flex_supported(torch.device("cuda"))),
        reason="needs a CUDA GPU with compute capability >= 8.0",
    ),
]


def lora_model(base, **patch):
    return lora_training_model(base, rank=8, max_row_tokens=4096, **patch)


def batches(steps, vocab, lengths=((900, 700), (1200, 333), (600, 1000), (2000, 48))):
    generator = torch.Generator().manual_seed(5)
    for step in range(steps):
        documents = lengths[step % len(lengths)]
        ids = torch.randint(0, vocab, (1, sum(documents)), generator=generator).cuda()
        positions = torch.cat([torch.arange(n) for n in documents])[None].cuda()
        yield {"input_ids": ids, "position_ids": positions, "labels": ids}


def train(model, steps=4, vocab=512, plans=None, before_step=None):
    """Each step's loss and gradients; `plans`: a list that gets each step's memory plan; `before_step(step, batch)`
    runs before each step."""
    results = []
    for step, batch in enumerate(batches(steps, vocab)):
        if before_step is not None:
            before_step(step, batch)
        model.zero_grad(set_to_none=True)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
        if plans is not None:
            plans.append(fastgemma.memory_plan(model))
    return results


def assert_same(actual, expected, tolerance=1e-6):
    for (loss, grads), (loss_ref, grads_ref) in zip(actual, expected, strict=True):
        assert abs(loss - loss_ref) <= tolerance * abs(loss_ref)
        assert grads.keys() == grads_ref.keys() and grads
        for name in grads:
            assert relative_error(grads[name], grads_ref[name]) <= tolerance, name


@pytest.fixture(scope="module")
def base():
    config = tiny_gemma2_config(head_dim=256, layers=4, window=256, vocab=512)
    return random_gemma2(config, device="cuda", dtype=torch.bfloat16)


@pytest.mark.parametrize("graphs", [False, True], ids=["op-by-op", "cuda-graphs"])
def test_offloaded_inputs_train_exactly_like_checkpointing_every_layer(base, graphs, monkeypatch):
    pinned = []
    take = offload.HostBuffers.take

    def counting(self, like):
        flat, host = take(self, like)
        pinned.append(flat.data_ptr())
        assert flat.is_pinned() and host.shape == like.shape
        return flat, host

    monkeypatch.setattr(offload.HostBuffers, "take", counting)
    reference = train(lora_model(base, memory_budget=None, cuda_graphs=graphs), steps=4)
    model = lora_model(base, force_offload=True, cuda_graphs=graphs)
    assert_same(train(model, steps=4), reference)
    assert fastgemma.memory_plan(model).offloaded == 4
    assert len(pinned) == 4 * 4
    # Buffers come back when their step's backward is done; the rows' lengths differ, and still 4 buffers (of
    # 2 MiB each) serve every step.
    assert len(set(pinned)) == 4


def test_the_auto_budget_measures_and_keeps_every_layer_on_a_big_gpu(base):
    reference = train(lora_model(base, memory_budget=None, cuda_graphs=False))
    model = lora_model(base, cuda_graphs=False)
    assert_same(train(model), reference)
    budget = state_of(model.base_model.model.model).budget
    assert budget.rest_per_token is not None and budget.layer_per_token > 0
    plan = fastgemma.memory_plan(model)
    assert (plan.kept, plan.offloaded) == (4, 0) and plan.budget > 0, plan


def test_graphed_steps_keep_every_layer_in_graph_pools_on_a_big_gpu(base):
    """CUDA-graphed layers under the default budget: the second step counts one kept layer (the memory its graphs'
    own pool reserved), later steps keep every layer (the backward graphs differentiate the forward graphs' saved
    activations, no recompute), and every step trains like graphs that checkpoint every layer. Two forwards before
    their backwards recompute the layers the second forward replayed over, with the same gradients."""
    reference = lora_model(base, memory_budget=None, cuda_graphs=True)
    expected = train(reference, steps=6)
    model = lora_model(base, cuda_graphs=True)
    plans = []
    assert_same(train(model, steps=6, plans=plans), expected, 1e-5)
    assert plans[1].kept == 1 and plans[1].counts_layer and plans[-1].kept == 4, plans
    state = state_of(model.base_model.model.model)
    layers = model.base_model.model.model.layers
    tokens = 2048
    assert all(state.graphs.kept_bytes(layer) > 0 for layer in layers)
    assert state.budget.layer_per_token * tokens > 4 * tokens * 64 * 2  # a kept layer: several inputs' worth
    first, second = list(batches(2, 512))
    grads = []
    for trained in (reference, model):
        trained.zero_grad(set_to_none=True)
        (trained(**first, use_cache=False).loss + trained(**second, use_cache=False).loss).backward()
        grads.append({n: p.grad.float() for n, p in trained.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(relative_error(grads[1][n], grads[0][n]) <= 1e-5 for n in grads[0])


def test_offloading_lowers_what_the_forward_leaves_on_the_gpu():
    from transformers import Gemma2Config

    config = Gemma2Config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=256, vocab_size=512, sliding_window=1024,
                          attn_implementation="eager")
    base = random_gemma2(config, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 512, (1, 8192), device="cuda")
    input_bytes = 8192 * 1024 * 2

    def after_forward(**patch):
        options = fastgemma.PatchOptions(max_row_tokens=8192, cuda_graphs=False, **patch)
        model = fastgemma.patch_model(copy.deepcopy(base), options=options)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.train()
        # Earlier tests' models, freed by a garbage collection during the forward, would lower what it holds.
        gc.collect()
        gc.disable()
        try:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            torch.cuda.synchronize()
            # The allocator frees a block used on the copy stream at its next allocation after the copy's event.
            torch.empty(1, device="cuda")
            held = torch.cuda.memory_allocated() - before
        finally:
            gc.enable()
        loss.backward()
        return held

    everything = after_forward(memory_budget=None)
    offloaded = after_forward(force_offload=True)
    assert everything - offloaded >= 7.5 * input_bytes, (everything, offloaded, input_bytes)


def test_the_budget_stays_within_a_per_process_memory_fraction():
    """Smaller cards are emulated with torch.cuda.set_per_process_memory_fraction: the budget must see that share,
    not the device's free memory."""
    from fastgemma.memory_budget import DeviceMemory

    device = torch.device("cuda")
    memory = DeviceMemory(device)
    physical = torch.cuda.mem_get_info(device)[1]
    before = torch.cuda.get_per_process_memory_fraction(memory.device)
    try:
        torch.cuda.set_per_process_memory_fraction(0.25, memory.device)
        assert memory.total() == int(physical * 0.25)
        assert memory.limit() <= int(physical * 0.25)
    finally:
        torch.cuda.set_per_process_memory_fraction(before, memory.device)


def test_layers_saving_their_flex_attention_train_exactly(base):
    """The middle tier on flex attention: a budget (read from a stand-in allocator, to place it between
    checkpointing and keeping every layer) that saves some layers' attention and keeps others trains exactly like
    checkpointing every layer."""
    from fake_memory import FakeMemory
    from fastgemma.memory_budget import GiB, PROBE_ATTENTION

    reference = train(lora_model(base, memory_budget=None, cuda_graphs=False), steps=6)
    model = lora_model(base, cuda_graphs=False)
    memory = FakeMemory()
    memory.device = torch.device("cuda", torch.cuda.current_device())
    budget = state_of(model.base_model.model.model).budget
    budget.memory = memory

    def place_budget(step, batch):
        if step == 2:  # the rest and one kept layer are measured: room for 2.5 more kept layers
            tokens = batch["input_ids"].numel()
            padded = fastgemma.memory_plan(model).padded_bytes  # flex's part at its padded length, per layer
            input_bytes, layer_bytes = tokens * 64 * 2, budget.layer_per_token * tokens + padded
            memory.limit_bytes = int(2 * GiB + 4 * input_bytes + budget.rest_per_token * tokens
                                     + 2.5 * (layer_bytes - input_bytes))

    plans = []
    assert_same(train(model, steps=6, plans=plans, before_step=place_budget), reference, 1e-5)
    assert plans[2].why == PROBE_ATTENTION and plans[-1].attention_saved >= 1, plans


def test_graphed_qlora_steps_read_dequantised_copies_and_train_like_without(tmp_path):
    """hold_dequantized_weights with the default budget on a big GPU: the recorded layers multiply with dequantised
    copies of the 4-bit weights (fastgemma.dense_weights) and train like the same graphs dequantising at every use."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, Gemma2ForCausalLM

    from fastgemma.ops.nf4 import holds_dequantized

    random_gemma2(tiny_gemma2_config(head_dim=256, layers=4, window=256, vocab=512)).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    results, held = {}, {}
    for budget in ("auto", None):  # (no hub kernels: transformers >= 5.25 would fetch one for a GPU model)
        base = Gemma2ForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, dtype=torch.bfloat16,
                                                 device_map={"": 0}, use_kernels=False)
        model = lora_model(base, cuda_graphs=True, memory_budget=budget, hold_dequantized_weights=True)
        results[budget] = train(model)
        linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        held[budget] = sum(holds_dequantized(m) for m in linears), len(linears)
    assert held["auto"] == (4 * 7, 4 * 7) and held[None] == (0, 4 * 7)
    assert_same(results["auto"], results[None], tolerance=2e-3)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 4, 256), (4, 2, 128)])
def test_flex_padded_bytes_are_what_flex_attention_saves(heads, kv_heads, head_dim):
    """The budget counts flex's saved tensors at the padded length apart from what grows with the tokens: the
    formula must be what a flex call, given inputs padded as fused RoPE writes them, saves for its backward."""
    from types import SimpleNamespace

    from fastgemma import AttentionMask, BlockMaskCache, softcap_attention
    from fastgemma.step_memory import flex_padded_bytes

    tokens = 1000
    mask = AttentionMask(tokens, tokens, window=256, cache=BlockMaskCache(2048))
    padded = mask.padded_length
    assert padded == 2048 and mask.cache.padded_length_for(tokens) == padded

    def inputs(count):
        return torch.randn(1, count, padded, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    query, key, value = inputs(heads), inputs(kv_heads), inputs(kv_heads)
    saved = {}

    def pack(tensor):
        if tensor.is_floating_point():
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = softcap_attention(query, key, value, mask, scale=head_dim ** -0.5, softcap=50.0, backend="flex")
    output.float().sum().backward()
    assert output.shape[2] == tokens
    config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                             hidden_size=heads * head_dim)
    assert sum(saved.values()) == flex_padded_bytes(config, 1, padded, torch.bfloat16)
