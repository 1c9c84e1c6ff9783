"""Shared helpers for the tests: tiny random Gemma 2 models, a float64 attention reference, the recipe module."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPE_PATH = RECIPES_DIR / "sft_gemma2.py"
# The recipe's parts (recipes/sft/) import as `sft`, found beside the script: `python recipes/sft_gemma2.py`
# puts the script's folder on sys.path, and so do the tests.
if str(RECIPES_DIR) not in sys.path:
    sys.path.insert(0, str(RECIPES_DIR))

# tests/hf_suite/ runs Hugging Face's Gemma 2 tests through its own run.py; plain pytest skips it.
collect_ignore = ["hf_suite"]

# The tests `pytest -m "not slow"` leaves out: each took 10 s or more on a 2-core CPU (`--durations`), mostly
# compiling, training the recipe or launching processes. Listed here, by file or by test function (all its
# parameter cases), so that test files need no marks; a name that no longer exists marks nothing.
# Every test of these files compiles decoder layers (in one process the first to run pays for the compile):
SLOW_FILES = {"test_compile_layers.py", "test_cuda_graphs.py"}
SLOW_TESTS = {
    "test_benchmarks.py": {"test_host_proxy_measures_each_contender_and_refuses_unknown_ones",
                           "test_kernel_suite_tiny", "test_trl_suite_tiny",
                           "test_trl_suite_runs_each_contender_under_each_trainer"},
    "test_decoding.py": {"test_every_cached_decode_step_matches_stock"},
    "test_distributed.py": {"test_ddp_two_processes", "test_two_nodes_on_one_machine_match_one_process",
                            "test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step",
                            "test_fsdp2_around_a_patched_model"},
    "test_hf_compat.py": {"test_backward_through_a_retained_graph_adds_the_gradients_again",
                          "test_create_graph_gives_hf_gradients_and_double_backward_stops_in_one_line"},
    "test_packaging.py": {"test_the_installed_wheel_finds_its_glue_as_fastgemma_patches",
                          "test_a_checkout_that_is_not_installed_still_patches"},
    "test_packing.py": {"test_packed_loss_and_gradients_equal_hf_eager"},
    "test_patch.py": {"test_greedy_generation_from_padded_prompts_is_unchanged"},
    "test_readme_snippet.py": {"test_the_readme_trl_snippet_trains"},
    "test_recipe.py": {"test_compiled_layers_run_the_recipe_like_the_op_by_op_path", "test_other_dataset_formats",
                       "test_4bit_loading_path",
                       # the three that share the trained_output fixture, one run of the recipe
                       "test_default_run_saves_adapter_tokenizer_and_state",
                       "test_adapter_loads_with_peft_and_changes_the_output",
                       "test_fresh_tiny_base_matches_the_one_saved_by_the_run"},
    "test_recipe_checks.py": {"test_hub_dataset_offline_fails_fast_as_a_script"},
    "test_recipe_resume.py": {"test_ctrl_c_at_the_terminal",
                              "test_ctrl_c_saves_and_resume_finishes_like_an_uninterrupted_run"},
    "test_trainer.py": {"test_nan_loss_is_logged_when_the_filter_is_off",
                        "test_lean_trainer_trains_exactly_like_sft_trainer",
                        "test_nan_loss_is_filtered_as_transformers_does"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = getattr(item, "originalname", item.name)
        if item.path.name in SLOW_FILES or name in SLOW_TESTS.get(item.path.name, ()):
            item.add_marker(pytest.mark.slow)


def tiny_gemma2_config(head_dim=16, query_pre_attn_scalar=None, heads=4, kv_heads=2, layers=4, window=24, vocab=97):
    from transformers import Gemma2Config

    return Gemma2Config(
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=query_pre_attn_scalar or head_dim,
        intermediate_size=128,
        vocab_size=vocab,
        sliding_window=window,
        max_position_embeddings=1024,
        attn_implementation="eager",
    )


def random_gemma2(config, seed=0, dtype=torch.float32, device="cpu"):
    """A Gemma2ForCausalLM with weights large enough that attention patterns are far from uniform."""
    from transformers import Gemma2ForCausalLM

    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model.to(device=device, dtype=dtype)


def lora_training_model(base, rank=4, max_row_tokens=128, reentrant=False, **patch):
    """A patched copy of `base` with non-zero LoRA (`rank`) on all linears, gradient checkpointing and train mode;
    `patch`: PatchOptions settings."""
    import copy

    import fastgemma
    from peft import LoraConfig, get_peft_model

    options = fastgemma.PatchOptions(max_row_tokens=max_row_tokens, **patch)
    model = fastgemma.patch_model(copy.deepcopy(base), options=options)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                             init_lora_weights=False))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    return model.train()


def reference_attention(query, key, value, allowed, scale, softcap):
    """Softcapped attention in float64, as HF eager computes it. `allowed` is bool (B|1, 1, Q, K), or a padded
    batch's int8 dense mask (only its 1s are allowed pairs).

    HF eager adds finfo.min to the scores of hidden keys: a query with no allowed key then averages every
    key of its row uniformly (the sums round to one value), with gradients through its scores.
    """
    if allowed.dtype == torch.int8:
        allowed = allowed == 1
    q, k, v = (t.double() for t in (query, key, value))
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    if not torch.is_grad_enabled() or q.shape[1] * q.shape[-2] * k.shape[-2] <= REFERENCE_WHOLE_SCORES:
        return _reference_heads(q, k, v, allowed, scale, softcap)
    # Long rows: one head at a time, checkpointed, so that forward and backward hold one head's float64 scores
    # (16 heads x 8192 x 8192 all at once kept some 50 GB for the backward).
    from torch.utils.checkpoint import checkpoint

    heads = [checkpoint(_reference_heads, q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1], allowed, scale, softcap,
                        use_reentrant=False) for h in range(q.shape[1])]
    return torch.cat(heads, dim=1)


REFERENCE_WHOLE_SCORES = 2**28  # heads x queries x keys up to which the reference computes every head at once


def _reference_heads(q, k, v, allowed, scale, softcap):
    scores = q @ k.transpose(-1, -2) * scale
    scores = softcap * torch.tanh(scores / softcap)
    hidden = torch.tensor(torch.finfo(torch.float64).min, dtype=torch.float64, device=scores.device)
    scores = scores + torch.where(allowed, 0.0, hidden)
    return torch.softmax(scores, dim=-1) @ v


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def gradients_after_backwards(model, times=2, create_graph=False, **inputs):
    """Parameter gradients (by name) after `times` backwards of one loss through its retained graph."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, use_cache=False).loss
    for i in range(times):
        loss.backward(retain_graph=i < times - 1, create_graph=create_graph)
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(actual, expected, tolerance=1e-3):
    assert actual.keys() == expected.keys() and actual
    for name in expected:
        assert relative_error(actual[name], expected[name]) < tolerance, name


def padding_mask(length, pads, side):
    """A (len(pads), length) attention mask with pads[i] padding tokens on the `side` ("right"/"left") of row i."""
    mask = torch.ones(len(pads), length, dtype=torch.long)
    for row, pad in enumerate(pads):
        if pad and side == "right":
            mask[row, -pad:] = 0
        elif pad:
            mask[row, :pad] = 0
    return mask


def load_recipe(name="sft_gemma2"):
    """recipes/sft_gemma2.py as a module (it is a script, not part of the package), under `name`."""
    spec = importlib.util.spec_from_file_location(name, RECIPE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def flex_forward_on_cpu(monkeypatch):
    """patch_model refuses backend="flex" on a CPU (no flex backward there), but torch runs flex_attention's
    forward on CPUs: tests that check flex's masks and score functions there step past that refusal."""
    import fastgemma.api

    monkeypatch.setattr(fastgemma.api, "flex_supported", lambda device: True)
