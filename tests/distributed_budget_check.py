"""Run under torchrun (CPU, gloo, 2 processes) by tests/test_distributed.py: a patched tiny Gemma 2 with LoRA under
DDP, each rank under its own memory plan, trains like every layer checkpointed.

The first argument is the output directory, the second the plans: "none" (memory_budget=None on both ranks, the
reference) or "mixed" (rank 0 a large budget: it checkpoints, counts one layer, then keeps every layer; rank 1 a
budget of one byte: every checkpointed input offloaded). A CPU has no allocator to measure, so each rank's budget
reads a fake device memory. Each rank writes rank<N>.pt: its LoRA weights after the steps, and its last plan.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fastgemma
# (this script's folder, tests/, is on sys.path)
from conftest import lora_training_model, random_gemma2, tiny_gemma2_config
from fake_memory import FakeMemory
from fastgemma.patching import state_of

STEPS = 3


def main(output: Path, plans: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    budget = None if plans == "none" else ("auto" if rank == 0 else 1)
    model = lora_training_model(random_gemma2(tiny_gemma2_config(window=16, layers=4)), memory_budget=budget)
    state = next(state_of(m) for m in model.modules() if state_of(m) is not None)
    if state.budget is not None:
        state.budget.memory = FakeMemory()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(100 * step + rank)
        ids = torch.randint(0, 97, (1, 60 + step), generator=generator)
        ddp(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    plan = fastgemma.memory_plan(model)
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    torch.save({"weights": weights, "kept": plan and plan.kept, "offloaded": plan and plan.offloaded},
               output / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
