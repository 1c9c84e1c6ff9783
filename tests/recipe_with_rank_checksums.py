"""recipes/sft_gemma2.py under torchrun, each rank writing a checksum of the adapter it trained.

    torchrun --nproc_per_node 2 tests/recipe_with_rank_checksums.py CHECKSUM_DIR <recipe arguments>

Every rank writes CHECKSUM_DIR/rank<N>.json, so tests/test_distributed.py can check that all ranks ended
with bit-identical weights and that the one adapter on disk is exactly those. The recipe runs unchanged:
every rank calls the Trainer's save_state after training (and after a Ctrl-C), and this wraps it.
"""

import hashlib
import json
import runpy
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sft_gemma2.py"


def checksum_of(state: dict) -> dict:
    """sha256 over a state dict as PEFT saves it: sorted names, dtypes, shapes and bytes."""
    import torch

    digest = hashlib.sha256()
    elements = 0
    for name in sorted(state):
        tensor = state[name]
        if hasattr(tensor, "full_tensor"):  # a DTensor (FSDP2)
            tensor = tensor.full_tensor()
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        elements += tensor.numel()
    return {"sha256": digest.hexdigest(), "tensors": len(state), "elements": elements}


def write_rank_checksum(trainer, directory: Path) -> None:
    """This rank's adapter checksum, computed from its model in memory (sharded tensors are gathered, so
    every rank must call it), and how the Trainer ran it."""
    import torch
    from peft import get_peft_model_state_dict
    from sft import distributed

    launch = distributed.detect_launch()
    group_ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    record = {
        **checksum_of(get_peft_model_state_dict(trainer.model)),
        "rank": launch.rank,
        "world_size": launch.world_size,
        "trainer_world_size": trainer.args.world_size,
        "parallel_mode": str(trainer.args.parallel_mode),
        "wrapped_in": type(trainer.model_wrapped).__name__,
        "backend": torch.distributed.get_backend() if group_ready else None,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"rank{launch.rank}.json").write_text(json.dumps(record, indent=2))


def main() -> None:
    directory, recipe_arguments = Path(sys.argv[1]), sys.argv[2:]
    from transformers import Trainer

    save_state = Trainer.save_state

    def save_state_and_checksum(self):
        save_state(self)
        write_rank_checksum(self, directory)

    Trainer.save_state = save_state_and_checksum
    sys.path.insert(0, str(RECIPE.parent))  # what `python recipes/sft_gemma2.py` does for its own folder
    sys.argv = [str(RECIPE), *recipe_arguments]
    runpy.run_path(str(RECIPE), run_name="__main__")


if __name__ == "__main__":
    main()
