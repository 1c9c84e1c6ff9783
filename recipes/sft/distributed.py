"""The recipe under torchrun / accelerate launch: one process per GPU (or per CPU worker), DDP or FSDP.

fastgemma does no distribution of its own. Each process loads, patches and trains its own copy
of the model, and PyTorch DDP or FSDP, as driven by TRL / transformers / accelerate, keeps them in
step. This module holds what the recipe has to get right for that:

- which process this is (`Launch`, from the environment torchrun and accelerate launch set);
- one GPU per process: `torch.cuda.set_device(local_rank)` before anything touches CUDA, so the
  4-bit base (`device_map={"": current device}`), fastgemma's compiled kernels and block masks
  and the fused ops all live on this rank's GPU; the process group, before training (`join`);
- the Trainer settings for DDP / FSDP (`trainer_settings`): a CPU launch must say `use_cpu=True`
  or every process silently trains alone; the collective timeout; no unused-parameter search;
- output from the main process only (`console_for_this_rank`, `tiny_base_model_dir`); the
  Trainer already saves the adapter and trainer_state.json from the main process only;
- choices every rank must make alike (`least`: the automatic micro-batch from the smallest free memory);
- the summary's numbers for the whole job (`slowest`, `per_gpu`, `peak_memory`, `gather`);
- a stop that every rank takes after the same step (`any_rank`), for Ctrl-C.

Nothing here does anything in a plain single-process run. Only the standard library is imported
at module level (torch inside the functions), so the recipe can answer --help and bad flags at once.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Collectives (NCCL on GPUs, gloo on CPUs) wait this long for the slowest rank before failing.
# The first step compiles fastgemma's kernels on every rank at once (31 s for 2B on an H200 with
# cold caches; CPU and larger models take longer), and the main process alone saves and generates
# at the end while the others wait. transformers' default (1800 s) covers both with a wide margin;
# set here so the choice is visible. A rank that really hangs fails after this long.
COLLECTIVE_TIMEOUT_S = 1800

# FSDP (see --fsdp): shard at the decoder layer, the unit fastgemma patches and checkpoints.
# Found by class name, which patching leaves unchanged (fastgemma swaps per-instance forwards).
FSDP_LAYER_CLASS = "Gemma2DecoderLayer"
# The LoRA states are small, and bitsandbytes' paged 8-bit AdamW on FSDP2's sharded (DTensor) parameters is
# untested here; plain AdamW handles DTensors.
FSDP_OPTIMIZER = "adamw_torch"


@dataclass(frozen=True)
class Launch:
    """This process's place in the job; a plain `python recipes/sft_gemma2.py` is rank 0 of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The one process that prints and writes files (global rank 0, on the first node)."""
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def describe(self) -> str:
        return f"{self.world_size} processes ({self.nodes} node{'s' * (self.nodes > 1)} x {self.local_world_size})"


def detect_launch(environ=os.environ) -> Launch:
    """Rank and world size from the variables torchrun and `accelerate launch` set (RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE); rank 0 of 1 without them."""

    def number(name, default):
        value = environ.get(name, "")
        return int(value) if value.strip() else default

    world_size = number("WORLD_SIZE", 1)
    local_world_size = number("LOCAL_WORLD_SIZE", world_size)
    return Launch(
        rank=number("RANK", 0),
        local_rank=number("LOCAL_RANK", 0),
        world_size=world_size,
        local_world_size=local_world_size,
    )


# ---------------------------------------------------------------------------------------
# Command line and settings
# ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "more than one GPU",
        "launch the same command with torchrun --nproc_per_node N (or accelerate launch --multi_gpu --num_processes N); "
        "each process trains on its own GPU with DDP, and only rank 0 writes",
    )
    group.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the model over the processes with FSDP2 instead of replicating it (DDP): for models that "
        "do not fit one GPU. 4-bit weights are then stored in the compute dtype (bnb_4bit_quant_storage) so "
        f"they can be sharded, each {FSDP_LAYER_CLASS} is one FSDP unit, and the optimizer defaults to "
        f"{FSDP_OPTIMIZER}. GPUs only",
    )


def check_arguments(fsdp: bool, launch: Launch, on_gpu: bool) -> str | None:
    """An error message for settings a launch cannot run, or None."""
    if fsdp and not launch.distributed:
        return (
            "--fsdp shards the model over several processes: launch with torchrun --nproc_per_node N "
            "(or accelerate launch --multi_gpu --num_processes N), N >= 2"
        )
    if fsdp and not on_gpu:
        # accelerate applies FSDP on accelerators only; on CPU processes it would quietly run DDP instead.
        return "--fsdp needs GPUs (accelerate runs FSDP on GPUs only); on CPU, launch without --fsdp for DDP"
    return None


def use_this_ranks_device(launch: Launch, on_gpu: bool) -> None:
    """One GPU per process: LOCAL_RANK's GPU becomes the current device before anything touches CUDA, so
    that the 4-bit base (`device_map={"": current device}`), fastgemma's kernels and masks and the fused
    ops live there."""
    if not (on_gpu and launch.distributed):
        return
    import torch

    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise RuntimeError(
            f"process with LOCAL_RANK={launch.local_rank} has no GPU of its own: this machine shows {count}; "
            "launch at most one process per GPU (--nproc_per_node)"
        )
    torch.cuda.set_device(launch.local_rank)


def join(launch: Launch, on_gpu: bool) -> None:
    """Set up the process group (NCCL on GPUs, gloo on CPUs, COLLECTIVE_TIMEOUT_S) now rather than in the
    Trainer, so that the ranks can agree on things before training (the automatic micro-batch, see `least`);
    accelerate then uses this group.

    Call it after the model is loaded: with a process group up, transformers' save_pretrained writes from
    rank 0 only, and every rank writes the tiny demo's base model for itself."""
    if not launch.distributed:
        return
    from datetime import timedelta

    import torch

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
            device_id=torch.device("cuda", launch.local_rank) if on_gpu else None,
        )


def trainer_settings(launch: Launch, on_gpu: bool, fsdp: bool) -> dict:
    """SFTConfig keyword arguments for a distributed launch (harmless in a single process)."""
    settings = {
        # On a machine without CUDA, transformers sets up a distributed run only with use_cpu=True;
        # without it every torchrun process trains alone (parallel_mode NOT_PARALLEL) and no gradient
        # is ever averaged. With it, accelerate uses DDP over gloo.
        "use_cpu": not on_gpu,
        "ddp_timeout": COLLECTIVE_TIMEOUT_S,
        # Every LoRA parameter gets a gradient at every step, so DDP need not search the graph for
        # unused ones (transformers would, since a PeftModel is not a PreTrainedModel). The search
        # costs a graph walk per step and fights gradient checkpointing.
        "ddp_find_unused_parameters": False,
    }
    if fsdp:
        settings["fsdp"] = True  # FULL_SHARD, wrapped by transformer_layer_cls_to_wrap (fsdp_config)
        settings["fsdp_config"] = {
            "version": 2,  # FSDP2 (fully_shard): LoRA and frozen 4-bit weights share a unit; FSDP1 is deprecated
            "transformer_layer_cls_to_wrap": [FSDP_LAYER_CLASS],
            "reshard_after_forward": True,  # free each layer's gathered weights after its forward: the memory saving
            # Checkpointing stays transformers' (the recipe's setting), not FSDP's own activation_checkpointing:
            # its checkpoint wrapper renames the modules, and PEFT 0.21 then finds no adapter weights in the
            # state dict, so the Trainer would save an empty adapter.
            "cpu_ram_efficient_loading": False,  # does not apply to 4-bit loading; each rank loads its own copy
            "state_dict_type": "FULL_STATE_DICT",  # the adapter is saved whole, by rank 0
        }
    return settings


def quantization_storage(fsdp: bool, compute_dtype):
    """The dtype 4-bit weights are packed in: uint8 normally; the compute dtype under FSDP, which shards floats only."""
    import torch

    return compute_dtype if fsdp else torch.uint8


# ---------------------------------------------------------------------------------------
# Output from the main process only
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def console_for_this_rank(launch: Launch | None = None):
    """Other ranks print nothing to stdout (the main process speaks for the job) and log warnings only.
    Errors still reach stderr from every rank."""
    launch = launch or detect_launch()
    if launch.is_main:
        yield
        return
    fastgemma_logger = logging.getLogger("fastgemma")
    previous_level = fastgemma_logger.level
    fastgemma_logger.setLevel(logging.WARNING)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield
    finally:
        fastgemma_logger.setLevel(previous_level)


def tiny_base_model_dir(launch: Launch, main_dir: Path) -> Path:
    """Where this rank writes the demo's random base model before loading it.

    The main process writes it into the output directory (the saved adapter points there).
    The others build the same seeded weights into a private temporary directory, removed at
    exit: no rank waits for another, and on several machines each one has its own copy.
    """
    if launch.is_main:
        return main_dir
    directory = Path(tempfile.mkdtemp(prefix=f"fastgemma_tiny_base_rank{launch.rank}_"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def finish(launch: Launch) -> None:
    """Wait for every rank (the main process saves and generates alone at the end), then leave the process group."""
    if _group_ready(launch):
        import torch

        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Numbers for the whole job
# ---------------------------------------------------------------------------------------
def _group_ready(launch: Launch) -> bool:
    if not launch.distributed:
        return False
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather(launch: Launch, value) -> list:
    """`value` from every rank, in rank order (just [value] in a single process). All ranks must call it."""
    if not _group_ready(launch):
        return [value]
    import torch

    values = [None] * launch.world_size
    torch.distributed.all_gather_object(values, value)
    return values


def any_rank(launch: Launch, flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank. For a stop that all ranks must take after the
    same step: a signal such as Ctrl-C reaches the ranks at different points of a step, and a rank that
    stops one step early leaves the others waiting in the next all-reduce. All ranks must call it at the
    same place (e.g. in a callback's on_step_end); it costs one one-element all-reduce."""
    if not _group_ready(launch):
        return bool(flag)
    import torch

    on_cuda = "nccl" in str(torch.distributed.get_backend()) and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def least(launch: Launch, value):
    """The smallest of every rank's `value`: what every rank can afford (e.g. free GPU memory), so that all
    make the same choice from it. All ranks must call it."""
    return min(gather(launch, value))


def slowest(launch: Launch, seconds: float | None) -> float | None:
    """The longest of every rank's `seconds` (None if any rank has none). All ranks must call it.

    A job's throughput is its tokens over the slowest rank's time; under DDP the ranks finish each
    step within the same all-reduce anyway."""
    everyone = gather(launch, seconds)
    return None if any(value is None for value in everyone) else max(everyone)


def per_gpu(launch: Launch, numbers: dict, keys: tuple[str, ...]) -> dict:
    """`<key>_per_gpu` = value / world size for each rate in `keys` (NaN and None stay as they are).

    TRL's logged `num_tokens` already counts every rank's tokens (it gathers each batch's count
    across processes), so rates computed from it are for the whole job."""
    return {
        f"{key}_per_gpu": numbers[key] / launch.world_size if isinstance(numbers.get(key), (int, float)) else None
        for key in keys
    }


def peak_memory(launch: Launch, on_gpu: bool) -> dict:
    """Each rank's peak memory in MiB (CUDA allocated and reserved, or the process's max RSS on CPU)."""
    import resource

    import torch

    if on_gpu:
        mine = {
            "allocated": torch.cuda.max_memory_allocated() / 2**20,
            "reserved": torch.cuda.max_memory_reserved() / 2**20,
        }
    else:
        mine = {"max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return {key: [values[key] for values in gather(launch, mine)] for key in mine}


def memory_line(launch: Launch, memory: dict) -> str | None:
    """'rank 0: ..., rank 1: ...' for a distributed run, None for a single process."""
    if not launch.distributed:
        return None
    key = "allocated" if "allocated" in memory else "max_rss"
    what = "CUDA peak allocated" if key == "allocated" else "max RSS"
    return f"{what} per rank (MiB): " + ", ".join(f"{value:,.0f}" for value in memory[key])
