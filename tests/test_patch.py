"""patch_model on whole models against Hugging Face's own eager Gemma 2, in float32."""

import copy
import logging

import pytest
import torch

import fastgemma
from conftest import padding_mask, random_gemma2, relative_error, tiny_gemma2_config

VALUE_TOLERANCE = 1e-4
GRAD_TOLERANCE = 1e-3

CONFIGS = {
    # head_dim equal to query_pre_attn_scalar (2B / 9B style), GQA 2:1
    "hd32-gqa2": dict(head_dim=32, heads=4, kv_heads=2),
    # 27B style: query_pre_attn_scalar differs from head_dim; GQA 4:1
    "hd16-qpas144-gqa4": dict(head_dim=16, query_pre_attn_scalar=144, heads=8, kv_heads=2),
}


def forward_backward(model, **batch):
    model.zero_grad(set_to_none=True)
    output = model(**batch, use_cache=False)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output.logits.detach(), output.loss.detach(), grads


def assert_same_training_step(reference, patched, real=None, **batch):
    """Logits (on real tokens), loss and every parameter gradient agree."""
    ref_logits, ref_loss, ref_grads = forward_backward(reference, **batch)
    logits, loss, grads = forward_backward(patched, **batch)
    if real is not None:
        ref_logits, logits = ref_logits[real], logits[real]
    assert relative_error(logits, ref_logits) < VALUE_TOLERANCE
    assert relative_error(loss, ref_loss) < VALUE_TOLERANCE
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert relative_error(grads[name], ref_grads[name]) < GRAD_TOLERANCE, name


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("length", [70, 200])  # not multiples of 128; longer than the window (24)
def test_training_step_matches_hf_eager(config_name, length):
    reference = random_gemma2(tiny_gemma2_config(**CONFIGS[config_name]), seed=length)
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=256, backend="eager")
    ids = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(length))
    assert_same_training_step(reference, patched, input_ids=ids, labels=ids)


def test_compiled_backend_matches_hf_eager():
    reference = random_gemma2(tiny_gemma2_config(**CONFIGS["hd16-qpas144-gqa4"]))
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=256, backend="compiled")
    ids = torch.randint(0, 97, (2, 150))
    assert_same_training_step(reference, patched, input_ids=ids, labels=ids)


PADDED_CONFIGS = {
    "hd32-gqa2": CONFIGS["hd32-gqa2"],
    "hd128-gqa2": dict(head_dim=128, heads=4, kv_heads=2),
    "hd256-gqa4-qpas144": dict(head_dim=256, query_pre_attn_scalar=144, heads=4, kv_heads=1),
}


def padded_batch(length, padding, seed):
    """Random ids and a 2D attention mask: "right" / "left" padding (one row all padding but its first or last
    token), or "holes" (a run longer than the sliding window, and padding at both ends of a row)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (3, length), generator=generator)
    if padding in ("right", "left"):
        pads = [0, int(torch.randint(30, length - 30, (1,), generator=generator)), length - 1]
        return ids, padding_mask(length, pads, padding)
    mask = torch.ones_like(ids)
    start = int(torch.randint(5, length - 60, (1,), generator=generator))
    mask[0, start:start + 50] = 0  # past the window (24) of the sliding layers
    mask[1, :7] = mask[1, -11:] = 0
    mask[2, 1::3] = 0
    return ids, mask


@pytest.mark.parametrize("padding", ["right", "left", "holes"])
@pytest.mark.parametrize("config_name", list(PADDED_CONFIGS))
def test_every_position_of_a_padded_batch_matches_hf_eager(config_name, padding):
    """Padded positions included: logits everywhere, and a loss over every position (labels never -100, so
    the predictions made at padded positions train too) with its gradients."""
    length = 150 if padding == "holes" else 90  # not multiples of 128; longer than the window (24)
    reference = random_gemma2(tiny_gemma2_config(**PADDED_CONFIGS[config_name]), seed=length)
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=256, backend="eager")
    ids, mask = padded_batch(length, padding, seed=hash((config_name, padding)) % 1000)
    assert_same_training_step(reference, patched, input_ids=ids, attention_mask=mask, labels=ids)


@pytest.mark.parametrize("padding", ["right", "left", "holes"])
def test_compiled_backend_matches_hf_eager_on_every_padded_position(padding):
    reference = random_gemma2(tiny_gemma2_config(**CONFIGS["hd16-qpas144-gqa4"]))
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=256, backend="compiled")
    ids, mask = padded_batch(150, padding, seed=hash(padding) % 1000)
    labels = ids.masked_fill(mask == 0, -100)  # the usual labels: the last left pad still predicts a real token
    assert_same_training_step(reference, patched, input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("padding", [None, "right", "left", "holes"])
def test_flex_forward_on_cpu_matches_hf_eager(padding, flex_forward_on_cpu):
    """Every position, padded ones included (flex tiles of padded queries only, uniform rows)."""
    reference = random_gemma2(tiny_gemma2_config(**PADDED_CONFIGS["hd128-gqa2"]))
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=256, backend="flex")
    ids, mask = padded_batch(150 if padding == "holes" else 230, padding or "right", seed=5)
    batch = {"input_ids": ids} if padding is None else {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        expected = reference(**batch, use_cache=False).logits
        actual = patched(**batch, use_cache=False).logits
    assert relative_error(actual, expected) < VALUE_TOLERANCE


@pytest.mark.parametrize("batch_kind", ["plain", "padded", "packed"])
def test_fused_rope_hands_flex_its_inputs_already_padded(batch_kind, flex_forward_on_cpu, monkeypatch):
    """With fused ops, RoPE writes query, key and value padded to flex's fixed length, so flex copies none of
    them again: every flex call gets them at that length, and the logits stay HF eager's."""
    import fastgemma.attention

    reference = random_gemma2(tiny_gemma2_config(**PADDED_CONFIGS["hd128-gqa2"]))
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=256, backend="flex", fused_ops=True)
    patched.requires_grad_(False)  # grad mode stays on, so the fused ops run; flex has no CPU backward
    calls, original = [], fastgemma.attention.flex_softcap_attention

    def spy(query, *args, length=None, **kwargs):
        calls.append((query.shape[-2], query.is_contiguous(), length))
        return original(query, *args, length=length, **kwargs)

    monkeypatch.setattr(fastgemma.attention, "flex_softcap_attention", spy)
    ids, mask = padded_batch(230, "left", seed=6)
    batch = {"input_ids": ids}
    if batch_kind == "padded":
        batch["attention_mask"] = mask
    if batch_kind == "packed":
        batch["position_ids"] = torch.cat([torch.arange(100), torch.arange(130)])[None].expand(ids.shape[0], -1)
    actual = patched(**batch, use_cache=False).logits
    with torch.no_grad():
        expected = reference(**batch, use_cache=False).logits
    assert calls and all(padded > 230 and contiguous and real == 230 for padded, contiguous, real in calls)
    assert relative_error(actual, expected) < VALUE_TOLERANCE


def test_patched_model_never_calls_hf_attention(monkeypatch):
    from transformers.models.gemma2 import modeling_gemma2

    reference = random_gemma2(tiny_gemma2_config())
    patched = fastgemma.patch_model(copy.deepcopy(reference), backend="eager")

    def forbidden(*args, **kwargs):
        raise AssertionError("HF's eager attention was called")

    monkeypatch.setattr(modeling_gemma2, "eager_attention_forward", forbidden)
    ids = torch.randint(0, 97, (1, 40))
    patched(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    with pytest.raises(AssertionError, match="HF's eager attention"):
        reference(input_ids=ids, use_cache=False)  # the spy is live: the unpatched model trips it


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_greedy_generation_from_padded_prompts_is_unchanged(side, cache):
    """Stock's tokens and scores. A right-padded prompt's first new token comes from a padded position."""
    reference = random_gemma2(tiny_gemma2_config(window=16))
    patched = fastgemma.patch_model(copy.deepcopy(reference))  # auto
    prompt = torch.randint(1, 97, (3, 11))
    mask = padding_mask(11, [0, 4, 9], side)
    kwargs = dict(max_new_tokens=25, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)  # 36 tokens: past the window
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    expected = reference.generate(prompt, attention_mask=mask, **kwargs)
    actual = patched.generate(prompt, attention_mask=mask, **kwargs)
    assert torch.equal(actual.sequences, expected.sequences)
    assert len(actual.scores) == len(expected.scores) == 25
    for got, want in zip(actual.scores, expected.scores):
        assert relative_error(got, want) < VALUE_TOLERANCE


def test_peft_lora_gradients_flow_and_match():
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    base = random_gemma2(tiny_gemma2_config())
    reference = get_peft_model(copy.deepcopy(base), lora)
    patched = copy.deepcopy(reference)
    fastgemma.patch_model(patched, max_row_tokens=128, backend="eager")
    assert fastgemma.is_patched(patched)
    ids = torch.randint(0, 97, (2, 60))
    ref_logits, _, ref_grads = forward_backward(reference, input_ids=ids, labels=ids)
    logits, _, grads = forward_backward(patched, input_ids=ids, labels=ids)
    assert all("lora_" in name for name in grads) and len(grads) == 4 * 2 * 4  # 4 layers x 4 projections x A,B
    assert relative_error(logits, ref_logits) < VALUE_TOLERANCE
    for name in grads:
        assert grads[name].abs().sum() > 0
        assert relative_error(grads[name], ref_grads[name]) < GRAD_TOLERANCE, name


def test_4bit_model_is_patched():
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from transformers import Gemma2ForCausalLM

    try:
        model = Gemma2ForCausalLM.from_pretrained(
            _saved_tiny_model(), quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
            dtype=torch.float32,
        )
    except Exception as error:  # bitsandbytes builds without a CPU 4-bit backend
        pytest.skip(f"4-bit loading not available on this machine: {error}")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    fastgemma.patch_model(model, backend="eager")
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    assert torch.isfinite(logits).all()


_SAVED = {}


def _saved_tiny_model():
    import atexit
    import shutil
    import tempfile

    if "path" not in _SAVED:
        path = tempfile.mkdtemp(prefix="fastgemma-tiny-")
        atexit.register(shutil.rmtree, path, True)
        random_gemma2(tiny_gemma2_config(head_dim=64, heads=2, kv_heads=1)).save_pretrained(path)
        _SAVED["path"] = path
    return _SAVED["path"]


def test_patch_is_per_instance_idempotent_and_undoable(caplog):
    reference = random_gemma2(tiny_gemma2_config())
    first, second = copy.deepcopy(reference), copy.deepcopy(reference)
    with caplog.at_level(logging.INFO, logger="fastgemma"):
        fastgemma.patch_model(first, backend="eager")
    assert "patched 4 Gemma 2 attention layers (2 sliding, 2 global)" in caplog.text
    assert fastgemma.is_patched(first) and not fastgemma.is_patched(second)
    assert type(first.model.layers[0].self_attn).forward is type(second.model.layers[0].self_attn).forward

    fastgemma.patch_model(first, backend="eager")  # twice: harmless
    ids = torch.randint(0, 97, (1, 50))
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits
        assert relative_error(first(input_ids=ids, use_cache=False).logits, expected) < VALUE_TOLERANCE

    fastgemma.unpatch_model(first)
    assert not fastgemma.is_patched(first)
    for module in (first.model, first.model.norm, *first.model.layers[0].modules()):
        assert "forward" not in module.__dict__, type(module).__name__
    assert first.config._attn_implementation == reference.config._attn_implementation
    with torch.no_grad():
        assert torch.equal(first(input_ids=ids, use_cache=False).logits, expected)


def test_gemma2_backbone_alone_is_patched():
    reference = random_gemma2(tiny_gemma2_config()).model
    patched = fastgemma.patch_model(copy.deepcopy(reference), backend="eager")
    ids = torch.randint(0, 97, (2, 33))
    with torch.no_grad():
        assert relative_error(patched(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state) < 1e-4


def test_non_gemma2_models_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=64, vocab_size=50))
    with pytest.raises(ValueError, match="Gemma 2"):
        fastgemma.patch_model(llama)
    with pytest.raises(ValueError, match="Gemma 2"):
        fastgemma.patch_model("google/gemma-2-2b")


def test_bidirectional_gemma2_is_refused():
    config = tiny_gemma2_config()
    config.use_bidirectional_attention = True
    model = random_gemma2(config)
    assert not model.model.layers[0].self_attn.is_causal
    with pytest.raises(ValueError, match="bidirectional"):
        fastgemma.patch_model(model)
    assert not fastgemma.is_patched(model)


def test_bad_arguments_are_refused():
    model = random_gemma2(tiny_gemma2_config())
    with pytest.raises(ValueError, match="unknown attention backend"):
        fastgemma.patch_model(model, backend="sdpa")
    with pytest.raises(ValueError, match="max_row_tokens"):
        fastgemma.patch_model(model, max_row_tokens=0)
    with pytest.raises(ValueError, match="fused_ops"):
        fastgemma.patch_model(model, fused_ops="yes")
    with pytest.raises(ValueError, match="flex_kernel_options"):
        fastgemma.patch_model(model, flex_kernel_options="fast")
    assert not fastgemma.is_patched(model)


def test_is_patched_is_false_for_a_model_that_is_not_gemma2():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert fastgemma.is_patched(llama) is False
    assert fastgemma.is_patched(torch.nn.Linear(2, 2)) is False
    with pytest.raises(ValueError, match="supports"):  # patching it is still an error
        fastgemma.patch_model(llama)


@pytest.mark.skipif(torch.cuda.is_available() and fastgemma.attention.flex_supported(torch.device("cuda")),
                    reason="checks a device without flex support")
def test_flex_backend_is_refused_at_patch_time_where_flex_cannot_train():
    model = random_gemma2(tiny_gemma2_config())  # on the CPU
    with pytest.raises(ValueError, match=r"backend='flex' needs .*cpu device: use backend='auto' .* or 'compiled'"):
        fastgemma.patch_model(model, backend="flex")
    assert not fastgemma.is_patched(model)
    fastgemma.patch_model(model, backend="auto")  # what runs there instead
    assert fastgemma.is_patched(model)


def test_batch_longer_than_max_row_tokens_is_still_exact(caplog, flex_forward_on_cpu):
    reference = random_gemma2(tiny_gemma2_config())
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=128, backend="flex")
    ids = torch.randint(0, 97, (1, 300))
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="fastgemma"):
        actual = patched(input_ids=ids, use_cache=False).logits
        expected = reference(input_ids=ids, use_cache=False).logits
    assert "max_row_tokens=128" in caplog.text
    assert relative_error(actual, expected) < VALUE_TOLERANCE


def record_attention_argument(monkeypatch, name):
    """The values of softcap_attention's keyword `name` in every call the glue makes, as they happen."""
    import fastgemma.patches.gemma2 as glue

    seen = []
    original = glue.softcap_attention

    def recording(*args, **kwargs):
        seen.append(kwargs[name])
        return original(*args, **kwargs)

    monkeypatch.setattr(glue, "softcap_attention", recording)
    return seen


@pytest.mark.parametrize("options", ["auto", None, {"bwd_num_warps": 8}])
def test_flex_kernel_options_reach_every_attention_call(monkeypatch, options):
    seen = record_attention_argument(monkeypatch, "kernel_options")
    model = random_gemma2(tiny_gemma2_config())
    fastgemma.patch_model(model, backend="eager", flex_kernel_options=options)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 97, (1, 12)))
    assert len(seen) == model.config.num_hidden_layers and all(s == options for s in seen)
    fastgemma.unpatch_model(model)
    assert not any("_fastgemma_state" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("softcap_tanh", ["auto", "exact", "approx"])
def test_softcap_tanh_reaches_every_attention_call(monkeypatch, softcap_tanh, caplog):
    seen = record_attention_argument(monkeypatch, "softcap_tanh")
    reference = random_gemma2(tiny_gemma2_config())
    model = copy.deepcopy(reference)
    with caplog.at_level(logging.INFO, logger="fastgemma"):
        fastgemma.patch_model(model, backend="eager", softcap_tanh=softcap_tanh)
    assert f"softcap tanh on flex: {softcap_tanh} -> exact on cpu" in caplog.text  # only NVIDIA kernels approximate
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        assert relative_error(logits, reference(input_ids=ids, use_cache=False).logits) < VALUE_TOLERANCE
    assert seen and all(s == softcap_tanh for s in seen)
    fastgemma.unpatch_model(model)
    assert not any("_fastgemma_state" in m.__dict__ for m in model.modules())
    with pytest.raises(ValueError, match="softcap_tanh"):
        fastgemma.patch_model(model, softcap_tanh="fast")


def test_dense_backends_take_longer_batches_silently_and_exactly(caplog):
    """README, max_row_tokens: only the flex path has a fixed length (and warns when a batch outgrows it)."""
    reference = random_gemma2(tiny_gemma2_config())
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=64, backend="eager")
    ids = torch.randint(0, 97, (1, 150))
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="fastgemma"):
        actual = patched(input_ids=ids, use_cache=False).logits
    assert not caplog.records
    with torch.no_grad():
        assert relative_error(actual, reference(input_ids=ids, use_cache=False).logits) < VALUE_TOLERANCE
