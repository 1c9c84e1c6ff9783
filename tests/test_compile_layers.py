"""Compiled decoder layers on CPU (PatchOptions(compiled_regions=True), what cuda_graphs=True falls back to):
each decoder layer as one compiled region while training.

The same maths as the op-by-op path (against HF eager + PEFT, and over a 4-bit base), one graph per
kind of layer for every token count, no split of the region, and the usual path wherever the region
cannot apply (reentrant checkpointing, inference).
"""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import fastgemma
from conftest import random_gemma2, relative_error, tiny_gemma2_config
from fastgemma import regions


def lora_models(reference, checkpointing, reentrant=False, **patch):
    """(HF eager + PEFT, fastgemma-patched copy + PEFT), with the same LoRA weights."""
    from peft import LoraConfig, get_peft_model

    options = fastgemma.PatchOptions(max_row_tokens=128, fused_ops=True, **patch)
    patched = fastgemma.patch_model(copy.deepcopy(reference), options=options)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    models = []
    for model in (reference, patched):
        torch.manual_seed(0)
        model = get_peft_model(model, lora)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        models.append(model)
    return models


def packed_step(model, lengths, seed):
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.randint(0, 97, (1, sum(lengths)), generator=torch.Generator().manual_seed(seed))
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_compiled_layers_train_like_hf_eager_with_one_graph_per_layer_kind(checkpointing):
    torch._dynamo.reset()
    regions.compiled.cache_clear()
    counters.clear()
    reference, patched = lora_models(random_gemma2(tiny_gemma2_config(window=16)), checkpointing, compiled_regions=True)
    for step, lengths in enumerate([[40, 9, 30], [25, 50], [7, 33, 12, 20]]):  # documents longer than the window
        ref_logits, ref_loss, ref_grads = packed_step(reference, lengths, step)
        logits, loss, grads = packed_step(patched, lengths, step)
        assert relative_error(logits, ref_logits) < 1e-4 and relative_error(loss, ref_loss) < 1e-4
        assert grads.keys() == ref_grads.keys() and len(grads) == 4 * 7 * 2  # layers x projections x (A, B)
        for name in grads:
            assert relative_error(grads[name], ref_grads[name]) < 1e-3, name
    assert regions.compiled.cache_info().currsize == 1  # one compiled function for every layer
    # For all three lengths: one graph for the layers (a second when the first layer's input needs no
    # gradient: no checkpointing), plus the final norm's fused op and the chunked loss's. On CPU the attention
    # reads a dense mask, an input of the graph, so sliding and global layers share it. No break split the region.
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_compiled_layers_on_padded_batches_match_the_op_by_op_step(side):
    """Rows of a batch padded on either side (a 2D attention mask, per-row segments when left-padded), over
    two batch shapes: the compiled layers give the op-by-op path's loss and gradients."""
    base = random_gemma2(tiny_gemma2_config(window=16))
    _, by_ops = lora_models(copy.deepcopy(base), True)
    _, compiled = lora_models(base, True, compiled_regions=True)
    assert_padded_steps_match(by_ops, compiled, side)


def assert_padded_steps_match(by_ops, model_under_test, side):
    """Two batch shapes padded on `side`: `model_under_test` gives `by_ops`'s loss and LoRA gradients."""
    from conftest import padding_mask

    for seed, (length, pads) in enumerate([(40, [0, 7]), (33, [5, 0, 12])]):
        ids = torch.randint(0, 97, (len(pads), length), generator=torch.Generator().manual_seed(seed))
        mask = padding_mask(length, pads, side)
        labels = ids.masked_fill(mask == 0, -100)
        results = []
        for model in (by_ops, model_under_test):
            model.zero_grad(set_to_none=True)
            out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
            out.loss.backward()
            results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        (ref_loss, ref_grads), (loss, grads) = results
        assert relative_error(loss, ref_loss) < 1e-5 and grads.keys() == ref_grads.keys() and len(grads) == 4 * 7 * 2
        for name in grads:
            assert relative_error(grads[name], ref_grads[name]) < 1e-4, name


def test_compiled_layers_match_the_op_by_op_step_over_a_4bit_base():
    """QLoRA as the recipe runs it (nf4 with double quantisation, LoRA on all linears, non-reentrant
    checkpointing), on bitsandbytes' CPU backend: the compiled layers give the op-by-op step's loss and grads."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, Gemma2ForCausalLM

    from test_patch import _saved_tiny_model

    results = []
    for compiled_regions in (False, True):
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
        try:
            model = Gemma2ForCausalLM.from_pretrained(_saved_tiny_model(), quantization_config=quantization,
                                                      dtype=torch.float32)
        except Exception as error:  # bitsandbytes builds without a CPU 4-bit backend
            pytest.skip(f"4-bit loading not available on this machine: {error}")
        fastgemma.patch_model(model, options=fastgemma.PatchOptions(max_row_tokens=128, fused_ops=True,
                                                                    compiled_regions=compiled_regions))
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.train()
        results.append([packed_step(model, lengths, seed) for seed, lengths in enumerate([[30, 20], [11, 40, 9]])])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            packed_step(model, [25, 25], 2)
        bnb_ops = sum(e.count for e in profile.key_averages() if e.key.startswith("bitsandbytes::"))
        # compiled, the 4-bit projections are tensor ops (fastgemma.ops.nf4): no bitsandbytes op runs
        assert (bnb_ops == 0) if compiled_regions else (bnb_ops > 0), bnb_ops
    for (logits, loss, grads), (ref_logits, ref_loss, ref_grads) in zip(results[1], results[0]):
        assert relative_error(logits, ref_logits) < 1e-4 and relative_error(loss, ref_loss) < 1e-4
        assert grads.keys() == ref_grads.keys() and grads
        for name in grads:
            assert relative_error(grads[name], ref_grads[name]) < 1e-3, name


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # torch's, for the no-grad call in train mode
def test_reentrant_checkpointing_and_inference_run_the_layers_as_usual(monkeypatch):
    """torch.compile cannot trace reentrant checkpointing, and inference gains nothing from a region
    that would compile once more: both take the usual path, with the usual results."""
    calls = []
    monkeypatch.setattr(regions, "compiled", lambda function: calls.append(1) or function)
    reference, patched = lora_models(random_gemma2(tiny_gemma2_config(window=16)), True, reentrant=True,
                                     compiled_regions=True, backend="eager")
    _, loss, _ = packed_step(patched, [30, 20], 0)
    _, ref_loss, _ = packed_step(reference, [30, 20], 0)
    assert relative_error(loss, ref_loss) < 1e-4
    with torch.no_grad():
        patched(input_ids=torch.randint(0, 97, (1, 20)), use_cache=False)
    assert calls == []
    patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packed_step(patched, [30, 20], 0)
    assert calls  # the non-reentrant kind does take the region


def test_compiled_layers_take_retained_graphs_and_create_graph():
    """Checkpointed compiled layers: a second backward through a retained graph adds HF eager + PEFT's gradients
    again; create_graph=True gives them once, and differentiating them again is torch's one-line refusal."""
    from conftest import assert_same_gradients, gradients_after_backwards

    reference, patched = lora_models(random_gemma2(tiny_gemma2_config(layers=2, window=16)), True,
                                     compiled_regions=True)
    positions = torch.cat([torch.arange(n) for n in (30, 10)])[None]
    ids = torch.randint(0, 97, (1, 40))
    inputs = dict(input_ids=ids, position_ids=positions, labels=ids)
    gradients_after_backwards(patched, times=1, **inputs)  # compiles the backward the next steps reuse
    expected = gradients_after_backwards(reference, **inputs)
    assert_same_gradients(gradients_after_backwards(patched, **inputs), expected)
    weights = [p for p in patched.parameters() if p.requires_grad]
    grads = torch.autograd.grad(patched(**inputs, use_cache=False).loss, weights, create_graph=True)
    by_name = dict(zip([n for n, p in patched.named_parameters() if p.requires_grad], grads))
    assert_same_gradients(by_name, {name: grad / 2 for name, grad in expected.items()})
    with pytest.raises(RuntimeError, match="^torch.compile with aot_autograd does not currently support double backward"):
        sum(g.square().sum() for g in grads).backward()


def test_compiled_regions_must_be_a_bool():
    with pytest.raises(ValueError, match="compiled_regions must be True or False"):
        fastgemma.PatchOptions(compiled_regions="yes")


def test_a_hooked_submodule_is_called_through_its_hooks():
    """call_module bypasses nn.Module.__call__ only where no hook would notice."""
    model = fastgemma.patch_model(random_gemma2(tiny_gemma2_config()), backend="eager")
    seen = []
    model.model.layers[1].mlp.register_forward_hook(lambda module, args, output: seen.append(module))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 97, (1, 12)), use_cache=False)
    assert seen == [model.model.layers[1].mlp]


@pytest.mark.parametrize("kind", ["causal-sliding", "packed-sliding", "padded-sliding"])
def test_flex_attention_inside_a_larger_compiled_region_needs_no_break(kind):
    """On a GPU the compiled layers call flex_attention inside their region: fastgemma's flex wrapper
    (padding to the block mask's length, score function, kernel options) must trace whole
    (fullgraph=True). Checked with the CPU's compiled flex forward, against the dense path."""
    from fastgemma.attention import flex_softcap_attention, softcap_attention
    from fastgemma.masks import AttentionMask

    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, 200, 32, generator=generator) * 3 for n in (4, 2, 2))
    segment_ids = torch.repeat_interleave(torch.arange(3), torch.tensor([70, 90, 40]))[None] if kind == "packed-sliding" \
        else None
    real_tokens = None
    if kind == "padded-sliding":  # left padding and a hole past the window: uniform rows too
        real_tokens = torch.ones(1, 200, dtype=torch.bool)
        real_tokens[0, :20] = real_tokens[0, 100:180] = False
    mask = AttentionMask(200, 200, window=64, segment_ids=segment_ids, real_tokens=real_tokens)
    block_mask = mask.block_mask(q.device)
    query_ids = mask.flex_inputs(q.device).get("query_ids")

    def region(q, k, v):
        return flex_softcap_attention(q * 1.0, k, v, block_mask, 32**-0.5, 50.0, compiled=True,
                                      query_ids=query_ids) + 0.0

    with torch.no_grad():
        actual = torch.compile(region, fullgraph=True)(q, k, v)
        expected = softcap_attention(q, k, v, mask, scale=32**-0.5, softcap=50.0, backend="eager")
    assert relative_error(actual, expected) < 1e-5


def saved_bytes(model):
    """Bytes autograd keeps for the backward of one packed training step (distinct storages, parameters left
    out), measured with saved_tensors_hooks."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    positions = torch.cat([torch.arange(200), torch.arange(100)])[None]
    ids = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
    out.loss.backward()
    return sum(storages.values())


def test_compiled_layers_still_checkpoint():
    """Gradient checkpointing inside the region keeps its promise: measured with saved_tensors_hooks (distinct
    storages, parameters left out), the compiled layers save what the op-by-op checkpointing saves, plus the
    batch's shared masks and rotary tables, a fixed amount that does not grow with the number of layers."""
    extra = {}
    for layers in (4, 8):
        base = random_gemma2(tiny_gemma2_config(window=16, layers=layers))
        _, by_ops = lora_models(copy.deepcopy(base), True)
        _, unchecked = lora_models(copy.deepcopy(base), False, compiled_regions=True)
        _, compiled = lora_models(base, True, compiled_regions=True)
        by_ops_bytes, compiled_bytes = saved_bytes(by_ops), saved_bytes(compiled)
        assert compiled_bytes < saved_bytes(unchecked) / 5  # checkpointing on: far less is kept
        extra[layers] = compiled_bytes - by_ops_bytes
    assert extra[4] == extra[8] >= 0, extra


def test_the_region_checkpoints_with_a_recompute_everything_policy():
    """The compiled region checkpoints with HF's function and settings plus a policy that recomputes every
    op (the partitioner would otherwise be free to keep activations); a user's own policy is left alone."""
    import functools

    from torch.utils.checkpoint import checkpoint

    hf = functools.partial(checkpoint, use_reentrant=False, preserve_rng_state=False)
    twin = regions.recompute_everything_checkpoint(hf)
    assert twin.func is checkpoint and twin.keywords["use_reentrant"] is False
    assert twin.keywords["preserve_rng_state"] is False and twin.keywords["context_fn"] is regions._recompute_every_op
    assert regions.recompute_everything_checkpoint(hf) is twin  # one object per HF function: no new guards per call
    users = functools.partial(checkpoint, use_reentrant=False, context_fn=lambda: None)
    assert regions.recompute_everything_checkpoint(users) is users
    assert regions.recompute_everything_checkpoint(None) is None

    calls = []
    reference, patched = lora_models(random_gemma2(tiny_gemma2_config(window=16)), True, compiled_regions=True)
    original = regions._recompute_every_op
    try:
        regions._RECOMPUTING_CHECKPOINTS.clear()
        regions._recompute_every_op = lambda: calls.append(1) or original()
        torch._dynamo.reset()
        _, loss, _ = packed_step(patched, [30, 20], 0)
    finally:
        regions._recompute_every_op = original
        regions._RECOMPUTING_CHECKPOINTS.clear()
    assert calls, "the compiled region did not checkpoint with the recompute-everything policy"
    assert relative_error(loss, packed_step(reference, [30, 20], 0)[1]) < 1e-4
