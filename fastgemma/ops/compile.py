"""torch.compile for fastgemma: a backend whose backwards keep their saved tensors, and small elementwise ops
whose token dimension changes from batch to batch."""

from __future__ import annotations

import functools

import torch

LEADING = "leading"  # every dimension but the last (the feature dimension)


def mark_dynamic(tensor: torch.Tensor, dims=LEADING) -> None:
    """Tell torch.compile that these dimensions of `tensor` (or every one but the last) vary between calls."""
    if dims == LEADING:
        dims = range(tensor.dim() - 1)
    for dim in dims:
        if tensor.shape[dim] > 1:  # size 1 is specialised by torch anyway
            torch._dynamo.maybe_mark_dynamic(tensor, dim)


# --------------------------------------------------------------------------------------
# torch.compile whose backwards keep their saved tensors
# --------------------------------------------------------------------------------------
# By default AOTAutograd lets a compiled backward overwrite what its forward saved ("donated buffers"),
# so backward(retain_graph=True) or create_graph=True through it fails. fastgemma's compiles go without:
# - torch._functorch.config.donated_buffer is read when the forward compiles: off there, no backward donates;
# - it is read again when a backward runs, and torch then also refuses a graph compiled with it off (it
#   has no list of donated tensors for it): the compile records the empty list instead;
# - torch's compile caches key a backward without its donations, so one compiled with them (by another
#   process, or an older fastgemma) would be served to us: our compiles tag their cache keys.
CACHE_KEY_TAG = "fastgemma-keeps-saved-tensors"


def _own_cache_keys():
    if not hasattr(getattr(torch.compiler, "config", None), "cache_key_tag"):  # older torch: no tag, no cache
        import torch._inductor.config as inductor_config

        return inductor_config.patch(fx_graph_cache=False)
    tag = torch.compiler.config.cache_key_tag
    if CACHE_KEY_TAG not in tag.split("|"):
        tag = f"{tag}|{CACHE_KEY_TAG}" if tag else CACHE_KEY_TAG
    return torch.compiler.config.patch(cache_key_tag=tag)


def _no_donated_buffers_declared() -> None:
    # torch internals (2.13): if they move, such backwards raise torch's donated-buffer error again, never miscompute.
    context = torch._guards.TracingContext.try_get()
    metadata = getattr(context, "fw_metadata", None)
    if metadata is not None and getattr(metadata, "bw_donated_idxs", ()) is None:
        metadata.bw_donated_idxs = []


def _inner_compile(gm, example_inputs, **kwargs):
    # Inductor's compile of one graph: the forward's, and the backward's when that first runs (outside our calls).
    from torch._inductor.compile_fx import compile_fx_inner

    _no_donated_buffers_declared()
    with _own_cache_keys():
        return compile_fx_inner(gm, example_inputs, **kwargs)


def inductor_keeping_saved_tensors(gm, example_inputs, **kwargs):
    """torch.compile backend: inductor, with backwards that keep their saved tensors (see above)."""
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    with functorch_config.patch(donated_buffer=False), _own_cache_keys():
        return compile_fx(gm, example_inputs, inner_compile=_inner_compile, **kwargs)


def compile_function(fn, **kwargs):
    """``torch.compile(fn, **kwargs)`` for fastgemma's functions: inductor, and a backward that runs under
    ``retain_graph=True`` (or ``create_graph=True``), as stock PyTorch ops do."""
    return torch.compile(fn, backend=inductor_keeping_saved_tensors, **kwargs)


def fuse(fn, dynamic_dims: dict[int, tuple[int, ...] | str]):
    """`fn` compiled lazily, with the given (argument index -> dimensions, or LEADING) marked dynamic.

    Marking the token dimensions dynamic before the first call gives one graph for every
    length at once (instead of a static graph first and a dynamic one on the second length)
    while the feature dimensions stay static, so reductions over them keep fixed block sizes.
    Calling ``.eager(...)`` runs `fn` uncompiled.
    """
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if torch.compiler.is_compiling():  # inside a larger compiled region (ours or the user's): it fuses `fn`
            return fn(*args)
        if compiled is None:
            compiled = compile_function(fn, dynamic=None)
        for index, dims in dynamic_dims.items():
            mark_dynamic(args[index], dims)
        return compiled(*args)

    wrapper.eager = fn
    return wrapper
