"""Decoding with a KV cache under the patch: step-by-step logits and greedy generation against stock Gemma 2.

These run on whichever transformers is installed; CI runs them on both ends of the supported range, where
the cache reaches the forwards under different names (``past_key_values`` before 5.24, ``cache`` after).
"""

import copy

import pytest
import torch
import transformers
from packaging.version import Version

import fastgemma
from fastgemma.patches.gemma2 import CACHE_ARGUMENT
from conftest import random_gemma2, relative_error, tiny_gemma2_config

TOLERANCE = 1e-5  # float32, the same maths in the same order up to the attention kernel


def _decode_logits(model, prompt, steps, cache_kind):
    """Prefill `prompt`, then feed `steps` tokens one at a time; the logits of every call, concatenated."""
    from transformers import DynamicCache, StaticCache

    length = prompt.shape[1] + steps
    cache = (DynamicCache(config=model.config) if cache_kind == "dynamic"
             else StaticCache(config=model.config, max_cache_len=length))
    torch.manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (prompt.shape[0], steps))
    outputs = []
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, **{CACHE_ARGUMENT: cache})
        outputs.append(out.logits)
        for step in range(steps):
            out = model(input_ids=tokens[:, step:step + 1], use_cache=True, **{CACHE_ARGUMENT: cache})
            outputs.append(out.logits)
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("head_dim, scalar", [(16, None), (8, 12)])
def test_every_cached_decode_step_matches_stock(cache_kind, head_dim, scalar):
    reference = random_gemma2(tiny_gemma2_config(head_dim=head_dim, query_pre_attn_scalar=scalar, window=8))
    patched = fastgemma.patch_model(copy.deepcopy(reference))
    prompt = torch.randint(0, 97, (2, 13))
    steps = 12  # past the window of 8: the sliding layers must drop keys
    expected = _decode_logits(reference, prompt, steps, cache_kind)
    actual = _decode_logits(patched, prompt, steps, cache_kind)
    assert relative_error(actual[:, :13], expected[:, :13]) < TOLERANCE  # prefill
    for step in range(13, 13 + steps):
        assert relative_error(actual[:, step], expected[:, step]) < TOLERANCE, f"decode step {step - 12}"


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_greedy_generation_gives_stock_tokens_and_scores(cache_implementation):
    reference = random_gemma2(tiny_gemma2_config(window=16))
    patched = fastgemma.patch_model(copy.deepcopy(reference))
    prompt = torch.randint(0, 97, (3, 9))
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True, cache_implementation=cache_implementation)
    expected = reference.generate(prompt, **kwargs)
    actual = patched.generate(prompt, **kwargs)
    assert torch.equal(actual.sequences, expected.sequences)
    assert relative_error(torch.stack(actual.scores), torch.stack(expected.scores)) < TOLERANCE


def test_generating_from_a_model_in_training_mode_with_checkpointing_uses_the_cache():
    # Evaluation callbacks generate mid-training: no grad, so checkpointing must not drop the cache (stock
    # transformers before 5.25 drops it there, and then decodes each token without its context).
    reference = random_gemma2(tiny_gemma2_config(window=16)).eval()
    patched = fastgemma.patch_model(copy.deepcopy(reference))
    patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patched.train()
    prompt = torch.randint(0, 97, (1, 7))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    expected = reference.generate(prompt, **kwargs)
    if Version(transformers.__version__).release[:2] < (5, 23):
        # Before 5.23 transformers itself drops the cache there, before any layer runs: never silently wrong.
        with pytest.raises(ValueError, match="attention_mask has shape"):
            patched.generate(prompt, **kwargs)
        return
    actual = patched.generate(prompt, **kwargs)
    assert torch.equal(actual.sequences, expected.sequences)
    assert relative_error(torch.stack(actual.scores), torch.stack(expected.scores)) < TOLERANCE


def test_the_cache_reaches_hf_under_the_name_the_caller_used():
    """Whatever name a caller passes the cache under, HF's own forward sees it, and warns as it does stock."""
    import warnings

    from transformers import DynamicCache

    reference = random_gemma2(tiny_gemma2_config(window=8))
    patched = fastgemma.patch_model(copy.deepcopy(reference))
    ids = torch.randint(0, 97, (1, 6))
    caught = {}
    for name, model in (("stock", reference), ("patched", patched)):
        with warnings.catch_warnings(record=True) as caught[name], torch.no_grad():
            warnings.simplefilter("always")
            cache = DynamicCache(config=model.config)
            model(input_ids=ids, past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 6, name
    deprecated = {name: any("`past_key_values` is deprecated" in str(w.message) for w in found)
                  for name, found in caught.items()}
    assert deprecated["patched"] == deprecated["stock"]
