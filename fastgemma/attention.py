"""Logit-softcapped attention: ``softmax(cap * tanh(q·kᵀ * scale / cap) + mask) · v``, with GQA.

Three backends compute the same function:

- ``flex``: torch ``flex_attention`` (compiled), softcap as a score_mod, sparse block masks.
  CUDA GPUs of compute capability >= 8.0. (On CPU torch runs its forward only.) On NVIDIA GPUs
  its softcap uses the hardware's approximate tanh by default, as FlashAttention's does
  (``softcap_tanh``; see fastgemma/fast_tanh.py).
- ``compiled``: a ``torch.compile``d dense implementation; the CPU training path.
- ``eager``: the same dense implementation in plain PyTorch, for debugging and decoding.

``auto`` picks flex on capable GPUs, compiled elsewhere, and eager for what neither
handles (a dense mask from Hugging Face during decoding, dropout).

Model-agnostic: the caller supplies scale, softcap and the mask.
"""

from __future__ import annotations

import functools
import itertools
import logging
import types
import warnings
from typing import Optional, Union

import torch

from . import fast_tanh
from .masks import DENSE_UNIFORM, AttentionMask, uniform_rows
from .ops.compile import compile_function

logger = logging.getLogger("fastgemma")

BACKENDS = ("auto", "flex", "compiled", "eager")
SOFTCAP_TANH = ("auto", "exact", "approx")

# What softcap_tanh="auto" means for flex on NVIDIA GPUs: "approx" (one-instruction tanh, as in
# FlashAttention) while benchmarks/check_softcap.py finds its errors within HF eager bf16's; else "exact".
AUTO_SOFTCAP_TANH = "approx"


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


_CUDA_CAPABILITIES: dict = {}  # str(device) -> (major, minor): asked once, then read as a constant inside compiles


def cuda_capability(device) -> tuple:
    """torch.cuda.get_device_capability(device), asked of the driver once per device."""
    key = str(torch.device(device))
    if key not in _CUDA_CAPABILITIES:
        _CUDA_CAPABILITIES[key] = tuple(torch.cuda.get_device_capability(device))
    return _CUDA_CAPABILITIES[key]


def flex_supported(device: torch.device) -> bool:
    """flex_attention's fused kernels need a CUDA GPU of compute capability 8.0 or newer."""
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return cuda_capability(device)[0] >= 8


def flex_head_dim_ok(head_dim: int) -> bool:
    """flex_attention's kernels want a power-of-two head size of at least 16 (Gemma 2: 128, 256)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def auto_picks_flex(device: torch.device, head_dim: int) -> bool:
    """Whether backend="auto" runs flex (rather than compiled dense) for our masks, without dropout."""
    return flex_supported(device) and flex_head_dim_ok(head_dim)


def backend_runs_flex(backend: str, device: torch.device, head_dim: int, dropout: float = 0.0) -> bool:
    """Whether attention under patch option `backend` runs flex for fastgemma's masks on `device`."""
    return backend == "flex" or (backend == "auto" and dropout == 0.0 and auto_picks_flex(device, head_dim))


def flex_padded_length(mask, backend: str, device: torch.device, head_dim: int, dropout: float = 0.0):
    """The length flex pads this call's query, key and value to (`AttentionMask.padded_length`) when flex will
    run it, else None: a caller that writes them anyway (RoPE) can write them padded, saving flex a copy."""
    if not isinstance(mask, AttentionMask) or not backend_runs_flex(backend, device, head_dim, dropout):
        return None
    return mask.padded_length


# --------------------------------------------------------------------------------------
# Score functions (flex_attention's score_mod signature)
# --------------------------------------------------------------------------------------
def tanh_softcap(cap: float, approx: bool = False):
    """Score function squashing scores smoothly into (-cap, cap): ``cap * tanh(score / cap)``.

    `approx` swaps in the GPU's one-instruction tanh (fastgemma.fast_tanh: compiled NVIDIA kernels
    only; call ``fast_tanh.register()`` first).
    """
    # Two functions, not one closing over the chosen tanh, so each reads as the maths it computes.
    # (Their kernels are kept apart by _compiled_flex's keys, not by these functions: torch 2.11 did not.)
    if approx:

        def softcap_approx(score, b, h, q_idx, kv_idx):
            return cap * fast_tanh.tanh_approx(score / cap)

        return softcap_approx

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return softcap


def check_softcap_tanh(softcap_tanh) -> str:
    """'auto', 'exact' or 'approx' (see `resolve_softcap_tanh`)."""
    if not (isinstance(softcap_tanh, str) and softcap_tanh in SOFTCAP_TANH):
        raise ValueError(f"softcap_tanh must be 'auto', 'exact' or 'approx', got {softcap_tanh!r}")
    return softcap_tanh


def resolve_softcap_tanh(softcap_tanh: str, device) -> str:
    """The tanh ("approx" or "exact") that compiled flex_attention on `device` softcaps with.

    "auto" is `AUTO_SOFTCAP_TANH`. The approximate tanh exists only inside kernels compiled for
    NVIDIA GPUs: everywhere else (CPU, AMD GPUs, the dense backends, a torch without the APIs
    it needs) the softcap is exact, whatever was asked.
    """
    wanted = AUTO_SOFTCAP_TANH if check_softcap_tanh(softcap_tanh) == "auto" else softcap_tanh
    if wanted == "approx" and fast_tanh.is_nvidia(device) and fast_tanh.register():
        return "approx"
    return "exact"


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

    `mask` is None, a bool "allowed" tensor, an additive float tensor, or a padded batch's int8
    mask (`AttentionMask.dense`: its DENSE_UNIFORM rows average their keys uniformly, as HF eager),
    broadcastable to (batch, 1, q_len, kv_len). GQA without copying keys: query heads are grouped
    under their key head. A query with no allowed key outputs 0, never NaN.
    With `return_weights`, returns ``(output, weights)``, the (batch, heads, q_len, kv_len)
    probabilities in value's dtype (after dropout), as Hugging Face's eager attention returns them:
    the very tensor the output is computed from, so a gradient retained on it is the output's.
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
        if mask.dtype == torch.int8:  # uniform rows: scores exactly 0, gradients kept (masks.uniform_rows)
            scores = torch.where(mask == DENSE_UNIFORM, scores - scores.detach(), scores)
            mask = mask != 0
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
    weights = None
    if return_weights:
        # The product reads the returned tensor through a view, not the other way round: a view
        # handed back would sit off the path to the output and get no gradient.
        weights = probs.reshape(batch, heads, q_len, probs.shape[-1])
        probs = weights.view(probs.shape)
    out = torch.matmul(probs, value.unsqueeze(2)).view(batch, heads, q_len, head_dim)
    if return_weights:
        return out, weights
    return out


@functools.lru_cache(maxsize=None)
def _compiled_dense():
    # dynamic=True: one graph for every sequence length, so varying batches don't recompile.
    return compile_function(dense_softcap_attention, dynamic=True)


# --------------------------------------------------------------------------------------
# flex backend
# --------------------------------------------------------------------------------------
# Recompiles are bounded by design (static shapes at one padded length; one graph per
# mask variant: plain or packed, sliding or global), but a silent fall back to unfused
# flex_attention would cost O(length²) memory: give our own compiles head-room without
# changing the limit for the user's code.
FLEX_RECOMPILE_LIMIT = 32
_RECOMPILE_LIMIT_KEY = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def flex_compile_settings():
    """A context for tracing flex_attention: FLEX_RECOMPILE_LIMIT recompiles per function (the user's own
    limit is left as it is outside it), and floats specialised. A score function's softcap is a float it
    closes over; torch 2.15 turns a float that changed between calls into a symbolic one, which
    flex_attention then refuses (its buffers may be tensors or ints only)."""
    return torch._dynamo.config.patch(**{_RECOMPILE_LIMIT_KEY: FLEX_RECOMPILE_LIMIT, "specialize_float": True})


_ENTRY_NUMBERS = itertools.count()


def _flex_entry(*args, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _compiled_flex(score_key=None, kernels="triton"):
    """torch.compile'd flex_attention, one compiled entry point per kind of score function.

    `score_key` names the score function's maths (fastgemma's: softcap and tanh). torch.compile
    keeps its compiled graphs per code object, and torch 2.11 reused a kernel compiled for one
    score function for another: on an H100, softcap_tanh="exact" computed with the approximate
    tanh once an approximate kernel existed in the process (no new compile happened), until
    torch._dynamo.reset(). So each key gets its own code object, hence its own cache.
    """
    code = _flex_entry.__code__.replace(co_name=f"flex_attention_{next(_ENTRY_NUMBERS)}")
    entry = types.FunctionType(code, _flex_entry.__globals__, "flex_attention")
    # Static shapes: every batch arrives padded to the block mask's fixed length, so one
    # kernel serves all lengths. (With dynamic shapes, torch 2.11 fell back to unfused
    # flex_attention, or failed in the backward, once the mask function captured tensors.)
    return compile_function(entry, dynamic=False)


def _pad_length(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """`tensor` padded along the sequence to `length`, always in the contiguous layout.

    A batch of exactly `length` tokens must reach the compiled kernel with the same strides as
    a padded one (pad returns contiguous tensors; the attention layers hand over transposed
    views), or torch.compile guards on the strides and recompiles flex fwd+bwd for that batch.
    """
    missing = length - tensor.shape[-2]
    return tensor.contiguous() if missing == 0 else torch.nn.functional.pad(tensor, (0, 0, 0, missing))


def flex_softcap_attention(
    query, key, value, block_mask, scale, softcap, compiled=True, kernel_options=None, softcap_tanh="auto",
    query_ids=None, length=None,
):
    """flex_attention with a softcap score function; inputs are padded to the block mask's length.

    `query_ids`: a padded batch's (`AttentionMask.flex_inputs`), whose uniform rows the score function
    then flattens (`masks.uniform_rows`); None otherwise. `length`: the real number of queries when the
    inputs arrive already padded (zeros after it); None when they are not.

    `kernel_options` go to flex_attention unchanged on the compiled (GPU) path: Triton options (block
    sizes, warps, stages; ``fwd_`` / ``bwd_`` prefixes address one direction), or `FLASH_OPTIONS`;
    None keeps torch's defaults.
    See benchmarks/tune_flex.py. `softcap_tanh`: see `resolve_softcap_tanh` (uncompiled: exact).
    """
    from torch.nn.attention.flex_attention import flex_attention

    # FlashAttention 4 (FLASH) compiles the score function into its own kernels, softcap tanh included: it
    # gets torch's tanh, which its CuTe code generator lowers (the approximate tanh is a Triton-only op).
    approx = (compiled and not uses_flash(kernel_options)
              and resolve_softcap_tanh(softcap_tanh, query.device) == "approx")
    score_mod = None if softcap is None else tanh_softcap(float(softcap), approx=approx)
    if query_ids is not None:
        score_mod = uniform_rows(query_ids, score_mod)
    enable_gqa = query.shape[1] != key.shape[1]
    length, padded = query.shape[-2] if length is None else length, block_mask.seq_lengths[0]
    query, key, value = (_pad_length(t, padded) for t in (query, key, value))
    if not compiled:
        if not torch.is_grad_enabled():  # torch refuses CPU flex for inputs that require grad, even under no_grad
            query, key, value = query.detach(), key.detach(), value.detach()
        # uncompiled on purpose (CPU, forward only): torch's "call it compiled" advice; torch still traces it
        with warnings.catch_warnings(), flex_compile_settings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out = flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                 enable_gqa=enable_gqa)
    elif torch.compiler.is_compiling():  # inside a larger compiled region, which compiles flex_attention too
        out = flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale,
                             enable_gqa=enable_gqa, kernel_options=kernel_options)
    else:
        with flex_compile_settings():
            # One compiled entry per score function and kernel family (Triton or FlashAttention 4).
            score_key = None if softcap is None else ("softcap", float(softcap), approx)
            if query_ids is not None:
                score_key = ("uniform rows", score_key)
            out = _compiled_flex(score_key, "flash" if uses_flash(kernel_options) else "triton")(
                query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                kernel_options=kernel_options,
            )
    return out[:, :, :length]


# flex_attention kernel options by (GPU class, head_dim), for 16-bit inputs; absent: torch's own choice.
# A "fwd_" / "bwd_" prefix addresses one direction: torch strips it for that direction's kernel(s)
# and drops the option for the other. Rules for any entry: every BLOCK_* divides the block mask's
# 128; BLOCK_N1 % BLOCK_M1 == 0 and BLOCK_M2 % BLOCK_N2 == 0 (torch's backward kernel).
FLEX_KERNEL_OPTIONS = {
    # Hopper (227 KB of shared memory per block). On an H200 (torch 2.11): 8 backward warps made fwd+bwd
    # 1.21-1.24x faster, bit-identical; 128x64 forward tiles, 2 stages and 8 warps took the forward from 164
    # to 263 TFLOP/s (benchmarks/check_softcap.py). head_dim 128: torch's choice measured as fast.
    ("sm90", 256): dict(fwd_BLOCK_M=128, fwd_BLOCK_N=64, fwd_num_stages=2, fwd_num_warps=8, bwd_num_warps=8),
    # GPUs with 99 KB per block (sm86: RTX 30, A10, A40; sm89: RTX 40, L4, L40; sm12x). torch's
    # defaults there come from its A100 table (164 KB) and can fail with "out of resource" at
    # head_dim 256: these tiles are the ones torch picks for other 99 KB boards (its sm_120 forward
    # table; pytorch/pytorch#198228 for the backward). Not measured by us; only sure to fit.
    ("99KB", 256): dict(
        fwd_BLOCK_M=32, fwd_BLOCK_N=64, fwd_num_stages=2, fwd_num_warps=4,
        bwd_BLOCK_M1=32, bwd_BLOCK_N1=32, bwd_BLOCK_M2=32, bwd_BLOCK_N2=32, bwd_num_stages=2, bwd_num_warps=4,
    ),
    ("99KB", 128): dict(
        fwd_BLOCK_M=128, fwd_BLOCK_N=64, fwd_num_stages=2, fwd_num_warps=8,
        bwd_BLOCK_M1=64, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=64, bwd_num_stages=1, bwd_num_warps=4,
    ),
    # A100 (sm80, 164 KB) and the rest: torch's own tables, which are tuned for A100.
}


def gpu_class(device) -> Optional[str]:
    """The FLEX_KERNEL_OPTIONS class of an NVIDIA GPU: "sm90", "99KB", or None (torch's choice)."""
    if not fast_tanh.is_nvidia(device):
        return None
    capability = cuda_capability(device)
    if capability == (9, 0):
        return "sm90"
    if capability in ((8, 6), (8, 9)) or capability[0] == 12:
        return "99KB"
    return None


def tuned_flex_kernel_options(query: torch.Tensor) -> Optional[dict]:
    """fastgemma's flex_attention kernel options for this call (FLEX_KERNEL_OPTIONS), or None for torch's choice.

    Keyed by GPU class and head_dim, for bf16 / fp16 inputs (float32 tiles are twice the size:
    torch's choice). Measured with benchmarks/tune_flex.py and benchmarks/check_softcap.py.
    """
    if query.dtype not in (torch.bfloat16, torch.float16):
        return None
    options = FLEX_KERNEL_OPTIONS.get((gpu_class(query.device), query.shape[-1]))
    return dict(options) if options is not None else None


# FlashAttention 4's kernels, by an explicitly experimental name: slower than Triton on the common packed case.
EXPERIMENTAL_FLASH = "experimental-flash"
KERNEL_CHOICES = ("auto", EXPERIMENTAL_FLASH)


def check_kernel_options(kernel_options):
    """'auto' (fastgemma's tuned Triton options), 'experimental-flash' (FlashAttention 4), None (torch's defaults)
    or a dict."""
    if kernel_options is None or (isinstance(kernel_options, str) and kernel_options in KERNEL_CHOICES):
        return kernel_options
    if isinstance(kernel_options, dict) and all(isinstance(key, str) for key in kernel_options):
        return kernel_options
    raise ValueError(
        f"flex_kernel_options must be 'auto', {EXPERIMENTAL_FLASH!r}, None (torch's defaults) or a dict such as "
        f"{{'bwd_num_warps': 8}}, got {kernel_options!r}"
    )


# --------------------------------------------------------------------------------------
# FlashAttention 4 under flex_attention (torch's BACKEND="FLASH"), on request
# --------------------------------------------------------------------------------------
# torch's flex_attention can hand the same score and mask functions to FlashAttention 4's CuTe-DSL
# kernels (package flash-attn-4, an optional install) instead of its Triton templates. On an H200 they
# were faster only for long single documents (8K tokens causal: 1.40x at head_dim 256, 1.17x at 128)
# and slower for packed documents at head_dim 128 and at 2K tokens, so "auto" keeps Triton and FLASH is
# flex_kernel_options="experimental-flash".
FLASH_OPTIONS = {"BACKEND": "FLASH"}
# FlashAttention 4's Hopper tiles span fewer keys than the block mask's 128 at head_dim 256 (80 in its
# forward) and must divide the mask's key blocks: there the mask is cut into 64-key blocks.
FLASH_KV_BLOCK = {256: 64}
FLASH_INSTALL_HINT = "pip install flash-attn-4 (FlashAttention 4, CuTe DSL; Hopper or newer NVIDIA GPUs)"


@functools.lru_cache(maxsize=None)
def flash_attention_4_available() -> bool:
    """Whether FlashAttention 4 (`flash_attn.cute`) imports: what flex_attention's FLASH backend runs."""
    try:
        import flash_attn.cute  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure to import means: not usable here
        return False
    return True


def uses_flash(kernel_options) -> bool:
    """Whether these (resolved) flex kernel options run FlashAttention 4 rather than Triton."""
    return isinstance(kernel_options, dict) and kernel_options.get("BACKEND") == "FLASH"


def flex_kernel_options_for(choice, query: torch.Tensor):
    """The kernel options one flex call gets for `flex_kernel_options` = `choice`.

    "auto": fastgemma's tuned Triton options (`tuned_flex_kernel_options`). "experimental-flash": FlashAttention 4
    (`FLASH_OPTIONS`), which must be installed. None and dicts pass through unchanged.
    """
    if isinstance(choice, str) and choice == EXPERIMENTAL_FLASH:
        if not flash_attention_4_available():
            raise ImportError(f"flex_kernel_options={EXPERIMENTAL_FLASH!r} needs FlashAttention 4, which is not "
                              f"importable: {FLASH_INSTALL_HINT}")
        return dict(FLASH_OPTIONS)
    if isinstance(choice, str) and choice == "auto":
        return tuned_flex_kernel_options(query)
    return choice


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
        return "flex" if auto_picks_flex(query.device, query.shape[-1]) else "compiled"
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


def _flex_on_gpu(query, key, value, mask: AttentionMask, scale, softcap, kernel_options, softcap_tanh, length=None):
    """Compiled flex_attention with the kernels `kernel_options` picks (`flex_kernel_options_for`)."""
    kernel_options = flex_kernel_options_for(kernel_options, query)
    query_ids = mask.flex_inputs(query.device).get("query_ids")
    if query_ids is not None and uses_flash(kernel_options):
        kernel_options = tuned_flex_kernel_options(query)  # padded batches' score function is checked on Triton only
    kv_block = FLASH_KV_BLOCK.get(query.shape[-1]) if uses_flash(kernel_options) else None
    return flex_softcap_attention(query, key, value, mask.block_mask(query.device, kv_block=kv_block), scale,
                                  softcap, kernel_options=kernel_options, softcap_tanh=softcap_tanh,
                                  query_ids=query_ids, length=length)


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
    softcap_tanh: str = "auto",
) -> torch.Tensor:
    """Softcapped attention with GQA. query (B, H, Q, D); key, value (B, Hkv, K, D) -> (B, H, Q, D).

    `mask` is an AttentionMask (queries and keys start together), a dense mask from the
    caller (bool allowed, or additive float; used when decoding with a KV cache), or None
    (causal when Q == K; when Q < K, the queries are the last Q positions and see every key).
    Where flex runs an AttentionMask (`flex_padded_length`), query, key and value may arrive padded
    to its `padded_length` with zero rows, contiguous: the output then has the mask's `q_len` queries.
    `kernel_options` (flex only): "auto" or "experimental-flash" (see `flex_kernel_options_for`), None = torch's
    defaults, or a dict passed to flex_attention as is.
    `softcap_tanh` (flex on NVIDIA GPUs only; exact everywhere else): "auto" = `AUTO_SOFTCAP_TANH`,
    "exact" = torch.tanh, "approx" = the hardware's approximate tanh (see `resolve_softcap_tanh`).
    """
    check_kernel_options(kernel_options)
    check_softcap_tanh(softcap_tanh)
    if query.shape[1] % key.shape[1] != 0:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key heads ({key.shape[1]})")
    chosen = resolve_backend(backend, query, key, mask, dropout_p)
    if isinstance(mask, AttentionMask):
        length = None  # the real number of queries, when the inputs arrive padded for flex
        # (Inside a compiled region the caller checks this before entering: comparing a token count with
        # the mask's Python int would make torch.compile specialise the region to one length.)
        if not torch.compiler.is_compiling() and (query.shape[-2] != mask.q_len or key.shape[-2] != mask.kv_len):
            if chosen == "flex" and query.shape[-2] == key.shape[-2] == value.shape[-2] == mask.padded_length:
                length = mask.q_len
            else:
                raise ValueError(
                    f"attention mask built for {mask.q_len} queries / {mask.kv_len} keys, "
                    f"got {query.shape[-2]} / {key.shape[-2]}"
                )
        if chosen == "flex":
            if query.device.type != "cuda":  # uncompiled flex (CPU forward): no kernel options
                return flex_softcap_attention(query, key, value, mask.block_mask(query.device), scale, softcap,
                                              compiled=False, softcap_tanh=softcap_tanh,
                                              query_ids=mask.flex_inputs(query.device).get("query_ids"), length=length)
            return _flex_on_gpu(query, key, value, mask, scale, softcap, kernel_options, softcap_tanh, length)
        dense = mask.dense(query.device)
    else:
        dense = mask
        if dense is None and query.shape[-2] == key.shape[-2]:
            dense = AttentionMask(query.shape[-2], key.shape[-2]).dense(query.device)
    # Inside a larger compiled region (a compiled decoder layer), that region compiles this call too.
    compiled_here = chosen == "compiled" and not torch.compiler.is_compiling()
    fn = _compiled_dense() if compiled_here else dense_softcap_attention
    return fn(query, key, value, dense, scale, softcap, dropout_p)
