"""Packed (padding-free) batches: documents stay apart exactly, on the model and under TRL."""

import copy

import pytest
import torch

import fastgemma
from conftest import random_gemma2, relative_error, tiny_gemma2_config
from fastgemma.masks import AttentionMask, segments_from_position_ids

TOLERANCE = 1e-4
DOCUMENT_LENGTHS = [50, 7, 90, 33]  # shorter and longer than the window (24)


def packed_batch(lengths, vocab=97, seed=0):
    ids = torch.randint(0, vocab, (1, sum(lengths)), generator=torch.Generator().manual_seed(seed))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, positions


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_packed_logits_equal_documents_alone_and_hf_eager(backend, flex_forward_on_cpu):
    reference = random_gemma2(tiny_gemma2_config())
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=256, backend=backend)
    ids, positions = packed_batch(DOCUMENT_LENGTHS)
    with torch.no_grad():
        packed = patched(input_ids=ids, position_ids=positions, use_cache=False).logits
        hf_packed = reference(input_ids=ids, position_ids=positions, use_cache=False).logits
        assert relative_error(packed, hf_packed) < TOLERANCE
        start = 0
        for n in DOCUMENT_LENGTHS:
            alone = reference(input_ids=ids[:, start : start + n], use_cache=False).logits
            assert relative_error(packed[:, start : start + n], alone) < TOLERANCE
            start += n


def test_packed_loss_and_gradients_equal_hf_eager():
    reference = random_gemma2(tiny_gemma2_config(heads=8, kv_heads=2))
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=256, backend="compiled")
    ids, positions = packed_batch(DOCUMENT_LENGTHS, seed=1)
    labels = ids.clone()
    labels[positions == 0] = -100  # as TRL does: no loss across a document boundary
    results = []
    for model in (reference, patched):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, position_ids=positions, labels=labels, use_cache=False)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    assert relative_error(loss, ref_loss) < TOLERANCE
    for name in ref_grads:
        assert relative_error(grads[name], ref_grads[name]) < 1e-3, name


def test_cu_seq_lens_and_seq_idx_give_the_same_documents():
    reference = random_gemma2(tiny_gemma2_config())
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=256, backend="eager")
    ids, positions = packed_batch(DOCUMENT_LENGTHS, seed=2)
    cu = torch.tensor([0, *torch.tensor(DOCUMENT_LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    seq_idx = torch.repeat_interleave(torch.arange(len(DOCUMENT_LENGTHS)), torch.tensor(DOCUMENT_LENGTHS))[None]
    with torch.no_grad():
        expected = reference(input_ids=ids, position_ids=positions, use_cache=False).logits
        for extra in ({"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}, {"seq_idx": seq_idx}):
            # positions deliberately withheld: the boundaries must come from the other fields
            actual = patched(input_ids=ids, use_cache=False, **extra).logits
            assert relative_error(actual, expected) < TOLERANCE


def _word_tokenizer(vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def random_word_texts(count, vocab, seed=0):
    """`count` texts of 5-59 words w4..w{vocab-1}, for _word_tokenizer(vocab)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        " ".join(f"w{int(t)}" for t in torch.randint(4, vocab, (int(torch.randint(5, 60, (1,), generator=generator)),),
                                                      generator=generator))
        for _ in range(count)
    ]


def test_sft_trainer_packing_reaches_patched_attention_with_boundaries(tmp_path, monkeypatch):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from fastgemma import patches

    seen = []
    real_attention = patches.gemma2.softcap_attention

    def spy(query, key, value, mask, **kwargs):
        seen.append(mask)
        return real_attention(query, key, value, mask, **kwargs)

    monkeypatch.setattr(patches.gemma2, "softcap_attention", spy)
    batches = []

    model = random_gemma2(tiny_gemma2_config(vocab=64))
    fastgemma.patch_model(model, max_row_tokens=256, backend="eager")
    backbone_forward = model.model.forward

    def record_batch(*args, **kwargs):
        batches.append({k: v for k, v in kwargs.items() if k in ("position_ids", "cu_seq_lens_q", "attention_mask")})
        return backbone_forward(*args, **kwargs)

    model.model.forward = record_batch
    texts = random_word_texts(40, vocab=64)
    config = SFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, packing=True, max_length=128,
        learning_rate=1e-3, logging_steps=1, report_to=[], bf16=False, use_cpu=True, save_strategy="no",
        gradient_checkpointing=False, dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=_word_tokenizer(64))
    trainer.train()

    assert len(batches) == 3
    layers = len(model.model.layers)
    assert len(seen) == 3 * layers
    for step, batch in enumerate(batches):
        assert batch.get("attention_mask") is None  # padding-free
        expected = segments_from_position_ids(batch["position_ids"])
        assert expected is not None, "TRL packed several documents into the row"
        for mask in seen[step * layers : (step + 1) * layers]:
            assert isinstance(mask, AttentionMask)
            length = batch["position_ids"].shape[-1]
            assert torch.equal(mask.segment_ids[:, :length].long(), expected)
        assert {m.window for m in seen[step * layers : (step + 1) * layers]} == {None, model.config.sliding_window}
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_single_document_row_from_trl_stays_on_the_packed_path():
    """A padding-free row holding one document keeps segment ids (no switch of compiled variant) and stays exact."""
    from fastgemma.mask_mapping import build_mask_mapping

    config = tiny_gemma2_config()
    masks = build_mask_mapping(config, None, 1, 40, "cpu", None, torch.arange(40)[None], None,
                               {"cu_seq_lens_q": torch.tensor([0, 40], dtype=torch.int32)})
    assert all(mask.segment_ids is not None for mask in masks.values())
    reference = random_gemma2(config)
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=64, backend="eager")
    ids = torch.randint(0, 97, (1, 40))
    cu = torch.tensor([0, 40], dtype=torch.int32)
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits
        actual = patched(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, use_cache=False).logits
    assert relative_error(actual, expected) < TOLERANCE


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_calls_within_the_window_give_sliding_layers_the_causal_mask_and_stay_exact(backend, flex_forward_on_cpu):
    """A call no longer than the window: sliding layers see what global ones see, so both kinds read one mask
    object (one compiled body, one flex kernel). One token longer, the sliding layers get their window back. Both
    match HF eager: plain rows, packed and left-padded (flex: forward only on a CPU)."""
    from fastgemma.mask_mapping import build_mask_mapping

    config = tiny_gemma2_config(window=24)
    short = build_mask_mapping(config, None, 1, 24, "cpu", None, torch.arange(24)[None], None, {})
    assert short["sliding_attention"] is short["full_attention"] and short["full_attention"].window is None
    longer = build_mask_mapping(config, None, 1, 25, "cpu", None, torch.arange(25)[None], None, {})
    assert longer["sliding_attention"].window == 24 and longer["full_attention"].window is None

    reference = random_gemma2(config)
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=64, backend=backend)
    for length in (24, 25, 40):
        ids = torch.randint(0, 97, (2, length))
        padding = torch.ones(2, length, dtype=torch.long)
        padding[1, :5] = 0  # left padding: the window counts from each padded query too
        positions = torch.cat([torch.arange(10), torch.arange(length - 10)])[None].expand(2, length)
        with torch.no_grad():
            for inputs in ({}, {"attention_mask": padding}, {"position_ids": positions}):  # {}: q - k reaches 23
                expected = reference(input_ids=ids, use_cache=False, **inputs).logits
                actual = patched(input_ids=ids, use_cache=False, **inputs).logits
                assert relative_error(actual, expected) < TOLERANCE, (backend, length, list(inputs))


def test_bad_cu_seq_lens_are_refused_by_name():
    """TRL-style packed lengths that do not describe the row: a ValueError naming them, not a silent mask."""
    patched = fastgemma.patch_model(random_gemma2(tiny_gemma2_config()), max_row_tokens=64, backend="eager")
    ids = torch.randint(0, 97, (1, 40))
    for bad in ([0, 10, 30], [0, 30, 10, 40], [5, 40]):
        cu = torch.tensor(bad, dtype=torch.int32)
        with torch.no_grad(), pytest.raises(ValueError, match="cu_seq_lens must start at 0, never decrease and end"):
            patched(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, use_cache=False)
