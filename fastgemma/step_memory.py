"""A backbone's training call under its memory budget (fastgemma.memory_budget): the plan made, applied, said.

Kept layers run this call without checkpointing (their `gradient_checkpointing` flag is lowered for the call
only, which works wherever transformers checkpoints: in the layer's forward or its ``__call__``; CUDA-graphed
layers then run their kept graphs, and those of layers no longer kept are dropped); layers that save
their attention have the flag lowered too, and the model's glue checkpoints them in two pieces around the
attention (`PatchState.attention_saved_layers`); offloaded inputs and the counts of what a layer keeps go through
fastgemma.offload's saved-tensor hooks.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Optional

import torch

from .attention import backend_runs_flex
from .graph_policy import graphs_expected
from .log import say_once
from .masks import round_up
from .memory_budget import DeviceMemory, GiB, MemoryBudget, StepPlan
from .offload import HostBuffers, SavedTensorRouter
from .processes import world_size


def budget_for(options, previous: Optional[MemoryBudget]) -> Optional[MemoryBudget]:
    """The budget a backbone patched with `options` keeps (None: checkpoint every layer, as HF does)."""
    if options.memory_budget is None and not options.force_offload:
        return None
    cap = options.memory_budget if isinstance(options.memory_budget, int) else None
    settings = (cap, options.force_offload)
    if previous is not None and (previous.cap, previous.force_offload) == settings:
        return previous
    return MemoryBudget(*settings)


def copies_allowed(options, budget: Optional[MemoryBudget]) -> bool:
    """Whether dequantised 4-bit copies (fastgemma.dense_weights) may be held: opt-in, for CUDA-graphed calls
    under a memory budget."""
    return budget is not None and bool(options.layer_graphs) and options.hold_dequantized_weights


def set_budget(state, options) -> None:
    """A patched backbone's budget for `options`; copies the options no longer allow are dropped."""
    state.budget = budget_for(options, state.budget)
    if not copies_allowed(options, state.budget):
        state.dense_weights.release()


def run_planned(backbone, state, kwargs, forward):
    """`forward(**kwargs)` under the call's memory plan (`planned_call`). A forward that runs out of memory with
    layers kept, or with dequantised 4-bit copies held, runs once more checkpointing every layer and without the
    copies, as it would without a budget (in one process only: ranks that ran a forward twice would no longer
    meet in FSDP's collectives)."""
    plan = None  # this call's plan, once made (None also where no budget applies)
    try:
        with planned_call(backbone, state, kwargs) as plan:
            return forward(**kwargs)
    except torch.OutOfMemoryError:
        if plan is None or world_size() > 1:
            raise
        kept_some = state.budget.back_off(plan)
        if kept_some and getattr(state, "graphs", None) is not None:
            state.graphs.release_kept()  # the rerun keeps none: their pools' memory goes back
        copies = state.dense_weights.give_up()
        if not (kept_some or copies):
            raise
    if kept_some:
        budget = state.budget
        later = ("so will later steps (memory_budget=None does so from the start)" if budget.backed_off else
                 f"later steps plan within a budget {budget.lowered / GiB:.1f} GiB lower")
        say_once(f"memory back-off {budget.back_offs}", logging.WARNING, "fastgemma: memory: out of memory in a "
                 "forward that kept %d layers' activations and saved %d layers' attention; it runs again "
                 "checkpointing every layer, and %s", plan.kept, plan.attention_saved, later)
    if copies:
        say_once("dense weights back-off", logging.WARNING, "fastgemma: memory: out of memory in a forward while "
                 "holding dequantised copies of %d layers' 4-bit weights; they are dropped, the forward runs again "
                 "and later steps dequantise at every use", copies)
    gc.collect()  # the failed forward's tensors, held by its frames
    with planned_call(backbone, state, kwargs):
        return forward(**kwargs)


@contextlib.contextmanager
def planned_call(backbone, state, kwargs):
    """Around a backbone's forward: while training with checkpointing on a CUDA device, the call keeps, recomputes
    and offloads as its budget plans (yields the plan, or None where no budget applies)."""
    budget = getattr(state, "budget", None)
    layers = [layer for layer in getattr(backbone, "layers", ()) if getattr(layer, "gradient_checkpointing", False)]
    reference = kwargs.get("input_ids")
    if reference is None:
        reference = kwargs.get("inputs_embeds")
    if (budget is None or not layers or reference is None or reference.dim() < 2 or not backbone.training
            or not torch.is_grad_enabled()):
        yield None
        return
    device = reference.device
    if budget.memory is None or getattr(budget.memory, "device", device) != device:
        if device.type != "cuda":  # a CPU's memory is the host's: checkpoint every layer, as without a budget
            yield None
            return
        budget.memory = DeviceMemory(device)
    dtype = _hidden_dtype(backbone, kwargs.get("inputs_embeds"))
    shape = (reference.shape[0], reference.shape[1], backbone.config.hidden_size)
    tokens = shape[0] * shape[1]
    input_bytes = tokens * shape[2] * dtype.itemsize
    graphed = graphs_expected(state.options, device, tokens)
    if graphed and copies_allowed(state.options, budget):  # short micro-steps: room for dequantised copies
        state.dense_weights.hold(getattr(backbone, "layers", ()), budget.memory, budget.cap)
    runs_flex = attention_memory_is_linear(state.options, device, backbone.config)
    save_attention = runs_flex and not graphed and not state.options.compiles_layers
    padded_bytes = 0  # a graphed layer's padded attention is in its graph pool, counted with it
    if runs_flex and not graphed:
        cache = getattr(state, "cache", None)
        length = cache.padded_length_for(shape[1]) if cache is not None else round_up(shape[1])
        padded_bytes = flex_padded_bytes(backbone.config, shape[0], length, dtype)
    plan = budget.plan(tokens, len(layers), input_bytes, save_attention, padded_bytes)
    router = None
    if not plan.offloaded and state.host_buffers is not None:
        state.host_buffers.release()
    count = plan.counts_layer
    if plan.offloaded or count:
        storages = _parameter_storages(backbone) if count else ()
        host = state.host_buffers = getattr(state, "host_buffers", None) or HostBuffers()
        router = SavedTensorRouter(shape, plan.offloaded, count, storages, host)
    split = len(layers) - plan.kept
    kept, saved = layers[split:], layers[split - plan.attention_saved:split]
    for layer in (*saved, *kept):  # the glue checkpoints the attention-saving layers itself, in two pieces
        layer.gradient_checkpointing = False
    state.attention_saved_layers = frozenset(saved)
    graphs = getattr(state, "graphs", None)
    if graphs is not None:  # kept graphs' pools are cached memory the plan counted as free: only kept ones stay
        graphs.release_kept(kept if graphed else ())
    if graphed and plan.offloaded and state.options.layer_graphs == "auto":
        # A step short of room to checkpoint runs op by op: the graphs' pool and static buffers would take room
        # it lacks. cuda_graphs=True still offloads the graphed layers' inputs.
        state.graphs_declined = "the memory plan offloads checkpointed inputs to CPU memory"
    try:
        with router if router is not None else contextlib.nullcontext():
            yield plan
    finally:
        for layer in (*saved, *kept):
            layer.gradient_checkpointing = True
        state.attention_saved_layers = frozenset()
        state.graphs_declined = None
    counted = None
    if count:  # what the layers saved outside their graphs, and the kept graphs' pools
        counted = router.counted + (sum(graphs.kept_bytes(layer) for layer in kept) if graphs is not None else 0)
    budget.finish_forward(plan, counted, input_bytes)
    say_once(("memory plan", plan.kept == plan.layers, plan.kept > 0, plan.offloaded > 0, plan.why), logging.INFO,
             "fastgemma: memory: %s", plan.describe())


def attention_memory_is_linear(options, device: torch.device, config) -> bool:
    """Whether a layer's attention saves tensors that grow with the tokens (flex attention: queries, keys, values,
    output, log-sum-exp), not with their square (the dense backends keep the probabilities): only then may the
    budget save a layer's attention instead of recomputing it."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return backend_runs_flex(options.backend, device, head_dim, getattr(config, "attention_dropout", 0.0) or 0.0)


def flex_padded_bytes(config, batch: int, padded_length: int, dtype: torch.dtype) -> int:
    """What one layer's flex attention saves for its backward: queries, keys, values and output at the fixed
    `padded_length` in `dtype`, and the float32 log-sum-exp, the same for every call padded to that length."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    per_position = (2 * heads + 2 * kv_heads) * head_dim * dtype.itemsize + heads * 4
    return batch * padded_length * per_position


def _hidden_dtype(backbone, embeds) -> torch.dtype:
    """The dtype of the hidden states the layers pass on: the embeddings' (a wrapped embedding, such as PEFT's
    modules_to_save, included)."""
    if embeds is not None:
        return embeds.dtype
    embedding = backbone.get_input_embeddings()
    weight = next((p for p in embedding.parameters() if p.is_floating_point()), None) if embedding is not None else None
    return weight.dtype if weight is not None else torch.get_default_dtype()


def _parameter_storages(module: torch.nn.Module) -> set:
    tensors = [*module.parameters(), *module.buffers()]
    return {tensor.untyped_storage().data_ptr() for tensor in tensors}


def last_plan(model: torch.nn.Module) -> Optional[StepPlan]:
    """The memory plan of `model`'s last training call (None before one, or where no budget applies)."""
    from .patching import state_of

    for module in model.modules():
        state = state_of(module)
        if state is not None:
            budget = getattr(state, "budget", None)
            return budget.last_plan if budget is not None else None
    return None
