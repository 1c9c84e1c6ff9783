"""Gemma 2's self-check for untested versions: stock against patched on a tiny random model, on the CPU.

What it covers is what a transformers release tends to move under the glue: the forwards' signatures and
keyword names, the KV cache's interface, where gradient checkpointing runs, and how masks reach the layers.
It runs the dense eager backend (the compiled and flex kernels are torch's, checked by the test suite).
"""

from __future__ import annotations

import copy

import torch

from fastgemma.options import PatchOptions

TOLERANCE = 1e-4  # float32; the same maths in another order


def _relative_error(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _tiny_pair():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, query_pre_attn_scalar=8, intermediate_size=64, vocab_size=64,
                          sliding_window=6, max_position_embeddings=64, attn_implementation="eager")
    stock = Gemma2ForCausalLM(config)
    with torch.no_grad():
        for parameter in stock.parameters():
            parameter.normal_(0.0, 0.2)  # far from uniform attention
    return stock, copy.deepcopy(stock)


def _prefill_and_decode(model, ids, steps, cache_argument):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    logits = []
    with torch.no_grad():
        logits.append(model(input_ids=ids, use_cache=True, **{cache_argument: cache}).logits)
        for step in range(steps):
            token = logits[-1][:, -1:].argmax(-1)
            logits.append(model(input_ids=token, use_cache=True, **{cache_argument: cache}).logits)
    return logits


def _training_step(model, ids, position_ids):
    model.train()
    # transformers 5.23 renamed gradient checkpointing to activation checkpointing (the old names warn there).
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss = model(input_ids=ids, position_ids=position_ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def self_check() -> list:
    """Disagreements between stock and patched Gemma 2 (empty when exact)."""
    from . import gemma2

    problems = []

    def compare(what, actual, expected):
        error = _relative_error(actual, expected)
        if not error < TOLERANCE:
            problems.append(f"{what} differ (relative error {error:.2g})")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        stock, patched = _tiny_pair()
        gemma2.patch(patched, PatchOptions(max_row_tokens=64, backend="eager", fused_ops=False, cuda_graphs=False))
        vocab = stock.config.vocab_size

        ids = torch.randint(0, vocab, (2, 9))
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0
        with torch.no_grad():
            expected = stock(input_ids=ids, attention_mask=mask, use_cache=False).logits
            actual = patched(input_ids=ids, attention_mask=mask, use_cache=False).logits
        real = mask.bool()
        compare("padded prefill logits", actual[real], expected[real])

        expected = _prefill_and_decode(stock, ids, 4, gemma2.CACHE_ARGUMENT)  # 13 tokens: past the window of 6
        actual = _prefill_and_decode(patched, ids, 4, gemma2.CACHE_ARGUMENT)
        for step, (a, e) in enumerate(zip(actual, expected)):
            compare("prefill logits" if step == 0 else f"cached decode step {step} logits", a, e)

        packed = torch.randint(0, vocab, (1, 14))
        positions = torch.cat([torch.arange(5), torch.arange(9)]).unsqueeze(0)  # two packed documents
        stock_loss, stock_grads = _training_step(stock, packed, positions)
        patched_loss, patched_grads = _training_step(patched, packed, positions)
        compare("training losses", patched_loss, stock_loss)
        if stock_grads.keys() != patched_grads.keys():
            problems.append("training gradients reach other parameters")
        else:
            compare("training gradients", torch.cat([patched_grads[n].flatten() for n in stock_grads]),
                    torch.cat([stock_grads[n].flatten() for n in stock_grads]))
    return problems
