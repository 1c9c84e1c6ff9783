"""Approximate tanh for flex_attention score functions: the GPU's one-instruction ``tanh.approx.f32``.

FlashAttention 2 and 3 compute their logit softcap with CUTLASS's fast tanh, that one hardware
instruction (relative error about 2^-11). ``torch.tanh`` compiles to a libdevice routine of a few
dozen instructions, evaluated for every (query, key) pair: at head_dim 256 it bounds the
softcapped flex_attention kernels' speed.

``tanh_approx(x)`` is a torch custom op, ``fastgemma::tanh_approx``:

- compiled by Inductor for an NVIDIA GPU, it becomes inline PTX fused into the kernel (into both of
  flex_attention's kernels when used in a score function);
- anywhere else (eager mode, CPU, AMD GPUs) it is ``torch.tanh``.

Its derivative is ``1 - t²`` of the value ``t`` the op returned, so a backward differentiates the
function its forward computed. flex_attention derives a score function's backward by tracing
it through autograd (``create_fw_bw_graph`` in torch/_higher_order_ops/flex_attention.py): the
formula registered here lands in that joint graph with ``t`` the op's own output, which the
backward kernel recomputes with the same instruction.

Nothing is registered at import (it touches Inductor internals): `register()` does it on first use
and returns False, after one log line, where this torch lacks an API it needs; callers then keep
``torch.tanh``.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger("fastgemma")

OP_NAME = "fastgemma::tanh_approx"
PTX = "tanh.approx.f32 $0, $1;"  # one float32 register in, one out ("=f,f")


def tanh_approx(x: torch.Tensor) -> torch.Tensor:
    """tanh(x): the hardware approximation inside compiled NVIDIA kernels, exact elsewhere.

    Call `register()` first (and use ``torch.tanh`` where it returns False).
    """
    return torch.ops.fastgemma.tanh_approx(x)


def is_nvidia(device) -> bool:
    """Inline PTX exists only on NVIDIA GPUs (not on CPU, nor on ROCm builds, whose device type is "cuda" too)."""
    return torch.device(device).type == "cuda" and torch.version.hip is None


_registered = None  # None until register() runs; then whether it could


def register() -> bool:
    """Define the op (fake, autograd and vmap rules) and its Inductor lowering, once per process.

    Returns False, and logs why once, where this torch cannot do it. (A module flag, not functools'
    cache: torch.compile may trace this call inside a compiled layer, and it reads a flag as a constant
    but would run a cached function's body again.)
    """
    global _registered
    if _registered is None:
        try:
            _define_op()
            _register_lowering()
            _registered = True
        except Exception as exc:  # noqa: BLE001 - private APIs differ between torch versions
            logger.warning(
                "fastgemma: no approximate tanh with torch %s (%s: %s); the softcap uses exact tanh",
                torch.__version__, type(exc).__name__, exc,
            )
            _registered = False
    return _registered


def _define_op() -> None:
    @torch.library.custom_op(OP_NAME, mutates_args=())
    def tanh_approx(x: torch.Tensor) -> torch.Tensor:
        # Run as a kernel of its own (eager mode): exact. Only Inductor's lowering emits the PTX.
        return torch.tanh(x)

    @tanh_approx.register_fake
    def _(x):
        return torch.empty_like(x)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    def backward(ctx, grad):
        # The derivative of the value actually produced: 1 - t² of the approximate t.
        (t,) = ctx.saved_tensors
        return grad * (1 - t * t)

    tanh_approx.register_autograd(backward, setup_context=setup_context)

    def batched(info, in_dims, x):
        # Elementwise: a batched input is just a bigger input. (flex_attention's uncompiled path vmaps
        # score functions; the compiled one, the only one using this op, does not: so it is optional.)
        return tanh_approx(x), in_dims[0]

    if hasattr(tanh_approx, "register_vmap"):
        tanh_approx.register_vmap(batched)


def _register_lowering() -> None:
    from torch._inductor import lowering as L
    from torch._inductor.virtualized import ops

    exact = L.lowerings[torch.ops.aten.tanh.default]
    approx = L.make_pointwise(
        functools.partial(
            ops.inline_asm_elementwise, asm=PTX, constraints="=f,f", dtype=torch.float32, is_pure=True, pack=1
        )
    )

    def lower(x):
        if not is_nvidia(x.get_device()):
            return exact(x)
        dtype = x.get_dtype()
        if dtype == torch.float32:  # flex_attention's scores always are
            return approx(x)
        return L.to_dtype(approx(L.to_dtype(x, torch.float32)), dtype)

    L.register_lowering(torch.ops.fastgemma.tanh_approx, type_promotion_kind=None)(lower)
