"""The memory budget (fastgemma.memory_budget, step_memory, offload): what it plans from what it measures, and that
every plan (layers kept, checkpointed, inputs offloaded) trains exactly like checkpointing every layer.

A CPU has no allocator to measure, so these tests hand the budget a fake device memory; the GPU tests measure
the real one.
"""

import copy

import pytest
import torch

import fastgemma
from conftest import lora_training_model, random_gemma2, relative_error, tiny_gemma2_config
from fake_memory import FakeMemory
from fastgemma import offload
from fastgemma.memory_budget import GiB, PROBE, PROBE_ATTENTION, MemoryBudget, StepPlan
from fastgemma.patching import state_of


# -- planning -------------------------------------------------------------------------------------------------
def planned(budget, steps, tokens=1000, layers=26, input_bytes=1000 * 2304 * 2, layer_bytes=None):
    """The plans of `steps` calls; a call that counts a kept layer finds `layer_bytes` (default 25 inputs)."""
    plans = []
    for _ in range(steps):
        plan = budget.plan(tokens, layers, input_bytes)
        counted = None
        if plan.counts_layer:
            counted = (layer_bytes or 25 * input_bytes) + plan.checkpointed * input_bytes
        budget.finish_forward(plan, counted, input_bytes)
        plans.append(plan)
    return plans


def test_a_big_budget_checkpoints_first_counts_one_layer_then_keeps_every_layer():
    budget = MemoryBudget()
    budget.memory = FakeMemory(limit=100 * GiB)
    first, probe, full = planned(budget, 3)
    assert (first.kept, first.offloaded) == (0, 0) and "first step" in first.why
    assert probe.kept == 1 and probe.counts_layer
    assert full.kept == 26 and full.offloaded == 0
    assert budget.layer_per_token == pytest.approx(25 * 2304 * 2)


def test_the_budget_keeps_as_many_layers_as_fit_and_no_more():
    input_bytes = 4000 * 2304 * 2
    layer_bytes = 25 * input_bytes
    memory = FakeMemory(limit=10 * GiB, allocated=3 * GiB)
    budget = MemoryBudget()
    budget.memory = memory
    plans = planned(budget, 4, tokens=4000, input_bytes=input_bytes, layer_bytes=layer_bytes)
    margin = 2 * GiB  # 10% of 10 GiB is less than the 2 GiB minimum
    room = 10 * GiB - margin - 3 * GiB - 26 * input_bytes - budget.rest_per_token * 4000
    assert 1 < plans[-1].kept == int(room // (layer_bytes - input_bytes)) < 26
    assert plans[-1].budget == 8 * GiB


def test_a_cap_lowers_the_budget():
    budget = MemoryBudget(cap=4 * GiB)
    budget.memory = FakeMemory(limit=100 * GiB, allocated=GiB)
    plans = planned(budget, 3, tokens=4000, input_bytes=4000 * 2304 * 2)
    assert plans[-1].budget == 4 * GiB and 0 < plans[-1].kept < 26


def test_a_budget_below_the_checkpointed_inputs_offloads_the_first_inputs():
    input_bytes = 100 * 2 ** 20
    budget = MemoryBudget(cap=GiB)
    budget.memory = FakeMemory(limit=100 * GiB, allocated=0)
    first, second = planned(budget, 2, layers=26, input_bytes=input_bytes)
    # First step: 26 inputs and one layer's guessed recompute; then the measured rest instead of the guess.
    assert first.offloaded == 26 and first.kept == 0
    assert second.offloaded == 26 - GiB // input_bytes and second.kept == 0
    assert "CPU memory" in second.why


def test_a_lowered_peak_teaches_nothing_new():
    """After someone resets the allocator's peak statistics, the peak says nothing about the last step."""
    budget = MemoryBudget()
    memory = budget.memory = FakeMemory()
    planned(budget, 2)
    learned = budget.rest_per_token
    assert learned is not None
    memory.peak = lambda: 0
    planned(budget, 1)
    assert budget.rest_per_token == learned


@pytest.mark.parametrize("value", [-1, 0, 1.5, "1GB", True])
def test_bad_budgets_are_refused_in_one_line(value):
    with pytest.raises(ValueError, match="memory_budget must be") as error:
        fastgemma.PatchOptions(memory_budget=value)
    assert "\n" not in str(error.value)


def test_describe_says_what_was_chosen():
    text = StepPlan(4096, 26, kept=20, offloaded=0, budget=120 * GiB).describe()
    assert text == "4,096-token steps keep 20 of 26 layers' activations, checkpoint 6, within a 120.0 GiB budget"
    assert "3 of their inputs offloaded to CPU" in StepPlan(4096, 26, offloaded=3).describe()


# -- training under each plan -----------------------------------------------------------------------------------
def lora_model(base, reentrant=False, **patch):
    return lora_training_model(base, reentrant=reentrant, **patch)


def backbone_state(model):
    return next(state_of(m) for m in model.modules() if state_of(m) is not None)


def train_steps(model, steps=3, memory=None, saved=None, first=0):
    """Loss and LoRA gradients of `steps` packed training calls (a new batch each, from batch `first` on);
    `memory`: the fake device memory the budget reads; `saved`: a list that gets each step's bytes saved outside
    checkpoints."""
    if memory is not None:
        backbone_state(model).budget.memory = memory
    results = []
    for step in range(first, first + steps):
        lengths = (40, 24 + step)
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        ids = torch.randint(0, 97, (1, sum(lengths)), generator=torch.Generator().manual_seed(step))
        model.zero_grad(set_to_none=True)
        storages = {}

        def pack(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss
        loss.backward()
        if saved is not None:
            saved.append(sum(storages.values()))
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    return results


def assert_same_training(actual, expected, tolerance=1e-6):
    for (loss, grads), (loss_ref, grads_ref) in zip(actual, expected, strict=True):
        assert relative_error(loss, loss_ref) < tolerance
        assert grads.keys() == grads_ref.keys() and grads
        for name in grads:
            assert relative_error(grads[name], grads_ref[name]) < tolerance, name


@pytest.fixture(scope="module")
def base():
    return random_gemma2(tiny_gemma2_config(window=16, layers=4))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_kept_layers_train_exactly_like_checkpointing_every_layer(base, reentrant):
    reference = train_steps(lora_model(base, reentrant, memory_budget=None))
    model = lora_model(base, reentrant)
    saved = []
    results = train_steps(model, memory=FakeMemory(), saved=saved)
    assert_same_training(results, reference)
    plan = fastgemma.memory_plan(model)
    assert (plan.kept, plan.layers, plan.offloaded) == (4, 4, 0)
    assert saved[2] > 3 * saved[0]  # the third step kept every layer's activations; the first only their inputs
    for layer in model.base_model.model.model.layers:  # the call lowered the flags for itself only
        assert layer.gradient_checkpointing


def host_copies(monkeypatch) -> list:
    """The list every offloaded tensor's host copy will be appended to."""
    copies = []
    made = offload._HostCopy.__init__

    def counting(self, *args):
        made(self, *args)
        copies.append(self)

    monkeypatch.setattr(offload._HostCopy, "__init__", counting)
    return copies


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_offloaded_inputs_train_exactly_like_checkpointing_every_layer(base, reentrant, monkeypatch):
    copies = host_copies(monkeypatch)
    reference = train_steps(lora_model(base, reentrant, memory_budget=None))
    model = lora_model(base, reentrant, memory_budget=1)
    results = train_steps(model, memory=FakeMemory())
    assert_same_training(results, reference)
    plan = fastgemma.memory_plan(model)
    assert (plan.kept, plan.offloaded) == (0, 4)
    assert len(copies) == 3 * 4  # every layer's input, every step
    assert all(copy.host.shape == (1, 64 + step, 64) for step in range(3) for copy in copies[4 * step:4 * step + 4])


def test_without_a_budget_or_on_a_cpu_every_layer_is_checkpointed(base):
    model = lora_model(base)
    train_steps(model, steps=2)  # no fake memory: a CPU
    assert fastgemma.memory_plan(model) is None
    off = lora_model(base, memory_budget=None)
    assert backbone_state(off).budget is None and fastgemma.memory_plan(off) is None


def test_evaluation_and_no_grad_calls_plan_nothing(base):
    model = lora_model(base)
    backbone_state(model).budget.memory = FakeMemory()
    ids = torch.randint(0, 97, (1, 32))
    with torch.no_grad():
        model(input_ids=ids)
    model.eval()
    model(input_ids=ids)
    assert fastgemma.memory_plan(model) is None


def test_a_patched_model_with_a_budget_copies_without_its_measurements(base):
    model = lora_model(base)
    train_steps(model, steps=2, memory=FakeMemory())
    twin = copy.deepcopy(model)
    budget = backbone_state(twin).budget
    assert budget.memory is None and budget.rest_per_token is None and budget.last_plan is None


@pytest.mark.parametrize("layers", [{"cuda_graphs": True}, {"compiled_regions": True}],
                         ids=["cuda-graphs", "compiled-regions"])
def test_compiled_layers_keep_and_offload_exactly(base, monkeypatch, layers):
    """CUDA-graphed layers (here replayed without capture, on a CPU) keep layers through their kept recordings,
    compiled regions like the op-by-op path; the inputs of both go to the host like any checkpointed layer's."""
    reference = train_steps(lora_model(base, memory_budget=None, fused_ops=True, **layers))
    model = lora_model(base, fused_ops=True, **layers)
    assert_same_training(train_steps(model, memory=FakeMemory()), reference, 1e-5)
    assert fastgemma.memory_plan(model).kept == 4
    graphs = backbone_state(model).graphs
    if "cuda_graphs" in layers:  # the first step recorded checkpointed pairs, the second one kept pair, the third three
        assert sum(g.pool is not None for g in graphs._layers.values()) == 4 and graphs.captures == 8
    copies = host_copies(monkeypatch)
    offloaded = lora_model(base, fused_ops=True, force_offload=True, **layers)
    assert_same_training(train_steps(offloaded, memory=FakeMemory()), reference, 1e-5)
    assert fastgemma.memory_plan(offloaded).offloaded == 4 and len(copies) == 3 * 4


def test_under_auto_a_call_that_offloads_runs_op_by_op(base, monkeypatch, caplog):
    """cuda_graphs="auto" (pretended on a CPU) graphs a call with room to checkpoint, and runs one whose plan
    offloads op by op: the same results, inputs on the host, nothing recorded, and the log says why."""
    import logging

    from fastgemma import graph_policy, log

    monkeypatch.setattr(graph_policy, "auto_graphs_decline", lambda *args: None)
    reference = train_steps(lora_model(base, memory_budget=None, fused_ops=True, cuda_graphs=False))
    graphed = lora_model(base, fused_ops=True)
    assert_same_training(train_steps(graphed, memory=FakeMemory()), reference, 1e-5)
    assert backbone_state(graphed).graphs.captures > 0
    copies = host_copies(monkeypatch)
    log.said.clear()
    offloaded = lora_model(base, fused_ops=True, force_offload=True)
    with caplog.at_level(logging.INFO, logger="fastgemma"):
        assert_same_training(train_steps(offloaded, memory=FakeMemory()), reference, 1e-5)
    assert fastgemma.memory_plan(offloaded).offloaded == 4 and len(copies) == 3 * 4
    assert backbone_state(offloaded).graphs.captures == 0 and backbone_state(offloaded).graphs_declined is None
    assert "cuda_graphs=auto: the memory plan offloads checkpointed inputs" in caplog.text


# -- the recipe ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, value, patched", [("auto", "auto", "auto"), ("off", "off", None),
                                                  ("20", 20.0, 20 * GiB), ("0.5", 0.5, GiB // 2)])
def test_the_recipe_takes_a_memory_budget_in_gib(text, value, patched):
    from sft.config import memory_budget_arg, patch_memory_budget

    assert memory_budget_arg(text) == value
    assert patch_memory_budget(value) == patched


@pytest.mark.parametrize("text", ["0", "-3", "lots", "inf", "nan"])
def test_the_recipe_refuses_a_bad_memory_budget(text):
    import argparse

    from sft.config import memory_budget_arg

    with pytest.raises(argparse.ArgumentTypeError, match="expected auto, off or a positive number of GiB"):
        memory_budget_arg(text)


def test_the_recipe_summary_says_what_the_budget_chose():
    from sft.reporting import memory_plan_text, summary_lines

    plan = StepPlan(8192, 26, kept=20, budget=120 * GiB)
    text = memory_plan_text(plan, 100.0)
    assert text == plan.describe() + " (--memory-budget 100.0)"
    summary = {"steps": 10, "resumed_from_step": 0, "train_runtime_s": 10.0, "tokens": 1000, "tokens_per_s": 100.0,
               "warm_from_step": None, "model": "m", "backend": "auto", "fused_ops": "auto", "peak_memory": "1 GiB",
               "first_loss": None, "last_loss": None, "output_dir": "out", "batch_size": 8, "grad_accum": 1,
               "memory_plan": text}
    assert f"activations  {text}" in summary_lines(summary)
    assert memory_plan_text(None, "auto") is None


def test_host_buffers_are_reused_across_lengths_and_released(caplog):
    """Pinned buffers get a quarter more than asked (rounded up to 2 MiB), so the next packed step, a little
    longer, reuses them instead of pinning again; a step that offloads nothing frees them. Where memory cannot
    be pinned (here: no GPU) they are pageable, and the log says so once."""
    from fastgemma import log

    log.said.discard("unpinned offload")
    pool = offload.HostBuffers()
    mib = 2 ** 20 // 4  # float32 elements per MiB
    with caplog.at_level("WARNING", logger="fastgemma"):
        first, view = pool.take(torch.empty(16, mib))
        assert first.numel() == 20 * 2 ** 20 and view.shape == (16, mib) and view.dtype == torch.float32
        pool.give(first)
        again, _ = pool.take(torch.empty(19, mib))
        assert again is first  # a longer step, within the head-room: the same buffer
        bigger, _ = pool.take(torch.empty(21, mib))
        assert bigger is not first and bigger.numel() == 28 * 2 ** 20  # 21 * 1.25 = 26.25, rounded up to 2 MiB
    assert caplog.text.count("could not pin") == (0 if torch.cuda.is_available() else 1)
    pool.give(bigger)
    pool.give(again)
    small, _ = pool.take(torch.empty(10))  # the smallest buffer that holds it, of several free ones
    assert small is first
    pool.give(small)
    pool.release()
    assert pool.take(torch.empty(10))[0] is not first


@pytest.mark.parametrize("graphs, fused, device, tokens, expected", [
    ("auto", "auto", "cuda", 2048, True),    # a short micro-step on a GPU: graphed
    ("auto", "auto", "cuda", 16384, False),  # long ones run op by op: layers may be kept
    ("auto", "auto", "cpu", 2048, False),    # auto graphs only on CUDA
    (True, True, "cpu", 2048, True),         # forced graphs run anywhere (without capture on a CPU)
    (False, "auto", "cuda", 2048, False),
])
def test_the_plan_knows_which_calls_run_graphed(graphs, fused, device, tokens, expected):
    from fastgemma.graph_policy import graphs_expected

    options = fastgemma.PatchOptions(cuda_graphs=graphs, fused_ops=fused)
    assert graphs_expected(options, torch.device(device), tokens) is expected


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_a_trained_embedding_wrapped_by_peft_is_planned_too(base):
    """LoRA with modules_to_save=["embed_tokens"]: PEFT wraps the embedding, which still tells the hidden
    states' dtype; training keeps layers and matches checkpointing every layer."""
    from peft import LoraConfig, get_peft_model

    def model_with(**patch):
        model = fastgemma.patch_model(copy.deepcopy(base), max_row_tokens=128, **patch)
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 modules_to_save=["embed_tokens"], init_lora_weights=False))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.train()

    reference = train_steps(model_with(memory_budget=None))
    model = model_with()
    assert_same_training(train_steps(model, memory=FakeMemory()), reference)
    assert fastgemma.memory_plan(model).kept == 4


def test_some_layers_kept_and_the_rest_checkpointed_train_exactly(base):
    """A budget that holds two layers' activations besides the checkpointed inputs: the last layers keep theirs,
    the others recompute, and training is still exactly that of checkpointing every layer."""
    reference = train_steps(lora_model(base, memory_budget=None), steps=5)
    model = lora_model(base)
    memory = FakeMemory()
    results = train_steps(model, steps=2, memory=memory)  # measures the rest and one kept layer
    budget = backbone_state(model).budget
    tokens = 66
    input_bytes, layer_bytes = tokens * 64 * 4, budget.layer_per_token * tokens
    rest = budget.rest_per_token * tokens
    memory.limit_bytes = int(2 * GiB + 4 * input_bytes + rest + 2.5 * (layer_bytes - input_bytes))
    results += train_steps(model, steps=3, first=2)  # the reference's steps 3 to 5
    assert_same_training(results, reference)
    plan = fastgemma.memory_plan(model)
    assert plan.kept == 2 and plan.offloaded == 0, plan
    layers = model.base_model.model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)


def test_a_forward_out_of_memory_with_layers_kept_runs_again_checkpointing_every_layer(base, monkeypatch, caplog):
    """Something took the room the budget planned for (the allocator's fragmentation, another allocation): the
    forward that kept layers runs out of memory and runs again checkpointing every layer (the step's results
    unchanged); later steps plan within a budget one more margin lower, and after a second such forward keep none."""
    from fastgemma.memory_budget import MAX_BACK_OFFS, OUT_OF_MEMORY

    assert MAX_BACK_OFFS == 2
    reference = train_steps(lora_model(base, memory_budget=None), steps=6)
    model = lora_model(base)
    layers = model.base_model.model.model.layers
    kept_calls = []

    def short_of_memory(layer, forward):
        def call(*args, **kwargs):
            if not layer.gradient_checkpointing:  # a kept layer
                kept_calls.append(layer)
                if len(kept_calls) in (3, 5):
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return forward(*args, **kwargs)
        return call

    for layer in layers:
        monkeypatch.setattr(layer, "forward", short_of_memory(layer, layer.forward))
    memory, plans = FakeMemory(), []  # 100 GiB: the margin is 10 GiB
    with caplog.at_level("WARNING", logger="fastgemma"):
        results = []
        for step in range(6):  # step 2 keeps one layer; steps 3 and 4 would keep 4
            results += train_steps(model, steps=1, first=step, memory=memory)
            plans.append(fastgemma.memory_plan(model))
    assert_same_training(results, reference)
    assert len(kept_calls) == 5  # one in step 2, two in each of steps 3 and 4 before their errors; none after
    assert plans[1].budget == 90 * GiB and plans[1].kept == 1
    # step 3's rerun checkpoints every layer, within the lowered budget; so does step 4's, after the second error
    assert (plans[2].kept, plans[2].why, plans[2].budget) == (0, OUT_OF_MEMORY, 80 * GiB), plans[2]
    for plan in plans[3:]:
        assert (plan.kept, plan.attention_saved, plan.why) == (0, 0, OUT_OF_MEMORY), plan
    assert "it runs again checkpointing every layer, and later steps plan within a budget 10.0 GiB lower" in caplog.text
    assert "it runs again checkpointing every layer, and so will later steps" in caplog.text
    assert all(layer.gradient_checkpointing for layer in layers)


def test_an_out_of_memory_forward_that_kept_nothing_raises(base, monkeypatch):
    def short_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = lora_model(base, memory_budget=None)
    monkeypatch.setattr(model.base_model.model.model.layers[2], "forward", short_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        train_steps(model, steps=1)
    model = lora_model(base)
    monkeypatch.setattr(model.base_model.model.model.layers[2], "forward", short_of_memory)
    with pytest.raises(torch.OutOfMemoryError):  # the first step checkpoints every layer: nothing to give back
        train_steps(model, steps=1, memory=FakeMemory())
    assert not backbone_state(model).budget.backed_off
    monkeypatch.undo()
    train_steps(model, steps=3, first=1)  # the third step keeps every layer
    assert fastgemma.memory_plan(model).kept == 4
    layer = model.base_model.model.model.layers[2]
    monkeypatch.setattr(layer, "forward", short_of_memory)
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():  # an evaluation call has no plan to back off
        model.eval()(input_ids=torch.zeros(1, 8, dtype=torch.long), use_cache=False)
    assert not backbone_state(model).budget.backed_off


# -- layers that save their attention (the middle tier, where attention's saved tensors grow with the tokens) --
def test_attention_saving_fills_the_room_before_whole_layers_are_kept():
    budget = MemoryBudget()
    budget.memory = FakeMemory(limit=10 * GiB, allocated=3 * GiB)
    input_bytes = 4000 * 2304 * 2
    layer_bytes, attention_bytes = 25 * input_bytes, 4 * input_bytes

    def call():
        plan = budget.plan(4000, 26, input_bytes, save_attention=True)
        counted = None
        if plan.why == PROBE:
            counted = layer_bytes + plan.checkpointed * input_bytes
        elif plan.why == PROBE_ATTENTION:
            counted = attention_bytes + plan.kept * layer_bytes + plan.checkpointed * input_bytes
        budget.finish_forward(plan, counted, input_bytes)
        return plan

    first, kept_probe, attention_probe, planned = call(), call(), call(), call()
    assert first.kept == 0 and first.attention_saved == 0  # nothing measured yet: every layer checkpointed
    assert kept_probe.kept == 1 and attention_probe.why == PROBE_ATTENTION and attention_probe.attention_saved == 1
    assert budget.attention_per_token * 4000 == pytest.approx(attention_bytes)
    room = 10 * GiB - 2 * GiB - 3 * GiB - 26 * input_bytes - budget.rest_per_token * 4000
    assert planned.attention_saved + planned.kept == 26 and planned.kept >= 1
    assert planned.kept == int((room - 26 * (attention_bytes - input_bytes)) // (layer_bytes - attention_bytes))
    assert "save the attention of" in planned.describe()
    without = MemoryBudget()
    without.memory, without.rest_per_token, without.layer_per_token = budget.memory, budget.rest_per_token, \
        budget.layer_per_token
    assert without.plan(4000, 26, input_bytes).attention_saved == 0  # dense attention: no tier


def test_layers_saving_their_attention_train_exactly(base, monkeypatch):
    """Where attention may be saved (flex on a GPU; here the dense path, allowed for the test), a budget between
    checkpointing and keeping every layer saves some layers' attention and keeps others: the same training."""
    import fastgemma.patches.gemma2 as glue
    from fastgemma import step_memory

    monkeypatch.setattr(step_memory, "attention_memory_is_linear", lambda *args: True)
    split_calls = []
    original = glue._attention_inputs

    def counting(*args):
        split_calls.append(1)
        return original(*args)

    monkeypatch.setattr(glue, "_attention_inputs", counting)
    for reentrant in (False, True):
        reference = train_steps(lora_model(base, reentrant, memory_budget=None), steps=6)
        model = lora_model(base, reentrant)
        memory = FakeMemory()
        results = train_steps(model, steps=2, memory=memory)  # the rest, then one kept layer, measured
        budget = backbone_state(model).budget
        # the budget takes the attention for flex's, which also saves a fixed part at its padded length
        padded = fastgemma.memory_plan(model).padded_bytes
        input_bytes, layer_bytes = 66 * 64 * 4, budget.layer_per_token * 66 + padded
        room = 2.5 * (layer_bytes - input_bytes)
        memory.limit_bytes = int(2 * GiB + 4 * input_bytes + budget.rest_per_token * 66 + room)
        plans = []
        for step in range(2, 6):
            results += train_steps(model, steps=1, first=step)
            plans.append(fastgemma.memory_plan(model))
        assert_same_training(results, reference)
        assert plans[0].why == PROBE_ATTENTION and budget.attention_per_token is not None
        assert plans[-1].attention_saved >= 1 and plans[-1].kept >= 1, plans[-1]
    assert split_calls  # the two-piece layers ran (and recomputed their pieces in the backward)


def test_what_attention_saves_at_its_padded_length_is_counted_apart_from_the_tokens():
    """flex saves queries, keys, values and output at a fixed padded length: a layer counted on a long step must
    not be taken to save as much per token on a shorter one (nor less on a longer one)."""
    input_bytes_per_token, per_token, padded = 2304 * 2, 25 * 2304 * 2, 300 * 2 ** 20
    budget = MemoryBudget()
    budget.memory = FakeMemory(limit=100 * GiB, allocated=0)
    for tokens in (8000, 8000):  # the rest, then one kept layer counted with its padded part
        plan = budget.plan(tokens, 26, tokens * input_bytes_per_token, padded_bytes=padded)
        counted = plan.kept * (per_token * tokens + padded) + plan.checkpointed * tokens * input_bytes_per_token
        budget.finish_forward(plan, counted if plan.counts_layer else None, tokens * input_bytes_per_token)
    assert plan.why == PROBE and plan.padded_bytes == padded
    assert budget.layer_per_token == pytest.approx(per_token)

    short = 2000
    input_bytes = short * input_bytes_per_token
    rest = budget.rest_per_token * short
    layer_bytes = per_token * short + padded
    room_for = 7.5  # layers beyond checkpointing every one
    margin = 2 * GiB  # the minimum: 10% of this fake device is less
    budget.memory.limit_bytes = int(margin + 26 * input_bytes + rest + room_for * (layer_bytes - input_bytes))
    plan = budget.plan(short, 26, input_bytes, padded_bytes=padded)
    # Counted per token alone, the padded part spread over the long step's tokens, it would keep 13.
    assert plan.kept == 7, plan


def test_the_padded_length_is_read_without_growing_the_cache():
    cache = fastgemma.BlockMaskCache(1000)
    assert cache.padded_length_for(900) == cache.length == 1024
    assert cache.padded_length_for(3000) == 4096 and cache.length == 1024
    assert cache.length_for(3000) == 4096 == cache.length
