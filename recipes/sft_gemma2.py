#!/usr/bin/env python
"""QLoRA supervised fine-tuning of Gemma 2 with TRL, on a fastgemma-patched model.

    python recipes/sft_gemma2.py                                   # tiny demo: CPU, no downloads, a few minutes
    python recipes/sft_gemma2.py --model google/gemma-2-2b --dataset my_chats.jsonl   # QLoRA on one GPU

What it does, in order:
  1. checks every flag and input (numbers, paths, the model's config, the dataset's rows and
     their lengths) before loading any weights or writing anything: a bad one stops the
     recipe with a one-line error and exit status 2;
  2. loads Gemma 2 (4-bit NF4 with double quantisation and bf16 compute on a GPU by default);
  3. patches its attention with fastgemma (exact logit-softcapped attention, flex / compiled);
  4. trains LoRA adapters on every linear projection with TRL's SFTTrainer. Ctrl-C finishes
     the step in flight, saves the adapter and a checkpoint, and says how to go on (--resume);
  5. saves the adapter (PEFT format), tokenizer and trainer_state.json to --output-dir,
     prints a summary (steps, tokens/s, peak memory, first/last loss) and, for chat or
     prompt/completion data, greedy generations on held-out prompts next to the answer.

Without --model, the recipe builds a small random-init Gemma 2 from the config shipped in
recipes/assets/tiny_gemma2/ (config and character-level tokenizer made by
recipes/build_tiny_gemma2.py). Without --dataset it trains on recipes/assets/data/, a toy
instruction set (addition, reversal, uppercase, sorting) made by recipes/make_dataset.py.

Datasets (a hub name or a local .jsonl / .json / .parquet file) need one of these columns:
  messages            chat turns [{"role", "content"}]; loss on the assistant turns only
  prompt, completion  loss on the completion only
  text                plain language modelling; loss on every token
"""

# Only the standard library up here: the command line and the checks run before torch,
# transformers, peft and TRL are imported (about 10 s), so --help and a bad flag answer at once.
import argparse
import contextlib
import json
import logging
import math
import os
import re
import resource
import shlex
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# Run from a source checkout without `pip install -e .`: fall back to the checkout's packages
# (appended, so an installed fastgemma still wins). fastgemma itself is imported in run().
sys.path.append(str(Path(__file__).resolve().parents[1]))
from recipes import distributed  # noqa: E402  (torchrun / accelerate launch: recipes/distributed.py; stdlib only)
from recipes.batch_sizing import GRAPHS_MAX_TOKENS_PER_MICRO_STEP, cuda_graphs_pay_off  # noqa: E402  (stdlib only)

# ---------------------------------------------------------------------------------------
# Knobs. Real Gemma 2 (--model given): the usual single-GPU QLoRA settings.
# ---------------------------------------------------------------------------------------
DEFAULT_OUTPUT_DIR = "outputs/sft_gemma2"
MAX_SEQ_LENGTH = 2048
LORA_R = 16
LORA_ALPHA = 32
LORA_DROPOUT = 0.0  # off: dropout adds an activation per adapted layer and rarely helps a 1-epoch SFT
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH_SIZE_PACKED = 1  # with packing, one row of up to MAX_SEQ_LENGTH tokens (many documents) per micro-step
BATCH_SIZE_UNPACKED = 4
GRAD_ACCUM = 8
LEARNING_RATE = 2e-4
EPOCHS = 1
WARMUP = 0.03  # fraction of the steps
LR_SCHEDULER = "cosine"
GPU_OPTIMIZER = "paged_adamw_8bit"  # bitsandbytes: 8-bit states, paged to CPU on memory spikes
CPU_OPTIMIZER = "adamw_torch"
LOGGING_STEPS = 10
SAVE_STEPS = 500  # a resumable checkpoint every N optimizer steps (Ctrl-C saves one too)
CHECKPOINTS_KEPT = 2  # older checkpoint-N directories are deleted
SEED = 42
BACKEND = "auto"  # fastgemma: flex_attention on Ampere+ GPUs, torch.compile'd dense attention elsewhere
FUSED_OPS = "auto"  # fastgemma: fused norms / RoPE / GeGLU / LoRA-in-GEMM while training, on CUDA
COMPILE_LAYERS = False  # fastgemma: each decoder layer one compiled region (without graphs; see CUDA_GRAPHS)
CUDA_GRAPHS = "auto"  # fastgemma: compiled layers replayed as CUDA graphs; auto: for small micro-steps on one GPU

# ---------------------------------------------------------------------------------------
# Knobs for the embedded tiny demo (no --model): sized to finish in minutes on 2 CPU cores.
# ---------------------------------------------------------------------------------------
RECIPES_DIR = Path(__file__).resolve().parent
TINY_MODEL_DIR = RECIPES_DIR / "assets" / "tiny_gemma2"  # config.json + tokenizer files, no weights
TINY_TRAIN_FILE = RECIPES_DIR / "assets" / "data" / "tiny_tasks_train.jsonl"
TINY_HELDOUT_FILE = RECIPES_DIR / "assets" / "data" / "tiny_tasks_heldout.jsonl"
TINY_INIT_SEED = 0  # fixed, so the random "base model" is the same on every run and machine
TINY_MAX_SEQ_LENGTH = 512
TINY_BATCH_SIZE_PACKED = 1
TINY_BATCH_SIZE_UNPACKED = 16
TINY_GRAD_ACCUM = 1
TINY_LEARNING_RATE = 3e-3  # a random-init model and small adapters take (and need) a large step
TINY_MAX_STEPS = 500  # ~2 epochs of the toy set; a few minutes on 2 cores
TINY_WARMUP = 0.05
TINY_LOGGING_STEPS = 1
TINY_SAVE_STEPS = 0  # no periodic checkpoints in a few-minute demo; Ctrl-C still saves one
TINY_SHOW_GENERATIONS = 8

# ---------------------------------------------------------------------------------------
# Checks: how much is looked at before the weights load.
# ---------------------------------------------------------------------------------------
LENGTH_CHECK_ROWS = 1000  # rows tokenized up front to see whether documents fit --max-seq-length
HUB_TIMEOUT_S = 10  # one look at the Hugging Face Hub per name, no retries
DATASET_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Suffixes that mark a --dataset as a file name (so never a hub name), supported or not.
DATA_FILE_SUFFIXES = {*DATASET_FILE_TYPES, ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zst", ".bz2", ".xz"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name
MODEL_WEIGHT_PATTERNS = ["*.safetensors", "*.bin"]
MODEL_TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model"]

GENERATION_MAX_NEW_TOKENS = 32
RECIPE_NAME = Path(__file__).name


class RecipeError(Exception):
    """A problem with the inputs, reported as one short line and exit status 2."""


class RecipeInterrupted(Exception):
    """Ctrl-C: what was saved and where, reported as one line and exit status 130."""

    def __init__(self, message: str, resumable: bool = True):
        super().__init__(message)
        self.resumable = resumable  # a checkpoint exists that --resume can continue from


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=RECIPE_NAME,
        description=__doc__.split("\n\n")[0],
        epilog="Defaults in brackets are for a real model; the tiny demo (no --model) uses its own where noted.",
    )
    what = parser.add_argument_group("what to train")
    what.add_argument(
        "--model",
        help="Gemma 2 hub id (e.g. google/gemma-2-2b) or local directory. "
        f"Default: a tiny random-init Gemma 2 built from {TINY_MODEL_DIR.relative_to(RECIPES_DIR.parent)}",
    )
    what.add_argument(
        "--dataset",
        help="hub dataset name, or a local .jsonl/.json/.parquet file, with a 'messages', 'prompt'+'completion' "
        f"or 'text' column. Default: the toy task set {TINY_TRAIN_FILE.relative_to(RECIPES_DIR.parent)}",
    )
    what.add_argument("--dataset-split", default="train", help="split of a hub dataset to train on [train]")
    what.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help=f"where the adapter goes [{DEFAULT_OUTPUT_DIR}]")

    how = parser.add_argument_group("how to train")
    how.add_argument(
        "--max-seq-length",
        type=int,
        help="longest sequence in tokens; with packing, the length of a packed row "
        f"[{MAX_SEQ_LENGTH}; tiny {TINY_MAX_SEQ_LENGTH}]",
    )
    how.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        help="pack documents into rows of --max-seq-length with TRL's best-fit-decreasing strategy, padding-free "
        "(position ids restart per document, attention never crosses documents) [on with a GPU, off on CPU]",
    )
    how.add_argument(
        "--load-in-4bit",
        action=argparse.BooleanOptionalAction,
        help="load the base weights in 4-bit NF4 (bitsandbytes, double quantisation, bf16 compute): QLoRA "
        "[on with a GPU, off on CPU]",
    )
    how.add_argument("--lora-r", type=int, default=LORA_R, help=f"LoRA rank [{LORA_R}]")
    how.add_argument(
        "--lora-alpha", type=int, default=LORA_ALPHA, help=f"LoRA alpha; the update is scaled by alpha/r [{LORA_ALPHA}]"
    )
    how.add_argument(
        "--lora-dropout", type=float, default=LORA_DROPOUT, help=f"dropout on the LoRA input [{LORA_DROPOUT}]"
    )
    how.add_argument(
        "--batch-size",
        type=int,
        help="sequences (or packed rows) per micro-step "
        f"[{BATCH_SIZE_PACKED} packed, {BATCH_SIZE_UNPACKED} unpacked; "
        f"tiny {TINY_BATCH_SIZE_PACKED} / {TINY_BATCH_SIZE_UNPACKED}]",
    )
    how.add_argument(
        "--grad-accum", type=int, help=f"micro-steps per optimizer step [{GRAD_ACCUM}; tiny {TINY_GRAD_ACCUM}]"
    )
    how.add_argument("--lr", type=float, help=f"peak learning rate [{LEARNING_RATE}; tiny {TINY_LEARNING_RATE}]")
    how.add_argument("--epochs", type=float, help=f"passes over the dataset, unless --max-steps is set [{EPOCHS}]")
    how.add_argument(
        "--max-steps",
        type=int,
        help="stop after this many optimizer steps; -1 = use --epochs "
        f"[-1; tiny {TINY_MAX_STEPS} unless --epochs is given]",
    )
    how.add_argument(
        "--optim",
        help=f"transformers optimizer name [{GPU_OPTIMIZER} on a GPU, {CPU_OPTIMIZER} on CPU]",
    )
    how.add_argument(
        "--backend",
        default=BACKEND,
        choices=["auto", "flex", "compiled", "eager"],
        help="fastgemma attention: flex (flex_attention, GPU), compiled (torch.compile'd dense), eager (plain "
        f"PyTorch); auto picks flex on Ampere+ GPUs and compiled elsewhere [{BACKEND}]",
    )
    how.add_argument(
        "--fused-ops",
        default=FUSED_OPS,
        choices=["auto", "on", "off"],
        help="fastgemma's fused elementwise ops while training (norms with residual adds, RoPE, GeGLU, LoRA added "
        "inside its GEMM): auto fuses on CUDA; on also fuses on CPU (a slow first compile there); off keeps "
        f"Hugging Face's ops [{FUSED_OPS}]",
    )
    how.add_argument(
        "--compile-layers",
        action="store_true",
        default=COMPILE_LAYERS,
        help="run each decoder layer as one torch.compile'd region while training, without CUDA graphs "
        "(--cuda-graphs replays these regions as graphs); needs fused ops",
    )
    how.add_argument(
        "--cuda-graphs",
        default=CUDA_GRAPHS,
        choices=["auto", "on", "off"],
        help="replay each decoder layer's compiled forward and checkpointed backward as CUDA graphs while "
        "training, so small micro-batches are not bound by the host launching kernels: auto = on one GPU with "
        "fused ops and no LoRA dropout when a micro-step holds at most "
        f"{GRAPHS_MAX_TOKENS_PER_MICRO_STEP} tokens (e.g. --batch-size 1); on also runs the same path on a "
        "CPU (without capture); each new "
        "length bucket (up to 8) records every layer again, which makes the first steps slower "
        f"[{CUDA_GRAPHS}]",
    )
    how.add_argument("--seed", type=int, default=SEED, help=f"seed for adapter init and data order [{SEED}]")

    saving = parser.add_argument_group("checkpoints (Ctrl-C always saves the adapter and a checkpoint)")
    saving.add_argument(
        "--save-steps",
        type=int,
        help="also save a resumable checkpoint (--output-dir/checkpoint-N) every N optimizer steps, keeping the "
        f"last {CHECKPOINTS_KEPT}; 0 = only on Ctrl-C [{SAVE_STEPS}; tiny {TINY_SAVE_STEPS}]",
    )
    saving.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue an interrupted run from the latest checkpoint-N in --output-dir, or from the CHECKPOINT "
        "directory given; pass the run's other flags unchanged",
    )
    saving.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --output-dir that holds an earlier one, first deleting that run's checkpoints "
        "and outputs (the recipe's own files only; a new run into such a folder is refused otherwise)",
    )

    report = parser.add_argument_group("reporting")
    report.add_argument(
        "--logging-steps", type=int, help=f"log the loss every N steps [{LOGGING_STEPS}; tiny {TINY_LOGGING_STEPS}]"
    )
    report.add_argument(
        "--show-generations",
        type=int,
        help="after training, greedily generate for N held-out prompts and print them next to the expected answer. "
        "For your own dataset the last N rows are held out of training for this [0; tiny "
        f"{TINY_SHOW_GENERATIONS}, from {TINY_HELDOUT_FILE.name}]",
    )
    distributed.add_arguments(parser)  # [distributed] --fsdp
    return parser


def negative_numbers_as_values(argv: list[str]) -> list[str]:
    """`--lr -1e-3` as `--lr=-1e-3`: argparse takes a word starting with '-' that is not a plain
    integer or decimal (1e-3 form, inf) for a flag, and stops at "expected one argument"."""
    joined, index = [], 0
    while index < len(argv):
        arg = argv[index]
        value = argv[index + 1] if index + 1 < len(argv) else None
        if arg.startswith("--") and "=" not in arg and value is not None and value.startswith("-"):
            with contextlib.suppress(ValueError):
                float(value)
                joined.append(f"{arg}={value}")
                index += 2
                continue
        joined.append(arg)
        index += 1
    return joined


def fill_in_defaults(args: argparse.Namespace, on_gpu: bool) -> argparse.Namespace:
    """Replace the unset (None) knobs with the tiny-demo or real-model defaults."""
    tiny = args.model is None

    def default(name, real_value, tiny_value):
        if getattr(args, name) is None:
            setattr(args, name, tiny_value if tiny else real_value)

    if args.packing is None:
        args.packing = on_gpu
    if args.load_in_4bit is None:
        args.load_in_4bit = on_gpu
    if args.optim is None:
        args.optim = GPU_OPTIMIZER if on_gpu else CPU_OPTIMIZER
    default("max_seq_length", MAX_SEQ_LENGTH, TINY_MAX_SEQ_LENGTH)
    # Packed training on a GPU with neither --batch-size nor --grad-accum given: keep the defaults'
    # tokens per optimizer step, and let run() put as many of its rows in each micro-step as memory
    # allows (recipes/batch_sizing.py: small micro-steps leave the GPU waiting on the host).
    args.auto_micro_batch = on_gpu and bool(args.packing) and not tiny and args.batch_size is None \
        and args.grad_accum is None
    if args.packing:
        default("batch_size", BATCH_SIZE_PACKED, TINY_BATCH_SIZE_PACKED)
    else:
        default("batch_size", BATCH_SIZE_UNPACKED, TINY_BATCH_SIZE_UNPACKED)
    default("grad_accum", GRAD_ACCUM, TINY_GRAD_ACCUM)
    default("lr", LEARNING_RATE, TINY_LEARNING_RATE)
    default("max_steps", -1, TINY_MAX_STEPS if args.epochs is None else -1)
    if args.epochs is None:
        args.epochs = EPOCHS
    default("logging_steps", LOGGING_STEPS, TINY_LOGGING_STEPS)
    default("save_steps", SAVE_STEPS, TINY_SAVE_STEPS)
    default("show_generations", 0, TINY_SHOW_GENERATIONS)
    args.warmup = TINY_WARMUP if tiny else WARMUP
    return args


# ---------------------------------------------------------------------------------------
# Checks that run before anything is loaded or written. Each raises a RecipeError.
# ---------------------------------------------------------------------------------------
def check_flags(args: argparse.Namespace) -> None:
    """The numbers. No I/O and no imports, so a typo is answered at once."""
    for flag, value in [
        ("--max-seq-length", args.max_seq_length),
        ("--batch-size", args.batch_size),
        ("--grad-accum", args.grad_accum),
        ("--lora-r", args.lora_r),
        ("--lora-alpha", args.lora_alpha),
        ("--logging-steps", args.logging_steps),
    ]:
        if value is not None and value < 1:
            raise RecipeError(f"{flag} must be a whole number of at least 1, got {value}")
    for flag, value in [("--lr", args.lr), ("--epochs", args.epochs)]:
        if value is not None and not (math.isfinite(value) and value > 0):  # also refuses nan and inf
            raise RecipeError(f"{flag} must be a number above 0, got {value}")
    if not 0 <= args.lora_dropout < 1:
        raise RecipeError(f"--lora-dropout must be at least 0 and below 1, got {args.lora_dropout}")
    if args.max_steps is not None and args.max_steps < 1 and args.max_steps != -1:
        raise RecipeError(f"--max-steps must be at least 1 (or -1: train for --epochs), got {args.max_steps}")
    if args.save_steps is not None and args.save_steps < 0:
        raise RecipeError(f"--save-steps must be at least 1 (or 0: save only on Ctrl-C), got {args.save_steps}")
    if args.show_generations is not None and args.show_generations < 0:
        raise RecipeError(f"--show-generations must be 0 or more, got {args.show_generations}")
    if not 0 <= args.seed < 2**32:  # numpy's seed range
        raise RecipeError(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    if args.overwrite and args.resume is not None:
        raise RecipeError("--overwrite starts a new run and --resume continues the earlier one: give one of them")


def check_output_dir(output_dir: Path) -> None:
    """An existing, writable directory, or one that can be created."""
    if output_dir.exists():
        if not output_dir.is_dir():
            raise RecipeError(f"--output-dir {output_dir} is a file, not a directory")
        if not os.access(output_dir, os.W_OK | os.X_OK):
            raise RecipeError(f"--output-dir {output_dir} is not writable")
        return
    ancestor = output_dir.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RecipeError(f"--output-dir {output_dir} cannot be created: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RecipeError(f"--output-dir {output_dir} cannot be created: {ancestor} is not writable")


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The Trainer's checkpoint-N directory with the highest N (None if there is none)."""
    checkpoints = [
        path
        for path in output_dir.glob("checkpoint-*")
        if path.name.removeprefix("checkpoint-").isdigit() and (path / "trainer_state.json").is_file()
    ]
    return max(checkpoints, key=lambda path: int(path.name.removeprefix("checkpoint-")), default=None)


# What the recipe (through the Trainer and PEFT) writes into --output-dir, besides checkpoint-N folders.
RUN_OUTPUT_FILES = [
    "trainer_state.json", "recipe_summary.json", "adapter_model.safetensors", "adapter_config.json",
    "training_args.bin", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja",
]
EARLIER_RUN_MARKERS = ["trainer_state.json", "recipe_summary.json", "adapter_model.safetensors", "adapter_config.json"]


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


def remove_earlier_run(output_dir: Path) -> list[Path]:
    """--overwrite: delete the recipe's own checkpoints and outputs from output_dir, nothing else."""
    import shutil

    removed = [*checkpoint_dirs(output_dir), *(output_dir / name for name in RUN_OUTPUT_FILES)]
    removed.append(output_dir / "tiny_base_model")
    card = output_dir / "README.md"  # PEFT's model card; a README of the user's stays
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if card.is_file() and "library_name: peft" in card.read_text(encoding="utf-8"):
            removed.append(card)
    removed = [path for path in removed if path.exists()]
    for path in removed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return removed


def check_new_run(args: argparse.Namespace) -> None:
    """A new run never mixes its checkpoints and outputs with an earlier run's in one folder."""
    if args.resume is not None or args.overwrite:
        return
    if found := earlier_run(Path(args.output_dir)):
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise RecipeError(
            f"--output-dir {args.output_dir} holds an earlier run ({shown}): continue it with --resume, or start "
            "over with --overwrite (deletes that run's checkpoints and outputs), or give another --output-dir"
        )


class RecipeFinished(Exception):
    """--resume on a run that already reached its planned steps: one line, nothing trained, exit status 0."""


def read_state(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("global_step"), int) else None


def planned_end(args: argparse.Namespace, state: dict) -> str | None:
    """Why a run in `state` has nothing left to train under these flags (None when it has)."""
    max_steps = args.max_steps
    if max_steps is None:  # fill_in_defaults' choice, known before it runs
        max_steps = TINY_MAX_STEPS if args.model is None and args.epochs is None else -1
    step = state["global_step"]
    if max_steps > 0:
        return f"step {step} of --max-steps {max_steps}" if step >= max_steps else None
    epochs = args.epochs if args.epochs is not None else EPOCHS
    state_steps, epoch = state.get("max_steps") or 0, state.get("epoch") or 0.0
    # The Trainer's epoch counter can end a hair below a whole epoch when the last accumulation is short.
    if 0 < state_steps <= step and epoch >= epochs - 0.01:
        return f"step {step}, the end of --epochs {epochs:g}"
    return None


def check_resume(args: argparse.Namespace) -> None:
    """Turn --resume into a checkpoint directory that exists and has steps left to train."""
    if args.resume is None:
        return
    output_dir = Path(args.output_dir)
    if args.resume == "latest":
        checkpoint = latest_checkpoint(output_dir)
        # The folder's own trainer_state.json (saved at the end) can be past the last periodic checkpoint.
        candidates = [output_dir, *([checkpoint] if checkpoint else [])]
    else:
        checkpoint = Path(args.resume)
        if not (checkpoint / "trainer_state.json").is_file():
            raise RecipeError(f"--resume {args.resume} is not a training checkpoint (no trainer_state.json in it)")
        candidates = [checkpoint]
    states = [(state, where) for where in candidates if (state := read_state(where / "trainer_state.json"))]
    if states:
        state, where = max(states, key=lambda pair: pair[0]["global_step"])
        if (end := planned_end(args, state)) is not None:
            raise RecipeFinished(
                f"the run in {display_path(where)} already finished ({end}): nothing to resume; raise --max-steps "
                "or --epochs to train further, or start over with --overwrite"
            )
    if checkpoint is None:
        raise RecipeError(
            f"--resume: no checkpoint-N directory in {args.output_dir} to continue from (one is saved on "
            "Ctrl-C and every --save-steps); give the run's --output-dir, or a checkpoint: --resume DIR"
        )
    args.resume = str(checkpoint)


def first_line(error: BaseException) -> str:
    """The first line of the most specific message in an exception chain: wrappers such as
    datasets' "An error occurred while generating the dataset" hide the reason in __cause__."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    for candidate in reversed(chain):
        text = str(candidate).strip()
        if text:
            return text.splitlines()[0]
    return type(error).__name__


def is_hub_name(name: str) -> bool:
    """owner/name and nothing on disk under that name."""
    return HUB_ID.fullmatch(name) is not None and not Path(name).exists()


def check_hub_repo(name: str, repo_type: str, flag: str) -> None:
    """One quick look at the hub, so that a typo or no network fails within seconds instead of
    after the libraries' ~30 s of retries. With HF_HUB_OFFLINE set, the local cache is all there
    is: the loaders read it (and fail at once when the name is not cached)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return
    try:
        HfApi().repo_info(name, repo_type=repo_type, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise RecipeError(gated_message(name, repo_type, flag)) from None
    except RepositoryNotFoundError:
        raise RecipeError(
            f"{flag} {name!r}: no such {repo_type} on the Hugging Face Hub, and no such local path "
            "(a private one needs `hf auth login` or HF_TOKEN)"
        ) from None
    except Exception as error:  # no network, proxy, DNS, timeout, server error
        raise RecipeError(
            f"{flag} {name!r}: cannot reach the Hugging Face Hub ({first_line(error)}); without a network, "
            "set HF_HUB_OFFLINE=1 to use a copy in the local cache"
        ) from None


def gated_message(name: str, repo_type: str, flag: str) -> str:
    url = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{name}"
    return f"{flag} {name!r} is gated: accept its license at {url}, then log in (`hf auth login` or HF_TOKEN)"


def check_model_type(config: object, where: str) -> None:
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "gemma2":
        raise RecipeError(
            f"--model {where} is a {model_type!r} model; this recipe fine-tunes Gemma 2 only "
            "(config model_type 'gemma2', e.g. google/gemma-2-2b or google/gemma-2-9b)"
        )


def check_model_source(name: str) -> dict:
    """A local model directory (config, weights, tokenizer), or a Gemma 2 repository on the hub.
    Reads config.json only, and returns it."""
    if is_hub_name(name):
        check_hub_repo(name, "model", "--model")
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError

        try:
            config_file = hf_hub_download(name, "config.json")
        except GatedRepoError:
            raise RecipeError(gated_message(name, "model", "--model")) from None
        except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: first)
            offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
            raise RecipeError(f"--model {name!r} is not in the local Hugging Face cache{offline}") from None
        except EntryNotFoundError:
            raise RecipeError(f"--model {name!r} has no config.json on the hub: not a transformers model") from None
        except Exception as error:
            raise RecipeError(f"--model {name!r}: cannot read its config.json ({first_line(error)})") from None
        config = json.loads(Path(config_file).read_text())
        check_model_type(config, repr(name))
        return config

    path = Path(name).expanduser()
    if not path.exists():
        raise RecipeError(f"--model {name}: no such directory (a hub model is named like google/gemma-2-2b)")
    if not path.is_dir():
        raise RecipeError(f"--model {name} is a file; give the directory holding config.json, weights and tokenizer")
    if not any(path.iterdir()):
        raise RecipeError(f"--model {name} is an empty directory; expected config.json, weights and a tokenizer")
    if not (path / "config.json").is_file():
        raise RecipeError(f"--model {name} has no config.json: not a saved transformers model directory")
    try:
        config = json.loads((path / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise RecipeError(f"--model {name}: config.json is not valid JSON ({error})") from None
    check_model_type(config, name)
    if not any(any(path.glob(pattern)) for pattern in MODEL_WEIGHT_PATTERNS):
        raise RecipeError(f"--model {name} has a config but no weights (*.safetensors or *.bin)")
    if not any((path / file).is_file() for file in MODEL_TOKENIZER_FILES):
        raise RecipeError(f"--model {name} has no tokenizer ({' or '.join(MODEL_TOKENIZER_FILES)})")
    return config


def check_max_seq_length(args: argparse.Namespace, config: dict) -> None:
    """No longer than the model's positions (RoPE and the sliding window are set up for those)."""
    limit = config.get("max_position_embeddings")
    if isinstance(limit, int) and args.max_seq_length > limit:
        model = args.model or "the tiny demo model"
        raise RecipeError(
            f"--max-seq-length {args.max_seq_length} is longer than {model} handles: its config's "
            f"max_position_embeddings is {limit}; use --max-seq-length {limit} or less"
        )


def dataset_is_local(name: str) -> bool:
    return not is_hub_name(name) or Path(name).suffix.lower() in DATA_FILE_SUFFIXES


def check_dataset_source(name: str) -> None:
    """A non-empty local file of a supported type, or a dataset on the hub."""
    if not dataset_is_local(name):
        check_hub_repo(name, "dataset", "--dataset")
        return
    path = Path(name)
    if not path.exists():
        raise RecipeError(f"dataset file not found: {name}")
    if path.is_dir():
        raise RecipeError(f"--dataset {name} is a directory; give a .jsonl, .json or .parquet file")
    if path.suffix not in DATASET_FILE_TYPES:
        raise RecipeError(f"dataset file {name} must be .jsonl, .json or .parquet")
    if path.stat().st_size == 0:
        raise RecipeError(f"dataset file {name} is empty")


def check_device(args: argparse.Namespace, on_gpu: bool) -> None:
    """Flags that depend on the machine (after fill_in_defaults)."""
    import importlib.util

    if args.backend == "flex" and not on_gpu:
        raise RecipeError(
            "--backend flex needs a CUDA GPU (flex_attention's kernels are built with Triton); "
            "on a CPU use --backend compiled or eager"
        )
    fused_off = ("(--fused-ops off)" if args.fused_ops == "off"
                 else "(--fused-ops auto fuses on a GPU only)" if args.fused_ops == "auto" and not on_gpu else None)
    for asked, flag, what in ((args.compile_layers, "--compile-layers", "compiles the fused ops' layers"),
                              (args.cuda_graphs == "on", "--cuda-graphs on", "replays the fused ops' compiled layers")):
        if asked and fused_off:
            raise RecipeError(f"{flag} {what}, and fused ops are off here {fused_off}: add --fused-ops on, "
                              f"or drop {flag}")
    if args.cuda_graphs == "on" and args.lora_dropout > 0:
        raise RecipeError(f"--cuda-graphs on cannot replay LoRA dropout (--lora-dropout {args.lora_dropout}): "
                          "a graph repeats one random draw; use --lora-dropout 0 or --cuda-graphs off")
    # "auto" stays undecided until the micro-batch is known (run(), cuda_graphs_pay_off)
    if args.cuda_graphs != "auto" or not (on_gpu and args.fused_ops != "off" and args.lora_dropout == 0):
        args.cuda_graphs = args.cuda_graphs == "on"
    if args.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes")
    from transformers.training_args import OptimizerNames

    if args.optim not in {name.value for name in OptimizerNames}:
        raise RecipeError(
            f"--optim {args.optim!r} is not a transformers optimizer (e.g. adamw_torch, adamw_torch_fused, "
            "paged_adamw_8bit, adafactor)"
        )


def check_and_complete(args: argparse.Namespace) -> bool:
    """Every check that needs no weights and no dataset rows, then the defaults filled in.
    Returns whether training runs on a CUDA GPU."""
    check_flags(args)
    check_output_dir(Path(args.output_dir))
    check_resume(args)
    check_new_run(args)
    if args.model is not None:
        config = check_model_source(args.model)
    else:
        config = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    if args.dataset is not None:
        check_dataset_source(args.dataset)
    import torch

    on_gpu = torch.cuda.is_available()
    # [distributed] settings a launch cannot run (--fsdp without several GPU processes); FSDP's optimizer default
    if (problem := distributed.check_arguments(args, distributed.detect_launch(), on_gpu)) is not None:
        raise RecipeError(problem)
    fill_in_defaults(args, on_gpu)
    check_max_seq_length(args, config)
    check_device(args, on_gpu)
    return on_gpu


# ---------------------------------------------------------------------------------------
# Data (checked row by row before the weights load)
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_logger(name: str):
    """Silence a library's logger for a moment: its failures arrive as exceptions, which the
    recipe reports once, on one line (datasets also logs them, and with a root handler, twice)."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


def find_bad_json(path: Path) -> str | None:
    """Where a JSON / JSON-lines file stops being readable, e.g. 'line 7 is not valid JSON (...)'."""
    try:
        if path.suffix == ".json":  # one JSON document (array of rows), or JSON lines
            text = path.read_text(encoding="utf-8")
            try:
                json.loads(text)
                return None  # valid JSON: the problem is its layout, not its syntax
            except json.JSONDecodeError as error:
                first = next((line for line in text.splitlines() if line.strip()), "")
                try:
                    json.loads(first)  # the first line stands alone: JSON lines, scanned below
                except json.JSONDecodeError:
                    return f"line {error.lineno} is not valid JSON ({error.msg} at column {error.colno})"
        rows = 0
        with open(path, encoding="utf-8") as lines:  # JSON lines: one object per line
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip("\r\n"))  # (keeps error.colno on this line)
                except json.JSONDecodeError as error:
                    return f"line {number} is not valid JSON ({error.msg} at column {error.colno})"
                if not isinstance(row, dict):
                    return f"line {number} is a JSON {type(row).__name__}, not an object like {{\"text\": ...}}"
                rows += 1
        return None if rows else "it has no rows (only blank lines)"
    except UnicodeDecodeError as error:
        return f"it is not UTF-8 text ({error.reason} at byte {error.start})"


def load_training_dataset(name: str, split: str):
    from datasets import load_dataset

    if not dataset_is_local(name):
        from huggingface_hub import constants

        try:
            with quiet_logger("datasets"):
                return load_dataset(name, split=split)
        except Exception as error:
            offline = "; HF_HUB_OFFLINE is set, so only the local cache is read" if constants.HF_HUB_OFFLINE else ""
            raise RecipeError(
                f"cannot load dataset {name!r} (split {split!r}) from the hub: {first_line(error)}{offline}"
            ) from None
    path = Path(name)
    try:
        with quiet_logger("datasets"):
            return load_dataset(DATASET_FILE_TYPES[path.suffix], data_files=str(path), split="train")
    except Exception as error:
        reason = (find_bad_json(path) if path.suffix in (".json", ".jsonl") else None) or first_line(error)
        raise RecipeError(f"cannot read dataset file {name}: {reason}") from None


def dataset_format(dataset, name: str) -> str:
    """'chat', 'prompt-completion' or 'text', from the columns, or a RecipeError naming them."""
    columns = dataset.column_names
    if len(dataset) == 0:
        raise RecipeError(f"dataset {name} has no rows")
    if "messages" in columns:
        return "chat"
    if "prompt" in columns and "completion" in columns:
        return "prompt-completion"
    if "text" in columns:
        return "text"
    raise RecipeError(
        f"dataset {name} has no usable column: found {columns}; expected 'messages' (chat), "
        "'prompt' and 'completion', or 'text'"
    )


def split_off_heldout(dataset, count: int):
    """The last `count` rows become held-out prompts for the closing generations."""
    count = min(count, len(dataset) - 1)
    if count <= 0:
        return dataset, dataset.select([])
    return dataset.select(range(len(dataset) - count)), dataset.select(range(len(dataset) - count, len(dataset)))


def document_text(row: dict, data_format: str, tokenizer) -> str:
    """The whole training document as text, the way TRL renders it before tokenizing."""
    if data_format == "chat":
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    if data_format == "prompt-completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):  # conversational prompt/completion
            return tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        return prompt + completion
    return row["text"]


def check_document_lengths(dataset, data_format: str, tokenizer, max_length: int, name: str) -> None:
    """Tokenize the first rows: refuse a --max-seq-length that no document fits in (TRL would drop
    or truncate them all), say how many are truncated otherwise. Also catches rows the chat
    template cannot render, before any weights load."""
    rows = dataset.select(range(min(LENGTH_CHECK_ROWS, len(dataset))))
    texts = []
    for index, row in enumerate(rows):
        try:
            texts.append(document_text(row, data_format, tokenizer))
        except Exception as error:
            raise RecipeError(
                f"dataset {name}, row {index} (counting from 0): cannot render it for training ({first_line(error)})"
            ) from None
    lengths = [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # + EOS
    which = f"the {len(lengths):,} documents" if len(rows) == len(dataset) else f"the first {len(lengths):,} documents"
    too_long = sum(length > max_length for length in lengths)
    if too_long == len(lengths):
        raise RecipeError(
            f"no document fits in --max-seq-length {max_length}: the shortest of {which} is {min(lengths):,} "
            f"tokens (the longest {max(lengths):,}); raise --max-seq-length"
        )
    if too_long:
        print(
            f"lengths      {too_long:,} of {which} are longer than --max-seq-length {max_length} and get "
            f"truncated (longest {max(lengths):,} tokens)"
        )


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------
def build_tiny_gemma2(seed: int = TINY_INIT_SEED):
    """The demo's base model: the shipped tiny Gemma 2 config with seeded random weights (float32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(TINY_MODEL_DIR)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")


def save_tiny_base_model(directory: Path) -> Path:
    """Write the tiny random model and its tokenizer to disk, so it loads like any checkpoint
    (same code path as a real model, 4-bit included) and the saved adapter has a base to point to."""
    from transformers import AutoTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_gemma2().save_pretrained(directory)
    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(directory)
    return directory


def compute_dtype(on_gpu: bool):
    import torch

    # bf16 is Gemma 2's native precision (fp16 overflows in its activations); CPUs train in fp32.
    if on_gpu and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_base_model(model_source: str, load_in_4bit: bool, on_gpu: bool, fsdp: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(on_gpu)
    quantization_config = None
    if load_in_4bit:
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=distributed.quantization_storage(fsdp, dtype),  # [distributed] FSDP shards floats
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_source,
        dtype=dtype,
        quantization_config=quantization_config,
        # [distributed] The current device is this rank's GPU (distributed.use_this_ranks_device). Under FSDP a
        # bf16 base loads to CPU and FSDP moves each rank's shard to its GPU; a 4-bit one is quantised on the GPU.
        device_map={"": torch.cuda.current_device()} if on_gpu and not fsdp else None,
        # Gemma 2 needs softcapping, which sdpa lacks; eager is HF's exact path, and what
        # fastgemma leaves in place for anything it does not take over.
        attn_implementation="eager",
    )
    if load_in_4bit:
        prepare_4bit_model_for_training(model)
    return model


def prepare_4bit_model_for_training(model) -> None:
    """The parts of peft's prepare_model_for_kbit_training that a 4-bit Gemma 2 needs.

    Freeze the base, and feed gradients into the (frozen) embeddings' output so checkpointed
    layers get a graph. Unlike peft's helper, the embeddings (256k x hidden, tied with the
    LM head) stay in bf16 instead of being copied to fp32: that copy would cost more GPU
    memory than all the 4-bit layers of Gemma 2 2B, and Gemma2RMSNorm already normalises
    in fp32. Gradient checkpointing itself is switched on by SFTConfig.
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.enable_input_require_grads()


def lora_config(args: argparse.Namespace):
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=LORA_TARGET_MODULES,
        bias="none",
        task_type="CAUSAL_LM",
    )


def describe_model(model: str | None, base_dir: str, precision: str) -> str:
    if model is None:
        model = f"tiny random-init Gemma 2 ({TINY_MODEL_DIR.name}, seed {TINY_INIT_SEED}), base saved in {base_dir}"
    return f"{model}, {precision}"


# ---------------------------------------------------------------------------------------
# Trainer callbacks. Built by a function because transformers is imported only after the checks.
# ---------------------------------------------------------------------------------------
def recipe_callbacks() -> dict:
    from transformers import TrainerCallback

    launch = distributed.detect_launch()  # [distributed] for Ctrl-C under a launcher
    from transformers.trainer_callback import ProgressCallback

    class StepClock(TrainerCallback):
        """Wall-clock time at the end of every optimizer step, for throughput after the first
        step of this run (which includes torch.compile's warm-up)."""

        def __init__(self):
            self.start_step = 0
            self.step_end_times: dict[int, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_step = state.global_step  # > 0 when resuming

        def on_step_end(self, args, state, control, **kwargs):
            self.step_end_times[state.global_step] = time.perf_counter()

    class LogLastStep(TrainerCallback):
        """Log the final step too, so the summary's last loss is the end of training even when
        --max-steps is not a multiple of --logging-steps."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True

    class StopOnInterrupt(TrainerCallback):
        """Ctrl-C sets a flag instead of raising KeyboardInterrupt in the middle of a step (and
        of an optimizer update): the step in flight finishes, then the trainer logs, saves a
        checkpoint and stops. A second Ctrl-C raises KeyboardInterrupt as usual. Under a launcher
        the ranks see the signal at different points of a step, so they agree (an all-reduce)
        on whether anyone saw it before stopping."""

        def __init__(self):
            self.signalled = False  # set by the handler only, never cleared
            self.interrupted = False  # every rank agreed to stop

        def handle(self, signum, frame):
            self.signalled = True
            if launch.distributed:
                # [distributed] torchrun passes Ctrl-C on to every worker and then sends its own SIGINT (and
                # SIGKILL 30 s later), so a second SIGINT here is not a second Ctrl-C: keep saving.
                if launch.is_main:
                    print("\nCtrl-C: every rank finishes this step, then rank 0 saves a checkpoint and the adapter",
                          file=sys.stderr, flush=True)
                return
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C quits at once
            print(
                "\nCtrl-C: finishing this step, then saving a checkpoint and the adapter "
                "(Ctrl-C again quits without saving)",
                file=sys.stderr,
                flush=True,
            )

        @contextlib.contextmanager
        def installed(self):
            # Signal handlers can only be set from the main thread; elsewhere Ctrl-C is not ours.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = signal.signal(signal.SIGINT, self.handle)
            try:
                yield
            finally:
                signal.signal(signal.SIGINT, previous)

        def on_step_end(self, args, state, control, **kwargs):
            # [distributed] Ctrl-C reaches the ranks at different points of a step: all stop after the same one.
            # The handler writes a flag of its own: a signal that lands while this rank waits in the
            # all-reduce runs the handler before the result is stored, and would be overwritten.
            if distributed.any_rank(launch, self.signalled):
                self.interrupted = True
            if self.interrupted:
                control.should_log = True
                control.should_save = True
                control.should_training_stop = True

    class LossOnProgressBar(ProgressCallback):
        """Trainer's progress bar, with the latest loss on it instead of a printed dict per log."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and "loss" in (logs or {}):
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")

    return {
        "clock": StepClock(),
        "last_step": LogLastStep(),
        "interrupt": StopOnInterrupt(),
        "progress": LossOnProgressBar(),
    }


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------
def display_path(path: str | Path) -> str:
    """Relative to the current directory when inside it: shorter, and the same on every machine."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def peak_memory_text(on_gpu: bool) -> str:
    if on_gpu:
        import torch

        allocated = torch.cuda.max_memory_allocated() / 2**20
        reserved = torch.cuda.max_memory_reserved() / 2**20
        return f"{allocated:,.0f} MiB CUDA peak allocated ({reserved:,.0f} MiB peak reserved)"
    max_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{max_rss_kib / 1024:,.0f} MiB process max RSS (CPU run)"


def training_numbers(log_history: list[dict], step_end_times: dict, start_step: int, runtime: float,
                     launch: distributed.Launch | None = None) -> dict:
    """Tokens, throughput and losses of this run (after start_step, when resuming) from the log.
    [distributed] Under a launcher: for all ranks together (every rank must call this), per GPU beside it."""
    launch = launch or distributed.Launch()
    # TRL counts num_tokens from 0 in each run; the log history of a resumed run also holds the earlier steps.
    # Its counts already cover every rank; the time is the slowest rank's.
    token_logs = [(e["step"], e["num_tokens"]) for e in log_history if "num_tokens" in e and e["step"] > start_step]
    losses = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    numbers = {"tokens": 0, "tokens_per_s": math.nan, "warm_from_step": None, "warm_tokens_per_s": math.nan,
               "late_from_step": None, "late_tokens_per_s": math.nan}
    runtime = distributed.slowest(launch, runtime)

    def seconds_between(first, last):
        mine = None
        if first in step_end_times and last in step_end_times and last > first:
            mine = step_end_times[last] - step_end_times[first]
        return distributed.slowest(launch, mine)  # every rank calls this the same number of times

    if token_logs:
        last_step, total_tokens = token_logs[-1]
        numbers["tokens"] = int(total_tokens)
        numbers["tokens_per_s"] = total_tokens / runtime
        first_step, first_tokens = token_logs[0]
        if (seconds := seconds_between(first_step, last_step)) is not None:
            numbers["warm_from_step"] = first_step
            numbers["warm_tokens_per_s"] = (total_tokens - first_tokens) / seconds
        # The second half of the steps: steady state, past any compile of a later step.
        middle_step, middle_tokens = next(t for t in token_logs if t[0] >= (first_step + last_step) // 2)
        if (seconds := seconds_between(middle_step, last_step)) is not None:
            numbers["late_from_step"] = middle_step
            numbers["late_tokens_per_s"] = (total_tokens - middle_tokens) / seconds
    numbers["first_loss"] = list(losses[0]) if losses else None  # [step, loss]
    numbers["last_loss"] = list(losses[-1]) if losses else None
    numbers["world_size"] = launch.world_size
    numbers.update(distributed.per_gpu(launch, numbers, ("tokens_per_s", "warm_tokens_per_s", "late_tokens_per_s")))
    return numbers


def summary_lines(summary: dict) -> list[str]:
    """The closing summary, as printed (recipes/README.md shows one; a test keeps the two alike)."""
    steps, runtime, tokens = summary["steps"], summary["train_runtime_s"], summary["tokens"]
    if summary["resumed_from_step"]:
        done = f"resumed from step {summary['resumed_from_step']}, {steps - summary['resumed_from_step']} in this run"
        steps_line = f"{steps} optimizer steps ({done}: {runtime:.1f} s, {tokens:,} tokens)"
    else:
        steps_line = f"{steps} optimizer steps in {runtime:.1f} s, {tokens:,} tokens"
    world = summary.get("world_size", 1)

    def rate(key):  # [distributed] the whole job's rate, the per-GPU one beside it
        text = f"{summary[key]:,.0f} tokens/s"
        return text + (f" ({summary[key + '_per_gpu']:,.0f} per {summary['per']})" if world > 1 else "")

    throughput = "n/a"
    if tokens:
        throughput = f"{rate('tokens_per_s')} over the whole run"
    if summary["warm_from_step"] is not None:
        throughput += f", {rate('warm_tokens_per_s')} after step {summary['warm_from_step']} (warm)"
    if world > 1:
        throughput += f"; all {world} processes together"
    lines = [
        "=" * 30 + " fastgemma SFT summary " + "=" * 30,
        f"model        {summary['model']}",
        f"attention    fastgemma, backend={summary['backend']}, fused ops {summary['fused_ops']}"
        + (f", CUDA-graphed layers (recorded at {len(summary.get('cuda_graph_lengths') or [])} lengths)"
           if summary.get("cuda_graphs") else ", compiled layers" if summary.get("compile_layers") else ""),
    ]
    if world > 1:
        lines.append(f"processes    {summary['processes']}")
    lines += [
        f"steps        {steps_line}",
        f"throughput   {throughput}",
        f"peak memory  {summary['peak_memory']}",
    ]
    if summary.get("micro_batch_auto"):  # chosen from the GPU's free memory (recipes/batch_sizing.py)
        lines.append(f"micro-batch  {summary['batch_size']} row(s) x {summary['grad_accum']} accumulation step(s), "
                     "sized to the GPU's memory")
    if summary.get("peak_memory_per_rank"):
        lines.append(f"             {summary['peak_memory_per_rank']}")
    if summary["first_loss"] and summary["last_loss"]:
        (first_step, first), (last_step, last) = summary["first_loss"], summary["last_loss"]
        lines.append(
            f"loss         first {first:.4f} (step {first_step}) -> last {last:.4f} (step {last_step}), "
            f"{(last / first - 1) * 100:+.0f}%"
        )
    lines += [
        f"adapter      {display_path(summary['output_dir'])}",
        "             (adapter_model.safetensors, adapter_config.json, tokenizer, trainer_state.json)",
        "=" * 83,
    ]
    return lines


@dataclass
class HeldOutExample:
    model_prompt: str  # exactly what the model sees (chat-templated where needed)
    shown_prompt: str  # what a person reads: the last user message, or the plain prompt
    expected: str


def held_out_example(row: dict, tokenizer) -> HeldOutExample | None:
    """A generation prompt and its expected answer; None for a chat without an assistant turn."""
    if "messages" in row:
        messages = row["messages"]
        answers = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        if not answers:
            return None
        context = messages[: answers[-1]]
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        return HeldOutExample(prompt, context[-1]["content"], messages[answers[-1]]["content"])
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):  # conversational prompt/completion
        templated = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return HeldOutExample(templated, prompt[-1]["content"], completion[-1]["content"])
    return HeldOutExample(prompt, prompt, completion)


def show_generations(model, tokenizer, heldout) -> list[dict]:
    """Greedy generations from the trained adapter, next to the expected answers."""
    import torch

    examples = [example for row in heldout if (example := held_out_example(row, tokenizer)) is not None]
    if not examples:
        return []
    model.eval()
    stop_ids = [tokenizer.eos_token_id]
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        stop_ids.append(end_of_turn)  # Gemma ends a chat turn with <end_of_turn>
    device = next(model.parameters()).device
    results = []
    print(f"\nGreedy generations from the trained adapter on {len(examples)} held-out prompts:")
    for example in examples:
        # Chat templates already start with <bos>; plain prompts get it from the tokenizer.
        starts_with_bos = example.model_prompt.startswith(tokenizer.bos_token)
        inputs = tokenizer(example.model_prompt, return_tensors="pt", add_special_tokens=not starts_with_bos).to(device)
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=GENERATION_MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
        generated = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        expected = example.expected.strip()
        correct = generated == expected
        print(f"  [{'ok' if correct else '--'}] {example.shown_prompt!r:34} expected {expected!r:20} got {generated!r}")
        results.append(
            {"prompt": example.shown_prompt, "expected": expected, "generated": generated, "correct": correct}
        )
    print(f"  {sum(result['correct'] for result in results)}/{len(results)} exactly right")
    return results


# ---------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------
def run(args: argparse.Namespace, on_gpu: bool) -> dict:
    """Train, after check_and_complete(args). Returns the summary; raises RecipeError (bad data)
    or RecipeInterrupted (Ctrl-C, after saving)."""
    # The heavy imports, now that the flags are known to be good.
    import datasets
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    import fastgemma

    datasets.disable_progress_bars()  # keep the console for the training progress bar
    output_dir = Path(args.output_dir)
    tiny = args.model is None
    # [distributed] Under torchrun / accelerate launch: this process's place, and its own GPU before any CUDA work.
    launch = distributed.detect_launch()
    distributed.use_this_ranks_device(launch, on_gpu)

    # 1. Data and tokenizer: every row readable, documents that fit. Still nothing written.
    dataset_name = args.dataset or str(TINY_TRAIN_FILE)
    dataset = load_training_dataset(dataset_name, args.dataset_split)
    data_format = dataset_format(dataset, dataset_name)
    shown_name = display_path(dataset_name) if dataset_is_local(dataset_name) else dataset_name
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR if tiny else args.model)
    if data_format == "chat" and tokenizer.chat_template is None:
        # Base checkpoints may ship without a template: use Gemma's turn format (with the
        # {% generation %} markers that assistant-only loss needs).
        tokenizer.chat_template = (TINY_MODEL_DIR / "chat_template.jinja").read_text()
    check_document_lengths(dataset, data_format, tokenizer, args.max_seq_length, shown_name)
    if args.dataset is None:
        heldout = load_dataset("json", data_files=str(TINY_HELDOUT_FILE), split="train")
        heldout = heldout.select(range(min(args.show_generations, len(heldout))))
    elif data_format != "text":
        dataset, heldout = split_off_heldout(dataset, args.show_generations)
    else:
        heldout = dataset.select([])  # plain text has no expected answer to compare with
    print(f"dataset      {shown_name}: {len(dataset):,} {data_format} examples ({len(heldout)} held out)")

    if args.overwrite and launch.is_main:  # every check has passed: only now is the earlier run deleted
        if removed := remove_earlier_run(output_dir):
            print(f"overwrite    deleted the earlier run's {', '.join(path.name for path in removed)} "
                  f"from {display_path(output_dir)}")

    # 2. Base model. The tiny demo's random weights go through the same loading path.
    precision = "4-bit NF4" if args.load_in_4bit else str(compute_dtype(on_gpu))
    if tiny:
        # [distributed] other ranks build the same seeded weights in a private temporary directory
        base_dir = distributed.tiny_base_model_dir(launch, output_dir.resolve() / "tiny_base_model")
        with transformers_progress_bars_off():  # instant for a 3M-parameter model
            model_source = str(save_tiny_base_model(base_dir))
            model = load_base_model(model_source, args.load_in_4bit, on_gpu, fsdp=args.fsdp)
    else:
        model_source = args.model
        model = load_base_model(model_source, args.load_in_4bit, on_gpu, fsdp=args.fsdp)
    model_description = describe_model(args.model, display_path(model_source), precision)
    print(f"model        {model_description}")
    if args.load_in_4bit and not on_gpu:
        print("             (4-bit on a CPU runs bitsandbytes' slow reference kernels: it checks the path, not speed)")

    distributed.join(launch, on_gpu)  # [distributed] the process group, now that every rank has its model
    micro_batch = None
    if args.auto_micro_batch:
        from recipes.batch_sizing import choose_micro_batch, resumed_micro_batch

        rows_per_step = args.batch_size * args.grad_accum
        # A resumed run keeps its checkpoint's micro-batch: the Trainer skips seen data by counting batches.
        choice = resumed_micro_batch(args.resume, rows_per_step) if args.resume else None
        if choice is None:
            device = next(model.parameters()).device
            # [distributed] every rank sizes from the least free memory of all, so all choose the same micro-batch
            free = distributed.least(launch, torch.cuda.mem_get_info(device)[0])
            choice = choose_micro_batch(rows_per_step, args.max_seq_length, free, model.config)
        args.batch_size, args.grad_accum, micro_batch = choice.batch_size, choice.grad_accum, choice.reason
        print(f"micro-batch  {choice.reason} (set --batch-size / --grad-accum to choose)")
    if args.cuda_graphs == "auto":
        args.cuda_graphs, why = cuda_graphs_pay_off(args.batch_size, args.max_seq_length, launch.world_size)
        print(f"cuda graphs  {why} (--cuda-graphs on/off to choose)")

    # 3. fastgemma: swap in exact softcapped attention (per module instance, so PEFT
    #    wrapping by the trainer afterwards keeps it). Padding-free packing flattens the
    #    whole micro-batch into one row, so the longest row is batch_size x max length.
    longest_row = args.max_seq_length * (args.batch_size if args.packing else 1)
    fused_ops = {"auto": "auto", "on": True, "off": False}[args.fused_ops]
    fastgemma.patch_model(model, max_seq_length=longest_row, backend=args.backend, fused_ops=fused_ops,
                          compile_layers=args.compile_layers, cuda_graphs=args.cuda_graphs)

    # 4. LoRA + TRL. transformers renamed gradient_checkpointing to activation_checkpointing
    #    (same switch); use whichever this version has.
    checkpointing = "gradient_checkpointing"
    if "activation_checkpointing" in SFTConfig.__dataclass_fields__:
        checkpointing = "activation_checkpointing"
    config = SFTConfig(
        output_dir=str(output_dir),
        max_length=args.max_seq_length,
        packing=args.packing,
        packing_strategy="bfd",  # best-fit decreasing, padding-free: position ids restart per document
        assistant_only_loss=data_format == "chat",  # prompt/completion data gets completion-only loss by default
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        lr_scheduler_type=LR_SCHEDULER,
        warmup_steps=args.warmup,
        optim=args.optim,
        weight_decay=0.0,
        # Gradient (activation) checkpointing: recompute each layer's activations in backward.
        # [distributed] Non-reentrant: what DDP and FSDP need (each LoRA gradient is ready once).
        **{checkpointing: True, f"{checkpointing}_kwargs": {"use_reentrant": False}},
        bf16=compute_dtype(on_gpu) == torch.bfloat16,
        logging_steps=args.logging_steps,
        logging_first_step=True,  # the first loss, for the summary
        save_strategy="steps" if args.save_steps else "no",  # Ctrl-C saves a checkpoint either way
        save_steps=args.save_steps or SAVE_STEPS,  # (unused when save_strategy is "no")
        save_total_limit=CHECKPOINTS_KEPT,
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        dataloader_pin_memory=on_gpu,
        **distributed.trainer_settings(launch, on_gpu, args.fsdp),  # [distributed] gloo on CPU, timeout, FSDP
    )
    callbacks = recipe_callbacks()
    # The same SFTTrainer, without its host stalls between micro-steps (fastgemma/trainer.py says which).
    trainer = fastgemma.lean_trainer(SFTTrainer)(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(args),
        callbacks=[callbacks["clock"], callbacks["last_step"], callbacks["interrupt"]],
    )
    trainer.remove_callback(ProgressCallback)  # it prints every logged dict under the bar
    trainer.remove_callback(PrinterCallback)  # (its stand-in when tqdm is off) prints them too
    trainer.add_callback(callbacks["progress"])
    if len(trainer.train_dataset) == 0:  # what check_document_lengths could not see past its first rows
        raise RecipeError(f"no training example is left after truncating to --max-seq-length {args.max_seq_length}")
    trainable, total = trainer.model.get_nb_trainable_parameters()
    print(
        f"lora         r={args.lora_r}, alpha={args.lora_alpha} on {', '.join(LORA_TARGET_MODULES)}: "
        f"{trainable:,} trainable parameters ({100 * trainable / total:.2f}% of {total:,})"
    )
    if args.resume:
        print(f"resuming     from {display_path(args.resume)}")
    every = f"every {args.save_steps} step{'s' * (args.save_steps > 1)} and " if args.save_steps else ""
    print(f"checkpoints  {every}on Ctrl-C, in {display_path(output_dir)}/checkpoint-N (--resume continues)")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    try:
        with callbacks["interrupt"].installed():
            train_output = trainer.train(resume_from_checkpoint=args.resume)
    except KeyboardInterrupt:  # the second Ctrl-C
        if callbacks["progress"].training_bar is not None:
            callbacks["progress"].training_bar.close()  # now, not when garbage-collected after our last line
        checkpoint = latest_checkpoint(output_dir)
        kept = f"the last checkpoint is {display_path(checkpoint)}" if checkpoint else "no checkpoint was saved"
        raise RecipeInterrupted(
            f"interrupted again: quit at step {trainer.state.global_step} without saving; {kept}", bool(checkpoint)
        ) from None

    # 5. Save, report, and try the adapter on held-out prompts. [distributed] Every rank calls save_model and
    #    save_state (FSDP gathers the adapter for them); the Trainer writes from the main process only.
    trainer.save_model(str(output_dir))  # adapter_model.safetensors + adapter_config.json + tokenizer
    trainer.save_state()  # trainer_state.json (log history, steps)
    distributed.write_rank_checksum(launch, trainer)  # [distributed] test hook, off unless its variable is set
    if callbacks["interrupt"].interrupted:
        checkpoint = latest_checkpoint(output_dir)
        raise RecipeInterrupted(
            f"interrupted at step {trainer.state.global_step}/{trainer.state.max_steps}: adapter saved in "
            f"{display_path(output_dir)}, checkpoint {display_path(checkpoint)}"
        )
    clock = callbacks["clock"]
    summary = {
        "steps": trainer.state.global_step,
        "resumed_from_step": clock.start_step,
        "train_runtime_s": train_output.metrics["train_runtime"],
        **training_numbers(
            trainer.state.log_history, clock.step_end_times, clock.start_step, train_output.metrics["train_runtime"],
            launch,
        ),
        "model": model_description,
        "backend": args.backend,
        "fused_ops": args.fused_ops,
        "compile_layers": args.compile_layers,
        "cuda_graphs": args.cuda_graphs,
        "cuda_graph_lengths": fastgemma.cuda_graph_lengths(model) if args.cuda_graphs else [],
        "peak_memory": peak_memory_text(on_gpu),
        "output_dir": str(output_dir.resolve()),
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "micro_batch_auto": micro_batch,
    }
    # [distributed] every rank's peak, and what ran where
    summary["peak_memory_mib"] = distributed.peak_memory(launch, on_gpu)
    summary["peak_memory_per_rank"] = distributed.memory_line(launch, summary["peak_memory_mib"])
    summary["per"] = "GPU" if on_gpu else "process"
    summary["processes"] = (
        f"{launch.describe()}, {'FSDP' if args.fsdp else 'DDP'}; per-{summary['per']} batch {args.batch_size}"
    )
    print("\n" + "\n".join(summary_lines(summary)))
    summary["fastgemma_patched"] = fastgemma.is_patched(trainer.model)  # still patched after PEFT wrapping
    # [distributed] The main process generates and writes alone (an FSDP model would need every rank to
    # generate in lockstep, so it skips generating); the others wait for it in distributed.finish.
    if launch.is_main:
        try:
            summary["generations"] = [] if args.fsdp else show_generations(trainer.model, tokenizer, heldout)
        except KeyboardInterrupt:
            message = f"interrupted in the generations, after training; the adapter is in {display_path(output_dir)}"
            raise RecipeInterrupted(message, resumable=False) from None
        with open(output_dir / "recipe_summary.json", "w") as f:
            json.dump({**summary, "args": vars(args)}, f, indent=2, default=str)
    distributed.finish(launch)
    return summary


@contextlib.contextmanager
def transformers_progress_bars_off():
    from transformers.utils import logging as transformers_logging

    was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            transformers_logging.enable_progress_bar()


class DropMessages(logging.Filter):
    """Drop a library's log records that start with one of the given texts."""

    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


# Third-party log lines that mislead here, by logger. Everything else stays visible.
KNOWN_NOISE = {
    # Logged whenever bitsandbytes is imported on a CPU with AVX512-BF16 (peft imports it), even
    # when nothing is 4-bit. It names an optional faster kernel, not a failure: 4-bit still works.
    "bitsandbytes.backends.cpu.ops": DropMessages("Failed to load CPU gemm_4bit_forward"),
    # Checkpoints saved within the same second (--save-steps 1, or Ctrl-C right after a save)
    # have equal mtimes; the Trainer then orders them by step, which is what we want anyway.
    "transformers.trainer_utils": DropMessages("mtime may not be reliable on this filesystem"),
    # transformers >= 5.24 looks for a hub kernel of bitsandbytes' 4-bit ops; offline, the kernels package
    # says it skipped a check nobody asked for (the recipe's own offline errors say what matters).
    "kernels._internals.hf_hub": DropMessages("Skipping publisher trust check"),
}


@contextlib.contextmanager
def console_settings():
    """A readable console for the duration of the run (undone afterwards, for in-process callers):
    fastgemma's one line on what it patched, known third-party noise filtered."""
    fastgemma_logger = logging.getLogger("fastgemma")
    saved = fastgemma_logger.level, fastgemma_logger.propagate
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    # A handler on fastgemma's logger only: a root handler (basicConfig) would print the
    # libraries' own log lines a second time.
    fastgemma_logger.addHandler(handler)
    fastgemma_logger.setLevel(logging.INFO)
    fastgemma_logger.propagate = False
    for name, noise in KNOWN_NOISE.items():
        logging.getLogger(name).addFilter(noise)
    datasets_bars_were_on = "datasets" not in sys.modules or sys.modules["datasets"].is_progress_bar_enabled()
    try:
        with warnings.catch_warnings():
            # Upstream renames the user cannot act on (gradient -> activation checkpointing inside TRL/peft).
            renamed = r".*deprecated and will be removed in v6.*"
            warnings.filterwarnings("ignore", message=renamed, category=FutureWarning)
            yield
    finally:
        fastgemma_logger.removeHandler(handler)
        fastgemma_logger.setLevel(saved[0])
        fastgemma_logger.propagate = saved[1]
        for name, noise in KNOWN_NOISE.items():
            logging.getLogger(name).removeFilter(noise)
        if datasets_bars_were_on and "datasets" in sys.modules:
            sys.modules["datasets"].enable_progress_bars()


def resume_command(argv: list[str]) -> str:
    """This run's command line with --resume (replacing any earlier --resume, and without --overwrite)."""
    kept, skip_value = [], False
    for index, arg in enumerate(argv):
        if skip_value:
            skip_value = False
            continue
        if arg.startswith("--resume=") or arg == "--overwrite":  # continuing must not delete what it continues
            continue
        if arg == "--resume":
            skip_value = index + 1 < len(argv) and not argv[index + 1].startswith("-")
            continue
        kept.append(arg)
    return shlex.join(["python", display_path(__file__), *kept, "--resume"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(negative_numbers_as_values(argv))
    with console_settings(), distributed.console_for_this_rank():  # [distributed] only rank 0 prints
        try:
            on_gpu = check_and_complete(args)
            run(args, on_gpu)
        except RecipeError as error:
            print(f"{RECIPE_NAME}: error: {error}", file=sys.stderr)
            return 2
        except RecipeFinished as finished:
            print(f"{RECIPE_NAME}: {finished}")
            return 0
        except RecipeInterrupted as stop:
            how_to_go_on = f"; continue with: {resume_command(argv)}" if stop.resumable else ""
            print(f"{RECIPE_NAME}: {stop}{how_to_go_on}", file=sys.stderr)
            return 130
        except KeyboardInterrupt:
            print(f"\n{RECIPE_NAME}: interrupted before training started; nothing was saved", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
