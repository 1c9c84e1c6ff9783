"""Gemma 2's causal-LM loss without the full logits.

While training (module in train mode, grad enabled), a patched ``Gemma2ForCausalLM`` given ``labels`` computes
HF's loss (softcapped logits, labels shifted by one, ``ignore_index``, ``num_items_in_batch`` or
``shift_labels``) with ``fastgemma.ops.linear_cross_entropy``, a chunk of tokens at a time, instead of building
the (batch, length, vocabulary) logits and their float32 copy. The output's ``logits`` are computed from the
final hidden states when first read: transformers' Trainer reads only the loss while training and never builds
them, while code that does read them gets HF's logits (at HF's memory cost). Every other call runs HF's forward:
no labels, inference or evaluation, a tuple output (``return_dict=False``), ``logits_to_keep``, a custom
``loss_function``, an LM head that is not a plain ``nn.Linear`` (a PEFT LoRA or ``modules_to_save`` head: logged
once), and TRL's own ``fused_lm_head`` forward (which chunks its logits itself).
"""

from __future__ import annotations

import logging

import torch
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.gemma2 import modeling_gemma2

from fastgemma.log import say_once
from fastgemma.ops.linear_cross_entropy import linear_cross_entropy
from fastgemma.options import fused_here

from fastgemma.patching import PatchedForward, positional_parameters, state_of, unwrapped


def _note_once(reason: str) -> None:
    say_once(("full logits", reason), logging.INFO, "fastgemma: %s: the loss uses Hugging Face's full logits", reason)


def _plain_head(model) -> bool:
    """Whether the LM head is a plain nn.Linear that nothing wraps, so its weight and bias are all it computes."""
    head = model.lm_head
    if type(head) is not torch.nn.Linear:
        _note_once(f"the LM head is a {type(head).__module__}.{type(head).__name__}")
        return False
    if head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook") or "forward" in head.__dict__:
        _note_once("the LM head has hooks or its own forward")
        return False
    if type(head.weight) not in (torch.Tensor, torch.nn.Parameter):  # e.g. a sharded DTensor
        _note_once(f"the LM head's weight is a {type(head.weight).__name__}")
        return False
    return True


def _chunks_the_loss(model, kwargs: dict) -> bool:
    if kwargs.get("labels") is None or not (model.training and torch.is_grad_enabled()):
        return False
    if "fused_lm_head" in kwargs or state_of(model.model) is None:  # TRL's path; unpatched
        return False
    logits_to_keep = kwargs.get("logits_to_keep", 0)
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        return False
    return_dict = kwargs.get("return_dict")
    if not (return_dict if return_dict is not None else model.config.return_dict):
        return False  # a tuple output has the logits at a fixed place
    if model.loss_function is not ForCausalLMLoss:
        return False
    return _plain_head(model)


def causal_lm_forward(self, *args, **kwargs):
    """Gemma2ForCausalLM.forward, computing the training loss a chunk of tokens at a time (see the module)."""
    kwargs.update(zip(positional_parameters(type(self).forward), args))
    if not _chunks_the_loss(self, kwargs):
        return type(self).forward.__get__(self)(**kwargs)
    labels = kwargs.pop("labels")
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("return_dict", None)
    outputs = self.model(**kwargs)  # HF hands the backbone every keyword too, the loss's included
    hidden = outputs.last_hidden_state
    ignore_index = kwargs.get("ignore_index", -100)
    targets = kwargs.get("shift_labels")
    if targets is None:  # HF's shift: position t predicts label t + 1, the last position nothing
        targets = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.lm_head.weight.dtype
    with torch.autocast(device, enabled=False):  # the op casts to autocast's dtype itself, as the linear would
        loss = linear_cross_entropy(
            hidden, self.lm_head.weight, targets, self.lm_head.bias, softcap=self.config.final_logit_softcapping,
            ignore_index=ignore_index, num_items_in_batch=kwargs.get("num_items_in_batch"), dtype=dtype,
            fused=fused_here(self.model, hidden),
        )
    rest = {name: value for name, value in outputs.items() if name != "last_hidden_state"}
    return LogitsOnRead(loss=loss, logits_of=_logits_of(self, hidden), **rest)


def _logits_of(model, hidden):
    """A function computing HF's logits from `hidden` as the forward would have (same autocast, with grad)."""
    device = hidden.device.type
    autocast = {"dtype": torch.get_autocast_dtype(device)} if torch.is_autocast_enabled(device) else {"enabled": False}

    def logits():
        with torch.enable_grad(), torch.autocast(device, **autocast):
            logits = model.lm_head(hidden)
            cap = model.config.final_logit_softcapping
            return logits if cap is None else torch.tanh(logits / cap) * cap

    return logits


class LogitsOnRead(CausalLMOutputWithPast):
    """HF's causal-LM output whose ``logits`` are computed when first read (``.logits`` or ``["logits"]``)."""

    def __init__(self, *args, logits_of=None, **fields):
        super().__init__(*args, **fields)
        self.__dict__["_logits_of"] = logits_of

    @property
    def logits(self):
        if self.__dict__.get("_logits") is None and self.__dict__.get("_logits_of") is not None:
            self.__dict__["_logits"] = self.__dict__.pop("_logits_of")()
        return self.__dict__.get("_logits")

    @logits.setter
    def logits(self, value):
        self.__dict__["_logits"] = value

    def __getitem__(self, key):
        return self.logits if key == "logits" else super().__getitem__(key)


def patch(model: torch.nn.Module) -> None:
    """Install the forward on the Gemma2ForCausalLM in `model` (plain or PEFT), unless its forward is already
    someone's own (ours, or a wrapper such as accelerate's hooks, which then keeps HF's loss)."""
    causal_lm = unwrapped(model)
    if isinstance(causal_lm, modeling_gemma2.Gemma2ForCausalLM) and "forward" not in causal_lm.__dict__:
        causal_lm.forward = PatchedForward(causal_lm_forward, causal_lm)


def unpatch(model: torch.nn.Module) -> None:
    """Remove the forward `patch` installed. Where a wrapper was installed over it since (TRL's fused LM head),
    the wrapper stays, and ours inside it runs HF's forward from now on (its backbone is no longer patched)."""
    causal_lm = unwrapped(model)
    forward = causal_lm.__dict__.get("forward")
    if isinstance(forward, PatchedForward) and forward.function is causal_lm_forward:
        del causal_lm.__dict__["forward"]
