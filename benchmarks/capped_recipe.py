"""recipes/sft_gemma2.py under a per-process GPU memory cap, for benchmarks/suite_scale.py.

    python benchmarks/capped_recipe.py --cap-gib 20 -- <recipe arguments>
    torchrun --nproc_per_node 2 benchmarks/capped_recipe.py --cap-gib 20 -- --fsdp <recipe arguments>

Each process caps its own GPU (LOCAL_RANK's) with torch.cuda.set_per_process_memory_fraction before
the recipe touches CUDA, so the caching allocator refuses to go past the cap, as a smaller card would.
(Memory outside PyTorch's allocator, such as the CUDA context, is not counted.) Each rank writes
$CAPPED_RECIPE_RESULT_DIR/rank<N>.json: its peaks while loading (until the recipe resets the counters before
training) and while training, and whether it ran out of memory (then the exit status is 3).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sft_gemma2.py"
OOM_EXIT_STATUS = 3


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False, add_help=False
    )
    parser.add_argument("--cap-gib", type=float, default=None, help="GPU memory cap per process in GiB [no cap]")
    # Everything else is the recipe's (torchrun may drop the "--" separator, so do not rely on it).
    args, recipe_args = parser.parse_known_args()
    recipe_args = [argument for argument in recipe_args if argument != "--"]

    import torch

    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "cap_gib": args.cap_gib, "oom": False}
    if torch.cuda.is_available():
        device = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(device)
        total = torch.cuda.get_device_properties(device).total_memory
        record["total_gib"] = total / 2**30
        if args.cap_gib is not None:
            fraction = min(1.0, args.cap_gib * 2**30 / total)
            torch.cuda.set_per_process_memory_fraction(fraction, device)
            record["fraction"] = fraction

        # The recipe resets the peak counters before training; keep the loading peak from before that.
        reset = torch.cuda.reset_peak_memory_stats

        def reset_keeping_the_loading_peak(*args, **kwargs):
            record["loading_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            record["loading_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            return reset(*args, **kwargs)

        torch.cuda.reset_peak_memory_stats = reset_keeping_the_loading_peak

    sys.argv = [str(RECIPE), *recipe_args]
    status = 0
    try:
        sys.path.insert(0, str(RECIPE.parent))  # as `python recipes/sft_gemma2.py` does: its parts import as `sft`
        runpy.run_path(str(RECIPE), run_name="__main__")
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except torch.OutOfMemoryError as error:
        record["oom"] = True
        record["error"] = str(error).splitlines()[0][:300]
        status = OOM_EXIT_STATUS
        print(f"capped_recipe: rank {rank}: CUDA out of memory under the cap of {args.cap_gib} GiB", file=sys.stderr)
    if torch.cuda.is_available():  # since the recipe's reset before training (or from the start, if it never came)
        record["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    result_dir = os.environ.get("CAPPED_RECIPE_RESULT_DIR")
    if result_dir:
        Path(result_dir).mkdir(parents=True, exist_ok=True)
        (Path(result_dir) / f"rank{rank}.json").write_text(json.dumps({**record, "status": status}, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
