"""A patched Gemma2ForCausalLM's training loss, computed without the full logits, against stock Hugging Face."""

import copy
import logging

import pytest
import torch

import fastgemma
from conftest import padding_mask, random_gemma2, relative_error, tiny_gemma2_config
from fastgemma.ops import linear_cross_entropy as lce

LOSS_TOLERANCE = 1e-6
GRAD_TOLERANCE = 1e-5  # float32 rounding: the patched attention sums in another order


@pytest.fixture
def chunked_loss_calls(monkeypatch):
    """Counts the calls of the chunked loss, and makes its chunks small (17 tokens) so batches span several."""
    monkeypatch.setattr(lce, "CHUNK_LOGITS", 17 * 97)
    calls = []
    original = lce.LinearCrossEntropy.apply

    def counted(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(lce.LinearCrossEntropy, "apply", counted)
    return calls


def lora(model, targets=("q_proj", "v_proj", "gate_proj")):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False))


def padded_batch(length=40, pads=(0, 7), seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (len(pads), length), generator=generator)
    mask = padding_mask(length, pads, "right")
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100  # a prompt without loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def step(model, **batch):
    """(output, loss, gradients of every trainable parameter) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    output = model(**batch, use_cache=False)
    (output.loss * 1.5).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output, output.loss.detach(), grads


def assert_same_step(reference, patched, **batch):
    _, ref_loss, ref_grads = step(reference, **batch)
    output, loss, grads = step(patched, **batch)
    assert relative_error(loss, ref_loss) < LOSS_TOLERANCE
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert relative_error(grads[name], ref_grads[name]) < GRAD_TOLERANCE, name
    return output


def models(peft=False, **patch):
    reference = random_gemma2(tiny_gemma2_config(layers=2)).train()
    if peft:
        reference = lora(reference)
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=128, backend="eager", **patch)
    return reference, patched


@pytest.mark.parametrize("peft", [False, True], ids=["full", "peft-lora"])
@pytest.mark.parametrize("num_items_in_batch", [None, 61, "tensor"], ids=["mean", "int-items", "tensor-items"])
def test_training_loss_and_gradients_are_hf_s(chunked_loss_calls, peft, num_items_in_batch):
    reference, patched = models(peft)
    batch = padded_batch()
    if num_items_in_batch is not None:
        batch["num_items_in_batch"] = torch.tensor(61) if num_items_in_batch == "tensor" else num_items_in_batch
    output = assert_same_step(reference, patched, **batch)
    assert chunked_loss_calls == [(80, 64)]  # the whole batch, in 5 chunks of 17 tokens
    # The logits, when read, are HF's
    ref_output = reference(**batch, use_cache=False)
    assert relative_error(output.logits, ref_output.logits) < 1e-6 and output["logits"] is output.logits


def test_shift_labels_and_ignore_index_reach_the_loss(chunked_loss_calls):
    reference, patched = models()
    batch = padded_batch()
    shifted = torch.roll(batch.pop("labels"), -2, dims=1)
    assert_same_step(reference, patched, labels=shifted, shift_labels=shifted, **batch)
    batch = padded_batch()
    assert_same_step(reference, patched, ignore_index=3, **{**batch, "labels": batch["labels"].clamp(min=3)})
    assert len(chunked_loss_calls) == 2


def test_fused_ops_compile_the_chunks_and_give_hf_s_step(chunked_loss_calls):
    reference, patched = models(fused_ops=True)
    assert_same_step(reference, patched, **padded_batch())
    assert chunked_loss_calls and chunked_loss_calls[-1] == (80, 64)


def test_autocast_step_is_hf_s_to_bf16_rounding(chunked_loss_calls):
    reference, patched = models()
    batch = padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, ref_loss, ref_grads = step(reference, **batch)
        _, loss, grads = step(patched, **batch)
    assert chunked_loss_calls and relative_error(loss, ref_loss) < 1e-2
    for name in grads:
        assert grads[name].dtype == torch.float32 and relative_error(grads[name], ref_grads[name]) < 5e-2, name


@pytest.mark.parametrize("call", ["eval-mode", "no-grad", "tuple", "logits-to-keep", "no-labels", "custom-loss"])
def test_other_calls_run_hf_s_forward(chunked_loss_calls, call):
    reference, patched = models()
    batch = padded_batch()
    if call == "no-labels":
        del batch["labels"]
    if call == "tuple":
        batch["return_dict"] = False
    if call == "logits-to-keep":  # HF's loss then needs labels as long as the kept logits (it gives nan)
        batch.update(logits_to_keep=1, labels=batch["labels"][:, -1:])
    outputs = []
    for model in (reference, patched):
        if call == "eval-mode":
            model.eval()
        if call == "custom-loss":
            model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.float().square().mean()
        with torch.set_grad_enabled(call != "no-grad"):
            outputs.append(model(**batch, use_cache=False))
    expected, got = outputs
    assert type(got) is type(expected) and not chunked_loss_calls
    for index in range(1 if call == "no-labels" else 2):  # (loss, logits) or (logits,)
        torch.testing.assert_close(got[index], expected[index], rtol=1e-5, atol=1e-5, equal_nan=True)


def test_a_lora_lm_head_keeps_hf_s_loss_and_says_so_once(chunked_loss_calls, caplog, monkeypatch):
    from fastgemma import log

    monkeypatch.setattr(log, "said", set())
    reference = lora(random_gemma2(tiny_gemma2_config(layers=2)).train(), ("q_proj", "lm_head"))
    patched = fastgemma.patch_model(copy.deepcopy(reference), max_row_tokens=128, backend="eager")
    with caplog.at_level(logging.INFO, logger="fastgemma"):
        assert_same_step(reference, patched, **padded_batch())
        assert_same_step(reference, patched, **padded_batch(seed=1))
    assert not chunked_loss_calls
    notes = [r.getMessage() for r in caplog.records if "full logits" in r.getMessage()]
    assert len(notes) == 1 and "lora" in notes[0].lower(), notes


def test_unpatch_restores_hf_s_forward_and_patch_installs_it_again(chunked_loss_calls):
    reference, patched = models()
    causal_lm = patched
    fastgemma.unpatch_model(patched)
    assert "forward" not in causal_lm.__dict__
    assert_same_step(reference, patched, **padded_batch())
    assert not chunked_loss_calls
    fastgemma.patch_model(patched, max_row_tokens=128, backend="eager")
    assert_same_step(reference, patched, **padded_batch())
    assert len(chunked_loss_calls) == 1


def _trainer_losses(tmp_path, patched, chunked_loss_calls):
    """Training losses of 3 optimizer steps (gradient accumulation 2, so num_items_in_batch is passed) of a plain
    transformers Trainer on a tiny Gemma 2, patched or not."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = random_gemma2(tiny_gemma2_config(layers=2))
    if patched:
        fastgemma.patch_model(model, max_row_tokens=128, backend="eager")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in (30, 22, 40, 17, 33, 25, 40, 12, 26, 38, 19, 31):
        ids = torch.randint(0, 97, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})

    def collate(features):
        length = max(len(f["input_ids"]) for f in features)
        pad = [length - len(f["input_ids"]) for f in features]
        return {
            "input_ids": torch.tensor([f["input_ids"] + [0] * p for f, p in zip(features, pad)]),
            "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * p for f, p in zip(features, pad)]),
            "labels": torch.tensor([f["labels"] + [-100] * p for f, p in zip(features, pad)]),
        }

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        dataloader_num_workers=0, seed=0, data_seed=0, lr_scheduler_type="constant", remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collate)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_a_plain_trainer_trains_with_hf_s_losses(tmp_path, chunked_loss_calls):
    stock = _trainer_losses(tmp_path / "stock", False, chunked_loss_calls)
    assert not chunked_loss_calls
    patched = _trainer_losses(tmp_path / "patched", True, chunked_loss_calls)
    assert len(chunked_loss_calls) == 6  # every micro-step
    assert len(patched) == len(stock) == 3
    for got, want in zip(patched, stock):
        assert abs(got - want) <= 1e-5 * abs(want)


def test_trl_sft_trainer_keeps_its_own_fused_head_and_metrics(tmp_path, chunked_loss_calls):
    """TRL 1.16 wraps the model's forward with its own chunked LM head (`fused_lm_head=True`): its loss, token
    accuracy and entropy are those of an unpatched model, and fastgemma's loss is never called."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from test_packing import _word_tokenizer, random_word_texts

    logs = []
    for patched in (False, True):
        model = random_gemma2(tiny_gemma2_config(vocab=64, layers=2))
        if patched:
            fastgemma.patch_model(model, max_row_tokens=256, backend="eager")
        args = SFTConfig(
            output_dir=str(tmp_path / str(patched)), max_steps=2, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, packing=True, max_length=64, learning_rate=1e-3, logging_steps=1,
            report_to=[], bf16=False, use_cpu=True, save_strategy="no", dataloader_num_workers=0, seed=0, data_seed=0,
            lr_scheduler_type="constant",
        )
        torch.manual_seed(0)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": random_word_texts(24, vocab=64)}),
                             processing_class=_word_tokenizer(64), peft_config=LoraConfig(r=4, target_modules="all-linear"))
        trainer.train()
        logs.append([{k: e[k] for k in ("loss", "mean_token_accuracy", "entropy")}
                     for e in trainer.state.log_history if "loss" in e])
    assert not chunked_loss_calls
    assert len(logs[0]) == len(logs[1]) == 2
    for stock, patched in zip(*logs):
        for key in stock:
            assert abs(patched[key] - stock[key]) <= 1e-4 * max(1.0, abs(stock[key])), key
