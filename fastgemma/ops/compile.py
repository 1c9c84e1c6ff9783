"""torch.compile for small elementwise ops whose token dimension changes from batch to batch."""

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
            compiled = torch.compile(fn, dynamic=None)
        for index, dims in dynamic_dims.items():
            mark_dynamic(args[index], dims)
        return compiled(*args)

    wrapper.eager = fn
    return wrapper
