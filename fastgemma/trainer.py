"""A Hugging Face trainer whose micro-steps do not stall the GPU: the same training, less host work between them.

With fastgemma's CUDA-graphed layers a 2,048-token QLoRA micro-step costs the GPU about 90 ms, so the trainer's
own Python between two micro-steps shows. A profiled TRL step (H200) had the GPU idle twice per micro-step for
about 15 ms each, while transformers' ``Trainer``:

- checked the loss for nan/inf with ``bool(torch.isnan(loss))``: the host waits for the whole backward to
  finish before it may queue anything of the next micro-step;
- counted the model's parameters again for its FLOP estimate (``floating_point_ops``: one Python walk over
  every parameter and module, ~15 ms for a 2B QLoRA model);
- set train mode again on every module (``model.train()``: ~15 ms for the 2,219 modules of a PEFT model).

``lean_trainer(cls)`` returns a subclass of a ``Trainer`` class (``trl.SFTTrainer`` for the recipe) that does
the same three things without the waiting: the nan/inf filter runs on the GPU (``torch.where``, the same value
transformers logs), the parameter count is read once per model, and the train-mode walk is skipped when every
module is in train mode already. Nothing else changes, and each shortcut steps aside (to transformers' own
code) where its conditions do not hold.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["lean_trainer"]

_LEAN_CLASSES: dict[type, type] = {}


def lean_trainer(trainer_cls: type) -> type:
    """``trainer_cls`` (a ``transformers.Trainer`` subclass) with ``LeanTrainerMixin`` in front; one class per
    base, so ``lean_trainer(SFTTrainer) is lean_trainer(SFTTrainer)``."""
    from transformers import Trainer

    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"lean_trainer needs a transformers.Trainer subclass, got {trainer_cls!r}")
    if issubclass(trainer_cls, LeanTrainerMixin):
        return trainer_cls
    if trainer_cls not in _LEAN_CLASSES:
        _LEAN_CLASSES[trainer_cls] = type(f"Lean{trainer_cls.__name__}", (LeanTrainerMixin, trainer_cls), {
            "__doc__": f"{trainer_cls.__name__} without host stalls between micro-steps (fastgemma.trainer)."})
    return _LEAN_CLASSES[trainer_cls]


class LeanTrainerMixin:
    """Put in front of a ``transformers.Trainer`` subclass (see ``lean_trainer``)."""

    def train(self, *args, **kwargs):
        # The nan/inf filter moves onto the GPU for this run only; the caller's arguments come back as they were.
        user_filter = self.args.logging_nan_inf_filter
        self._lean_filter_on_gpu = None  # decided at the first micro-step, once the loop's state exists
        try:
            return super().train(*args, **kwargs)
        finally:
            self.args.logging_nan_inf_filter = user_filter

    def training_step(self, model, inputs, num_items_in_batch=None):
        if getattr(self, "_lean_filter_on_gpu", None) is None:
            # transformers 5.x keeps the running loss in self._tr_loss; without it, its own (syncing) filter stays.
            # (transformers skips the filter on XLA devices; so does this.)
            from transformers.utils import is_torch_xla_available

            self._lean_filter_on_gpu = (
                bool(self.args.logging_nan_inf_filter) and not is_torch_xla_available()
                and isinstance(getattr(self, "_tr_loss", None), torch.Tensor)
                and hasattr(self, "_globalstep_last_logged")
            )
            if self._lean_filter_on_gpu:
                self.args.logging_nan_inf_filter = False
        with _skip_redundant_train_mode(model):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self._lean_filter_on_gpu and isinstance(loss, torch.Tensor):
            # transformers' filter: a nan or inf loss adds the mean of the losses logged since the last log instead
            running_mean = self._tr_loss / (1 + self.state.global_step - self._globalstep_last_logged)
            loss = torch.where(torch.isfinite(loss), loss, running_mean.to(loss.dtype))
        return loss

    def floating_point_ops(self, inputs):
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        cached = getattr(self, "_lean_parameter_count", None)
        if cached is None or cached[0] is not self.model:  # a new model (or wrapper): count again
            cached = (self.model, self.model.num_parameters(exclude_embeddings=True))
            self._lean_parameter_count = cached
        return 6 * inputs[main_input].numel() * cached[1]


# Classes whose train() does nothing beyond nn.Module.train's when no module's mode changes.
def _no_op_train_methods() -> set:
    methods = {torch.nn.Module.train}
    with contextlib.suppress(ImportError):
        from transformers import PreTrainedModel

        methods.add(PreTrainedModel.train)  # re-applies its kernels only when the mode changed
    return methods


class _ModuleList:
    """The modules of one model, listed once, and whether their train() methods may be skipped."""

    def __init__(self, model):
        self.modules = tuple(model.modules())
        allowed = _no_op_train_methods()
        # a train() of its own, on the class or the instance, may do more than set the flag: never skip it
        self.skippable = all(type(m).train in allowed and "train" not in vars(m) for m in self.modules)


@contextlib.contextmanager
def _skip_redundant_train_mode(model):
    """While Trainer.training_step runs, ``model.train()`` returns at once when every module is in train mode
    already (what it would leave unchanged): checking the flags costs well under a millisecond, setting them
    through nn.Module.__setattr__ about 15 ms for a PEFT model. The module list is taken at the first call;
    modules added to the model later (the Trainer adds none while training) would not be looked at."""
    if not isinstance(model, torch.nn.Module) or "train" in vars(model):
        yield
        return
    listing = getattr(model, "_lean_module_list", None)
    if listing is None:
        listing = _ModuleList(model)
        object.__setattr__(model, "_lean_module_list", listing)  # a plain attribute, not a submodule
    if not listing.skippable:
        yield
        return
    full_train = type(model).train

    def train(mode: bool = True):
        if mode and all(m.training for m in listing.modules):
            return model
        return full_train(model, mode)

    object.__setattr__(model, "train", train)
    try:
        yield
    finally:
        object.__delattr__(model, "train")
