"""Cross-entropy of a linear head's logits, a chunk of tokens at a time, without the full logits.

``loss = cross_entropy(cap · tanh(hidden @ weightᵀ (+ bias) / cap), targets)`` (the softcap is optional), with
Hugging Face's reduction: ``ignore_index`` targets count for nothing, the sum is divided by the number of
counted targets, or by ``num_items_in_batch`` when given (HF's normalisation under gradient accumulation).
The log-softmax runs in float32 (float64 inputs stay float64), as HF upcasts its logits before the loss.

The gradients are computed in the forward, chunk by chunk, and kept for the backward (grad_hidden, and
grad_weight when the weight is trained): one logits GEMM per chunk, where recomputing the logits in the backward
would need a second. No more than one chunk of logits (``CHUNK_LOGITS`` elements) exists at a time. A backward
with ``create_graph=True`` (gradients of gradients) recomputes the loss from the full logits, differentiably.
"""

from __future__ import annotations

import torch

from .compile import fuse

# Logits per chunk: 256 MiB in float32; 256 tokens at Gemma's 256K vocabulary, a GEMM still big enough to run at
# full speed, while its float32 temporaries stay well below the activations of one decoder layer.
CHUNK_LOGITS = 1 << 26


def _loss_and_grad(logits, targets, scale, softcap: float | None, ignore_index: int):
    """(sum of the chunk's losses, d loss / d logits in the logits' dtype) for one chunk of logits.

    `scale` is 1 / the loss's denominator (a 0-dim tensor). In-place steps keep the float32 temporaries to two.
    """
    compute = torch.promote_types(logits.dtype, torch.float32)
    capped = logits.to(compute)
    tanh = None
    if softcap is not None:
        tanh = capped.div_(softcap).tanh_()  # HF's order: logits / cap, tanh, * cap
        capped = tanh * softcap
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).unsqueeze(1)
    lse = torch.logsumexp(capped, dim=-1, keepdim=True)
    picked = capped.gather(1, safe)
    loss_sum = torch.where(valid, (lse - picked).squeeze(1), 0).sum()
    grad = capped.sub_(lse).exp_()  # softmax
    grad.scatter_add_(1, safe, torch.full_like(picked, -1))  # minus the one-hot target
    grad.mul_(torch.where(valid, scale, 0).unsqueeze(1))  # ignored rows: exactly zero, even when scale is inf
    if tanh is not None:
        grad.mul_(tanh.mul_(tanh).neg_().add_(1))  # d(cap · tanh(x / cap)) / dx = 1 - tanh²
    return loss_sum, grad.to(logits.dtype)


_fused_loss_and_grad = fuse(_loss_and_grad, {0: (0,), 1: (0,)})  # one graph for every chunk length


def chunk_rows(vocab: int) -> int:
    """Tokens per chunk: as many as keep a chunk's logits within CHUNK_LOGITS, a multiple of 64 when above it."""
    rows = max(1, CHUNK_LOGITS // vocab)
    return rows - rows % 64 if rows >= 64 else rows


def _unchunked_loss(hidden, weight, bias, targets, softcap, ignore_index, denominator, dtype):
    """The same loss from the full logits, differentiably: for backward(create_graph=True) only."""
    logits = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    logits = logits.to(denominator.dtype)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    loss_sum = torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return loss_sum / denominator


class LinearCrossEntropy(torch.autograd.Function):
    """See the module docstring. Inputs: ``(tokens, features)`` hidden states, ``(vocab, features)`` weight,
    ``(tokens,)`` targets; the GEMMs run in `dtype` (autocast's), the softmax in float32; returns the scalar loss."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, ignore_index, num_items_in_batch, dtype, fused):
        compute = torch.promote_types(dtype, torch.float32)
        if num_items_in_batch is None:  # HF's mean over counted targets (0 / 0 = nan when none counts)
            denominator = (targets != ignore_index).sum().to(compute)
        else:
            denominator = torch.as_tensor(num_items_in_batch, device=hidden.device).to(compute)
        scale = denominator.reciprocal()
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=compute, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=compute, device=bias.device) if need_bias else None
        loss_sum = torch.zeros((), dtype=compute, device=hidden.device)
        cast_weight = weight.to(dtype)
        cast_bias = None if bias is None else bias.to(dtype)
        step = chunk_rows(weight.shape[0])
        loss_and_grad = _fused_loss_and_grad if fused else _loss_and_grad
        for start in range(0, hidden.shape[0], step):
            rows = slice(start, start + step)
            chunk = hidden[rows].to(dtype)
            logits = torch.nn.functional.linear(chunk, cast_weight, cast_bias)
            chunk_loss, grad_logits = loss_and_grad(logits, targets[rows], scale, softcap, ignore_index)
            del logits
            loss_sum += chunk_loss
            if grad_hidden is not None:
                grad_hidden[rows] = torch.mm(grad_logits, cast_weight)
            if grad_weight is not None:
                if grad_weight.dtype == grad_logits.dtype:
                    grad_weight.addmm_(grad_logits.t(), chunk)
                else:  # bf16/fp16 products, summed in float32 as one GEMM would accumulate them
                    grad_weight += torch.mm(grad_logits.t(), chunk)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0, dtype=compute)
        # The inputs stay for a backward with create_graph=True, as a stock linear's backward keeps them too.
        ctx.save_for_backward(hidden, weight, bias, targets, denominator, grad_hidden,
                              None if grad_weight is None else grad_weight.to(weight.dtype),
                              None if grad_bias is None else grad_bias.to(bias.dtype))
        ctx.settings = (softcap, ignore_index, dtype)
        return loss_sum / denominator

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, targets, denominator, *grads = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            # Fresh aliases, so that the gradients are partial: a weight tied to the embedding also reaches
            # `hidden` through the model, a path the outer backward already covers.
            hidden, weight, bias = (None if t is None else t.view_as(t) for t in (hidden, weight, bias))
            inputs = [t for t, needed in zip((hidden, weight, bias), ctx.needs_input_grad) if needed]
            loss = _unchunked_loss(hidden, weight, bias, targets, *ctx.settings[:2], denominator, ctx.settings[2])
            found = iter(torch.autograd.grad(loss, inputs, grad_loss, create_graph=True))
            grads = [next(found) if needed else None for needed in ctx.needs_input_grad[:3]]
        else:
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
        return (*grads, None, None, None, None, None, None)


def linear_cross_entropy(hidden, weight, targets, bias=None, softcap: float | None = None, ignore_index: int = -100,
                         num_items_in_batch=None, dtype: torch.dtype | None = None, fused: bool = True) -> torch.Tensor:
    """``cross_entropy(softcap(hidden @ weight.T + bias), targets)`` with HF's reduction, never holding more than
    one chunk of logits. `hidden` is ``(..., features)``, `targets` the matching ``(...)`` token ids (already
    aligned with the positions that predict them). `dtype`: the GEMMs' (default: hidden's; pass autocast's dtype
    to match an autocast linear). `fused` compiles the per-chunk elementwise work."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return LinearCrossEntropy.apply(hidden, weight, bias, targets.reshape(-1).to(hidden.device), softcap,
                                    ignore_index, num_items_in_batch, dtype or hidden.dtype, fused)
