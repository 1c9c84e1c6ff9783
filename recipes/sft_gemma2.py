#!/usr/bin/env python
"""QLoRA supervised fine-tuning of Gemma 2 with TRL, on a fastgemma-patched model.

    python recipes/sft_gemma2.py                                   # tiny demo: CPU, no downloads, a few minutes
    python recipes/sft_gemma2.py --model google/gemma-2-2b --dataset my_chats.jsonl   # QLoRA on one GPU

What it does, in order (`train` below):
  1. checks every flag and input (numbers, paths, the model's config, the dataset's rows and
     their lengths) before loading any weights or writing anything: a bad one stops the
     recipe with a one-line error and exit status 2;
  2. loads Gemma 2 (4-bit NF4 with double quantisation and bf16 compute on a GPU by default);
  3. patches its attention with fastgemma (exact logit-softcapped attention, flex / compiled);
  4. trains LoRA adapters on every linear projection with TRL's SFTTrainer, evaluating on an
     eval set if one is given. Ctrl-C finishes the step in flight, saves the adapter and a
     checkpoint, and says how to go on (--resume);
  5. saves the adapter (PEFT format), tokenizer and trainer_state.json to --output-dir (and with
     --merge a standalone model in --output-dir/merged), prints a summary (steps, tokens/s,
     peak memory, first/last loss, eval loss) and, for chat or prompt/completion data, greedy
     generations on held-out prompts next to the answer.

Without --model, the recipe builds a small random-init Gemma 2 from the config shipped in
recipes/assets/tiny_gemma2/. Without --dataset it trains on recipes/assets/data/, a toy
instruction set (addition, reversal, uppercase, sorting).

Datasets (a hub name or a local .jsonl / .json / .parquet file) need one of these columns:
  messages            chat turns [{"role", "content"}]; loss on the assistant turns only
  prompt, completion  loss on the completion only
  text                plain language modelling; loss on every token

The parts live beside this file in recipes/sft/ (checks, data, model, training, reporting, ...).
"""

# Only the standard library and the recipe's light modules up here: the command line and the checks
# run before torch, transformers, peft and TRL are imported (seconds), so --help and a bad flag answer at once.
# `python recipes/sft_gemma2.py` puts this file's folder first on sys.path, which is how `sft` is found.
import sys
from dataclasses import replace
from pathlib import Path

from sft import checks, console, distributed
from sft.config import Knobs, RecipeConfig, build_parser, negative_numbers_as_values, patch_memory_budget
from sft.errors import RecipeError, RecipeFinished, RecipeInterrupted

# ---------------------------------------------------------------------------------------
# Knobs. A real Gemma 2 (--model given): the usual single-GPU QLoRA settings.
# ---------------------------------------------------------------------------------------
REAL_MODEL = Knobs(
    output_dir="outputs/sft_gemma2",
    max_seq_length=2048,
    lora_r=16,
    lora_alpha=32,
    lora_dropout=0.0,  # off: dropout adds an activation per adapted layer and rarely helps a 1-epoch SFT
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    batch_size_packed=1,  # with packing, one row of up to max_seq_length tokens (many documents) per micro-step
    batch_size_unpacked=4,
    grad_accum=8,
    lr=2e-4,
    epochs=1.0,
    max_steps=-1,  # train for `epochs`
    warmup=0.03,  # fraction of the steps
    lr_scheduler="cosine",
    gpu_optimizer="paged_adamw_8bit",  # bitsandbytes: 8-bit states, paged to CPU on memory spikes
    cpu_optimizer="adamw_torch",
    logging_steps=10,
    eval_steps=200,  # with an eval set (--eval-dataset / --eval-fraction)
    save_steps=500,  # a resumable checkpoint every N optimizer steps (Ctrl-C saves one too)
    checkpoints_kept=2,  # older checkpoint-N directories are deleted
    seed=42,
    backend="auto",  # fastgemma: flex_attention on Ampere+ GPUs, torch.compile'd dense attention elsewhere
    fused_ops="auto",  # fastgemma: fused norms / RoPE / GeGLU / LoRA-in-GEMM while training, on CUDA
    cuda_graphs="auto",  # fastgemma: compiled layers replayed as CUDA graphs, for small micro-steps on one GPU
    memory_budget="auto",  # fastgemma: GPU memory for activations (GiB, auto or off): layers kept, recomputed, offloaded
    show_generations=0,
    generation_max_new_tokens=32,
)
# The embedded tiny demo (no --model): sized to finish in minutes on 2 CPU cores.
TINY_DEMO = replace(
    REAL_MODEL,
    max_seq_length=512,
    batch_size_unpacked=16,
    grad_accum=1,
    lr=3e-3,  # a random-init model and small adapters take (and need) a large step
    max_steps=500,  # ~2 epochs of the toy set; a few minutes on 2 cores
    warmup=0.05,
    logging_steps=1,
    eval_steps=100,
    save_steps=0,  # no periodic checkpoints in a few-minute demo; Ctrl-C still saves one
    show_generations=8,
)
RECIPE_NAME = Path(__file__).name


def train(config: RecipeConfig) -> dict:
    """The recipe, after the checks. Returns the summary; raises RecipeError (bad data) or
    RecipeInterrupted (Ctrl-C, after saving)."""
    import datasets  # the heavy imports, now that the flags are known to be good
    import fastgemma
    from sft import batch_sizing, data, generation, model as models, reporting, runs, training

    datasets.disable_progress_bars()  # keep the console for the training progress bar
    launch = distributed.detect_launch()  # under torchrun / accelerate launch: this process's place
    distributed.use_this_ranks_device(launch, config.on_gpu)  # its own GPU, before any CUDA work

    # 1. Tokenizer and data: every row readable, documents that fit. Still nothing written.
    tokenizer = data.load_tokenizer(config)
    splits = data.load_splits(config, tokenizer)
    if config.overwrite and launch.is_main:  # every check has passed: only now is the earlier run deleted
        runs.remove_earlier_run(config.output_dir, say=True)

    # 2. Base model, then the micro-batch (sized to the free GPU memory unless chosen) and CUDA graphs.
    model, model_source, model_description = models.load_model(config, launch)
    distributed.join(launch, config.on_gpu)  # the process group, now that every rank has its model
    config, micro_batch = batch_sizing.settle_micro_step(config, model, launch)

    # 3. fastgemma: exact softcapped attention, per module instance (so PEFT's wrapping keeps it).
    #    Padding-free packing flattens the micro-batch into one row of batch_size x max_seq_length tokens.
    longest_row = config.max_seq_length * (config.batch_size if config.packing else 1)
    fastgemma.patch_model(model, max_row_tokens=longest_row, backend=config.backend,
                          fused_ops={"auto": "auto", "on": True, "off": False}[config.fused_ops],
                          cuda_graphs=config.cuda_graphs == "on",
                          memory_budget=patch_memory_budget(config.memory_budget))

    # 4. LoRA adapters and TRL's SFTTrainer; then the adapter and trainer_state.json are saved.
    trainer, callbacks = training.build_trainer(config, model, tokenizer, splits, launch)
    train_output = training.train_and_save(config, trainer, callbacks)

    # 5. Summary (every rank), then the main process alone merges, generates and writes; the others wait.
    eval_examples = len(splits.eval) if splits.eval is not None else None
    summary = reporting.summarize(config, model, trainer, train_output, callbacks["clock"], launch,
                                  model_description, eval_examples, micro_batch)
    if launch.is_main:
        try:
            if config.merge:
                summary["merged_dir"] = str(models.save_merged_model(config, model_source, tokenizer))
            print("\n" + "\n".join(reporting.summary_lines(summary)))
            # An FSDP model would need every rank to generate in lockstep: it skips generating.
            summary["generations"] = [] if config.fsdp else generation.show_generations(
                trainer.model, tokenizer, splits.heldout, config.generation_max_new_tokens)
        except KeyboardInterrupt:
            where = console.display_path(config.output_dir)
            message = f"interrupted in the merge or the generations, after training; the adapter is in {where}"
            raise RecipeInterrupted(message, resumable=False) from None
        reporting.write_summary(config, summary)
    distributed.finish(launch)
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(REAL_MODEL, TINY_DEMO, prog=RECIPE_NAME, description=__doc__.split("\n\n")[0])
    args = parser.parse_args(negative_numbers_as_values(argv))
    with console.console_settings(), distributed.console_for_this_rank():  # only rank 0 prints
        try:
            train(checks.check_and_resolve(args, REAL_MODEL, TINY_DEMO))
        except RecipeError as error:
            print(f"{RECIPE_NAME}: error: {error}", file=sys.stderr)
            return 2
        except RecipeFinished as finished:
            print(f"{RECIPE_NAME}: {finished}")
            return 0
        except RecipeInterrupted as stop:
            how_to_go_on = f"; continue with: {console.resume_command(__file__, argv)}" if stop.resumable else ""
            print(f"{RECIPE_NAME}: {stop}{how_to_go_on}", file=sys.stderr)
            return 130
        except KeyboardInterrupt:
            print(f"\n{RECIPE_NAME}: interrupted before training started; nothing was saved", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
