"""The recipe's settings: the knobs' type, the command line, and the one config resolved from both.

The knobs themselves (values) sit at the top of recipes/sft_gemma2.py. A flag left unset takes the
knob for a real model or for the tiny demo (no --model); `resolve` fills them in once, and everything
after it reads the frozen `RecipeConfig`.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from . import distributed
from .batch_sizing import GRAPHS_MAX_TOKENS_PER_MICRO_STEP

RECIPES_DIR = Path(__file__).resolve().parents[1]
TINY_MODEL_DIR = RECIPES_DIR / "assets" / "tiny_gemma2"  # config.json + tokenizer files, no weights
TINY_TRAIN_FILE = RECIPES_DIR / "assets" / "data" / "tiny_tasks_train.jsonl"
TINY_HELDOUT_FILE = RECIPES_DIR / "assets" / "data" / "tiny_tasks_heldout.jsonl"
TINY_INIT_SEED = 0  # fixed, so the random "base model" is the same on every run and machine

Switch = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class Knobs:
    """Default settings; recipes/sft_gemma2.py defines one set for real models and one for the tiny demo."""

    output_dir: str
    max_seq_length: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: tuple[str, ...]
    batch_size_packed: int  # with packing: rows of up to max_seq_length tokens (many documents) per micro-step
    batch_size_unpacked: int
    grad_accum: int
    lr: float
    epochs: float
    max_steps: int  # -1: train for `epochs`
    warmup: float  # fraction of the steps
    lr_scheduler: str
    gpu_optimizer: str
    cpu_optimizer: str
    logging_steps: int
    eval_steps: int
    save_steps: int  # 0: checkpoints on Ctrl-C only
    checkpoints_kept: int
    seed: int
    backend: str
    fused_ops: Switch
    cuda_graphs: Switch
    memory_budget: str  # "auto", "off" or GiB
    show_generations: int
    generation_max_new_tokens: int


@dataclass(frozen=True)
class RecipeConfig:
    """Every setting of one run, resolved from the command line and the knobs."""

    model: str | None  # None: the tiny random-init demo model
    dataset: str | None  # None: the toy task set
    dataset_split: str
    eval_dataset: str | None
    eval_dataset_split: str
    eval_fraction: float  # of the training rows held out for evaluation (0: none)
    eval_steps: int
    output_dir: Path
    max_seq_length: int
    packing: bool
    load_in_4bit: bool
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: tuple[str, ...]
    batch_size: int
    grad_accum: int
    size_micro_batch_to_gpu: bool  # choose batch_size x grad_accum from free GPU memory (batch_sizing.py)
    lr: float
    epochs: float
    max_steps: int
    warmup: float
    lr_scheduler: str
    optim: str
    seed: int
    backend: str
    fused_ops: Switch
    cuda_graphs: Switch  # "auto" only until the micro-batch is known (batch_sizing.settle_micro_step)
    memory_budget: str | float  # "auto", "off" or GiB (fastgemma's memory budget for activations)
    logging_steps: int
    save_steps: int
    checkpoints_kept: int
    report_to: tuple[str, ...]
    show_generations: int
    generation_max_new_tokens: int
    merge: bool
    resume: Path | None  # the checkpoint directory to continue from
    overwrite: bool
    fsdp: bool
    on_gpu: bool

    @property
    def tiny(self) -> bool:
        return self.model is None

    @property
    def has_eval(self) -> bool:
        return self.eval_dataset is not None or self.eval_fraction > 0


def memory_budget_arg(text: str) -> str | float:
    """--memory-budget: auto, off, or a positive number of GiB."""
    if text in ("auto", "off"):
        return text
    try:
        gib = float(text)
    except ValueError:
        gib = 0.0
    if not gib > 0 or gib == float("inf"):
        raise argparse.ArgumentTypeError(f"expected auto, off or a positive number of GiB, got {text!r}")
    return gib


def patch_memory_budget(value: str | float):
    """--memory-budget as fastgemma.patch_model's memory_budget (bytes, "auto" or None)."""
    return {"auto": "auto", "off": None}[value] if isinstance(value, str) else int(value * 2 ** 30)


def build_parser(real: Knobs, tiny: Knobs, prog: str, description: str) -> argparse.ArgumentParser:
    def default(name: str) -> str:
        """'[real]' or '[real; tiny value]' for the help text."""
        real_value, tiny_value = getattr(real, name), getattr(tiny, name)
        return f"[{real_value}]" if real_value == tiny_value else f"[{real_value}; tiny {tiny_value}]"

    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Defaults in brackets are for a real model; the tiny demo (no --model) uses its own where noted.",
    )
    repo = RECIPES_DIR.parent
    what = parser.add_argument_group("what to train")
    what.add_argument("--model", help="Gemma 2 hub id (e.g. google/gemma-2-2b) or local directory. "
                      f"Default: a tiny random-init Gemma 2 built from {TINY_MODEL_DIR.relative_to(repo)}")
    what.add_argument("--dataset", help="hub dataset name, or a local .jsonl/.json/.parquet file, with a 'messages', "
                      "'prompt'+'completion' or 'text' column. "
                      f"Default: the toy task set {TINY_TRAIN_FILE.relative_to(repo)}")
    what.add_argument("--dataset-split", default="train", help="split of a hub dataset to train on [train]")
    what.add_argument("--output-dir", default=real.output_dir, help=f"where the adapter goes [{real.output_dir}]")

    how = parser.add_argument_group("how to train")
    how.add_argument("--max-seq-length", type=int, help="longest sequence in tokens; with packing, the length of a "
                     f"packed row {default('max_seq_length')}")
    how.add_argument("--packing", action=argparse.BooleanOptionalAction,
                     help="pack documents into rows of --max-seq-length with TRL's best-fit-decreasing strategy, "
                     "padding-free (position ids restart per document, attention never crosses documents) "
                     "[on with a GPU, off on CPU]")
    how.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction,
                     help="load the base weights in 4-bit NF4 (bitsandbytes, double quantisation, bf16 compute): "
                     "QLoRA [on with a GPU, off on CPU]")
    how.add_argument("--lora-r", type=int, default=real.lora_r, help=f"LoRA rank [{real.lora_r}]")
    how.add_argument("--lora-alpha", type=int, default=real.lora_alpha,
                     help=f"LoRA alpha; the update is scaled by alpha/r [{real.lora_alpha}]")
    how.add_argument("--lora-dropout", type=float, default=real.lora_dropout,
                     help=f"dropout on the LoRA input [{real.lora_dropout}]")
    how.add_argument("--batch-size", type=int, help="sequences (or packed rows) per micro-step "
                     f"[{real.batch_size_packed} packed, {real.batch_size_unpacked} unpacked; "
                     f"tiny {tiny.batch_size_packed} / {tiny.batch_size_unpacked}]")
    how.add_argument("--grad-accum", type=int, help=f"micro-steps per optimizer step {default('grad_accum')}")
    how.add_argument("--lr", type=float, help=f"peak learning rate {default('lr')}")
    how.add_argument("--epochs", type=float, help=f"passes over the dataset, unless --max-steps is set [{real.epochs:g}]")
    how.add_argument("--max-steps", type=int, help="stop after this many optimizer steps; -1 = use --epochs "
                     f"[{real.max_steps}; tiny {tiny.max_steps} unless --epochs is given]")
    how.add_argument("--optim", help=f"transformers optimizer name [{real.gpu_optimizer} on a GPU, "
                     f"{real.cpu_optimizer} on CPU]")
    how.add_argument("--backend", default=real.backend, choices=["auto", "flex", "compiled", "eager"],
                     help="fastgemma attention: flex (flex_attention, GPU), compiled (torch.compile'd dense), eager "
                     f"(plain PyTorch); auto picks flex on Ampere+ GPUs and compiled elsewhere [{real.backend}]")
    how.add_argument("--fused-ops", default=real.fused_ops, choices=["auto", "on", "off"],
                     help="fastgemma's fused elementwise ops while training (norms with residual adds, RoPE, GeGLU, "
                     "LoRA added inside its GEMM): auto fuses on CUDA; on also fuses on CPU (a slow first compile "
                     f"there); off keeps Hugging Face's ops [{real.fused_ops}]")
    how.add_argument("--cuda-graphs", default=real.cuda_graphs, choices=["auto", "on", "off"],
                     help="replay each decoder layer's compiled forward and checkpointed backward as CUDA graphs "
                     "while training, so small micro-batches are not bound by the host launching kernels: auto = on "
                     "one GPU with fused ops and no LoRA dropout when a micro-step holds at most "
                     f"{GRAPHS_MAX_TOKENS_PER_MICRO_STEP} tokens (e.g. --batch-size 1); on also runs the same path on "
                     "a CPU (without capture); each new length bucket (up to 8) records every layer again, which "
                     f"makes the first steps slower [{real.cuda_graphs}]")
    how.add_argument("--memory-budget", type=memory_budget_arg, default=real.memory_budget,
                     help="GPU memory for the training step's activations, with checkpointing: the last layers keep "
                     "theirs (no recompute) as far as they fit, and the first layers' inputs wait in CPU memory when "
                     "even checkpointing does not fit. auto = the GPU's free memory less a margin; a number = GiB; "
                     f"off = checkpoint every layer [{real.memory_budget}]")
    how.add_argument("--seed", type=int, default=real.seed, help=f"seed for adapter init and data order [{real.seed}]")

    evaluation = parser.add_argument_group("evaluation (the eval loss goes to the log, trainer_state.json and the summary)")
    evaluation.add_argument("--eval-dataset", help="hub dataset name or local .jsonl/.json/.parquet file to evaluate "
                            "on, in the training data's format [none]")
    evaluation.add_argument("--eval-dataset-split", default="test", help="split of a hub --eval-dataset [test]")
    evaluation.add_argument("--eval-fraction", type=float, default=0.0,
                            help="hold this fraction of the training rows out for evaluation instead (seeded), "
                            "e.g. 0.05 [0: none]")
    evaluation.add_argument("--eval-steps", type=int,
                            help=f"evaluate every N optimizer steps, and after the last {default('eval_steps')}")

    saving = parser.add_argument_group("checkpoints and outputs (Ctrl-C always saves the adapter and a checkpoint)")
    saving.add_argument("--save-steps", type=int, help="also save a resumable checkpoint (--output-dir/checkpoint-N) "
                        f"every N optimizer steps, keeping the last {real.checkpoints_kept}; 0 = only on Ctrl-C "
                        f"{default('save_steps')}")
    saving.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                        help="continue an interrupted run from the latest checkpoint-N in --output-dir, or from the "
                        "CHECKPOINT directory given; pass the run's other flags unchanged")
    saving.add_argument("--overwrite", action="store_true",
                        help="start a new run in an --output-dir that holds an earlier one, first deleting that run's "
                        "checkpoints and outputs (the recipe's own files only; a new run into such a folder is "
                        "refused otherwise)")
    saving.add_argument("--merge", action="store_true",
                        help="after training, also save a standalone model in --output-dir/merged: the base "
                        "(dequantised where it was 4-bit) with the adapter merged in, in the precision it trained "
                        "in (bf16 on a GPU, fp32 on CPU), and the tokenizer")

    report = parser.add_argument_group("reporting")
    report.add_argument("--logging-steps", type=int, help=f"log the loss every N steps {default('logging_steps')}")
    report.add_argument("--report-to", nargs="+", default=["none"], metavar="NAME",
                        help="experiment trackers to log to, as in transformers' TrainingArguments: tensorboard "
                        "(event files in --output-dir/runs), wandb, trackio, mlflow, ..., all, or none [none]")
    report.add_argument("--show-generations", type=int,
                        help="after training, greedily generate for N held-out prompts and print them next to the "
                        "expected answer. For your own dataset the last N rows are held out of training for this "
                        f"{default('show_generations')}, from {TINY_HELDOUT_FILE.name} for the tiny demo")
    distributed.add_arguments(parser)  # --fsdp
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


def planned_max_steps(args: argparse.Namespace, real: Knobs, tiny: Knobs) -> int:
    """--max-steps as `resolve` will set it; needed before resolving, to see whether a run is finished."""
    if args.max_steps is not None:
        return args.max_steps
    return tiny.max_steps if args.model is None and args.epochs is None else real.max_steps


def resolve(args: argparse.Namespace, real: Knobs, tiny: Knobs, on_gpu: bool, resume: Path | None) -> RecipeConfig:
    """The command line with every unset flag filled in from the knobs (tiny demo or real model, GPU or CPU)."""
    knobs = tiny if args.model is None else real

    def chosen(name: str, knob: str | None = None):
        value = getattr(args, name)
        return getattr(knobs, knob or name) if value is None else value

    packing = on_gpu if args.packing is None else args.packing
    # Packed training on a GPU with neither --batch-size nor --grad-accum given: keep the knobs' tokens per
    # optimizer step and put as many of its rows in each micro-step as memory allows (batch_sizing.py).
    size_to_gpu = on_gpu and packing and args.model is not None and args.batch_size is None and args.grad_accum is None
    cuda_graphs = args.cuda_graphs
    if cuda_graphs == "auto" and not (on_gpu and args.fused_ops != "off" and args.lora_dropout == 0):
        cuda_graphs = "off"  # graphs replay the fused ops' compiled layers on a GPU, and one dropout draw only
    optim = args.optim or (distributed.FSDP_OPTIMIZER if args.fsdp else knobs.gpu_optimizer if on_gpu
                           else knobs.cpu_optimizer)
    return RecipeConfig(
        model=args.model,
        dataset=args.dataset,
        dataset_split=args.dataset_split,
        eval_dataset=args.eval_dataset,
        eval_dataset_split=args.eval_dataset_split,
        eval_fraction=args.eval_fraction,
        eval_steps=chosen("eval_steps"),
        output_dir=Path(args.output_dir),
        max_seq_length=chosen("max_seq_length"),
        packing=packing,
        load_in_4bit=on_gpu if args.load_in_4bit is None else args.load_in_4bit,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_target_modules=knobs.lora_target_modules,
        batch_size=chosen("batch_size", "batch_size_packed" if packing else "batch_size_unpacked"),
        grad_accum=chosen("grad_accum"),
        size_micro_batch_to_gpu=size_to_gpu,
        lr=chosen("lr"),
        epochs=knobs.epochs if args.epochs is None else args.epochs,
        max_steps=planned_max_steps(args, real, tiny),
        warmup=knobs.warmup,
        lr_scheduler=knobs.lr_scheduler,
        optim=optim,
        seed=args.seed,
        backend=args.backend,
        fused_ops=args.fused_ops,
        cuda_graphs=cuda_graphs,
        memory_budget=args.memory_budget,
        logging_steps=chosen("logging_steps"),
        save_steps=chosen("save_steps"),
        checkpoints_kept=knobs.checkpoints_kept,
        report_to=tuple(args.report_to),
        show_generations=chosen("show_generations"),
        generation_max_new_tokens=knobs.generation_max_new_tokens,
        merge=args.merge,
        resume=resume,
        overwrite=args.overwrite,
        fsdp=args.fsdp,
        on_gpu=on_gpu,
    )


def as_json(config: RecipeConfig) -> dict:
    """The config as JSON-ready values, for recipe_summary.json."""
    values = {field.name: getattr(config, field.name) for field in fields(config)}
    return {name: str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
            for name, value in values.items()}
