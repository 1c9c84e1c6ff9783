"""Training: TRL's SFTTrainer on the patched model, the recipe's callbacks, and Ctrl-C.

Ctrl-C finishes the step in flight, saves a checkpoint and the adapter, and stops; a second
Ctrl-C quits at once. Under a launcher every rank stops after the same step.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from . import distributed
from .config import RecipeConfig
from .console import display_path
from .errors import RecipeError, RecipeInterrupted
from .model import compute_dtype, lora_config
from .runs import latest_checkpoint


def trainer_settings(config: RecipeConfig, launch: distributed.Launch, data_format: str, has_eval: bool):
    """The SFTConfig (TrainingArguments) for this run."""
    from trl import SFTConfig

    # transformers renamed gradient_checkpointing to activation_checkpointing (same switch); use whichever this
    # version has.
    checkpointing = "gradient_checkpointing"
    if "activation_checkpointing" in SFTConfig.__dataclass_fields__:
        checkpointing = "activation_checkpointing"
    evaluation = {}
    if has_eval:
        evaluation = {"eval_strategy": "steps", "eval_steps": config.eval_steps,
                      "per_device_eval_batch_size": config.batch_size}
    return SFTConfig(
        output_dir=str(config.output_dir),
        max_length=config.max_seq_length,
        packing=config.packing,
        packing_strategy="bfd",  # best-fit decreasing, padding-free: position ids restart per document
        assistant_only_loss=data_format == "chat",  # prompt/completion data gets completion-only loss by default
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup,
        optim=config.optim,
        weight_decay=0.0,
        # Gradient (activation) checkpointing: recompute each layer's activations in backward.
        # Non-reentrant: what DDP and FSDP need (each LoRA gradient is ready once).
        **{checkpointing: True, f"{checkpointing}_kwargs": {"use_reentrant": False}},
        bf16=compute_dtype(config.on_gpu) == torch.bfloat16,
        logging_steps=config.logging_steps,
        logging_first_step=True,  # the first loss, for the summary
        save_strategy="steps" if config.save_steps else "no",  # Ctrl-C saves a checkpoint either way
        save_steps=config.save_steps or 1,  # (unused when save_strategy is "no", but must be positive)
        save_total_limit=config.checkpoints_kept,
        report_to=list(config.report_to),
        seed=config.seed,
        data_seed=config.seed,
        dataloader_pin_memory=config.on_gpu,
        **evaluation,
        **distributed.trainer_settings(launch, config.on_gpu, config.fsdp),  # gloo on CPU, timeout, FSDP
    )


def build_trainer(config: RecipeConfig, model, tokenizer, splits, launch: distributed.Launch):
    """The SFTTrainer (PEFT wraps the model in LoRA adapters here) and the recipe's callbacks."""
    import fastgemma
    from trl import SFTTrainer

    callbacks = recipe_callbacks()
    # The same SFTTrainer, without its host stalls between micro-steps (fastgemma/trainer.py says which).
    trainer = fastgemma.lean_trainer(SFTTrainer)(
        model=model,
        args=trainer_settings(config, launch, splits.data_format, splits.eval is not None),
        train_dataset=splits.train,
        eval_dataset=splits.eval,
        processing_class=tokenizer,
        peft_config=lora_config(config),
        callbacks=[callbacks["clock"], callbacks["last_step"], callbacks["interrupt"]],
    )
    trainer.remove_callback(ProgressCallback)  # it prints every logged dict under the bar
    trainer.remove_callback(PrinterCallback)  # (its stand-in when tqdm is off) prints them too
    trainer.add_callback(callbacks["progress"])
    if len(trainer.train_dataset) == 0:  # what data.check_document_lengths could not see past its first rows
        raise RecipeError(f"no training example is left after truncating to --max-seq-length {config.max_seq_length}")
    trainable, total = trainer.model.get_nb_trainable_parameters()
    print(f"lora         r={config.lora_r}, alpha={config.lora_alpha} on {', '.join(config.lora_target_modules)}: "
          f"{trainable:,} trainable parameters ({100 * trainable / total:.2f}% of {total:,})")
    if config.resume:
        print(f"resuming     from {display_path(config.resume)}")
    every = f"every {config.save_steps} step{'s' * (config.save_steps > 1)} and " if config.save_steps else ""
    print(f"checkpoints  {every}on Ctrl-C, in {display_path(config.output_dir)}/checkpoint-N (--resume continues)")
    return trainer, callbacks


def train_and_save(config: RecipeConfig, trainer, callbacks):
    """trainer.train with Ctrl-C handled, then the adapter and trainer_state.json saved. Raises
    RecipeInterrupted after saving when Ctrl-C stopped it. Every rank calls this (FSDP gathers the adapter
    for save_model); the Trainer writes from the main process only."""
    if config.on_gpu:
        torch.cuda.reset_peak_memory_stats()
    try:
        with callbacks["interrupt"].installed():
            train_output = trainer.train(resume_from_checkpoint=str(config.resume) if config.resume else None)
    except KeyboardInterrupt:  # the second Ctrl-C
        if callbacks["progress"].training_bar is not None:
            callbacks["progress"].training_bar.close()  # now, not when garbage-collected after our last line
        checkpoint = latest_checkpoint(config.output_dir)
        kept = f"the last checkpoint is {display_path(checkpoint)}" if checkpoint else "no checkpoint was saved"
        raise RecipeInterrupted(
            f"interrupted again: quit at step {trainer.state.global_step} without saving; {kept}", bool(checkpoint)
        ) from None
    trainer.save_model(str(config.output_dir))  # adapter_model.safetensors + adapter_config.json + tokenizer
    trainer.save_state()  # trainer_state.json (log history, steps)
    if callbacks["interrupt"].interrupted:
        checkpoint = latest_checkpoint(config.output_dir)
        raise RecipeInterrupted(
            f"interrupted at step {trainer.state.global_step}/{trainer.state.max_steps}: adapter saved in "
            f"{display_path(config.output_dir)}, checkpoint {display_path(checkpoint)}"
        )
    return train_output


def recipe_callbacks() -> dict:
    """The recipe's Trainer callbacks, by role."""
    launch = distributed.detect_launch()  # for Ctrl-C under a launcher

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
        """Log (and evaluate, with an eval set) the final step too, so the summary's last losses are the end
        of training even when --max-steps is not a multiple of --logging-steps or --eval-steps."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True
                control.should_evaluate = args.eval_strategy != "no"

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
                # torchrun passes Ctrl-C on to every worker and then sends its own SIGINT (and
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
            # Ctrl-C reaches the ranks at different points of a step: all stop after the same one.
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

        def __init__(self):
            super().__init__()
            self.shown = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                self.shown.update(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")
            if "eval_loss" in logs:
                self.shown["eval_loss"] = f"{logs['eval_loss']:.4f}"
            if state.is_world_process_zero and self.training_bar is not None and ("loss" in logs or "eval_loss" in logs):
                self.training_bar.set_postfix(self.shown)

    return {
        "clock": StepClock(),
        "last_step": LogLastStep(),
        "interrupt": StopOnInterrupt(),
        "progress": LossOnProgressBar(),
    }
