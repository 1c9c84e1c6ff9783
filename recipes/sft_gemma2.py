#!/usr/bin/env python
"""QLoRA supervised fine-tuning of Gemma 2 with TRL, on a fastgemma-patched model.

    python recipes/sft_gemma2.py                                   # tiny demo: CPU, no downloads, a few minutes
    python recipes/sft_gemma2.py --model google/gemma-2-2b --dataset my_chats.jsonl   # QLoRA on one GPU

What it does, in order:
  1. checks the inputs (dataset file and columns, model type) before loading any weights;
  2. loads Gemma 2 (4-bit NF4 with double quantisation and bf16 compute on a GPU by default);
  3. patches its attention with fastgemma (exact logit-softcapped attention, flex / compiled);
  4. trains LoRA adapters on every linear projection with TRL's SFTTrainer;
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

import argparse
import contextlib
import json
import logging
import math
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    TrainerCallback,
)
from trl import SFTConfig, SFTTrainer

# Run from a source checkout without `pip install -e .`: fall back to the checkout's packages
# (appended, so an installed fastgemma still wins).
sys.path.append(str(Path(__file__).resolve().parents[1]))
import fastgemma  # noqa: E402

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
SEED = 42
BACKEND = "auto"  # fastgemma: flex_attention on Ampere+ GPUs, torch.compile'd dense attention elsewhere
FUSED_OPS = "auto"  # fastgemma: fused norms / RoPE / GeGLU / LoRA-in-GEMM while training, on CUDA

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
TINY_SHOW_GENERATIONS = 8

# transformers renamed gradient_checkpointing to activation_checkpointing (same switch); use
# whichever this version has.
CHECKPOINTING = "gradient_checkpointing"
if "activation_checkpointing" in SFTConfig.__dataclass_fields__:
    CHECKPOINTING = "activation_checkpointing"
GENERATION_MAX_NEW_TOKENS = 32
DATASET_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class RecipeError(Exception):
    """A problem with the inputs, reported as one short line and exit status 2."""


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    what.add_argument("--dataset-split", default="train", help="split to train on [train]")
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
    how.add_argument("--seed", type=int, default=SEED, help=f"seed for adapter init and data order [{SEED}]")

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
    return parser


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
    default("show_generations", 0, TINY_SHOW_GENERATIONS)
    args.warmup = TINY_WARMUP if tiny else WARMUP
    return args


# ---------------------------------------------------------------------------------------
# Checks that run before any weights are loaded
# ---------------------------------------------------------------------------------------
def check_model_is_gemma2(model_source: str) -> None:
    """Read only the config (a small JSON file) and insist on model_type 'gemma2'."""
    try:
        config = AutoConfig.from_pretrained(model_source)
    except Exception as error:  # missing dir, no config.json, no hub access, gated repo, ...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(f"cannot read a model config from --model {model_source!r}: {first_line}") from None
    if config.model_type != "gemma2":
        raise RecipeError(
            f"--model {model_source!r} is a {config.model_type!r} model; this recipe fine-tunes Gemma 2 only "
            "(config model_type 'gemma2', e.g. google/gemma-2-2b or google/gemma-2-9b)"
        )


def looks_like_local_file(name: str) -> bool:
    return Path(name).suffix in DATASET_FILE_TYPES or Path(name).exists()


def load_training_dataset(name: str, split: str) -> Dataset:
    if looks_like_local_file(name):
        path = Path(name)
        if not path.is_file():
            raise RecipeError(f"dataset file not found: {name}")
        if path.suffix not in DATASET_FILE_TYPES:
            raise RecipeError(f"dataset file {name} must be .jsonl, .json or .parquet")
        try:
            return load_dataset(DATASET_FILE_TYPES[path.suffix], data_files=str(path), split="train")
        except Exception as error:
            raise RecipeError(f"cannot read dataset file {name}: {error}") from None
    try:
        return load_dataset(name, split=split)
    except Exception as error:
        raise RecipeError(f"cannot load dataset {name!r} (split {split!r}) from the hub: {error}") from None


def dataset_format(dataset: Dataset, name: str) -> str:
    """'chat', 'prompt-completion' or 'text', from the columns, or a RecipeError naming them."""
    columns = dataset.column_names
    if len(dataset) == 0:
        raise RecipeError(f"dataset {name} is empty")
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


def split_off_heldout(dataset: Dataset, count: int) -> tuple[Dataset, Dataset]:
    """The last `count` rows become held-out prompts for the closing generations."""
    count = min(count, len(dataset) - 1)
    if count <= 0:
        return dataset, dataset.select([])
    return dataset.select(range(len(dataset) - count)), dataset.select(range(len(dataset) - count, len(dataset)))


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------
def build_tiny_gemma2(seed: int = TINY_INIT_SEED):
    """The demo's base model: the shipped tiny Gemma 2 config with seeded random weights (float32)."""
    config = AutoConfig.from_pretrained(TINY_MODEL_DIR)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")


def save_tiny_base_model(directory: Path) -> Path:
    """Write the tiny random model and its tokenizer to disk, so it loads like any checkpoint
    (same code path as a real model, 4-bit included) and the saved adapter has a base to point to."""
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_gemma2().save_pretrained(directory)
    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(directory)
    return directory


def compute_dtype(on_gpu: bool) -> torch.dtype:
    # bf16 is Gemma 2's native precision (fp16 overflows in its activations); CPUs train in fp32.
    if on_gpu and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_base_model(model_source: str, load_in_4bit: bool, on_gpu: bool):
    dtype = compute_dtype(on_gpu)
    quantization_config = None
    if load_in_4bit:
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_source,
        dtype=dtype,
        quantization_config=quantization_config,
        device_map={"": torch.cuda.current_device()} if on_gpu else None,
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


def lora_config(args: argparse.Namespace) -> LoraConfig:
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=LORA_TARGET_MODULES,
        bias="none",
        task_type="CAUSAL_LM",
    )


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------
class StepClock(TrainerCallback):
    """Wall-clock time at the end of every optimizer step, for throughput after the first
    step (which includes torch.compile's warm-up)."""

    def __init__(self):
        self.step_end_times: dict[int, float] = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.step_end_times[state.global_step] = time.perf_counter()


class LogLastStep(TrainerCallback):
    """Log the final step too, so the summary's last loss is the end of training even when
    --max-steps is not a multiple of --logging-steps."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


def peak_memory_line(on_gpu: bool) -> str:
    if on_gpu:
        allocated = torch.cuda.max_memory_allocated() / 2**20
        reserved = torch.cuda.max_memory_reserved() / 2**20
        return f"{allocated:,.0f} MiB CUDA peak allocated ({reserved:,.0f} MiB peak reserved)"
    max_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{max_rss_kib / 1024:,.0f} MiB process max RSS (CPU run)"


def throughput_lines(log_history: list[dict], clock: StepClock, train_runtime: float) -> tuple[int, str]:
    token_logs = [(entry["step"], entry["num_tokens"]) for entry in log_history if "num_tokens" in entry]
    if not token_logs:
        return 0, "n/a"
    last_step, total_tokens = token_logs[-1]
    line = f"{total_tokens / train_runtime:,.0f} tokens/s over the whole run"
    first_step, first_tokens = token_logs[0]
    if first_step in clock.step_end_times and last_step in clock.step_end_times and last_step > first_step:
        seconds = clock.step_end_times[last_step] - clock.step_end_times[first_step]
        line += f", {(total_tokens - first_tokens) / seconds:,.0f} tokens/s after step {first_step} (warm)"
    return int(total_tokens), line


def print_summary(trainer, clock, train_output, args, on_gpu, model_description) -> dict:
    history = trainer.state.log_history
    losses = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    total_tokens, throughput = throughput_lines(history, clock, train_output.metrics["train_runtime"])
    summary = {
        "steps": trainer.state.global_step,
        "tokens": total_tokens,
        "train_runtime_s": train_output.metrics["train_runtime"],
        "first_loss": losses[0][1] if losses else math.nan,
        "last_loss": losses[-1][1] if losses else math.nan,
        "output_dir": str(Path(args.output_dir).resolve()),
    }
    change = (summary["last_loss"] / summary["first_loss"] - 1) * 100 if losses else math.nan
    print("\n" + "=" * 30 + " fastgemma SFT summary " + "=" * 30)
    print(f"model        {model_description}")
    print(f"attention    fastgemma, backend={args.backend}, fused ops {args.fused_ops}")
    runtime = summary["train_runtime_s"]
    print(f"steps        {summary['steps']} optimizer steps in {runtime:.1f} s, {total_tokens:,} tokens")
    print(f"throughput   {throughput}")
    print(f"peak memory  {peak_memory_line(on_gpu)}")
    if losses:
        print(
            f"loss         first {losses[0][1]:.4f} (step {losses[0][0]}) -> last {losses[-1][1]:.4f} "
            f"(step {losses[-1][0]}), {change:+.0f}%"
        )
    print(f"adapter      {summary['output_dir']}")
    print("             (adapter_model.safetensors, adapter_config.json, tokenizer, trainer_state.json)")
    print("=" * 83)
    return summary


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


@torch.no_grad()
def show_generations(model, tokenizer, heldout: Dataset) -> list[dict]:
    """Greedy generations from the trained adapter, next to the expected answers."""
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
def run(args: argparse.Namespace) -> dict:
    on_gpu = torch.cuda.is_available()
    args = fill_in_defaults(args, on_gpu)
    output_dir = Path(args.output_dir)
    tiny = args.model is None

    # 1. Inputs, checked before any weights are loaded.
    if not tiny:
        check_model_is_gemma2(args.model)
    dataset_name = args.dataset or str(TINY_TRAIN_FILE)
    dataset = load_training_dataset(dataset_name, args.dataset_split)
    data_format = dataset_format(dataset, dataset_name)
    if args.dataset is None:
        heldout = load_dataset("json", data_files=str(TINY_HELDOUT_FILE), split="train")
        heldout = heldout.select(range(min(args.show_generations, len(heldout))))
    elif data_format != "text":
        dataset, heldout = split_off_heldout(dataset, args.show_generations)
    else:
        heldout = dataset.select([])  # plain text has no expected answer to compare with
    print(f"dataset      {dataset_name}: {len(dataset):,} {data_format} examples ({len(heldout)} held out)")

    # 2. Base model. The tiny demo's random weights go through the same loading path.
    if tiny:
        model_source = str(save_tiny_base_model(output_dir.resolve() / "tiny_base_model"))
        model_description = (
            f"tiny random-init Gemma 2 ({TINY_MODEL_DIR.name}, seed {TINY_INIT_SEED}), base saved in {model_source}"
        )
    else:
        model_source = args.model
        model_description = args.model
    model_description += ", 4-bit NF4" if args.load_in_4bit else f", {compute_dtype(on_gpu)}"
    tokenizer = AutoTokenizer.from_pretrained(model_source)
    if data_format == "chat" and tokenizer.chat_template is None:
        # Base checkpoints may ship without a template: use Gemma's turn format (with the
        # {% generation %} markers that assistant-only loss needs).
        tokenizer.chat_template = (TINY_MODEL_DIR / "chat_template.jinja").read_text()
    model = load_base_model(model_source, args.load_in_4bit, on_gpu)

    # 3. fastgemma: swap in exact softcapped attention (per module instance, so PEFT
    #    wrapping by the trainer afterwards keeps it). Padding-free packing flattens the
    #    whole micro-batch into one row, so the longest row is batch_size x max length.
    longest_row = args.max_seq_length * (args.batch_size if args.packing else 1)
    fused_ops = {"auto": "auto", "on": True, "off": False}[args.fused_ops]
    fastgemma.patch_model(model, max_seq_length=longest_row, backend=args.backend, fused_ops=fused_ops)

    # 4. LoRA + TRL.
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
        **{CHECKPOINTING: True, f"{CHECKPOINTING}_kwargs": {"use_reentrant": False}},
        bf16=compute_dtype(on_gpu) == torch.bfloat16,
        logging_steps=args.logging_steps,
        logging_first_step=True,  # the first loss, for the summary
        save_strategy="no",  # the adapter is saved once, at the end
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        dataloader_pin_memory=on_gpu,
    )
    clock = StepClock()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(args),
        callbacks=[clock, LogLastStep()],
    )
    trainer.model.print_trainable_parameters()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    train_output = trainer.train()

    # 5. Save, report, and try the adapter on held-out prompts.
    trainer.save_model(str(output_dir))  # adapter_model.safetensors + adapter_config.json + tokenizer
    trainer.save_state()  # trainer_state.json (log history, steps)
    summary = print_summary(trainer, clock, train_output, args, on_gpu, model_description)
    summary["fastgemma_patched"] = fastgemma.is_patched(trainer.model)  # still patched after PEFT wrapping
    summary["generations"] = show_generations(trainer.model, tokenizer, heldout)
    with open(output_dir / "recipe_summary.json", "w") as f:
        json.dump({**summary, "args": vars(args)}, f, indent=2, default=str)
    return summary


@contextlib.contextmanager
def console_settings():
    """Readable output for the duration of the run (undone afterwards, for in-process callers)."""
    fastgemma_logger = logging.getLogger("fastgemma")
    previous_level = fastgemma_logger.level
    progress_bars_were_on = datasets.is_progress_bar_enabled()
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    fastgemma_logger.setLevel(logging.INFO)  # one line saying what was patched
    datasets.disable_progress_bars()  # keep the console for the training progress bar and the losses
    try:
        with warnings.catch_warnings():
            # Upstream renames the user cannot act on (gradient -> activation checkpointing inside TRL/peft).
            renamed = r".*deprecated and will be removed in v6.*"
            warnings.filterwarnings("ignore", message=renamed, category=FutureWarning)
            yield
    finally:
        fastgemma_logger.setLevel(previous_level)
        if progress_bars_were_on:
            datasets.enable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with console_settings():
        try:
            run(args)
        except RecipeError as error:
            print(f"sft_gemma2.py: error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
