"""The public API: patch_model / unpatch_model / is_patched."""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import torch

from .attention import EXPERIMENTAL_FLASH, flex_supported, resolve_softcap_tanh
from .options import PatchOptions
from .self_check import ensure_exact

logger = logging.getLogger("fastgemma")


def _patcher_for(model):
    try:
        from .patches import PATCHERS, find_patcher
    except ModuleNotFoundError as err:  # a source checkout on sys.path, not installed: its top-level patches/
        if err.name != f"{__package__}.patches":
            raise
        from patches import PATCHERS, find_patcher

    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"fastgemma.patch_model expects a Gemma 2 model (torch.nn.Module), got {type(model).__name__}")
    patcher = find_patcher(model)
    if patcher is None:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        supported = ", ".join(p.NAME for p in PATCHERS)
        raise ValueError(
            f"fastgemma supports {supported} models only (Gemma2ForCausalLM or Gemma2Model, plain, PEFT-wrapped "
            f"or 4-bit); got {type(model).__name__}" + (f" with model_type={model_type!r}" if model_type else "")
        )
    return patcher


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def patch_model(
    model: torch.nn.Module,
    max_row_tokens: int = 8192,
    backend: str = "auto",
    fused_ops="auto",
    flex_kernel_options="auto",
    softcap_tanh="auto",
    cuda_graphs="auto",
    memory_budget="auto",
    *,
    options: Optional[PatchOptions] = None,
    **deprecated,
) -> torch.nn.Module:
    """Swap every attention forward of a Gemma 2 model for fastgemma's softcapped attention, in place.

    Args:
        model: Gemma2ForCausalLM or Gemma2Model, plain, PEFT-wrapped or loaded in 4-bit.
        max_row_tokens: the most tokens one row of a batch holds (with padding-free packing, batch
            size x tokens per document; with padded batches, the longest document). flex_attention runs
            every batch at this one padded length, so one compiled kernel serves all shorter batches; a
            longer batch grows it (doubling, one recompile, a warning). Formerly ``max_seq_length``, which
            still works, with a DeprecationWarning.
        backend: "auto" (flex on CUDA GPUs of compute capability >= 8.0, compiled dense
            elsewhere, eager while decoding with a KV cache), or force "flex", "compiled", "eager".
            "flex" is refused (ValueError) unless the model's parameters are on a CUDA GPU of compute
            capability >= 8.0 (`fastgemma.attention.flex_supported`): torch's flex_attention has no
            CPU backward, so a CPU flex model could only run inference, which "auto" runs exactly too.
            Move the model to such a GPU before patching, or use "auto" / "compiled".
        fused_ops: fuse the elementwise work around attention while training: RMSNorms with
            their residual adds, RoPE, the GeGLU gate (each one torch.compile'd kernel per
            direction), and LoRA adapters added inside their GEMMs. "auto" fuses on CUDA;
            True also on CPU (slow first compile there); False keeps Hugging Face's ops.
            Inference (no grad) always runs the unfused ops, so generation never compiles.
        flex_kernel_options: which kernels flex_attention runs. "auto": its Triton kernels with
            fastgemma's measured options per GPU class, head_dim and direction
            (`fastgemma.attention.FLEX_KERNEL_OPTIONS`). None: torch's own defaults; a dict such as
            {"bwd_num_warps": 8} is passed as is. "experimental-flash": FlashAttention 4's kernels under
            flex_attention (torch's BACKEND="FLASH"; needs ``pip install flash-attn-4``, Hopper or newer;
            same score and mask functions, its own tanh): faster for long single documents (8K tokens),
            slower for packed short ones (docs/design.md); not with cuda_graphs=True.
        softcap_tanh: the tanh of the softcap inside flex_attention's kernels. "approx" uses the
            GPU's one-instruction tanh (``tanh.approx.f32``, as FlashAttention does), forward and
            backward; "exact" is torch's tanh; "auto" is `fastgemma.attention.AUTO_SOFTCAP_TANH`.
            Only compiled flex on NVIDIA GPUs can approximate: the dense backends, CPUs and other
            GPUs always compute the exact tanh.
        cuda_graphs: replay each decoder layer's compiled forward and checkpointed backward as CUDA
            graphs while training, so that short micro-steps are not bound by the host launching
            kernels. "auto" (default): graphs for training micro-steps of at most
            `fastgemma.graphs.AUTO_MAX_TOKENS` tokens on one CUDA GPU, with gradient checkpointing,
            fused ops and LoRA without dropout; every other call runs op by op (the log says once
            what was chosen and why). True: graphs wherever they can run (a CPU runs the same path
            without capture), otherwise one compiled region per layer, with a warning. False: op by op.
            A batch runs at a fixed bucket length (max_row_tokens, under "auto" at most AUTO_MAX_TOKENS, split
            into 8 steps; padding rows add nothing to the results), so at most 8 lengths are recorded, each the
            first time it comes.
        memory_budget: how much of the GPU's memory a training step's activations may use, with gradient
            checkpointing on. "auto" (default): what the GPU has free for this process, less a margin (10%, at
            least 2 GiB), measured by torch's allocator; a number of bytes caps it lower (e.g. ``20 * 2**30``).
            Within it, the last decoder layers keep their activations (no recompute in the backward) as far as
            they fit, and with flex attention the layers before them save their attention (its recompute is
            skipped); if even the checkpointed layers' inputs do not fit, the first ones wait in pinned CPU
            memory and come back one layer ahead of their recompute. Until the first steps have measured what
            a step needs, every layer is checkpointed as before; CUDA-graphed calls always recompute; CPUs
            checkpoint every layer. None: checkpoint every layer, as transformers does. The log says what was
            chosen; `fastgemma.memory_plan(model)` returns the last training call's plan.
        options: all of the above as one `fastgemma.PatchOptions`, instead of the keywords.

    Returns the same model. Calling it again only updates the settings; `unpatch_model`
    restores the original forwards.
    """
    settings = dict(max_row_tokens=max_row_tokens, backend=backend, fused_ops=fused_ops,
                    flex_kernel_options=flex_kernel_options, softcap_tanh=softcap_tanh, cuda_graphs=cuda_graphs,
                    memory_budget=memory_budget)
    if options is None:
        options = PatchOptions(**_without_deprecated_names(settings, deprecated))
    elif deprecated or settings != _DEFAULT_SETTINGS:
        raise ValueError("patch_model takes either options=PatchOptions(...) or the settings as keywords, not both")
    patcher = _patcher_for(model)
    device = _device_of(model)
    if options.backend == "flex" and not flex_supported(device):
        where = f"a {device.type} device" if device.type != "cuda" else f"GPU {device} (compute capability < 8.0)"
        raise ValueError(
            f"backend='flex' needs the model on a CUDA GPU of compute capability >= 8.0, and its parameters are on "
            f"{where}: use backend='auto' (flex where it can run, compiled elsewhere) or 'compiled'"
        )
    ensure_exact(patcher)
    summary = patcher.patch(model, options)
    if options.backend == "auto":
        resolved = "flex" if flex_supported(device) else "compiled"
        how = f"auto -> {resolved} on {device.type} (eager while decoding with a KV cache)"
    else:
        how = options.backend
    softcap_tanh = options.softcap_tanh
    logger.info(
        "fastgemma: %s %d %s attention layers (%d sliding, %d global) of %s; backend=%s; max_row_tokens=%d; "
        "fused_ops=%s; flex_kernel_options=%s; softcap tanh on flex: %s%s",
        "re-configured" if summary["already"] else "patched", summary["layers"], patcher.NAME,
        summary["sliding"], summary["global"], type(model).__name__, how, options.max_row_tokens, options.fused_ops,
        options.flex_kernel_options, f"{softcap_tanh} -> {resolve_softcap_tanh(softcap_tanh, device)} on {device.type}",
        _layers_note(options),
    )
    return model


_DEFAULT_SETTINGS = {name: getattr(PatchOptions(), name) for name in
                     ("max_row_tokens", "backend", "fused_ops", "flex_kernel_options", "softcap_tanh", "cuda_graphs",
                      "memory_budget")}


def _without_deprecated_names(settings: dict, deprecated: dict) -> dict:
    """`settings` with the former spellings in `deprecated` mapped onto the current ones, each with a
    DeprecationWarning (`max_seq_length`, `compile_layers`, flex_kernel_options="flash")."""
    settings = dict(settings)
    unknown = set(deprecated) - {"max_seq_length", "compile_layers"}
    if unknown:
        raise TypeError(f"patch_model() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    if "max_seq_length" in deprecated:
        if settings["max_row_tokens"] != _DEFAULT_SETTINGS["max_row_tokens"]:
            raise ValueError("pass max_row_tokens only (max_seq_length is its former name)")
        warnings.warn("patch_model's max_seq_length is now max_row_tokens (the most tokens one row of a batch "
                      "holds: batch size x tokens per document with padding-free packing)", DeprecationWarning,
                      stacklevel=3)
        settings["max_row_tokens"] = deprecated["max_seq_length"]
    if "compile_layers" in deprecated:
        compile_layers = deprecated["compile_layers"]
        if not isinstance(compile_layers, bool):
            raise ValueError(f"compile_layers must be True or False, got {compile_layers!r}")
        warnings.warn("patch_model's compile_layers is superseded by cuda_graphs ('auto' by default), which graphs "
                      "the compiled layers where that pays off; drop compile_layers", DeprecationWarning, stacklevel=3)
        settings["compiled_regions"] = compile_layers
    kernels = settings["flex_kernel_options"]
    if isinstance(kernels, str) and kernels == "flash":
        warnings.warn(f"flex_kernel_options='flash' is now {EXPERIMENTAL_FLASH!r} (slower than the default on "
                      "packed rows; see docs/design.md)", DeprecationWarning, stacklevel=3)
        settings["flex_kernel_options"] = EXPERIMENTAL_FLASH
    return settings


def _layers_note(options: PatchOptions) -> str:
    """How the decoder layers train, for patch_model's log line ("" for op by op)."""
    graphs = options.layer_graphs
    if graphs is True:
        return "; cuda_graphs=True (compiled decoder layers replayed as CUDA graphs while training)"
    if graphs == "auto":
        return "; cuda_graphs=auto (CUDA-graphed decoder layers for short micro-steps on one GPU while training)"
    return "; compiled_regions=True (one compiled region per decoder layer while training)" \
        if options.compiled_regions else ""


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the original forwards of a model patched by `patch_model` (a no-op otherwise)."""
    patcher = _patcher_for(model)
    restored = patcher.unpatch(model)
    logger.info("fastgemma: restored %d original forwards of %s", restored, type(model).__name__)
    return model


def cuda_graph_lengths(model: torch.nn.Module) -> list:
    """The token lengths at which `patch_model`'s cuda_graphs has recorded the model's layers so far
    (empty when none ran graphed: inference, no checkpointing, or cuda_graphs off; see the log)."""
    return _patcher_for(model).graph_lengths(model)


def memory_plan(model: torch.nn.Module):
    """How `model`'s last training call treated its decoder layers' activations under `patch_model`'s memory
    budget (a `fastgemma.memory_budget.StepPlan`: layers kept, checkpointed, inputs offloaded; its `describe()`
    says it in words), or None before one, on a CPU, or with memory_budget=None."""
    from .step_memory import last_plan

    return last_plan(model)


def is_patched(model: torch.nn.Module) -> bool:
    """Whether `model` currently runs fastgemma's attention (False for anything that is not a Gemma 2 model)."""
    try:
        patcher = _patcher_for(model)
    except ValueError:
        return False
    return patcher.is_patched(model)
