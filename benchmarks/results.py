"""The results file: one JSON object per line, one line per measured row (a contender on a workload).

Every row carries its own provenance, so a table can be rebuilt from any subset of rows:

    date, commit, gpu, versions{package: version}, command, run, source, notes[]   where and how it was measured
    own_process (only when true)   the contender ran in a process of its own, with the versions it names
    suite, contender, label, workload{...}, status                                what was measured
    metrics{...}, ratios{baseline contender: x}                                   what came out

`run` groups rows measured together: ratios are only ever taken between rows of one run. `source` says how
the row got here ("benchmarks.run", or the document a row was transcribed from).
"""

from __future__ import annotations

import json
import os

# The fields of a harness row that say what was measured; rows with equal workloads are comparable.
WORKLOAD_FIELDS = {
    "kernel": ("model", "heads", "seq", "mask"),
    "model": ("model", "batch", "seq"),
    "trl": ("model", "trainer", "quant", "batch", "max_length", "grad_accum"),
    "context": ("model", "loss_mode", "cap", "resolution"),
}

# metric name in the results file <- (field of the harness row, factor): one vocabulary across suites.
METRICS = {
    "kernel": {"fwd_bwd_ms": ("ms", 1), "tflops": ("tflops", 1), "peak_extra_mib": ("peak_extra_mib", 1),
               "mask_ms": ("mask_ms", 1), "err_out": ("err_out", 1), "err_grad": ("err_grad", 1)},
    "model": {"tokens_per_s": ("tokens_per_s", 1), "step_ms": ("ms", 1), "peak_gib": ("peak_mib", 1 / 1024),
              "loss_first": ("loss_first", 1)},
    "trl": {"tokens_per_s": ("tokens_per_s", 1), "peak_gib": ("peak_mib", 1 / 1024),
            "peak_reserved_gib": ("peak_reserved_mib", 1 / 1024), "first_step_s": ("first_step_from_train_s", 1),
            "first_step_from_load_s": ("first_step_from_load_s", 1), "gpu_busy": ("gpu_busy", 1),
            "mfu": ("mfu", 1), "model_tflops": ("model_tflops", 1),
            "graphed_lengths": ("graph_lengths", 1), "steps": ("steps_done", 1), "loss_first": ("loss_first", 1)},
    "context": {"max_len": ("max_ok", 1), "first_failure": ("first_fail", 1),
                "peak_gib_at_max": ("peak_mib_at_max", 1 / 1024), "step_s_at_max": ("s_at_max", 1)},
}

# The metric that ratios compare, and whether more of it is better.
RATIO_METRIC = {"kernel": ("fwd_bwd_ms", False), "model": ("tokens_per_s", True), "trl": ("tokens_per_s", True),
                "context": ("max_len", True)}
BASELINES = ("hf-eager", "hf-flex")
VERSION_KEYS = ("torch", "cuda", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "liger_kernel",
                "python")


def _metric(value, factor):
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return value * factor if factor != 1 else value
    return value if isinstance(value, list) and value else None


def ratios(rows: list[dict], suite: str) -> None:
    """Fill each row's `ratios` against the baselines of the same run and workload (in place)."""
    metric, higher_better = RATIO_METRIC[suite]
    for row in rows:
        row["ratios"] = {}
        mine = row["metrics"].get(metric)
        if row["status"] != "ok" or not mine:
            continue
        for other in rows:
            theirs = other["metrics"].get(metric)
            if (other["contender"] in BASELINES and other["status"] == "ok" and theirs
                    and other["run"] == row["run"] and other["workload"] == row["workload"]):
                row["ratios"][other["contender"]] = round(mine / theirs if higher_better else theirs / mine, 4)


def from_harness(suite: str, harness_rows: list[dict], env: dict, source: str = "benchmarks.run") -> list[dict]:
    """The results-file rows of one suite's run (`env` from common.env_info)."""
    out = []
    for r in harness_rows:
        versions = {k: env[k] for k in VERSION_KEYS if env.get(k) not in (None, "not installed", "n/a")}
        own_process = bool(r.get("versions"))  # Unsloth runs beside the harness, on the versions it names
        if own_process:
            versions = {"torch": versions.get("torch"), "cuda": versions.get("cuda"), **r["versions"]}
        metrics = {}
        for name, (field, factor) in METRICS[suite].items():
            value = _metric(r.get(field), factor)
            if value is not None:
                metrics[name] = value
        notes = [r["note"]] if r.get("note") else []
        out.append({
            "date": env["date"], "commit": env["fastgemma_git"], "gpu": env["gpu"], "versions": versions,
            "command": env["command"], "run": r.get("run", env["date"]), "source": source, "notes": notes,
            "suite": suite, "contender": r["contender"], "label": r.get("label", r["contender"]),
            "workload": {k: r[k] for k in WORKLOAD_FIELDS[suite] if k in r},
            "status": r["status"], "metrics": metrics,
        })
        if own_process:
            out[-1]["own_process"] = True
    ratios(out, suite)
    return out


def load(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")
