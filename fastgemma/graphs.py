"""CUDA-graphed training layers: each layer's checkpointed forward and backward replayed as one graph each.

At small micro-batches a compiled decoder layer still costs its host time: the compiled code launches
a few hundred kernels per layer and direction from Python, which at 2,048 tokens takes longer than
the GPU needs to run them. A CUDA graph replays the same launches with one call. Graphs need fixed
shapes and fixed addresses, so:

- every call runs at a fixed *bucket* length (the batch's token count rounded up; at most
  `MAX_BUCKETS` lengths per run), the rows padded with zeros; the outputs are sliced back;
- the per-batch inputs (the layer input, the output gradient, and what the caller binds: rotary
  tables, masks) are copied into static buffers before each replay, and the outputs are copied out
  right after it, so every graph may share one memory pool and replays may come in any order;
- for the same reason the static buffers are shared as far as they can be: every bucket's input
  and output-gradient buffers are views of one storage (sized for the longest bucket the caller
  expects, else the first one seen; a longer one later gets a storage of its own),
  each output is written over its graph's own input buffer (the input is dead by then), and the
  backward's parameter gradients land in buffers shared by every layer and bucket. Each replay's
  results are copied out before the next replay, so nothing is overwritten while still needed;
- each layer gets its own pair of graphs (its weights are baked into them), captured the first time
  it runs at a bucket length. A checkpointed layer's pair: a forward (the differentiable call, its
  autograd graph dropped), and a backward that recomputes the layer and differentiates it, which is
  gradient checkpointing: only each layer's input is kept. A kept layer's pair (`keep=True`, no
  recompute): a forward that leaves what autograd saves in a memory pool of the layer's own, and a
  backward that differentiates from it. The pool holds one call's activations at a time: a backward
  whose forward was replayed over since (two forwards of the layer before their backwards) recomputes
  through the checkpointed pair instead.

Padding rows are zeros with a zero output gradient, so they add exactly nothing to any gradient.

On a CPU (and wherever `replay="rerun"`), the same machinery runs without capture: "replaying"
re-runs the recorded call on the static buffers. The CPU tests use it to check everything but the
capture itself.

Model-agnostic: the caller supplies the layer body and a `StaticBinder` for its per-batch inputs.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch

from .ops.compile import mark_dynamic
from .static_buffers import copy_padded

logger = logging.getLogger("fastgemma")

MAX_BUCKETS = 8  # distinct lengths per run: each one captures every layer anew (seconds, and pool memory)
# cuda_graphs="auto" graphs micro-steps of at most this many tokens: below it the host's kernel launches bound
# a step of a 2B-9B layer stack, above it the GPU is busy without graphs (the 4 x 4096 step ran as fast op by op).
AUTO_MAX_TOKENS = 4096
BUCKET_MULTIPLE = 128


def bucket_length(length: int, max_length: int, buckets: int = MAX_BUCKETS) -> int:
    """The fixed length a batch of `length` tokens runs at: `max_length` split into `buckets` steps
    (each a multiple of 128), the smallest step that holds `length`; past `max_length`, `length`
    rounded up to 128."""
    step = max(BUCKET_MULTIPLE, math.ceil(max_length / buckets / BUCKET_MULTIPLE) * BUCKET_MULTIPLE)
    rounded = math.ceil(length / step) * step
    if length > max_length:
        return math.ceil(length / BUCKET_MULTIPLE) * BUCKET_MULTIPLE
    return min(rounded, math.ceil(max_length / BUCKET_MULTIPLE) * BUCKET_MULTIPLE)


class StaticBinder:
    """How a model's per-batch layer inputs (besides the hidden states) become static buffers.

    `sources` is a tuple of what the layer receives besides its input (e.g. rotary tables and a mask);
    the same objects for every layer of one batch, new ones for the next batch.
    """

    def key(self, sources, length: int):
        """A hashable description of what `sources` look like at `length` tokens (their kind and shapes)."""
        raise NotImplementedError

    def make(self, sources, length: int):
        """Static buffers shaped for `length` tokens; returns (static, kwargs the body reads them from)."""
        raise NotImplementedError

    def load(self, static, sources) -> None:
        """Copy `sources` into `static` (padding the token dimensions with neutral values)."""
        raise NotImplementedError


def _replays_on(device: torch.device, replay: str) -> str:
    if replay == "auto":
        return "cuda" if device.type == "cuda" else "rerun"
    if replay not in ("cuda", "rerun"):
        raise ValueError(f"replay must be 'auto', 'cuda' or 'rerun', got {replay!r}")
    return replay


class _Recording:
    """One captured call: a CUDA graph, or (replay="rerun") the call itself, run again on the same buffers."""

    def __init__(self, mode: str, pool, stream):
        self.mode, self.pool, self.stream = mode, pool, stream
        self.graph, self.call, self.outputs = None, None, None

    def record(self, call: Callable[[], tuple]) -> tuple:
        if self.mode == "rerun":
            self.call = call
            self.outputs = call()
            return self.outputs
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: only this thread is barred from unsafe CUDA calls while capturing (a data loader's
        # pinning thread may go on); autograd's device thread launches onto the capture stream, as it must.
        with torch.cuda.graph(self.graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            self.outputs = call()
        return self.outputs

    def replay(self) -> tuple:
        if self.mode == "rerun":
            self.outputs = self.call()
        else:
            self.graph.replay()
        return self.outputs


class _Storage:
    """Flat static memory that the buffers of several buckets view: replays never overlap, and each one's
    inputs are copied in right before it, so buckets may share it. Grows only by a new storage (a recorded
    graph keeps the addresses it was recorded with)."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        self.input = torch.zeros(numel, dtype=dtype, device=device)
        self.grad_out = torch.zeros(numel, dtype=dtype, device=device)

    def holds(self, numel: int) -> bool:
        return self.input.numel() >= numel


class _Buffers:
    """Static tensors of one bucket, shared by every layer: the input and the output gradient, as views of a
    `_Storage` shared with other buckets. The output is written over the input buffer: by the end of the
    recorded forward (and of the backward's recompute and differentiation) the input is no longer read."""

    def __init__(self, like: torch.Tensor, length: int, storage: _Storage):
        shape = (like.shape[0], length, *like.shape[2:])
        numel = math.prod(shape)
        self.x = storage.input[:numel].view(shape)
        mark_dynamic(self.x)  # one compile of the body for every bucket
        self.grad_out = storage.grad_out[:numel].view(shape)
        self.out = self.x

    @staticmethod
    def fill(target: torch.Tensor, value: torch.Tensor) -> None:
        """target[:, :T] = value, zeros after it."""
        copy_padded(target, value)


class _KeptPool:
    """A kept layer's private graph memory pool (shared by its buckets): its forward graphs leave there what
    autograd saves, its backward graphs read it. `owner` is the call whose activations it holds now."""

    def __init__(self, layer):
        self.layer = layer
        self.handle = None  # the CUDA graph pool, once the first recording made it
        self.owner = None
        self.bytes = 0  # device memory its recordings reserved


class _LayerGraphs:
    """The forward and backward recordings of one layer at one bucket (`pool`: a kept layer's, else None)."""

    def __init__(self, layer, signature, forward: _Recording, backward: _Recording, key=None, pool=None):
        self.layer, self.signature = layer, signature
        self.forward, self.backward = forward, backward
        self.key, self.pool = key, pool


class GraphedLayers:
    """Runs ``body(layer, x, **static_kwargs)`` for training through per-layer CUDA graphs.

    `body` must be a pure function of the layer's parameters, `x` and the bound inputs: no
    randomness (dropout), no hooks, no state it updates. A layer is recorded again whenever its
    `LayerPlan` signature changes (modules or parameters replaced or moved), and whenever
    `layer_signature(layer)` does (what else the body depends on, e.g. adapters switched).
    """

    def __init__(self, body: Callable, binder: StaticBinder, layer_signature: Callable = None,
                 replay: str = "auto", max_buckets: int = MAX_BUCKETS):
        self.body, self.binder = body, binder
        self.layer_signature = layer_signature or _no_signature  # a module-level function: the model pickles
        self.replay_mode, self.max_buckets = replay, max_buckets
        self._reset()

    def _reset(self):
        self._buffers: dict = {}   # (device, dtype, batch, length, features) -> _Buffers
        self._storages: dict = {}  # (device, dtype) -> [_Storage], the buckets' buffers view the largest
        self._grad_buffers: dict = {}  # (slot index, shape, dtype, device) -> a parameter gradient's buffer
        self._statics: dict = {}   # binder key -> (static, kwargs, loaded sources)
        self._layers: dict = {}    # (id(layer), call key, kept or not) -> _LayerGraphs
        self._stand_ins: dict = {}  # id(parameter) -> (parameter, its stand-in in recorded backwards)
        self._kept_pools: dict = {}  # id(layer) -> _KeptPool
        self._lengths: set = set()
        self._pool = None
        self._stream = None
        self.captures = 0          # layer recordings made (each is a forward and a backward graph)
        self.recordings_again = 0  # of those, layers recorded again at a length (their signature changed)

    def __getstate__(self):
        # Graphs and static buffers belong to one process and one set of weights: a copy records its own.
        state = dict(self.__dict__)
        for name in ("_buffers", "_storages", "_grad_buffers", "_statics", "_layers", "_stand_ins", "_kept_pools",
                     "_lengths", "_pool", "_stream", "captures", "recordings_again"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    @property
    def lengths(self) -> frozenset:
        """The bucket lengths recorded so far."""
        return frozenset(self._lengths)

    def accepts_length(self, length: int) -> bool:
        """Whether a batch at this bucket length can run graphed (a new length beyond `max_buckets` cannot)."""
        return length in self._lengths or len(self._lengths) < self.max_buckets

    def plan(self, layer) -> "LayerPlan":
        """What this call of `layer` is made of (its modules, trainable parameters and a signature)."""
        return LayerPlan(layer, self.layer_signature)

    def __call__(self, layer, x: torch.Tensor, sources, length: int, plan: "LayerPlan" = None,
                 capacity: int = 0, keep: bool = False) -> torch.Tensor:
        """The layer's output for `x` (batch, tokens, ...) at bucket `length` >= tokens. `capacity`: the longest
        bucket the caller expects; static buffers are sized for it, so that later, longer buckets share them.
        `keep`: the backward differentiates from the forward's saved activations (no recompute)."""
        plan = plan or self.plan(layer)
        keep = keep and torch.is_grad_enabled() and (x.requires_grad or bool(plan.trainable))
        return _GraphedCall.apply(self, plan, sources, (length, capacity, keep), x, *plan.trainable)

    def kept_bytes(self, layer) -> int:
        """Device memory the kept recordings of `layer` reserved (0 where it has none)."""
        pool = self._kept_pools.get(id(layer))
        return pool.bytes if pool is not None and pool.layer is layer else 0

    def release_kept(self, layers=()) -> None:
        """Drop the kept recordings (and their pools' memory) of every layer but `layers`."""
        keep = {id(layer) for layer in layers}
        for key, graphs in list(self._layers.items()):
            if graphs.pool is not None and id(graphs.layer) not in keep:
                del self._layers[key]
        for key in [key for key in self._kept_pools if key not in keep]:
            del self._kept_pools[key]

    # -- static inputs ------------------------------------------------------------------
    def _mode(self, device):
        return _replays_on(device, self.replay_mode)

    def _buffers_for(self, x: torch.Tensor, length: int, capacity: int = 0):
        """(key, buffers) for inputs shaped like `x` at `length` tokens (a new storage holds `capacity` tokens)."""
        key = (str(x.device), x.dtype, x.shape[0], length, tuple(x.shape[2:]))
        if key not in self._buffers:
            per_token = x.shape[0] * math.prod(x.shape[2:])
            numel = per_token * length
            storages = self._storages.setdefault((str(x.device), x.dtype), [])
            if not storages or not storages[-1].holds(numel):
                storages.append(_Storage(per_token * max(length, capacity), x.dtype, x.device))
            self._buffers[key] = _Buffers(x, length, storages[-1])
        return key, self._buffers[key]

    def _grad_buffers_for(self, slots) -> list:
        """Static buffers for the recorded backward's parameter gradients, one per slot, shared by every layer
        and bucket (each replay's gradients are copied out before the next replay)."""
        out = []
        for index, (_, _, parameter) in enumerate(slots):
            key = (index, tuple(parameter.shape), parameter.dtype, str(parameter.device))
            if key not in self._grad_buffers:
                self._grad_buffers[key] = torch.zeros_like(parameter, memory_format=torch.contiguous_format)
            out.append(self._grad_buffers[key])
        return out

    def _bind(self, sources, length: int):
        """The static kwargs for `sources` at `length`, loaded with them (copied only when they changed)."""
        key = self.binder.key(sources, length)
        entry = self._statics.get(key)
        if entry is None:
            static, kwargs = self.binder.make(sources, length)
            entry = self._statics[key] = [static, kwargs, None]
        loaded = entry[2]
        if loaded is None or len(loaded) != len(sources) or any(a is not b for a, b in zip(loaded, sources)):
            self.binder.load(entry[0], sources)
            entry[2] = tuple(sources)  # held until the next batch: their identity says the buffers hold them
        return key, entry[1]

    # -- recording ----------------------------------------------------------------------
    def _stand_in(self, parameter) -> torch.nn.Parameter:
        """A leaf sharing `parameter`'s storage, the same object every time (nothing for a compiler to tell apart)."""
        known = self._stand_ins.get(id(parameter))
        if known is None or known[0] is not parameter or known[1].data_ptr() != parameter.data_ptr():
            known = self._stand_ins[id(parameter)] = (parameter, torch.nn.Parameter(parameter.detach()))
        return known[1]

    def _say_recording_again(self, layer, before, now) -> None:
        """Recording a layer again at a length it was recorded at is the slow path: say so, and why
        (at the 1st, 10th, 100th, ... time, so a layer that changes every call is heard, not flooded)."""
        self.recordings_again += 1
        if math.log10(self.recordings_again) % 1:
            return
        parts = ("its modules", "its parameters (replaced, moved, or requires_grad switched)", "its adapter state")
        changed = [name for name, a, b in zip(parts, before, now) if a != b] or ["its signature"]
        logger.warning("fastgemma: cuda_graphs: recording a %s again (%d so far): %s changed since its last "
                       "recording at this length", type(layer).__name__, self.recordings_again, ", ".join(changed))

    def _kept_pool(self, layer) -> _KeptPool:
        pool = self._kept_pools.get(id(layer))
        if pool is None or pool.layer is not layer:
            pool = self._kept_pools[id(layer)] = _KeptPool(layer)
        return pool

    def _graphs_for(self, plan: "LayerPlan", key, kwargs, buffers: _Buffers, device, keep: bool = False
                    ) -> _LayerGraphs:
        layer, signature = plan.layer, plan.signature
        graphs = self._layers.get((id(layer), key, keep))
        if graphs is not None and graphs.layer is layer and graphs.signature == signature:
            return graphs
        if graphs is not None and graphs.layer is layer:
            self._say_recording_again(layer, graphs.signature, signature)
        mode = self._mode(device)
        if mode == "cuda" and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device)

        slots = plan.slots
        grad_buffers = self._grad_buffers_for(slots)

        saved = {}  # a kept forward's saved storages (data pointer -> bytes), the layer's weights and inputs left out
        fixed = {buffers.x.untyped_storage().data_ptr()}
        for module in plan.modules:
            tensors = (*module._parameters.values(), *module._buffers.values())
            fixed.update(t.untyped_storage().data_ptr() for t in tensors if t is not None)

        def count_saved(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in fixed:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        def differentiable_body(count=False):
            # Autograd on, over stand-ins that share the parameters' storage: autograd keeps one gradient
            # accumulator per parameter, created on the stream of the forward that made it (the default one,
            # outside the capture), and reaching it from inside a capture fails.
            # The autograd graph is the recording's own: a caller's saved-tensor hooks (offloading, say)
            # must neither see it nor run inside a capture, hence private hooks innermost.
            stand_ins = [self._stand_in(p) for _, _, p in slots]
            hooks = _private_saved_tensors(count_saved if count else None)
            with torch.enable_grad(), _parameters_replaced(slots, stand_ins), hooks:
                x = buffers.x.detach().requires_grad_(True)
                mark_dynamic(x)
                return x, stand_ins, self.body(layer, x, **kwargs)

        def forward_call():
            # The forward runs the very call the backward recomputes, autograd on, and drops its graph: one
            # compile per layer kind instead of a no-grad one besides (3-5 s each on an H200), and an output
            # that is exactly the one the backward differentiates.
            _, _, y = differentiable_body()
            with torch.no_grad():
                buffers.out.copy_(y)
            return (buffers.out,)

        def gradients(x, stand_ins, y):
            grads = torch.autograd.grad(y, (x, *stand_ins), buffers.grad_out, allow_unused=True)
            with torch.no_grad():
                buffers.out.copy_(grads[0])
                for buffer, grad in zip(grad_buffers, grads[1:]):
                    if grad is not None:
                        buffer.copy_(grad)
            # The gradients themselves are freed into the pool, for the next recording to reuse.
            return (buffers.out, *(None if g is None else b for b, g in zip(grad_buffers, grads[1:])))

        def backward_call():
            return gradients(*differentiable_body())

        # A kept layer's forward hands its autograd graph to its backward: recorded one after the other, the
        # backward graph reads what the forward graph saved, where it saved it.
        kept_call = []

        def kept_forward_call():
            saved.clear()
            kept_call[:] = differentiable_body(count=True)
            with torch.no_grad():
                buffers.out.copy_(kept_call[2])
            return (buffers.out,)

        def kept_backward_call():
            call = tuple(kept_call)
            kept_call.clear()
            return gradients(*call)

        record_forward, record_backward = (kept_forward_call, kept_backward_call) if keep else (forward_call,
                                                                                                 backward_call)
        started = time.perf_counter()
        if mode == "cuda":
            # Warm up on the capture stream (compiles, autotuning, lazy library setup), then capture.
            self._stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self._stream):
                record_forward()
                record_backward()
            torch.cuda.current_stream(device).wait_stream(self._stream)
        pool = self._kept_pool(layer) if keep else None
        reserved = torch.cuda.memory_reserved(device) if keep and mode == "cuda" else 0
        forward = _Recording(mode, pool.handle if keep else self._pool, self._stream)
        forward.record(record_forward)
        if keep and mode == "cuda" and pool.handle is None:
            pool.handle = forward.graph.pool()
        backward = _Recording(mode, pool.handle if keep else self._pool, self._stream)
        backward.record(record_backward)
        if keep:  # what its pool reserved, at least what the forward saved
            reserved = torch.cuda.memory_reserved(device) - reserved if mode == "cuda" else 0
            pool.bytes = max(pool.bytes, sum(saved.values()), pool.bytes + reserved)
        seconds = time.perf_counter() - started
        if seconds > 5:  # the warm-up compiled something: the first layer of a kind, or an unexpected recompile
            logger.info("fastgemma: cuda_graphs: recording a %s took %.1f s (warm-up and capture)",
                        type(layer).__name__, seconds)
        graphs = self._layers[(id(layer), key, keep)] = _LayerGraphs(layer, signature, forward, backward, key, pool)
        self.captures += 1
        return graphs

    def run_forward(self, plan, sources, length, x, capacity: int = 0, keep: bool = False) -> tuple:
        """(output, the graphs that made it: its backward replays their backward, the call's token: a kept
        layer's backward finds its activations in the layer's pool while the pool's owner is still this token)."""
        shape, buffers = self._buffers_for(x, length, capacity)
        key, kwargs = self._bind(sources, length)
        graphs = self._graphs_for(plan, (shape, key, _autocast_state(x.device)), kwargs, buffers, x.device, keep)
        if length not in self._lengths:
            self._lengths.add(length)
            logger.info("fastgemma: CUDA-graphed layers recorded at %d tokens (%d of at most %d lengths)",
                        length, len(self._lengths), self.max_buckets)
        buffers.fill(buffers.x, x)
        (out,) = graphs.forward.replay()
        token = None
        if graphs.pool is not None:
            token = graphs.pool.owner = object()
        return out[:, : x.shape[1]].clone(), graphs, token

    def run_backward(self, graphs: _LayerGraphs, sources, length, x, grad_out, plan=None, token=None):
        # The graphs the forward replayed (recorded for the weights and inputs of that call), whatever was
        # recorded since; the static inputs are loaded again, as another batch may have run in between.
        _, buffers = self._buffers_for(x, length)
        _, kwargs = self._bind(sources, length)
        if graphs.pool is not None:
            if graphs.pool.owner is token:
                graphs.pool.owner = None  # the backward reuses the saved activations' memory as it goes
            else:  # replayed over since (or released): recompute, as a checkpointed layer does
                graphs = self._graphs_for(plan, graphs.key, kwargs, buffers, x.device)
        buffers.fill(buffers.x, x)
        buffers.fill(buffers.grad_out, grad_out)
        grad_x, *grad_params = graphs.backward.replay()
        return grad_x[:, : x.shape[1]].clone(), [None if g is None else g.clone() for g in grad_params]


def _no_signature(layer) -> None:
    return None


def _autocast_state(device: torch.device) -> tuple:
    """Whether (and to what) autocast casts here: a graph replays the casts made when it was recorded, so a
    call under other autocast settings needs graphs of its own (torch.compile's guards would tell the same)."""
    kind = device.type
    if not torch.is_autocast_enabled(kind):
        return (False,)
    return (True, torch.get_autocast_dtype(kind))


class LayerPlan:
    """One layer as a call finds it: its modules, its trainable parameters as (module, name, parameter)
    slots, and a signature that changes whenever a recorded graph of it would go stale (a module or
    parameter replaced, a storage moved, requires_grad switched, or what `extra` reports).

    Walks `_modules` and `_parameters` directly: this runs for every layer of every micro-step, where
    ``Module.modules()`` and ``parameters()`` cost several times more host time.
    """

    def __init__(self, layer, extra=None):
        self.layer = layer
        modules, stack = [], [layer]
        while stack:
            module = stack.pop()
            modules.append(module)
            stack.extend(child for child in reversed(module._modules.values()) if child is not None)
        self.modules = modules
        seen, slots, storage = set(), [], []
        for module in modules:
            for name, parameter in module._parameters.items():
                if parameter is None or id(parameter) in seen:
                    continue
                seen.add(id(parameter))
                storage.append((id(parameter), parameter.data_ptr(), parameter.requires_grad))
                if parameter.requires_grad:
                    slots.append((module, name, parameter))
        self.slots = slots
        self.trainable = tuple(parameter for _, _, parameter in slots)
        self.signature = (tuple(map(id, modules)), tuple(storage), extra(layer) if extra else None)


def _private_saved_tensors(pack=None):
    """Saved-tensor hooks that keep tensors as they are (`pack` may look at them), shadowing any the caller set."""
    return torch.autograd.graph.saved_tensors_hooks(pack or _keep, _keep)


def _keep(tensor):
    return tensor


class _parameters_replaced:
    """Within the block, each (module, name) slot holds its stand-in instead of its parameter."""

    def __init__(self, slots, stand_ins):
        self.slots, self.stand_ins = slots, stand_ins

    def __enter__(self):
        for (module, name, _), stand_in in zip(self.slots, self.stand_ins):
            module._parameters[name] = stand_in

    def __exit__(self, *exc):
        for module, name, parameter in self.slots:
            module._parameters[name] = parameter


class _GraphedCall(torch.autograd.Function):
    """Autograd's view of one graphed layer call: saves the layer input (all a checkpointed layer keeps; a kept
    layer's activations wait in its graph pool), and the backward replays the layer's backward graph for it."""

    @staticmethod
    def forward(ctx, runner: GraphedLayers, plan: LayerPlan, sources, lengths: tuple, x: torch.Tensor, *trainable):
        length, capacity, keep = lengths
        out, graphs, token = runner.run_forward(plan, sources, length, x, capacity, keep)
        ctx.runner, ctx.graphs, ctx.sources, ctx.length = runner, graphs, sources, length
        ctx.plan, ctx.token = plan, token
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # ctx keeps the graphs and sources afterwards: backward(retain_graph=True) replays them again.
        (x,) = ctx.saved_tensors
        with torch.no_grad():  # create_graph=True runs this with grad mode on; a replay records nothing anyway
            grad_x, grad_params = ctx.runner.run_backward(ctx.graphs, ctx.sources, ctx.length, x, grad_out.contiguous(),
                                                          ctx.plan, ctx.token)
        grads = [grad_x if ctx.needs_input_grad[4] else None, *grad_params]
        if torch.is_grad_enabled():
            grads = _not_differentiable_again(grads)
        return (None, None, None, None, *grads)


NO_DOUBLE_BACKWARD = ("fastgemma: CUDA-graphed layers (cuda_graphs=True) have no double backward: their gradients "
                      "cannot be differentiated again; patch_model(..., backend='eager', fused_ops=False) can")


class _NoDoubleBackward(torch.autograd.Function):
    """Gradients that a graphed backward replayed, as they are; differentiating them raises NO_DOUBLE_BACKWARD."""

    @staticmethod
    def forward(ctx, *grads):
        return tuple(grad.view_as(grad) for grad in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(NO_DOUBLE_BACKWARD)


def _not_differentiable_again(grads: list) -> list:
    """Under create_graph=True: `grads` on a node that raises if a second backward reaches it (as torch's
    once_differentiable, with fastgemma's message), instead of constants that would silently drop those terms."""
    present = [index for index, grad in enumerate(grads) if grad is not None]
    wrapped = _NoDoubleBackward.apply(*(grads[index].detach().requires_grad_() for index in present))
    for index, grad in zip(present, wrapped):
        grads[index] = grad
    return grads
