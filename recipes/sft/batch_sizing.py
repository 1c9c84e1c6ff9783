"""The recipe's automatic micro-batch: as many packed rows per micro-step as the GPU's memory allows.

A QLoRA step on a few thousand tokens leaves the GPU idle while the host launches kernels
(Python, autograd, PEFT, bitsandbytes): at 1 row x 2048 tokens x 8 accumulation steps a 2B
step kept an H100 busy 22% of the time. The same tokens per optimizer step in fewer, larger
micro-steps cost the same GPU work and far less host time. So, unless the user sets
--batch-size or --grad-accum, the recipe keeps the tokens per optimizer step and moves as
many of its rows as fit into each micro-step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Memory a QLoRA step needs per token beyond the weights, bf16 with gradient checkpointing:
# each layer's saved input (hidden values per token and layer), plus the working set of the
# one layer being recomputed (its projections and the MLP's intermediate activations, about
# 16 hidden-sized and 6 intermediate-sized values per token). Measured peaks agree within 20%
# (measured on an H200: 2B ~250 KB/token, 9B ~570 KB/token; this gives 300 and 590).
BYTES_PER_VALUE = 2
HIDDEN_VALUES_PER_LAYER = 1
WORKING_HIDDEN_VALUES = 16
WORKING_INTERMEDIATE_VALUES = 6
HEADROOM = 0.75  # of the free memory: allocator fragmentation, optimizer spikes, the loss's chunks


def activation_bytes_per_token(config) -> int:
    """Estimated activation memory per token of a checkpointed (Q)LoRA step for a Gemma-2-like config."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    values = hidden * (HIDDEN_VALUES_PER_LAYER * layers + WORKING_HIDDEN_VALUES)
    values += config.intermediate_size * WORKING_INTERMEDIATE_VALUES
    return BYTES_PER_VALUE * values


@dataclass(frozen=True)
class MicroBatch:
    """Rows per micro-step and accumulation steps, and why."""

    batch_size: int
    grad_accum: int
    reason: str


def choose_micro_batch(rows_per_step: int, max_seq_length: int, free_bytes: int, config,
                       headroom: float = HEADROOM) -> MicroBatch:
    """The largest divisor of `rows_per_step` whose micro-step fits `headroom` x `free_bytes`.

    The tokens per optimizer step stay rows_per_step x max_seq_length whatever is chosen, so
    the optimisation (loss curve, learning-rate schedule) is the one the defaults describe.
    """
    if rows_per_step < 1 or max_seq_length < 1:
        raise ValueError(f"rows_per_step and max_seq_length must be positive, got {rows_per_step}, {max_seq_length}")
    per_row = activation_bytes_per_token(config) * max_seq_length
    budget = headroom * max(free_bytes, 0)
    for batch in sorted((d for d in range(1, rows_per_step + 1) if rows_per_step % d == 0), reverse=True):
        if batch * per_row <= budget or batch == 1:
            fits = batch * per_row <= budget
            reason = (
                f"{batch} row(s) of {max_seq_length} tokens per micro-step x {rows_per_step // batch} accumulation "
                f"step(s) = {rows_per_step * max_seq_length} tokens per optimizer step; estimated "
                f"{batch * per_row / 2**30:.1f} GiB of activations against {free_bytes / 2**30:.1f} GiB free"
                + ("" if fits else " (even one row may not fit: lower --max-seq-length if it runs out of memory)")
            )
            return MicroBatch(batch, rows_per_step // batch, reason)
    raise AssertionError("unreachable: batch 1 always returns")


def resumed_micro_batch(checkpoint, rows_per_step: int) -> MicroBatch | None:
    """The micro-batch a checkpointed run used (its trainer_state.json), or None if it does not say."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        batch = int(state["train_batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if batch < 1 or rows_per_step % batch:
        return None
    reason = (f"{batch} row(s) per micro-step x {rows_per_step // batch} accumulation step(s), as in the checkpoint "
              "being resumed")
    return MicroBatch(batch, rows_per_step // batch, reason)


# Tokens per micro-step up to which `--cuda-graphs auto` replays the layers as CUDA graphs. At 1 row x 2048
# (2B, H100) graphed layers ran 18.4K tokens/s against 3.2K op by op; at 4x4096 and 8x2048 the step is
# GPU-bound and graphs only add their first-step recordings and ~8% memory (measured on an H200).
GRAPHS_MAX_TOKENS_PER_MICRO_STEP = 4096


def cuda_graphs_pay_off(batch_size: int, max_seq_length: int, world_size: int) -> tuple[bool, str]:
    """Whether `--cuda-graphs auto` turns the graphed layers on for this micro-batch, and why.

    Only a small micro-step is bound by the host launching kernels, which is what the graphs remove; the
    graphed layers are proven on one GPU, so a distributed run keeps the op-by-op path."""
    tokens = batch_size * max_seq_length
    shape = f"{batch_size} row(s) x {max_seq_length} tokens per micro-step"
    if world_size > 1:
        return False, f"off: {world_size} processes (CUDA-graphed layers are measured on one GPU only)"
    if tokens > GRAPHS_MAX_TOKENS_PER_MICRO_STEP:
        return False, f"off: {shape} keeps the GPU busy without them"
    return True, f"on: {shape} would leave the GPU waiting on the host (the first steps record each layer)"


def settle_micro_step(config, model, launch) -> tuple[object, str | None]:
    """The config with its micro-batch (when sized to the GPU) and `--cuda-graphs auto` decided, now that the
    model is loaded; and the micro-batch's reason (None when the user or the knobs chose it). Prints both."""
    import dataclasses

    from . import distributed

    reason = None
    if config.size_micro_batch_to_gpu:
        import torch

        rows_per_step = config.batch_size * config.grad_accum
        # A resumed run keeps its checkpoint's micro-batch: the Trainer skips seen data by counting batches.
        choice = resumed_micro_batch(config.resume, rows_per_step) if config.resume else None
        if choice is None:
            device = next(model.parameters()).device
            # Every rank sizes from the least free memory of all, so all choose the same micro-batch.
            free = distributed.least(launch, torch.cuda.mem_get_info(device)[0])
            choice = choose_micro_batch(rows_per_step, config.max_seq_length, free, model.config)
        config = dataclasses.replace(config, batch_size=choice.batch_size, grad_accum=choice.grad_accum)
        reason = choice.reason
        print(f"micro-batch  {choice.reason} (set --batch-size / --grad-accum to choose)")
    if config.cuda_graphs == "auto":
        graphs, why = cuda_graphs_pay_off(config.batch_size, config.max_seq_length, launch.world_size)
        config = dataclasses.replace(config, cuda_graphs="on" if graphs else "off")
        print(f"cuda graphs  {why} (--cuda-graphs on/off to choose)")
    return config, reason
