"""One run per --output-dir: its checkpoints, --resume, and --overwrite.

A new run into a folder that holds an earlier one is refused (runs never mix); --resume continues
the latest checkpoint-N unless the run already reached its planned end; --overwrite deletes the
recipe's own files of the earlier run first. Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from .console import display_path
from .errors import RecipeError, RecipeFinished

# What the recipe (through the Trainer and PEFT) writes into --output-dir, besides checkpoint-N folders.
RUN_OUTPUT_FILES = [
    "trainer_state.json", "recipe_summary.json", "adapter_model.safetensors", "adapter_config.json",
    "training_args.bin", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja",
]
RUN_OUTPUT_DIRS = ["tiny_base_model", "merged", "runs"]  # the demo's base, --merge, --report-to tensorboard
EARLIER_RUN_MARKERS = ["trainer_state.json", "recipe_summary.json", "adapter_model.safetensors", "adapter_config.json"]


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The Trainer's checkpoint-N directory with the highest N (None if there is none)."""
    checkpoints = [
        path
        for path in output_dir.glob("checkpoint-*")
        if path.name.removeprefix("checkpoint-").isdigit() and (path / "trainer_state.json").is_file()
    ]
    return max(checkpoints, key=lambda path: int(path.name.removeprefix("checkpoint-")), default=None)


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    return sorted(path for path in output_dir.glob("checkpoint-*")
                  if path.is_dir() and path.name.removeprefix("checkpoint-").isdigit())


def earlier_run(output_dir: Path) -> list[str]:
    """The names in output_dir that show an earlier run of the recipe (empty when there is none)."""
    if not output_dir.is_dir():
        return []
    return [path.name for path in checkpoint_dirs(output_dir)] + [
        name for name in EARLIER_RUN_MARKERS if (output_dir / name).is_file()
    ]


def remove_earlier_run(output_dir: Path, say: bool = False) -> list[Path]:
    """--overwrite: delete the recipe's own checkpoints and outputs from output_dir, nothing else."""
    removed = [*checkpoint_dirs(output_dir), *(output_dir / name for name in RUN_OUTPUT_FILES + RUN_OUTPUT_DIRS)]
    card = output_dir / "README.md"  # PEFT's model card; a README of the user's stays
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if card.is_file() and "library_name: peft" in card.read_text(encoding="utf-8"):
            removed.append(card)
    removed = [path for path in removed if path.exists()]
    for path in removed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if say and removed:
        print(f"overwrite    deleted the earlier run's {', '.join(path.name for path in removed)} "
              f"from {display_path(output_dir)}")
    return removed


def check_new_run(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    """A new run never mixes its checkpoints and outputs with an earlier run's in one folder."""
    if resume is not None or overwrite:
        return
    if found := earlier_run(output_dir):
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise RecipeError(
            f"--output-dir {output_dir} holds an earlier run ({shown}): continue it with --resume, or start "
            "over with --overwrite (deletes that run's checkpoints and outputs), or give another --output-dir"
        )


def read_state(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("global_step"), int) else None


def planned_end(max_steps: int, epochs: float, state: dict) -> str | None:
    """Why a run in `state` has nothing left to train with these --max-steps / --epochs (None when it has)."""
    step = state["global_step"]
    if max_steps > 0:
        return f"step {step} of --max-steps {max_steps}" if step >= max_steps else None
    state_steps, epoch = state.get("max_steps") or 0, state.get("epoch") or 0.0
    # The Trainer's epoch counter can end a hair below a whole epoch when the last accumulation is short.
    if 0 < state_steps <= step and epoch >= epochs - 0.01:
        return f"step {step}, the end of --epochs {epochs:g}"
    return None


def check_resume(resume: str | None, output_dir: Path, max_steps: int, epochs: float) -> Path | None:
    """--resume as a checkpoint directory that exists and has steps left to train (None: a new run)."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoint = latest_checkpoint(output_dir)
        # The folder's own trainer_state.json (saved at the end) can be past the last periodic checkpoint.
        candidates = [output_dir, *([checkpoint] if checkpoint else [])]
    else:
        checkpoint = Path(resume)
        if not (checkpoint / "trainer_state.json").is_file():
            raise RecipeError(f"--resume {resume} is not a training checkpoint (no trainer_state.json in it)")
        candidates = [checkpoint]
    states = [(state, where) for where in candidates if (state := read_state(where / "trainer_state.json"))]
    if states:
        state, where = max(states, key=lambda pair: pair[0]["global_step"])
        if (end := planned_end(max_steps, epochs, state)) is not None:
            raise RecipeFinished(
                f"the run in {display_path(where)} already finished ({end}): nothing to resume; raise --max-steps "
                "or --epochs to train further, or start over with --overwrite"
            )
    if checkpoint is None:
        raise RecipeError(
            f"--resume: no checkpoint-N directory in {output_dir} to continue from (one is saved on "
            "Ctrl-C and every --save-steps); give the run's --output-dir, or a checkpoint: --resume DIR"
        )
    return checkpoint
