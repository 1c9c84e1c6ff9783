"""PatchOptions: patch_model's settings, validated once (one line per bad value), stored once per model, and
the former spellings (max_seq_length, compile_layers, flex_kernel_options="flash") mapped with a warning."""

import dataclasses

import pytest

import fastgemma
from conftest import random_gemma2, tiny_gemma2_config
from fastgemma.patching import state_of


@pytest.mark.parametrize("setting, value, allowed", [
    ("max_row_tokens", 0, "a positive int"),
    ("max_row_tokens", True, "a positive int"),
    ("backend", "sdpa", "auto, flex, compiled, eager"),
    ("fused_ops", "yes", "'auto', True or False"),
    ("flex_kernel_options", "fast", "'auto', 'experimental-flash', None"),
    ("flex_kernel_options", {1: 2}, "'auto', 'experimental-flash', None"),
    ("softcap_tanh", "fast", "'auto', 'exact' or 'approx'"),
    ("cuda_graphs", "on", "'auto', True or False"),
    ("compiled_regions", "yes", "True or False"),
])
def test_each_bad_value_is_refused_in_one_line_naming_the_setting(setting, value, allowed):
    with pytest.raises(ValueError) as error:
        fastgemma.PatchOptions(**{setting: value})
    message = str(error.value)
    assert "\n" not in message and allowed in message and repr(value) in message
    assert setting in message or setting == "backend" and "attention backend" in message


def test_settings_that_cannot_go_together_are_refused():
    with pytest.raises(ValueError, match="cuda_graphs=True replays the fused, compiled layers: it needs fused_ops"):
        fastgemma.PatchOptions(cuda_graphs=True, fused_ops=False)
    assert fastgemma.PatchOptions(fused_ops=False).layer_graphs is False  # "auto" picks op by op there
    assert fastgemma.PatchOptions(flex_kernel_options="experimental-flash").layer_graphs is False
    assert fastgemma.PatchOptions().layer_graphs == "auto"


def test_options_are_frozen_and_keep_their_own_kernel_options():
    kernels = {"bwd_num_warps": 8}
    options = fastgemma.PatchOptions(flex_kernel_options=kernels)
    kernels["bwd_num_warps"] = 4
    assert options.flex_kernel_options == {"bwd_num_warps": 8}
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.backend = "eager"


def test_the_options_are_stored_once_per_model_and_replaced_as_one():
    model = random_gemma2(tiny_gemma2_config())
    fastgemma.patch_model(model, max_row_tokens=256, backend="eager", softcap_tanh="exact")
    state = state_of(model.model)
    patched = [m for m in model.modules() if "_fastgemma_state" in m.__dict__]
    assert len(patched) > 3 * model.config.num_hidden_layers and all(state_of(m) is state for m in patched)
    assert state.options == fastgemma.PatchOptions(max_row_tokens=256, backend="eager", softcap_tanh="exact")
    fastgemma.patch_model(model, max_row_tokens=256, backend="compiled")
    assert all(state_of(m).options.backend == "compiled" for m in patched) and state_of(model.model) is state


def test_an_options_object_patches_as_its_keywords_do():
    options = fastgemma.PatchOptions(max_row_tokens=512, backend="eager", fused_ops=False)
    by_object = fastgemma.patch_model(random_gemma2(tiny_gemma2_config()), options=options)
    by_keywords = fastgemma.patch_model(random_gemma2(tiny_gemma2_config()), max_row_tokens=512, backend="eager",
                                        fused_ops=False)
    assert state_of(by_object.model).options == state_of(by_keywords.model).options == options
    model = random_gemma2(tiny_gemma2_config())
    with pytest.raises(ValueError, match="either options=PatchOptions"):
        fastgemma.patch_model(model, backend="eager", options=options)
    assert not fastgemma.is_patched(model)


def test_max_seq_length_still_works_and_names_max_row_tokens():
    model = random_gemma2(tiny_gemma2_config())
    with pytest.warns(DeprecationWarning, match="max_seq_length is now max_row_tokens"):
        fastgemma.patch_model(model, max_seq_length=640, backend="eager")
    assert state_of(model.model).options.max_row_tokens == 640 and state_of(model.model).cache.max_row_tokens == 640
    with pytest.raises(ValueError, match="max_row_tokens"), pytest.warns(DeprecationWarning):
        fastgemma.patch_model(model, max_seq_length=0)
    with pytest.raises(ValueError, match="pass max_row_tokens only"):
        fastgemma.patch_model(model, max_row_tokens=512, max_seq_length=640)


def test_compile_layers_is_mapped_onto_compiled_regions_with_a_warning():
    model = random_gemma2(tiny_gemma2_config())
    with pytest.warns(DeprecationWarning, match="compile_layers is superseded by cuda_graphs"):
        fastgemma.patch_model(model, backend="eager", compile_layers=True)
    assert state_of(model.model).options.compiled_regions is True
    with pytest.raises(ValueError, match="compile_layers must be True or False, got 'yes'"):
        fastgemma.patch_model(model, compile_layers="yes")


def test_flash_kernels_go_by_their_experimental_name():
    model = random_gemma2(tiny_gemma2_config())
    with pytest.warns(DeprecationWarning, match="flex_kernel_options='flash' is now 'experimental-flash'"):
        fastgemma.patch_model(model, backend="eager", flex_kernel_options="flash")
    assert state_of(model.model).options.flex_kernel_options == "experimental-flash"
    with pytest.raises(ValueError, match="not inside compiled decoder layers"):
        fastgemma.patch_model(model, flex_kernel_options="experimental-flash", cuda_graphs=True)


def test_an_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_len'"):
        fastgemma.patch_model(random_gemma2(tiny_gemma2_config()), max_len=128)
