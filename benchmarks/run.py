"""Entry point: ``python -m benchmarks.run --suite kernel|model|trl|context|all``.

Prints markdown tables as it goes, appends one row per contender and workload (with date, commit, GPU,
versions and the exact command line) to benchmarks/results.jsonl (or --results PATH) and then regenerates
benchmarks/RESULTS.md from it, and writes the raw rows as JSON (--json PATH), rewritten after every contender
so a run cut short still leaves its finished rows behind.

--tiny is the CPU smoke configuration (tiny Gemma 2, a couple of steps); it never writes into
benchmarks/results.jsonl unless --results names that file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from . import report
from . import results as R

DEFAULT_RESULTS = report.RESULTS_FILE
SUITES = ("kernel", "model", "trl", "context")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="all", help="kernel, model, trl, context, all, or a comma list")
    p.add_argument("--tiny", action="store_true", help="CPU smoke configuration (tiny Gemma 2)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    p.add_argument("--results", default=None, help=f"results file (JSON lines) to append to (default "
                   f"{DEFAULT_RESULTS}, then RESULTS.md is regenerated; with --tiny: a temporary file)")
    p.add_argument("--no-results", action="store_true", help="do not append to any results file")
    p.add_argument("--json", default=None, help="write raw results as JSON to this path")
    p.add_argument("--plot", default=None, help="model suite: draw tokens/s and peak memory into this PNG")
    p.add_argument("--from-json", default=None, nargs="+", metavar="JSON",
                   help="do not run anything: append the rows stored in these JSON files (from GPU runs, e.g. one "
                   "per model) to the results file, print one table per suite and redraw the plot")
    p.add_argument("--models", default=None, help="comma list of 2b,9b,27b (suite defaults otherwise)")
    p.add_argument("--seqs", default=None, help="comma list of sequence lengths, e.g. 2048,8192 or 2k,8k")
    p.add_argument("--shapes", default=None, help="model suite: comma list of BxS, e.g. 2x2048,1x8192")
    p.add_argument("--masks", default=None, help="kernel suite: comma list of causal,sliding,docs")
    p.add_argument("--contenders", default=None,
                   help="comma list among hf-eager,hf-flex,liger,fastgemma (kernel also: fastgemma-<backend>; "
                   "trl and context also: unsloth,unsloth-nocompile)")
    p.add_argument("--fastgemma-backend", default="auto", help="backend for patch_model in model/trl/context")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (suite default otherwise)")
    p.add_argument("--iters", type=int, default=None, help="timed steps (kernel/model; suite default otherwise)")
    p.add_argument("--steps", type=int, default=None, help="trl suite: optimizer steps per contender")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget per suite; contenders not started in time are reported as skipped")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--q-std", type=float, default=10.0, help="kernel suite: std of q (raw logit std)")
    p.add_argument("--no-ref", action="store_true", help="kernel suite: skip the float64 reference")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--ckpt-dir", default=None,
                   help="trl/context: where random-init checkpoints are saved for from_pretrained + nf4 "
                   "(default $TMPDIR/fastgemma_bench_ckpt)")
    p.add_argument("--no-quant", action="store_true", help="trl/context: LoRA on bf16 instead of QLoRA nf4")
    p.add_argument("--trl-max-length", type=int, default=None, help="trl suite: max_length (default 4096)")
    p.add_argument("--trl-batch", type=int, default=4, help="trl suite: per_device_train_batch_size")
    p.add_argument("--trl-grad-accum", type=int, default=1, help="trl suite: gradient_accumulation_steps")
    p.add_argument("--trl-trainer", default="trl",
                   help="trl suite: the trainer every contender runs under: 'trl' (TRL's SFTTrainer as users run it), "
                   "'lean' (fastgemma.lean_trainer(SFTTrainer), the recipe's), or 'trl,lean' for both, ratios "
                   "within each")
    p.add_argument("--trl-pad-multiple", type=int, default=None,
                   help="trl suite: pad each micro-batch's flattened row to a multiple of this many tokens (TRL's "
                   "pad_to_multiple_of; pad tokens are not counted), so that its matrix shapes repeat across steps")
    p.add_argument("--trl-trace-dir", default=None,
                   help="trl suite: also record the host's ops in the profiled step, save its Chrome trace here and "
                   "print the GPU's longest idle gaps with what the host ran meanwhile")
    p.add_argument("--unsloth-path", default=os.environ.get("FASTGEMMA_UNSLOTH_PATH"),
                   help="trl and context suites, Unsloth contenders: the PYTHONPATH of their process, before the repository "
                   "root, e.g. /tmp/site-unsloth:.wu/pkgs (default $FASTGEMMA_UNSLOTH_PATH; unset: this "
                   "process's environment)")
    p.add_argument("--unsloth-timeout-s", type=float, default=None,
                   help="trl and context suites: wall-clock limit of each Unsloth process (default 900 s; the "
                   "context suite adds its search's time cap)")
    p.add_argument("--context-start", type=int, default=None, help="context suite: first length tried")
    p.add_argument("--context-max", type=int, default=None, help="context suite: cap of the search")
    p.add_argument("--context-step", type=int, default=None, help="context suite: resolution (default 1024)")
    p.add_argument("--context-gpu-gib", type=float, default=None,
                   help="context suite: cap this process's GPU memory at this many GiB "
                   "(torch.cuda.set_per_process_memory_fraction), emulating a smaller card")
    p.add_argument("--context-loss", default="chunked", choices=("chunked", "hf"),
                   help="context suite: 'chunked' = LM head + CE in 512-token checkpointed chunks for every "
                   "contender (as TRL's fused LM head); 'hf' = the model's own loss from labels")
    p.add_argument("--contender-budget-s", type=float, default=None,
                   help="context suite: search time cap per contender (default 240 s)")
    return p


def render_section(suite: str, env: dict, res, tiny: bool) -> str:
    lines = [
        f"## {suite} suite — {env['date']}" + (" (tiny CPU smoke run)" if tiny else ""),
        "",
        f"- GPU: {env['gpu']} (CUDA {env['cuda']})",
        f"- versions: torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}, "
        f"peft {env['peft']}, bitsandbytes {env['bitsandbytes']}, liger-kernel {env['liger_kernel']}, "
        f"accelerate {env['accelerate']}, python {env['python']}; fastgemma git {env['fastgemma_git']}",
        f"- command: `{env['command']}`",
        "",
    ]
    for n in res.notes:
        lines.append(f"> {n}")
        lines.append(">")
    if res.notes:
        lines.pop()
        lines.append("")
    lines.append(res.table)
    for f in res.extra_files:
        lines.append("")
        lines.append(f"![{suite} suite]({f})")
    lines.append("")
    return "\n".join(lines)


def record(path: str | None, suite: str, harness_rows: list[dict], env: dict) -> None:
    """Append a suite's rows to the results file; the default one's report is regenerated with it."""
    if not path:
        return
    R.append(path, R.from_harness(suite, harness_rows, env))
    if os.path.abspath(path) == os.path.abspath(DEFAULT_RESULTS):
        report.main([])


def merge_payloads(payloads: list[dict]) -> dict:
    """{suite: (env, {"rows": [...], "notes": [...]})}, each suite merged over the runs that measured it.

    A suite's env (date, command, versions) names only the runs that contributed its rows.
    """
    runs_of: dict = {}
    for p in payloads:
        for suite in p.get("suites", {}):
            runs_of.setdefault(suite, []).append(p)
    merged = {}
    for suite, runs in runs_of.items():
        env = dict(runs[0]["env"])
        commands, dates = [], []
        data: dict = {"rows": [], "notes": []}
        for p in runs:
            e = p["env"]
            if e["command"] not in commands:
                commands.append(e["command"])
            dates.append(e["date"])
            for k in ("gpu", "torch", "transformers", "trl", "peft", "bitsandbytes", "liger_kernel", "fastgemma_git"):
                if e.get(k) != env.get(k) and f" / {e.get(k)}" not in str(env.get(k)):
                    env[k] = f"{env.get(k)} / {e.get(k)}"
            data["rows"].extend(p["suites"][suite]["rows"])
            for n in p["suites"][suite].get("notes", []):
                if n not in data["notes"]:
                    data["notes"].append(n)
        env["command"] = "` ; `".join(commands)
        if len(runs) > 1:
            env["date"] = f"{min(dates)} .. {max(dates)} (merged from {len(runs)} runs)"
        merged[suite] = (env, data)
    return merged


def _from_json(args) -> int:
    from . import common as C
    from .plot import plot_model_suite
    from .suite_registry import table_for

    payloads = []
    for path in args.from_json:
        with open(path) as f:
            payloads.append(json.load(f))
    results = None if args.no_results else (args.results or DEFAULT_RESULTS)
    for suite, (env, data) in merge_payloads(payloads).items():
        res = C.SuiteResult(suite, rows=data["rows"], notes=data["notes"])
        res.table = table_for(suite, res.rows)
        if suite == "model" and args.plot and plot_model_suite(res.rows, args.plot, env):
            res.extra_files.append(args.plot)
        print(render_section(suite, env, res, any(p.get("tiny") for p in payloads)), flush=True)
    if results:
        for p in payloads:  # each run's rows with that run's own provenance
            for suite, data in p.get("suites", {}).items():
                record(results, suite, data["rows"], p["env"])
        print(f"appended to {results}", flush=True)
    return 0


def show_fastgemma_log() -> None:
    """fastgemma's INFO messages on stderr (what it patched, what it recorded, why a fast path did not apply):
    a benchmark log must say which path ran."""
    import logging

    logger = logging.getLogger("fastgemma")
    if not any(getattr(h, "_fastgemma_bench", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[fastgemma %(asctime)s] %(message)s", "%H:%M:%S"))
        handler._fastgemma_bench = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.from_json:
        _from_json(args)
        return {}

    from . import common as C

    suites = list(SUITES) if args.suite == "all" else C.parse_list(args.suite, SUITES)
    for s in suites:
        if s not in SUITES:
            raise SystemExit(f"unknown suite {s!r}; choose from {', '.join(SUITES)} or all")

    import torch

    device = C.pick_device(args.tiny, force_cpu=args.cpu)
    threads_before = torch.get_num_threads()
    if os.environ.get("BENCH_CPU_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_CPU_THREADS"]))
    elif device.type == "cpu" and args.tiny:
        # Tiny matmuls on a small shared CPU run far slower with intra-op threads contending.
        torch.set_num_threads(1)
    try:
        return _run(args, argv, device, suites)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, argv: list[str], device, suites: list[str]) -> dict:
    from . import common as C
    from .suite_registry import get_suite

    if args.tiny:  # never benchmarks/results.jsonl unless asked for explicitly
        tmpdir = tempfile.mkdtemp(prefix="fastgemma_bench_tiny_") if not (args.no_results or args.results) else None
        results = None if args.no_results else (args.results or os.path.join(tmpdir, "results.jsonl"))
    else:
        results = None if args.no_results else (args.results or DEFAULT_RESULTS)
    args.results_path = results

    env = C.env_info(device, ["benchmarks/run.py", *argv])
    C.log(f"device {device} | {env['gpu']} | torch {env['torch']} transformers {env['transformers']} "
          f"trl {env['trl']} peft {env['peft']} bnb {env['bitsandbytes']} liger {env['liger_kernel']}")
    C.log(f"command: {env['command']}")
    payload: dict = {
        "env": env,
        "tiny": args.tiny,
        "args": {k: v for k, v in vars(args).items() if not callable(v)},
        "suites": {},
        "results_file": results,
        "sections": {},
    }

    run_id = f"{env['date']} pid{os.getpid()}"
    payload["run_id"] = run_id

    def save(res=None) -> None:
        if res is not None:
            for row in res.rows:
                row.setdefault("run", run_id)  # ratios are only taken between rows of the same run
            payload["suites"][res.suite] = res.to_json()
        if args.json:
            C.write_json(args.json, payload)

    args.on_row = save
    C.raise_recompile_limits()
    t_all = time.perf_counter()
    for suite in suites:
        t0 = time.perf_counter()
        C.log(f"=== suite {suite} ===")
        mod = get_suite(suite)
        res = mod.run(args, device)
        save(res)
        res.table = mod.table(res.rows)
        res.notes.append(f"suite wall time {time.perf_counter() - t0:.0f} s")
        if suite == "model" and res.rows and args.plot:
            from .plot import plot_model_suite

            if plot_model_suite(res.rows, args.plot, env):
                res.extra_files.append(args.plot)
                C.log(f"plot written to {args.plot}")
        save(res)
        text = render_section(suite, env, res, args.tiny)
        payload["sections"][suite] = text
        print("\n" + text, flush=True)
        if results:
            record(results, suite, res.rows, env)
            C.log(f"appended to {results}")
    C.log(f"all done in {time.perf_counter() - t_all:.0f} s" + (f"; JSON: {args.json}" if args.json else ""))
    payload["results_file"] = results
    return payload


if __name__ == "__main__":
    show_fastgemma_log()  # from the command line only: a caller's (or a test's) logging stays its own
    main()
