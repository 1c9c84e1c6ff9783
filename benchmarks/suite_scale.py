"""Past one GPU: the recipe on 1 and 2 GPUs (DDP), and FSDP under a per-GPU memory cap.

Commands of at most 10 minutes each on a 2-GPU machine (NCCL_NVLS_ENABLE=0 is set for the runs):

    python3 -m benchmarks.suite_scale ddp  --out $OUT/scale                       # ~3-4 min
    python3 -m benchmarks.suite_scale ddp  --out $OUT/scale --gpus 4 --steps 16   # 4-GPU machine: 1 vs 4 GPUs
    python3 -m benchmarks.suite_scale fsdp --out $OUT/scale --fsdp-runs measure   # ~5-6 min (writes 27B in NF4: 16 GB)
    python3 -m benchmarks.suite_scale fsdp --out $OUT/scale --fsdp-runs confirm   # ~4-5 min (same machine: --work)

ddp:  random Gemma 2 2B weights (recipes/make_random_gemma2.py) loaded through the recipe's nf4 path, trained
      on synthetic text documents of 200-2000 tokens packed into 2048-token rows, with the same per-GPU
      micro-batch (4 rows) on 1 GPU (python) and on --gpus N GPUs (torchrun; 2 by default). The 1-GPU run
      accumulates N micro-batches per step, so both runs take the same global batch (4N rows) per optimizer
      step and their loss curves should match within bf16 noise. Reports global and per-GPU tokens/s (second half of the steps,
      and after step 1), the scaling ratio, peak memory per GPU and both loss curves.
fsdp: random weights with the real Gemma 2 27B shapes (all 46 layers by default; --layers N keeps the real
      layer shapes but fewer of them, and the report says so), QLoRA, one --fsdp-seq-token row per step.
      measure: one GPU and two GPUs with FSDP, both uncapped; the cap is put midway between FSDP's peak
      reservation per GPU and one GPU's peak allocation (if FSDP needs less). confirm: FSDP on 2 GPUs and one
      GPU, both under that cap (torch.cuda.set_per_process_memory_fraction): FSDP should train, one GPU should
      run out of memory. FSDP needs less per GPU only when activations outweigh about half the 4-bit weights:
      each rank first holds the whole 4-bit model, and accelerate keeps it next to the new shards while sharding.

Each part writes <out>/<part>.json (all numbers), <part>.md (the tables) and the logs of every run, and
prints the tables. `--tiny` runs the same plumbing on the CPU with the tiny demo model (a check of this
script, not a measurement; FSDP needs GPUs and is reported as failed there).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import fmt, git_revision, markdown_table  # noqa: E402

RECIPE = REPO / "recipes" / "sft_gemma2.py"
CAPPED = REPO / "benchmarks" / "capped_recipe.py"
MAKE_RANDOM = REPO / "recipes" / "make_random_gemma2.py"
TINY_TOKENIZER = REPO / "recipes" / "assets" / "tiny_gemma2"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
GIB = 2**30


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------
def write_documents(path: Path, count: int, shortest: int, longest: int, seed: int = 0) -> Path:
    """Plain-text documents of random lowercase words, `shortest`..`longest` characters (the tiny
    character-level tokenizer makes that about as many tokens)."""
    if path.exists():
        return path
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    with path.open("w") as f:
        for _ in range(count):
            target = rng.randint(shortest, longest)
            words, size = [], 0
            while size < target:
                word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
                words.append(word)
                size += len(word) + 1
            f.write(json.dumps({"text": " ".join(words)[:target]}) + "\n")
    return path


def build_random_model(directory: Path, size: str, layers: int | None, log_path: Path) -> tuple[Path, float]:
    """Random-init Gemma 2 with the published shapes (bf16 safetensors + the tiny tokenizer); reused if present."""
    if (directory / "config.json").exists() and any(directory.glob("*.safetensors")):
        return directory, 0.0
    start = time.perf_counter()
    if layers is None:
        command = [sys.executable, str(MAKE_RANDOM), "--size", size, "--out", str(directory)]
    else:  # the published layer shapes, fewer layers (make_random_gemma2.py has no such option)
        code = (
            "import shutil, sys, torch; from pathlib import Path\n"
            f"sys.path.insert(0, {str(REPO)!r})\n"
            "from transformers import AutoModelForCausalLM\n"
            "from fastgemma.patches.gemma2_shapes import published_config\n"
            f"config = published_config({size!r}, num_hidden_layers={layers})\n"
            "torch.manual_seed(0)\n"
            "with torch.device('cuda'):\n"
            "    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)\n"
            f"out = Path({str(directory)!r}); out.mkdir(parents=True, exist_ok=True)\n"
            "model.save_pretrained(out)\n"
            f"for name in {TOKENIZER_FILES!r}: shutil.copy(Path({str(TINY_TOKENIZER)!r}) / name, out / name)\n"
            "print('params', sum(p.numel() for p in model.parameters()))\n"
        )
        command = [sys.executable, "-c", code]
    with log_path.open("w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return directory, time.perf_counter() - start


def build_nf4_model(directory: Path, layers: int | None, log_path: Path) -> tuple[Path, float]:
    """Random 27B-shaped weights written directly as a pre-quantised NF4 checkpoint; reused if present."""
    if (directory / "config.json").exists() and (directory / "model.safetensors.index.json").exists():
        return directory, 0.0
    start = time.perf_counter()
    command = [sys.executable, "-m", "benchmarks.random_4bit_gemma2", "--size", "27b", "--out", str(directory)]
    if layers is not None:
        command += ["--layers", str(layers)]
    with log_path.open("w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=environment())
    return directory, time.perf_counter() - start


# ---------------------------------------------------------------------------------------
# Running the recipe
# ---------------------------------------------------------------------------------------
def environment(gpus: str | None = None, result_dir: Path | None = None) -> dict:
    env = dict(os.environ)
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    if result_dir is not None:
        env["CAPPED_RECIPE_RESULT_DIR"] = str(result_dir)
    return env


def launch_command(processes: int, script: Path, arguments: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, str(script), *arguments]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            str(script), *arguments]


def run_recipe(name: str, out: Path, work: Path, processes: int, recipe_args: list[str], timeout: float,
               gpus: str | None = None, cap_gib: float | None = None) -> dict:
    """One recipe run (through capped_recipe.py); returns what it left: status, summary, losses, per-rank records.
    The recipe's output directory (adapters of hundreds of MB for 27B) stays under `work`; its log, summary and
    trainer_state.json are kept under `out`."""
    run_dir = out / name
    output_dir = work / "runs" / name
    for directory in (run_dir, output_dir):
        shutil.rmtree(directory, ignore_errors=True)
    run_dir.mkdir(parents=True)
    wrapper_args = ([] if cap_gib is None else ["--cap-gib", f"{cap_gib:.3f}"]) + ["--", *recipe_args,
                                                                                     "--output-dir", str(output_dir)]
    command = launch_command(processes, CAPPED, wrapper_args)
    log_path = run_dir / "log.txt"
    record = {"name": name, "processes": processes, "cap_gib": cap_gib, "command": " ".join(command),
              "log": str(log_path)}
    start = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=environment(gpus, run_dir / "ranks"), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            record["status"] = process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            record["status"] = "timeout"
    record["wall_s"] = time.perf_counter() - start
    ranks = sorted((run_dir / "ranks").glob("rank*.json"))
    record["ranks"] = [json.loads(path.read_text()) for path in ranks]
    record["oom"] = any(rank.get("oom") for rank in record["ranks"])
    for kept in ("recipe_summary.json", "trainer_state.json"):
        if (output_dir / kept).exists():
            shutil.copy(output_dir / kept, run_dir / kept)
    summary_path = output_dir / "recipe_summary.json"
    if summary_path.exists():
        record["summary"] = json.loads(summary_path.read_text())
    state_path = output_dir / "trainer_state.json"
    if state_path.exists():
        history = json.loads(state_path.read_text())["log_history"]
        record["losses"] = {entry["step"]: entry["loss"] for entry in history if "loss" in entry}
    text = log_path.read_text(errors="replace")
    record["reached_training"] = reached_training(text)
    # Also when the recipe turned the error into an exit status of its own.
    record["oom"] = record["oom"] or "CUDA out of memory" in text or "OutOfMemoryError" in text
    if record["status"] not in (0,) and not record["oom"]:
        record["error_tail"] = text[-1500:]
    return record


def reached_training(log_text: str) -> bool:
    """Whether the recipe got past loading: it prints its LoRA line ("... N trainable parameters ...") just before."""
    return "trainable parameters" in log_text


def outcome(record: dict) -> str:
    if record.get("skipped"):
        return f"skipped ({record['skipped']})"
    if record["status"] == 0:
        return "trained"
    if record["oom"]:
        return "OOM " + ("in training" if record["reached_training"] else "while loading")
    return f"failed (status {record['status']})"


def peak_gib(record: dict, key: str = "allocated") -> list[float] | None:
    """Per-rank peak from the recipe's summary (MiB), or from the wrapper's records for a run that died."""
    memory = record.get("summary", {}).get("peak_memory_mib", {})
    if key in memory:
        return [value / 1024 for value in memory[key]]
    wrapper_key = f"peak_{key}_gib"
    values = [rank[wrapper_key] for rank in record.get("ranks", []) if wrapper_key in rank]
    return values or None


def fmt_list(values, digits=1) -> str:
    return "-" if not values else " / ".join(fmt(float(v), digits) for v in values)


# ---------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------
class Clock:
    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def part_ddp(args, out: Path, clock: Clock) -> dict:
    result = {"part": "ddp", "tiny": args.tiny}
    if args.tiny:
        model_args = ["--max-seq-length", "256", "--packing"]
        docs = write_documents(out / "docs.jsonl", 300, 50, 250)
    else:
        model, result["build_s"] = build_random_model(Path(args.work) / "gemma2-2b-random", "2b", None,
                                                      out / "build-2b.log")
        model_args = ["--model", str(model), "--load-in-4bit", "--packing", "--max-seq-length", str(args.seq)]
        docs = write_documents(Path(args.work) / "docs.jsonl", args.docs, 200, 2000)
    common = [*model_args, "--dataset", str(docs), "--max-steps", str(args.steps), "--logging-steps", "1",
              "--batch-size", str(args.micro_batch), "--show-generations", "0"]
    result["common_args"] = common
    runs = []
    n = args.gpus
    plan = [("ddp-1gpu", 1, n, "0"), (f"ddp-{n}gpu", n, 1, ",".join(str(i) for i in range(n)))]
    for name, processes, accumulation, gpus in plan:
        if clock.left() < 60:
            runs.append({"name": name, "processes": processes, "skipped": "time budget", "status": None, "oom": False})
            continue
        arguments = [*common, "--grad-accum", str(accumulation)]
        runs.append(run_recipe(name, out, Path(args.work), processes, arguments, clock.left() - 10,
                               gpus=None if args.tiny else gpus))
        runs[-1]["grad_accum"] = accumulation
    result["runs"] = runs

    one, two = runs
    rate = {}
    for key in ("late_tokens_per_s", "warm_tokens_per_s", "tokens_per_s"):
        a, b = one.get("summary", {}).get(key), two.get("summary", {}).get(key)
        rate[key] = (b / a) if a and b else None
    result["scaling"] = rate
    rows = []
    for run in runs:
        summary = run.get("summary", {})
        world = summary.get("world_size", run["processes"])
        rows.append([
            run["name"], world, f"{args.micro_batch}x{args.seq}", run.get("grad_accum", "-"),
            world * run.get("grad_accum", 1) * args.micro_batch, outcome(run),
            fmt(summary.get("late_tokens_per_s"), 0), fmt(summary.get("late_tokens_per_s_per_gpu"), 0),
            fmt(summary.get("warm_tokens_per_s"), 0), fmt(summary.get("warm_tokens_per_s_per_gpu"), 0),
            fmt_list(peak_gib(run)), fmt_list(peak_gib(run, "reserved")), fmt(run.get("wall_s"), 0),
        ])
    table = markdown_table(
        ["run", "GPUs", "micro-batch per GPU", "grad accum", "global batch (rows)", "result",
         "tokens/s 2nd half (all GPUs)", "per GPU", "tokens/s after step 1", "per GPU",
         "peak alloc GiB per GPU", "peak reserved GiB per GPU", "wall s"],
        rows,
    )
    scaling = (f"scaling {n} GPUs / 1 GPU: {fmt(rate['late_tokens_per_s'], 2)}x (second half of the steps), "
               f"{fmt(rate['warm_tokens_per_s'], 2)}x (after step 1), {fmt(rate['tokens_per_s'], 2)}x (whole run "
               "with start-up compile)")
    losses_one, losses_two = one.get("losses", {}), two.get("losses", {})
    steps = sorted(set(losses_one) | set(losses_two), key=int)
    loss_rows, gaps = [], []
    for step in steps:
        a, b = losses_one.get(step), losses_two.get(step)
        if a is not None and b is not None:
            gaps.append(abs(a - b))
        loss_rows.append([step, fmt(a, 4), fmt(b, 4), fmt(None if a is None or b is None else b - a, 4)])
    result["loss_gap_max"] = max(gaps) if gaps else None
    result["loss_gap_mean"] = sum(gaps) / len(gaps) if gaps else None
    loss_table = markdown_table(["step", "loss 1 GPU", f"loss {n} GPUs", "difference"], loss_rows)
    result["markdown"] = "\n\n".join([
        table, scaling,
        (f"Loss curves, same global batch per step (max |difference| {fmt(result['loss_gap_max'], 4)}, "
         f"mean {fmt(result['loss_gap_mean'], 4)}):"),
        loss_table,
    ])
    loss_line = (f"loss: max |1 GPU - {n} GPUs| {fmt(result['loss_gap_max'], 4)}, "
                 f"mean {fmt(result['loss_gap_mean'], 4)} over {len(gaps)} steps")
    result["printed"] = "\n\n".join([table, scaling, loss_line])
    return result


def part_fsdp(args, out: Path, clock: Clock) -> dict:
    result = {"part": "fsdp", "tiny": args.tiny, "layers": args.layers}
    if args.tiny:
        model_args = ["--max-seq-length", "256", "--packing"]
        docs = write_documents(out / "docs.jsonl", 300, 50, 250)
        result["model"] = "tiny demo model (CPU check of this script)"
    else:
        layers = None if args.layers == 46 else args.layers
        shapes = ("Gemma 2 27B shapes, all 46 layers" if layers is None else
                  f"Gemma 2 27B layer shapes, {args.layers} of the 46 layers (embedding and layers real size)")
        if args.bf16_checkpoint:  # bf16 weights, quantised by the recipe while loading (54 GB for all of 27B)
            name = "gemma2-27b-random" if layers is None else f"gemma2-27b-shapes-{args.layers}-layers"
            model, result["build_s"] = build_random_model(Path(args.work) / name, "27b", layers, out / "build-27b.log")
            result["model"] = shapes + ", bf16 checkpoint quantised while loading"
        else:  # written in NF4 directly (about 16 GB for all of 27B): loading reads it as a pre-quantised checkpoint
            name = f"gemma2-27b-nf4-{args.layers}-layers"
            model, result["build_s"] = build_nf4_model(Path(args.work) / name, layers, out / "build-27b.log")
            result["model"] = shapes + ", pre-quantised NF4 checkpoint (benchmarks/random_4bit_gemma2.py)"
        model_args = ["--model", str(model), "--load-in-4bit", "--packing", "--max-seq-length", str(args.fsdp_seq)]
        docs = write_documents(Path(args.work) / "docs.jsonl", args.docs, 200, 2000)
    common = [*model_args, "--dataset", str(docs), "--max-steps", str(args.fsdp_steps), "--logging-steps", "1",
              "--batch-size", "1", "--grad-accum", "1", "--optim", "adamw_torch", "--show-generations", "0"]
    result["common_args"] = common
    runs = result["runs"] = []
    # The measuring runs may come from an earlier command: its --out, or (a fresh $OUT each command) --work.
    previous = next((path for path in (out / "fsdp.json", Path(args.work) / "fsdp.json") if path.exists()), None)
    if args.fsdp_runs == "confirm" and previous is not None:
        earlier = json.loads(previous.read_text())
        runs.extend(run for run in earlier.get("runs", []) if "uncapped" in run["name"])
        result["window"] = earlier.get("window")

    def attempt(name, processes, extra, cap, gpus):
        if clock.left() < 90:
            runs.append({"name": name, "processes": processes, "cap_gib": cap, "skipped": "time budget",
                         "status": None, "oom": False})
            return runs[-1]
        runs.append(run_recipe(name, out, Path(args.work), processes, [*common, *extra], clock.left() - 10,
                               gpus=None if args.tiny else gpus, cap_gib=None if args.tiny else cap))
        return runs[-1]

    if args.fsdp_runs in ("measure", "all"):
        one = attempt("fsdp-1gpu-uncapped", 1, [], None, "0")
        two = attempt("fsdp-2gpu-uncapped", 2, ["--fsdp"], None, "0,1")
        result["window"] = cap_window(one, two)
    window = result.get("window") or {}
    cap = args.cap_gib if args.cap_gib else window.get("cap_gib")
    result["cap_gib"] = cap
    result["cap_rule"] = "given (--cap-gib)" if args.cap_gib else window.get("rule", "no measuring runs")
    if args.fsdp_runs in ("confirm", "all"):
        if cap is None and not args.tiny:
            result["confirm_skipped"] = f"no cap to confirm: {result['cap_rule']}"
        else:
            attempt("fsdp-2gpu-capped", 2, ["--fsdp"], cap, "0,1")
            attempt("fsdp-1gpu-capped", 1, [], cap, "0")

    rows = []
    for run in runs:
        summary = run.get("summary", {})
        loading = [rank["loading_peak_allocated_gib"] for rank in run.get("ranks", [])
                   if "loading_peak_allocated_gib" in rank]
        rows.append([
            run["name"], run["processes"], "none" if run.get("cap_gib") is None else fmt(run["cap_gib"], 2),
            outcome(run), fmt_list(loading, 2), fmt_list(peak_gib(run), 2), fmt_list(peak_gib(run, "reserved"), 2),
            fmt(summary.get("late_tokens_per_s"), 0), fmt(summary.get("late_tokens_per_s_per_gpu"), 0),
            fmt(summary.get("warm_tokens_per_s"), 0), fmt(run.get("wall_s"), 0),
        ])
    table = markdown_table(
        ["run", "GPUs", "cap GiB per GPU", "result", "loading peak alloc GiB", "training peak alloc GiB per GPU",
         "training peak reserved GiB per GPU",
         "tokens/s 2nd half (all GPUs)", "per GPU", "tokens/s after step 1", "wall s"],
        rows,
    )
    fractions = [rank.get("fraction") for run in runs for rank in run.get("ranks", []) if rank.get("fraction")]
    totals = [rank["total_gib"] for run in runs for rank in run.get("ranks", []) if rank.get("total_gib")]
    total = totals[0] if totals else None
    note = (f"model: {result['model']}; QLoRA nf4 (bf16 storage under FSDP), LoRA r16 all linear layers, "
            f"1x{args.fsdp_seq}-token packed rows, {args.fsdp_steps} steps, adamw_torch. Cap: {fmt(cap, 2)} GiB "
            f"per GPU ({result['cap_rule']}"
            + (f"; memory fraction {fractions[0]:.4f} of {total:.1f} GiB" if fractions and total else "")
            + ").")
    if result.get("confirm_skipped"):
        note += " " + result["confirm_skipped"] + "."
    result["markdown"] = result["printed"] = table + "\n\n" + note
    return result


def cap_window(one_gpu: dict, fsdp: dict) -> dict:
    """The per-GPU cap to test: between what FSDP on 2 GPUs needed and what one GPU needed, when there is room.

    One GPU surely runs out of memory under a cap below its peak allocation. FSDP should fit under a cap at or
    above its peak reservation (what its allocator held; allocation alone can fit and still fail on
    fragmentation). FSDP's peak includes the moment of sharding, when accelerate still holds each rank's whole
    4-bit model next to the new shards, so FSDP needs less than one GPU only when activations outweigh about half
    the 4-bit weights (long rows, many layers).
    """
    single, sharded = peak_gib(one_gpu), peak_gib(fsdp, "reserved") or peak_gib(fsdp)
    loading = [rank.get("loading_peak_reserved_gib", 0.0) for rank in fsdp.get("ranks", [])]
    if sharded and loading:  # the cap holds from the start: loading the whole 4-bit model must fit too
        sharded = [max(a, b) for a, b in zip(sharded, loading)] if len(loading) == len(sharded) else sharded
    if one_gpu.get("status") != 0 or fsdp.get("status") != 0 or not single or not sharded:
        return {"rule": f"no window: the uncapped runs did not both train ({outcome(one_gpu)}, {outcome(fsdp)})"}
    high, low = single[0], max(sharded)
    window = {"one_gpu_peak_allocated_gib": high, "fsdp_peak_reserved_gib": low, "fsdp_loading_reserved_gib": loading}
    if low + 0.25 >= high:
        window["rule"] = (f"no window: FSDP on 2 GPUs reserved {low:.2f} GiB per GPU at its peak, one GPU "
                          f"allocated {high:.2f} GiB; FSDP saves memory here only with longer rows or more layers")
        return window
    window["cap_gib"] = (low + high) / 2
    window["rule"] = (f"midway between FSDP's peak reservation per GPU ({low:.2f} GiB) and one GPU's peak "
                      f"allocation ({high:.2f} GiB), both measured uncapped")
    return window


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ["torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes"]:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    try:
        import torch

        if torch.cuda.is_available():
            found["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception as error:  # provenance only
        found["gpu"] = f"unknown ({type(error).__name__})"
    found["fastgemma_git"] = git_revision()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["ddp", "fsdp", "all"])
    parser.add_argument("--out", default=os.environ.get("OUT", "scale_out"), help="where results and logs go [$OUT]")
    parser.add_argument("--work", default="/tmp/fastgemma_scale", help="random checkpoints and the dataset")
    parser.add_argument("--budget-s", type=float, default=570, help="stop starting runs after this long [570]")
    parser.add_argument("--steps", type=int, default=30, help="ddp: optimizer steps per run [30]")
    parser.add_argument("--micro-batch", type=int, default=4, help="ddp: packed rows per GPU per micro-step [4]")
    parser.add_argument("--seq", type=int, default=2048, help="ddp: packed row length [2048]")
    parser.add_argument("--gpus", type=int, default=2,
                        help="ddp: GPUs of the data-parallel run, against one GPU accumulating as many micro-steps [2]")
    parser.add_argument("--docs", type=int, default=1200, help="synthetic documents (200-2000 tokens) [1200]")
    parser.add_argument("--layers", type=int, default=46, help="fsdp: decoder layers of 27B shape [46 = all]")
    parser.add_argument("--fsdp-seq", type=int, default=16384,
                        help="fsdp: packed row length; FSDP saves memory only when activations are large [16384]")
    parser.add_argument("--fsdp-steps", type=int, default=3, help="fsdp: optimizer steps per run [3]")
    parser.add_argument("--fsdp-runs", choices=["measure", "confirm", "all"], default="all",
                        help="fsdp: measure = 1 GPU and 2 GPUs (FSDP) uncapped, giving the cap; confirm = both under "
                        "the cap (from --cap-gib or <out>/fsdp.json of a measure command); all = both [all]")
    parser.add_argument("--cap-gib", type=float, help="fsdp: use this cap instead of the measured one")
    parser.add_argument("--bf16-checkpoint", action="store_true",
                        help="fsdp: write bf16 weights for the recipe to quantise while loading (54 GB for 27B) "
                        "instead of a pre-quantised NF4 checkpoint (16 GB)")
    parser.add_argument("--tiny", action="store_true", help="CPU check of this script with the tiny demo model")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.micro_batch, args.seq, args.fsdp_seq, args.fsdp_steps = 8, 2, 256, 256, 3

    out = Path(args.out) / ("tiny" if args.tiny else "")
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget_s)
    parts = ["ddp", "fsdp"] if args.part == "all" else [args.part]
    for part in parts:
        result = (part_ddp if part == "ddp" else part_fsdp)(args, out, clock)
        result["versions"] = versions()
        result["argv"] = sys.argv
        (out / f"{part}.json").write_text(json.dumps(result, indent=2, default=str))
        (Path(args.work) / f"{part}.json").write_text(json.dumps(result, indent=2, default=str))  # for a later command
        header = (f"## {part} — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
                  f"versions: {json.dumps(result['versions'])}\n\ncommand: `{' '.join(sys.argv)}`\n\n")
        (out / f"{part}.md").write_text(header + result["markdown"] + "\n")
        print(f"\n== {part} ({out / (part + '.md')}) ==\n{result['printed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
