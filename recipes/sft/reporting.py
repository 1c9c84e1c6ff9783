"""The closing summary: tokens, throughput, memory, losses (train and eval), from the Trainer's log.

Under a launcher the numbers are the whole job's (every rank must call `training_numbers`), with
the per-GPU rate beside them. recipes/README.md shows a printed summary; a test keeps the two alike.
"""

from __future__ import annotations

import json
import math
import resource

from . import distributed
from .console import display_path


def peak_memory_text(on_gpu: bool) -> str:
    if on_gpu:
        import torch

        allocated = torch.cuda.max_memory_allocated() / 2**20
        reserved = torch.cuda.max_memory_reserved() / 2**20
        return f"{allocated:,.0f} MiB CUDA peak allocated ({reserved:,.0f} MiB peak reserved)"
    max_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{max_rss_kib / 1024:,.0f} MiB process max RSS (CPU run)"


def memory_plan_text(plan, budget) -> str | None:
    """What fastgemma's memory budget chose for the last training step (None on a CPU, where every layer is
    checkpointed, and with --memory-budget off)."""
    if plan is None:
        return None
    return plan.describe() + ("" if budget == "auto" else f" (--memory-budget {budget})")


def training_numbers(log_history: list[dict], step_end_times: dict, start_step: int, runtime: float,
                     launch: distributed.Launch | None = None) -> dict:
    """Tokens, throughput and losses of this run (after start_step, when resuming) from the log.
    Under a launcher: for all ranks together (every rank must call this), per GPU beside it."""
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
    eval_losses = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    numbers["first_eval_loss"] = list(eval_losses[0]) if eval_losses else None
    numbers["last_eval_loss"] = list(eval_losses[-1]) if eval_losses else None
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

    def rate(key):  # the whole job's rate, the per-GPU one beside it
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
           if summary.get("cuda_graphs") else ""),
    ]
    if world > 1:
        lines.append(f"processes    {summary['processes']}")
    lines += [
        f"steps        {steps_line}",
        f"throughput   {throughput}",
        f"peak memory  {summary['peak_memory']}",
    ]
    if summary.get("memory_plan"):
        lines.append(f"activations  {summary['memory_plan']}")
    if summary.get("micro_batch_auto"):  # chosen from the GPU's free memory (batch_sizing.py)
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
    if summary.get("last_eval_loss"):
        (first_step, first), (last_step, last) = summary["first_eval_loss"], summary["last_eval_loss"]
        where = f"{summary['eval_examples']:,} examples" if summary.get("eval_examples") else "eval set"
        trend = (f"first {first:.4f} (step {first_step}) -> last {last:.4f} (step {last_step}), "
                 f"{(last / first - 1) * 100:+.0f}%" if last_step != first_step else f"{last:.4f} (step {last_step})")
        lines.append(f"eval loss    {trend} on {where}")
    lines += [
        f"adapter      {display_path(summary['output_dir'])}",
        "             (adapter_model.safetensors, adapter_config.json, tokenizer, trainer_state.json)",
    ]
    if summary.get("merged_dir"):
        lines.append(f"merged       {display_path(summary['merged_dir'])} (standalone model and tokenizer)")
    lines.append("=" * 83)
    return lines


def summarize(config, base_model, trainer, train_output, clock, launch: distributed.Launch, model_description: str,
              eval_examples: int | None, micro_batch: str | None) -> dict:
    """The run's summary (what summary_lines prints, and recipe_summary.json). Every rank must call it."""
    import fastgemma

    runtime = train_output.metrics["train_runtime"]
    summary = {
        "steps": trainer.state.global_step,
        "resumed_from_step": clock.start_step,
        "train_runtime_s": runtime,
        **training_numbers(trainer.state.log_history, clock.step_end_times, clock.start_step, runtime, launch),
        "eval_examples": eval_examples,
        "model": model_description,
        "backend": config.backend,
        "fused_ops": config.fused_ops,
        "cuda_graphs": config.cuda_graphs == "on",
        "cuda_graph_lengths": fastgemma.cuda_graph_lengths(base_model) if config.cuda_graphs == "on" else [],
        "peak_memory": peak_memory_text(config.on_gpu),
        "memory_plan": memory_plan_text(fastgemma.memory_plan(base_model), config.memory_budget),
        "output_dir": str(config.output_dir.resolve()),
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "micro_batch_auto": micro_batch,
        "fastgemma_patched": fastgemma.is_patched(trainer.model),  # still patched after PEFT wrapping
    }
    # Every rank's peak, and what ran where.
    summary["peak_memory_mib"] = distributed.peak_memory(launch, config.on_gpu)
    summary["peak_memory_per_rank"] = distributed.memory_line(launch, summary["peak_memory_mib"])
    summary["per"] = "GPU" if config.on_gpu else "process"
    summary["processes"] = (f"{launch.describe()}, {'FSDP' if config.fsdp else 'DDP'}; "
                            f"per-{summary['per']} batch {config.batch_size}")
    return summary


def write_summary(config, summary: dict) -> None:
    """recipe_summary.json in --output-dir: the summary, the generations and the resolved config."""
    from .config import as_json

    with open(config.output_dir / "recipe_summary.json", "w") as file:
        json.dump({**summary, "config": as_json(config)}, file, indent=2, default=str)
