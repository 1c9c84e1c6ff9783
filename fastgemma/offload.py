"""Saved-tensor hooks for one training call of a backbone: count what kept layers save, and send the first
checkpointed layers' inputs to pinned CPU memory, bringing each back one layer ahead of its recompute.

Checkpointing (torch's, and fastgemma's graphed layers) saves each layer's input as a saved tensor outside the
layer, where these hooks see it; inside a checkpoint torch's own hooks take over. On a CUDA device the copies run
on a stream of their own: to the host as the forward goes on, back while the backward works on the layer after.
On a CPU (the tests) an "offloaded" input is a copy, so the same bookkeeping runs.
"""

from __future__ import annotations

import logging
import weakref
from typing import Optional

import torch

from .log import say_once

ROUNDING = 2 ** 21  # pinned buffers are multiples of 2 MiB
HEADROOM = 1.25  # a new buffer holds this much more, so packed steps of varying lengths reuse it rather than pin again


class _HostCopy:
    """One offloaded tensor: its pinned host copy, and its device copy once fetched back."""

    def __init__(self, offloader: "SavedTensorRouter", index: int, tensor: torch.Tensor):
        self.offloader, self.index, self.device = offloader, index, tensor.device
        self.fetched: Optional[torch.Tensor] = None
        self.ready = None  # the event the fetch back recorded
        stream = offloader.stream
        if stream is None:
            self.host = tensor.detach().clone()
            return
        self.flat, self.host = offloader.host_pool.take(tensor)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # its memory is not reused before the copy has read it

    def fetch(self) -> None:
        """Start bringing the tensor back (on the copy stream), unless it is on its way."""
        if self.fetched is not None:
            return
        stream = self.offloader.stream
        if stream is None:
            self.fetched = self.host.clone()
            return
        with torch.cuda.stream(stream):
            self.fetched = self.host.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def get(self) -> torch.Tensor:
        self.fetch()
        if self.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready)
            self.fetched.record_stream(current)
        self.offloader.prefetch_before(self.index)
        tensor, self.fetched, self.ready = self.fetched, None, None  # a second backward fetches again
        return tensor

    def __del__(self):
        offloader = getattr(self, "offloader", None)
        if offloader is not None and hasattr(self, "flat"):
            offloader.host_pool.give(self.flat)


class SavedTensorRouter:
    """The pack / unpack hooks of one planned call (use as a context manager around the backbone's forward).

    `offload`: how many layer inputs (saved tensors of exactly `input_shape`, whatever their dtype: autocast may
    keep the residual stream in float32) go to the host, the first ones of the call; `count`: add up the bytes of
    every distinct storage saved outside checkpoints, the model's parameters left out.
    """

    def __init__(self, input_shape, offload: int = 0, count: bool = False, parameter_storages=(),
                 host_pool: Optional["HostBuffers"] = None):
        self.input_shape, self.offload = tuple(input_shape), offload
        self.counter = SavedBytes(parameter_storages) if count else None
        self.copies: list = []
        self.host_pool = host_pool
        self.stream = None
        self._hooks = None

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def counted(self) -> int:
        """Bytes of the distinct storages saved so far (with `count`)."""
        return self.counter.total

    def pack(self, tensor: torch.Tensor):
        if self.counter is not None:
            self.counter.pack(tensor)
        if len(self.copies) < self.offload and tuple(tensor.shape) == self.input_shape:
            if self.stream is None and tensor.is_cuda:
                self.stream = self.host_pool.stream(tensor.device)
            copy = _HostCopy(self, len(self.copies), tensor)
            self.copies.append(weakref.ref(copy))  # autograd owns the copies: each is freed after its backward
            return copy
        return tensor

    @staticmethod
    def unpack(packed):
        return packed.get() if isinstance(packed, _HostCopy) else packed

    def prefetch_before(self, index: int) -> None:
        """The backward has reached copy `index`: start bringing back the one its recompute needs next."""
        if index > 0:
            copy = self.copies[index - 1]()
            if copy is not None:
                copy.fetch()


class SavedBytes:
    """Adds up the distinct storages saved for backward (as a pack hook), the parameters' own left out."""

    def __init__(self, parameter_storages):
        self.parameter_storages = parameter_storages
        self.total, self._seen = 0, set()

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self._seen and pointer not in self.parameter_storages:
            self._seen.add(pointer)
            self.total += storage.nbytes()
        return tensor


class HostBuffers:
    """Pinned host buffers, reused from step to step (pinning memory takes milliseconds per call), and the copy
    stream of each device. A buffer comes back when its saved tensor is freed; every copy that reads or writes it
    is on the one copy stream, so the next use is ordered after the last."""

    def __init__(self):
        self._free: list = []
        self._streams: dict = {}

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def take(self, like: torch.Tensor):
        """(a flat pinned buffer, a view of it shaped like `like`): the smallest free buffer that holds it, else a
        new one with head-room: pinning takes about a second per GiB and holds up the step, and packed steps vary
        in length by a few percent from one to the next."""
        nbytes = like.numel() * like.element_size()
        fitting = [index for index, buffer in enumerate(self._free) if buffer.numel() >= nbytes]
        if fitting:  # (by index: comparing tensors with == would compare their elements)
            flat = self._free.pop(min(fitting, key=lambda index: self._free[index].numel()))
        else:
            flat = _host_memory(-(-int(nbytes * HEADROOM) // ROUNDING) * ROUNDING)
        return flat, flat[:nbytes].view(like.dtype).view(like.shape)

    def give(self, flat: torch.Tensor) -> None:
        self._free.append(flat)

    def release(self) -> None:
        """Free the buffers no saved tensor holds (a step that offloads nothing needs none)."""
        self._free.clear()


def _host_memory(nbytes: int) -> torch.Tensor:
    """Pinned host memory, or pageable memory (slower, synchronous copies) where the host cannot pin that much."""
    try:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    except RuntimeError as error:
        say_once("unpinned offload", logging.WARNING, "fastgemma: memory: could not pin %.1f GiB of host memory "
                 "(%s); offloaded inputs use pageable memory, whose copies hold up the GPU", nbytes / 2 ** 30,
                 str(error).splitlines()[0])
        return torch.empty(nbytes, dtype=torch.uint8)
