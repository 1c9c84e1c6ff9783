"""Static buffers that a CUDA graph reads: shaped for a bucket length, loaded with each batch's values padded."""

from __future__ import annotations

from typing import Optional

import torch


def static_like(tensor: Optional[torch.Tensor], length: int, dims=(1,), fill=0) -> Optional[torch.Tensor]:
    """A static buffer shaped like `tensor` with each dimension in `dims` set to `length`."""
    if tensor is None:
        return None
    shape = list(tensor.shape)
    for dim in dims:
        shape[dim] = length
    return torch.full(shape, fill, dtype=tensor.dtype, device=tensor.device)


def copy_padded(target: torch.Tensor, value: torch.Tensor, dims=(1,), fill=0) -> None:
    """target = value, padded with `fill` along `dims` (target's sizes there are >= value's)."""
    if tuple(target.shape) == tuple(value.shape):
        target.copy_(value)
        return
    if len(dims) == 1:  # the tail alone needs filling
        (dim,) = dims
        target.narrow(dim, 0, value.shape[dim]).copy_(value)
        target.narrow(dim, value.shape[dim], target.shape[dim] - value.shape[dim]).fill_(fill)
        return
    target.fill_(fill)
    index = [slice(None)] * value.dim()
    for dim in dims:
        index[dim] = slice(0, value.shape[dim])
    target[tuple(index)].copy_(value)
