"""A patched model behaves like the stock one wherever Hugging Face code (or a user's) relies on it:
gradient checkpointing, deep copies and pickles, attention weights, signatures, classification heads."""

import copy
import functools
import inspect
import pickle

import pytest
import torch
import transformers

import fastgemma
from conftest import (assert_same_gradients, gradients_after_backwards, padding_mask, random_gemma2,
                      relative_error, tiny_gemma2_config)

GRAD_TOLERANCE = 1e-3


def enable_checkpointing(model, use_reentrant):
    """HF's switch under either of its names (transformers 5.23 renamed it)."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def saved_activation_bytes(model, ids):
    """Bytes autograd keeps for the backward pass of one training step (what checkpointing saves)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return total, grads


def lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


# --------------------------------------------------------------------------------------
# Gradient checkpointing
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("with_peft", [False, True])
@pytest.mark.parametrize("order", ["checkpointing-then-patch", "patch-then-checkpointing"])
def test_gradient_checkpointing_saves_what_hf_saves(order, with_peft, use_reentrant):
    base = random_gemma2(tiny_gemma2_config(layers=4))
    ids = torch.randint(0, 97, (2, 150), generator=torch.Generator().manual_seed(1))
    reference = lora(copy.deepcopy(base)) if with_peft else copy.deepcopy(base)
    patched = copy.deepcopy(reference)
    without_bytes, _ = saved_activation_bytes(reference, ids)

    enable_checkpointing(reference, use_reentrant)
    if with_peft or use_reentrant:  # reentrant checkpointing needs inputs that require grad, as PEFT/TRL arrange
        reference.enable_input_require_grads()
        patched.enable_input_require_grads()
    if order == "checkpointing-then-patch":
        enable_checkpointing(patched, use_reentrant)
        fastgemma.patch_model(patched, max_row_tokens=256, backend="eager")
    else:
        fastgemma.patch_model(patched, max_row_tokens=256, backend="eager")
        enable_checkpointing(patched, use_reentrant)

    reference_bytes, reference_grads = saved_activation_bytes(reference, ids)
    patched_bytes, patched_grads = saved_activation_bytes(patched, ids)
    assert reference_bytes < without_bytes / 4  # the measurement sees checkpointing at all
    assert patched_bytes <= reference_bytes * 1.05, (patched_bytes, reference_bytes, without_bytes)
    assert patched_grads.keys() == reference_grads.keys() and patched_grads
    for name in patched_grads:
        assert relative_error(patched_grads[name], reference_grads[name]) < GRAD_TOLERANCE, name


def checkpointing_in_call(monkeypatch):
    """Emulates transformers before 5.23, which checkpoint in GradientCheckpointingLayer.__call__ (around the
    instance forward), in a few lines."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from fastgemma import hf_layers

    def call_with_checkpointing(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training:
            return self._gradient_checkpointing_func(functools.partial(torch.nn.Module.__call__, self, **kwargs), *args)
        return torch.nn.Module.__call__(self, *args, **kwargs)

    monkeypatch.setattr(GradientCheckpointingLayer, "__call__", call_with_checkpointing, raising=False)
    assert not hf_layers.hf_checkpoints_in_forward()


def test_checkpointing_in_call_layout_recomputes_each_layer_once(monkeypatch):
    """Where transformers checkpoints in a layer's __call__, fastgemma must not checkpoint a second time."""
    import fastgemma.patches.gemma2 as glue

    checkpointing_in_call(monkeypatch)
    calls = []
    body = glue.decoder_layer_body
    monkeypatch.setattr(glue, "decoder_layer_body", lambda *a, **k: calls.append(1) or body(*a, **k))
    model = random_gemma2(tiny_gemma2_config(layers=2))
    fastgemma.patch_model(model, max_row_tokens=128, backend="eager")
    enable_checkpointing(model, use_reentrant=False)
    # The stock class forward still checkpoints in this transformers; run only the instance forward's layout.
    ids = torch.randint(0, 97, (1, 40))
    model.train()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert len(calls) == 2 * 2  # per layer: the forward and one recompute, not two


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_in_call_layout_runs_graphed_layers_once_per_step(monkeypatch, use_reentrant):
    """There a graphed layer (its backward graph recomputes it) must not be run again by a recompute around it:
    one graphed call per layer and step, HF eager's loss and gradients, HF's own checkpoint function restored."""
    from test_compile_layers import lora_models, packed_step

    from fastgemma import graphs

    checkpointing_in_call(monkeypatch)
    calls = []
    record = graphs.GraphedLayers.__call__
    monkeypatch.setattr(graphs.GraphedLayers, "__call__", lambda *a, **k: calls.append(1) or record(*a, **k))
    reference, patched = lora_models(random_gemma2(tiny_gemma2_config(window=16)), True, reentrant=use_reentrant,
                                     cuda_graphs=True)
    functions = [layer._gradient_checkpointing_func for layer in patched.base_model.model.model.layers]
    for step, lengths in enumerate([[40, 9, 30], [25, 50]]):
        calls.clear()
        _, ref_loss, ref_grads = packed_step(reference, lengths, step)
        _, loss, grads = packed_step(patched, lengths, step)
        assert len(calls) == 4 and relative_error(loss, ref_loss) < 1e-4
        assert_same_gradients(grads, ref_grads, GRAD_TOLERANCE)
    assert [layer._gradient_checkpointing_func for layer in patched.base_model.model.model.layers] == functions


# --------------------------------------------------------------------------------------
# Copies
# --------------------------------------------------------------------------------------
def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_of_a_patched_model_are_independent_and_patched(how):
    reference = random_gemma2(tiny_gemma2_config())
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=128, backend="eager")
    ids = torch.randint(0, 97, (2, 50))
    _logits(patched, ids)  # a used model: its block-mask cache is filled
    clone = copy.deepcopy(patched) if how == "deepcopy" else pickle.loads(pickle.dumps(patched))
    assert fastgemma.is_patched(clone)
    assert torch.equal(_logits(clone, ids), _logits(patched, ids))

    with torch.no_grad():  # change the copy only, as a training step on a policy would
        for module in (clone, reference):
            module.model.layers[1].self_attn.q_proj.weight.mul_(3.0)
            module.model.layers[0].mlp.down_proj.weight.zero_()
    changed = _logits(clone, ids)
    assert relative_error(changed, _logits(reference, ids)) < 1e-4  # the copy computes with its own layers
    assert relative_error(changed, _logits(patched, ids)) > 1e-2  # and leaves the original alone

    spy = []
    clone.model.layers[0].self_attn.register_forward_hook(lambda *args: spy.append(1))
    _logits(patched, ids)
    assert not spy  # the original never runs the copy's layers


def test_reference_model_of_peft_policy_is_independent():
    """TRL-style: a frozen reference model is a deep copy of the (patched, PEFT-wrapped) policy."""
    policy = lora(random_gemma2(tiny_gemma2_config()))
    fastgemma.patch_model(policy, max_row_tokens=128, backend="eager")
    frozen = copy.deepcopy(policy).eval()
    ids = torch.randint(0, 97, (1, 40))
    before = _logits(frozen, ids)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.add_(1.0)
    assert torch.equal(_logits(frozen, ids), before)
    assert relative_error(_logits(policy, ids), before) > 1e-2


# --------------------------------------------------------------------------------------
# Retained graphs and double backward
# --------------------------------------------------------------------------------------
COMPILED_PIECES = {"compiled-attention": dict(backend="compiled", fused_ops=False),
                   "fused-ops": dict(backend="eager", fused_ops=True)}


@pytest.mark.parametrize("patch", list(COMPILED_PIECES.values()), ids=list(COMPILED_PIECES))
def test_backward_through_a_retained_graph_adds_the_gradients_again(patch):
    """Stock Gemma 2 takes backward(retain_graph=True) (HF's own tests, gradient penalties): through fastgemma's
    compiled pieces a second backward adds the same gradients again, after a plain step compiled the backward
    (a backward free to overwrite what its forward saved would refuse, or compute garbage, the second time)."""
    reference = random_gemma2(tiny_gemma2_config(layers=2, window=16)).train()
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=128, **patch)
    ids = torch.randint(0, 97, (2, 24))
    gradients_after_backwards(patched, times=1, input_ids=ids, labels=ids)
    expected = gradients_after_backwards(reference, input_ids=ids, labels=ids)
    assert_same_gradients(gradients_after_backwards(patched, input_ids=ids, labels=ids), expected)


def first_and_second_order_gradients(model, ids):
    """(d loss / d weights with create_graph=True, d |those|² / d weights)."""
    model.zero_grad(set_to_none=True)
    weights = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(input_ids=ids, labels=ids, use_cache=False).loss, weights, create_graph=True)
    sum(grad.square().sum() for grad in grads).backward()
    return grads, [p.grad for p in weights]


@pytest.mark.parametrize("patch", list(COMPILED_PIECES.values()), ids=list(COMPILED_PIECES))
def test_create_graph_gives_hf_gradients_and_double_backward_stops_in_one_line(patch):
    """create_graph=True through a compiled piece gives HF eager's gradients; differentiating them again stops
    at torch's one-line refusal (compiled backwards have no double backward)."""
    reference = random_gemma2(tiny_gemma2_config(layers=2, window=16)).train()
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=128, **patch)
    ids = torch.randint(0, 97, (2, 24))
    expected, _ = first_and_second_order_gradients(reference, ids)
    weights = [p for p in patched.parameters() if p.requires_grad]
    grads = torch.autograd.grad(patched(input_ids=ids, labels=ids, use_cache=False).loss, weights, create_graph=True)
    for got, want in zip(grads, expected):
        assert relative_error(got, want) < GRAD_TOLERANCE
    with pytest.raises(RuntimeError, match="^torch.compile with aot_autograd does not currently support double backward"):
        sum(grad.square().sum() for grad in grads).backward()


def test_double_backward_without_compiled_pieces_matches_hf_eager():
    """backend='eager' without fused ops is plain PyTorch throughout: gradients of gradients as HF eager's."""
    reference = random_gemma2(tiny_gemma2_config(layers=2, window=16)).train()
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=128, backend="eager", fused_ops=False)
    ids = torch.randint(0, 97, (2, 24))
    for got, want in zip(first_and_second_order_gradients(patched, ids), first_and_second_order_gradients(reference, ids)):
        for a, b in zip(got, want):
            assert relative_error(a, b) < GRAD_TOLERANCE


# --------------------------------------------------------------------------------------
# Attention weights, signatures
# --------------------------------------------------------------------------------------
def test_output_attentions_returns_hf_eager_weights():
    reference = random_gemma2(tiny_gemma2_config(window=16))
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=128, backend="auto")
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        expected = reference(input_ids=ids, output_attentions=True, use_cache=False)
        actual = patched(input_ids=ids, output_attentions=True, use_cache=False)
    assert len(actual.attentions) == len(expected.attentions) == reference.config.num_hidden_layers
    for got, want in zip(actual.attentions, expected.attentions):
        assert got.shape == want.shape == (2, 4, 40, 40)
        assert relative_error(got, want) < 1e-4
    assert relative_error(actual.logits, expected.logits) < 1e-4


def test_returned_attention_weights_carry_the_gradient_hf_eager_gives_them():
    """As Hugging Face's test_retain_grad_hidden_states_attentions: a gradient retained on the returned
    weights (and hidden states) is HF eager's, so the weights are the tensor the output was computed from."""
    reference = random_gemma2(tiny_gemma2_config(window=16))
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=128)
    ids = torch.randint(0, 97, (2, 40))
    projection = torch.randn(2, 40, 97)
    results = []
    for model in (reference, patched):
        out = model(input_ids=ids, output_attentions=True, output_hidden_states=True, use_cache=False)
        for tensor in (*out.attentions, out.hidden_states[0]):
            tensor.retain_grad()
        (out.logits * projection).sum().backward(retain_graph=True)
        results.append(out)
    expected, actual = results
    for got, want in zip((*actual.attentions, actual.hidden_states[0]), (*expected.attentions, expected.hidden_states[0])):
        assert got.grad is not None and relative_error(got, want) < 1e-4
        assert relative_error(got.grad, want.grad) < GRAD_TOLERANCE


def test_output_attentions_from_config_and_on_a_padded_batch():
    reference = random_gemma2(tiny_gemma2_config())
    reference.config.output_attentions = True
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=128, backend="eager")
    ids = torch.randint(0, 97, (3, 30))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    mask[2, :6] = 0  # rows with no real key: weights uniform over the whole row, as HF's
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, use_cache=False).attentions
        actual = patched(input_ids=ids, attention_mask=mask, use_cache=False).attentions
    assert len(actual) == len(expected) == reference.config.num_hidden_layers
    for got, want in zip(actual, expected):
        assert relative_error(got, want) < 1e-4


@pytest.mark.parametrize("kind", ["prompt_lookup", "assisted"])
def test_generation_that_returns_attention_weights_runs(kind):
    """Candidate-verifying generation with output_attentions indexes every layer's weights."""
    reference = random_gemma2(tiny_gemma2_config(window=16))
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=128)
    prompt = torch.randint(0, 97, (1, 12)).repeat(1, 2)  # repeated n-grams for prompt lookup to find
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_attentions=True,
                  return_dict_in_generate=True)
    if kind == "prompt_lookup":
        kwargs["prompt_lookup_num_tokens"] = 3
    else:
        kwargs["assistant_model"] = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=128)
    try:
        expected = reference.generate(prompt, **kwargs)
    except RuntimeError as error:  # transformers 5.17: assisted decoding crops no sliding-window cache layer
        pytest.skip(f"stock transformers {transformers.__version__} fails here too: {error}")
    actual = patched.generate(prompt, **kwargs)
    assert torch.equal(actual.sequences, expected.sequences)
    assert len(actual.attentions) == len(expected.attentions)
    for got, want in zip(actual.attentions, expected.attentions):
        assert [a.shape for a in got] == [w.shape for w in want]
        assert max(relative_error(a, w) for a, w in zip(got, want)) < 1e-4


def test_patched_forwards_keep_their_signatures():
    reference = random_gemma2(tiny_gemma2_config())
    patched = fastgemma.patch_model(copy.deepcopy(reference), backend="eager")
    pairs = [(reference.model, patched.model), (reference.model.layers[0], patched.model.layers[0]),
             (reference.model.layers[0].self_attn, patched.model.layers[0].self_attn),
             (reference.model.layers[0].mlp, patched.model.layers[0].mlp), (reference.model.norm, patched.model.norm)]
    for stock, ours in pairs:
        assert "forward" in ours.__dict__
        assert inspect.signature(ours.forward) == inspect.signature(stock.forward), type(stock).__name__
    assert "inputs_embeds" in inspect.signature(patched.model.forward).parameters


def test_backbone_accepts_positional_and_embedding_inputs():
    reference = random_gemma2(tiny_gemma2_config()).model
    patched = fastgemma.patch_model(copy.deepcopy(reference), backend="eager")
    ids = torch.randint(0, 97, (2, 33))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        embeds = reference.embed_tokens(ids)
        expected = reference(ids, mask).last_hidden_state
        by_position = patched(ids, mask).last_hidden_state
        by_embeds = patched(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert relative_error(by_position[real], expected[real]) < 1e-4
    assert relative_error(by_embeds[real], expected[real]) < 1e-4


# --------------------------------------------------------------------------------------
# Which models are accepted
# --------------------------------------------------------------------------------------
def _classifier(kind, seed=0):
    from transformers import Gemma2ForSequenceClassification, Gemma2ForTokenClassification

    config = tiny_gemma2_config()
    config.num_labels = 3
    config.pad_token_id = 0
    config.classifier_dropout = 0.0  # token classification applies dropout to the hidden states: keep runs comparable
    cls = Gemma2ForSequenceClassification if kind == "sequence" else Gemma2ForTokenClassification
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_classification_heads_match_hf_eager(kind, side):
    reference = _classifier(kind)
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=128, backend="eager")
    ids = torch.randint(1, 97, (3, 45))
    mask = padding_mask(45, [0, 7, 30], side)
    ids = ids.masked_fill(mask == 0, 0)  # the pad token, which sequence classification uses to find the last token
    if kind == "sequence":
        labels = torch.tensor([0, 2, 1])
    else:
        labels = torch.randint(0, 3, ids.shape).masked_fill(mask == 0, -100)
    results = []
    for model in (reference, patched):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append((out.logits.detach(), out.loss.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = results
    assert relative_error(logits, ref_logits) < 1e-4  # token logits at padded positions too
    assert relative_error(loss, ref_loss) < 1e-4
    for name in ref_grads:
        assert relative_error(grads[name], ref_grads[name]) < GRAD_TOLERANCE, name


def test_peft_sequence_classifier_is_accepted():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_classifier("sequence"), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj"]))
    fastgemma.patch_model(model, backend="eager")
    assert fastgemma.is_patched(model)


def test_models_that_merely_contain_gemma2_are_refused():
    class RewardModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = random_gemma2(tiny_gemma2_config())
            self.value = torch.nn.Linear(97, 1)

    wrapper = RewardModel()
    with pytest.raises(ValueError, match="Patch the Gemma 2 model itself"):
        fastgemma.patch_model(wrapper)
    assert not fastgemma.is_patched(wrapper)
    fastgemma.patch_model(wrapper.body, backend="eager")  # the advertised way
    assert fastgemma.is_patched(wrapper.body)


# --------------------------------------------------------------------------------------
# Packing with the default use_cache=True, and padded positions
# --------------------------------------------------------------------------------------
def test_packed_documents_stay_apart_with_use_cache_true():
    reference = random_gemma2(tiny_gemma2_config())
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=128, backend="eager")
    lengths = [20, 33, 11]
    ids = torch.randint(0, 97, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = patched(input_ids=ids, position_ids=positions, use_cache=True).logits
        alone = torch.cat([reference(input_ids=chunk, use_cache=False).logits
                           for chunk in ids.split(lengths, dim=1)], dim=1)
    assert relative_error(packed, alone) < 1e-4


def test_padded_positions_follow_the_documented_rule():
    """README, "Padding": as HF eager, padding hides keys only. A padded query sees the real keys before it
    (right padding included); one with none (left padding) averages its whole row uniformly."""
    from fastgemma.masks import DENSE_UNIFORM
    from fastgemma.mask_mapping import build_mask_mapping

    config = tiny_gemma2_config()
    right = torch.tensor([[1, 1, 1, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1]])
    plain = build_mask_mapping(config, None, 1, 5, "cpu", torch.ones_like(right), None, None, {})["full_attention"]
    assert plain.kind == "plain" and torch.equal(plain.dense("cpu")[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())
    dense = build_mask_mapping(config, None, 1, 5, "cpu", right, None, None, {})["full_attention"].dense("cpu")[0, 0]
    assert dense.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    dense = build_mask_mapping(config, None, 1, 5, "cpu", left, None, None, {})["full_attention"].dense("cpu")[0, 0]
    assert (dense[:2] == DENSE_UNIFORM).all()
    assert dense[2:].tolist() == [[0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]


def test_left_padding_compatibility_as_hf_tests_it():
    """transformers' test_left_padding_compatibility: rows of a tril attention mask (most of them right-padded,
    so the last position is a padded query), then the same rows behind 32 tokens of left padding, with position
    ids from the mask; the last position's logits agree, and agree with stock's."""
    reference = random_gemma2(tiny_gemma2_config())
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=128, backend="eager")
    ids = torch.randint(1, 97, (3, 7))
    mask = torch.ones_like(ids).tril()[:3]

    def last_logits(model, ids, mask):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]

    unpadded = last_logits(patched, ids, mask)
    padded_ids = torch.cat([torch.zeros(3, 32, dtype=ids.dtype), ids], dim=1)
    padded = last_logits(patched, padded_ids, torch.cat([torch.zeros(3, 32, dtype=mask.dtype), mask], dim=1))
    torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unpadded, last_logits(reference, ids, mask), rtol=1e-5, atol=1e-5)
