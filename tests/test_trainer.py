"""fastgemma.trainer.lean_trainer: the same training as TRL's SFTTrainer, less host work between micro-steps."""

import math

import pytest
import torch

import fastgemma
from conftest import random_gemma2, tiny_gemma2_config
from fastgemma.trainer import lean_trainer
from test_packing import _word_tokenizer, random_word_texts


def _train(tmp_path, lean, steps=3, nan_at=None, eval_module=False, **config):
    """Trains LoRA on a patched tiny Gemma 2 (packed, gradient accumulation 2) with SFTTrainer, or with
    lean_trainer(SFTTrainer) when `lean`, and returns the trainer. `nan_at`: the micro-step (0-based) whose
    reported loss is made nan, as a diverging step would report it (below the lean trainer's own code)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model = random_gemma2(tiny_gemma2_config(vocab=64))
    fastgemma.patch_model(model, max_row_tokens=256, backend="eager")
    if eval_module:
        model.model.layers[1].mlp.eval()  # Trainer's model.train() must put it back in train mode
    base = SFTTrainer
    if nan_at is not None:
        class NanAt(SFTTrainer):
            def training_step(self, *args, **kwargs):
                loss = super().training_step(*args, **kwargs)
                self.micro_steps = getattr(self, "micro_steps", 0) + 1
                return loss * math.nan if self.micro_steps - 1 == nan_at else loss

        base = NanAt
    if lean:
        base = lean_trainer(base)
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        packing=True, max_length=128, learning_rate=1e-3, logging_steps=1, report_to=[], bf16=False, use_cpu=True,
        save_strategy="no", dataloader_num_workers=0, seed=0, data_seed=0, lr_scheduler_type="constant", **config,
    )
    torch.manual_seed(0)
    dataset = Dataset.from_dict({"text": random_word_texts(48, vocab=64)})
    trainer = base(model=model, args=args, train_dataset=dataset,
                   processing_class=_word_tokenizer(64), peft_config=LoraConfig(r=4, target_modules="all-linear"))
    trainer.train()
    return trainer


def _lora_weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_lean_trainer_trains_exactly_like_sft_trainer(tmp_path):
    plain = _train(tmp_path / "plain", False)
    lean = _train(tmp_path / "lean", True)
    assert type(lean).__name__ == "LeanSFTTrainer"
    assert _losses(lean) == _losses(plain) and len(_losses(lean)) == 3
    plain_weights, lean_weights = _lora_weights(plain), _lora_weights(lean)
    assert plain_weights.keys() == lean_weights.keys() and plain_weights
    for name, weight in plain_weights.items():
        assert torch.equal(lean_weights[name], weight), name
    assert lean.state.total_flos == plain.state.total_flos > 0  # the FLOP estimate from a cached count
    assert lean._lean_filter_on_gpu, "transformers' nan/inf filter should have moved onto the device"
    assert lean.args.logging_nan_inf_filter is True, "the caller's setting comes back after train()"
    assert "train" not in vars(lean.model), "the train-mode shortcut is gone after each micro-step"


def test_nan_loss_is_filtered_as_transformers_does(tmp_path):
    plain = _train(tmp_path / "plain", False, nan_at=2)
    lean = _train(tmp_path / "lean", True, nan_at=2)
    assert all(math.isfinite(loss) for loss in _losses(plain))
    assert _losses(lean) == pytest.approx(_losses(plain), rel=1e-6, abs=0)


def test_nan_loss_is_logged_when_the_filter_is_off(tmp_path):
    plain = _train(tmp_path / "plain", False, nan_at=2, logging_nan_inf_filter=False)
    lean = _train(tmp_path / "lean", True, nan_at=2, logging_nan_inf_filter=False)
    assert math.isnan(_losses(plain)[1]) and math.isnan(_losses(lean)[1])
    assert not lean._lean_filter_on_gpu


def test_a_module_left_in_eval_mode_is_put_back_in_train_mode(tmp_path):
    lean = _train(tmp_path / "lean", True, steps=1, eval_module=True)
    assert all(module.training for module in lean.model.modules())


def test_train_mode_shortcut_skips_only_redundant_walks():
    from fastgemma.trainer import _skip_redundant_train_mode

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Linear(2, 2)))
    calls = []
    model[1].train = lambda mode=True: calls.append(mode)  # an instance override would be skipped: not allowed
    with _skip_redundant_train_mode(model):
        model.train()  # the real walk (the listing says a train() method may not be skipped)
    assert calls == [True]

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    model.eval()
    with _skip_redundant_train_mode(model):
        model.train()
        assert all(m.training for m in model.modules())
        model[1].eval()
        model.train()  # one module off: the full walk again
        assert model[1].training
        model.train(False)
        assert not any(m.training for m in model.modules())
    assert "train" not in vars(model)


def test_custom_train_methods_turn_the_shortcut_off():
    from fastgemma.trainer import _ModuleList

    class Special(torch.nn.Linear):
        def train(self, mode=True):
            return super().train(mode)

    assert _ModuleList(torch.nn.Sequential(torch.nn.Linear(2, 2))).skippable
    assert not _ModuleList(torch.nn.Sequential(Special(2, 2))).skippable


def test_lean_trainer_refuses_what_is_not_a_trainer():
    from trl import SFTTrainer

    with pytest.raises(TypeError, match="transformers.Trainer subclass"):
        lean_trainer(torch.nn.Module)
    assert lean_trainer(SFTTrainer) is lean_trainer(SFTTrainer)
    assert lean_trainer(lean_trainer(SFTTrainer)) is lean_trainer(SFTTrainer)
