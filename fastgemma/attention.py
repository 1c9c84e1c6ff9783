"""Logit-softcapped attention: ``softmax(cap * tanh(q·kᵀ * scale / cap) + mask) · v``, with GQA.

Three backends compute the same function:

- ``flex``: torch ``flex_attention`` (compiled), softcap as a score_mod, sparse block masks.
  CUDA GPUs of compute capability >= 8.0. (On CPU torch runs its forward only.)
- ``compiled``: a ``torch.compile``d dense implementation; the CPU training path.
- ``eager``: the same dense implementation in plain PyTorch, for debugging and decoding.

``auto`` picks flex on capable GPUs, compiled elsewhere, and eager for what neither
handles (a dense mask from Hugging Face during decoding, dropout).

Model-agnostic: the caller supplies scale, softcap and the mask.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional, Union

import torch

from .masks import AttentionMask

logger = logging.getLogger("fastgemma")

BACKENDS = ("auto", "flex", "compiled", "eager")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def flex_supported(device: torch.device) -> bool:
    """flex_attention's fused kernels need a CUDA GPU of compute capability 8.0 or newer."""
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def flex_head_dim_ok(head_dim: int) -> bool:
    """flex_attention's kernels want a power-of-two head size of at least 16 (Gemma 2: 128, 256)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


# --------------------------------------------------------------------------------------
# Score functions (flex_attention's score_mod signature)
# --------------------------------------------------------------------------------------
def tanh_softcap(cap: float):
    """Score function squashing scores smoothly into (-cap, cap): ``cap * tanh(score / cap)``."""

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return softcap


# --------------------------------------------------------------------------------------
# Dense backends
# --------------------------------------------------------------------------------------
def dense_softcap_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    softcap: Optional[float],
    dropout_p: float = 0.0,
    return_weights: bool = False,
):
    """Reference-style dense attention; scores and softmax in float32.

    `mask` is None, a bool "allowed" tensor, or an additive float tensor, broadcastable
    to (batch, 1, q_len, kv_len). GQA without copying keys: query heads are grouped
    under their key head. A query with no allowed key outputs 0, never NaN.
    With `return_weights`, returns ``(output, weights)``, the (batch, heads, q_len, kv_len)
    probabilities in value's dtype, as Hugging Face's eager attention returns them.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    q = query.view(batch, kv_heads, group, q_len, head_dim)
    scores = torch.matmul(q, key.unsqueeze(2).transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    has_key = None
    if mask is not None:
        mask = mask.unsqueeze(2)  # broadcast over the group dimension
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
            has_key = mask.any(-1, keepdim=True)
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    if has_key is not None:  # a query with no key outputs 0 (as flex_attention does), not a uniform average
        probs = probs.masked_fill(~has_key, 0.0)
    probs = probs.to(value.dtype)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, value.unsqueeze(2)).view(batch, heads, q_len, head_dim)
    if return_weights:
        return out, probs.reshape(batch, heads, q_len, probs.shape[-1])
    return out


@functools.lru_cache(maxsize=None)
def _compiled_dense():
    # dynamic=True: one graph for every sequence length, so varying batches don't recompile.
    return torch.compile(dense_softcap_attention, dynamic=True)


# --------------------------------------------------------------------------------------
# flex backend
# --------------------------------------------------------------------------------------
# Recompiles are bounded by design (static shapes at one padded length; one graph per
# mask variant: plain or packed, sliding or global), but a silent fall back to unfused
# flex_attention would cost O(length²) memory: give our own compiles head-room without
# changing the limit for the user's code.
FLEX_RECOMPILE_LIMIT = 32
_RECOMPILE_LIMIT_KEY = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Static shapes: every batch arrives padded to the block mask's fixed length, so one
    # kernel serves all lengths. (With dynamic shapes, torch 2.11 fell back to unfused
    # flex_attention, or failed in the backward, once the mask function captured tensors.)
    return torch.compile(flex_attention, dynamic=False)


def _pad_length(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """`tensor` padded along the sequence to `length`, always in the contiguous layout.

    A batch of exactly `length` tokens must reach the compiled kernel with the same strides as
    a padded one (pad returns contiguous tensors; the attention layers hand over transposed
    views), or torch.compile guards on the strides and recompiles flex fwd+bwd for that batch.
    """
    missing = length - tensor.shape[-2]
    return tensor.contiguous() if missing == 0 else torch.nn.functional.pad(tensor, (0, 0, 0, missing))


def flex_softcap_attention(query, key, value, block_mask, scale, softcap, compiled=True, kernel_options=None):
    """flex_attention with a softcap score function; inputs are padded to the block mask's length.

    `kernel_options` go to torch's Triton templates unchanged on the compiled (GPU) path (block sizes,
    warps, stages; ``fwd_`` / ``bwd_`` prefixes address one direction); None keeps torch's defaults.
    See benchmarks/tune_flex.py.
    """
    from torch.nn.attention.flex_attention import flex_attention

    score_mod = None if softcap is None else tanh_softcap(float(softcap))
    enable_gqa = query.shape[1] != key.shape[1]
    length, padded = query.shape[-2], block_mask.seq_lengths[0]
    query, key, value = (_pad_length(t, padded) for t in (query, key, value))
    if not compiled:
        if not torch.is_grad_enabled():  # torch refuses CPU flex for inputs that require grad, even under no_grad
            query, key, value = query.detach(), key.detach(), value.detach()
        out = flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    else:
        with torch._dynamo.config.patch(**{_RECOMPILE_LIMIT_KEY: FLEX_RECOMPILE_LIMIT}):
            out = _compiled_flex()(
                query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                kernel_options=kernel_options,
            )
    return out[:, :, :length]


def tuned_flex_kernel_options(query: torch.Tensor) -> Optional[dict]:
    """fastgemma's flex_attention kernel options for this call, or None for torch's own choice.

    Hopper (sm90), head_dim 256, 16-bit: 8 warps in the backward kernels. torch 2.11's Hopper
    default uses 4 there; on an H200, 8 made softcapped fwd+bwd 1.21-1.24x faster on a packed
    16K row, with bit-identical outputs and gradients. head_dim 128: no gain measured, so
    torch's choice stays. Measured by benchmarks/tune_flex.py; see benchmarks/RESULTS.md.
    """
    if (
        query.device.type == "cuda"
        and query.shape[-1] == 256
        and query.dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.get_device_capability(query.device)[0] == 9
    ):
        return {"bwd_num_warps": 8}
    return None


def check_kernel_options(kernel_options):
    """'auto' (fastgemma's tuned choice), None (torch's defaults) or a dict of Triton options."""
    if kernel_options is None or (isinstance(kernel_options, str) and kernel_options == "auto"):
        return kernel_options
    if isinstance(kernel_options, dict) and all(isinstance(key, str) for key in kernel_options):
        return kernel_options
    raise ValueError(
        "flex_kernel_options must be 'auto', None (torch's defaults) or a dict such as "
        f"{{'bwd_num_warps': 8}}, got {kernel_options!r}"
    )


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------
def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def resolve_backend(backend: str, query, key, mask, dropout_p: float = 0.0) -> str:
    """The backend that will run this call (see the module docstring for the rules)."""
    check_backend(backend)
    ours = isinstance(mask, AttentionMask)
    if backend == "auto":
        if not ours or dropout_p > 0.0:
            return "eager"
        if flex_supported(query.device) and flex_head_dim_ok(query.shape[-1]):
            return "flex"
        return "compiled"
    if backend == "flex":
        if not ours:
            raise ValueError(
                "backend='flex' needs queries and keys starting together (no KV cache in use); "
                "decoding with a cache takes backend='auto' or 'eager'"
            )
        if dropout_p > 0.0:
            raise ValueError("backend='flex' has no attention dropout; use backend='eager' or set attention_dropout=0")
        if query.device.type != "cuda" and _needs_grad(query, key):
            raise NotImplementedError(
                "backend='flex' cannot train on CPU: torch's flex_attention has no CPU backward. "
                "Use backend='compiled' (or 'auto') for CPU training."
            )
    return backend


def softcap_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: Union[AttentionMask, torch.Tensor, None],
    *,
    scale: float,
    softcap: Optional[float],
    backend: str = "auto",
    dropout_p: float = 0.0,
    kernel_options="auto",
) -> torch.Tensor:
    """Softcapped attention with GQA. query (B, H, Q, D); key, value (B, Hkv, K, D) -> (B, H, Q, D).

    `mask` is an AttentionMask (queries and keys start together), a dense mask from the
    caller (bool allowed, or additive float; used when decoding with a KV cache), or None
    (causal when Q == K; when Q < K, the queries are the last Q positions and see every key).
    `kernel_options` (flex only): "auto" = `tuned_flex_kernel_options`, None = torch's defaults,
    or a dict passed to flex_attention as is.
    """
    check_kernel_options(kernel_options)
    if query.shape[1] % key.shape[1] != 0:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key heads ({key.shape[1]})")
    chosen = resolve_backend(backend, query, key, mask, dropout_p)
    if isinstance(mask, AttentionMask):
        if query.shape[-2] != mask.q_len or key.shape[-2] != mask.kv_len:
            raise ValueError(
                f"attention mask built for {mask.q_len} queries / {mask.kv_len} keys, "
                f"got {query.shape[-2]} / {key.shape[-2]}"
            )
        if chosen == "flex":
            compiled = query.device.type == "cuda"
            if isinstance(kernel_options, str) and kernel_options == "auto":
                kernel_options = tuned_flex_kernel_options(query)
            return flex_softcap_attention(
                query, key, value, mask.block_mask(query.device), scale, softcap,
                compiled=compiled, kernel_options=kernel_options if compiled else None,
            )
        dense = mask.dense(query.device)
    else:
        dense = mask
        if dense is None and query.shape[-2] == key.shape[-2]:
            dense = AttentionMask(query.shape[-2], key.shape[-2]).dense(query.device)
    fn = _compiled_dense() if chosen == "compiled" else dense_softcap_attention
    return fn(query, key, value, dense, scale, softcap, dropout_p)
