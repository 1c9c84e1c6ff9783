"""``python -m benchmarks.report``: benchmarks/RESULTS.md and the README's headline table, from benchmarks/results.jsonl.

RESULTS.md shows the current rows only: for each suite, GPU, workload and contender, the newest measurement.
They are grouped into one table per run (ratios are only taken within a run), newest run first, each with its
command, GPU, code and versions. ``--check`` changes nothing and fails when either file differs from what the
results file gives (the tests run it, so the tables cannot drift from the data).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import results as R

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_FILE = os.path.join(HERE, "results.jsonl")
REPORT_FILE = os.path.join(HERE, "RESULTS.md")
README_FILE = os.path.join(os.path.dirname(HERE), "README.md")
HEADLINE_BEGIN = "<!-- headline table: python -m benchmarks.report -->"
HEADLINE_END = "<!-- end of headline table -->"

PEERS = {"hf-eager": "HF eager", "hf-flex": "HF flex_attention", "unsloth-nocompile": "Unsloth",
         "unsloth": "Unsloth"}
TRAINERS = {"lean": "lean trainer", "trl": "TRL's trainer"}

# (key, header, format): the order of the columns; a column shows when a row of the table has the metric.
COLUMNS = [
    ("tokens_per_s", "tokens/s", ",.0f"), ("fwd_bwd_ms", "fwd+bwd ms", ",.2f"), ("tflops", "TFLOP/s", ",.1f"),
    ("step_ms", "step ms", ",.1f"), ("max_len", "max trainable length", ",d"), ("first_failure", "first failure", ",d"),
    ("ratio:hf-eager", "vs HF eager", "ratio"), ("ratio:hf-flex", "vs HF flex", "ratio"),
    ("peak_gib", "peak GiB", ".2f"), ("peak_reserved_gib", "peak reserved GiB", ".2f"),
    ("peak_extra_mib", "peak extra MiB", ",.0f"), ("peak_gib_at_max", "peak GiB at max", ".2f"),
    ("step_s_at_max", "step s at max", ".2f"), ("first_step_s", "1st step s", ".1f"),
    ("first_step_from_load_s", "1st step from load s", ".1f"), ("gpu_busy", "GPU busy", "percent"),
    ("mfu", "MFU (bf16 peak)", "percent"),
    ("graphed_lengths", "graphed lengths", "list"), ("mask_ms", "mask ms", ".2f"), ("err_out", "err out", ".4f"),
    ("err_grad", "err grad", ".4f"), ("steps", "steps", "d"), ("loss_first", "loss@1", ".4f"),
]

SUITE_TITLES = {"kernel": "Softcapped attention kernel", "model": "Whole-model LoRA step",
                "trl": "TRL SFTTrainer", "context": "Longest trainable sequence"}

# The README's headline: fastgemma against a peer measured in the same run, on these workloads.
HEADLINE = [
    ({"suite": "trl", "model": "2b", "batch": 1, "max_length": 2048, "grad_accum": 8}, "hf-eager"),
    ({"suite": "trl", "model": "9b", "batch": 1, "max_length": 2048, "grad_accum": 8}, "hf-eager"),
    ({"suite": "trl", "model": "2b", "batch": 4, "max_length": 4096, "grad_accum": 1, "trainer": "lean"}, "hf-flex"),
    ({"suite": "trl", "model": "2b", "batch": 4, "max_length": 4096, "grad_accum": 1, "trainer": "trl"},
     "unsloth-nocompile"),
]


def current(rows: list[dict]) -> list[dict]:
    """The newest row (the last in the file) per suite, GPU, workload and contender, in file order."""
    newest = {}
    for i, row in enumerate(rows):
        key = (row["suite"], row["gpu"], json.dumps(row["workload"], sort_keys=True), row["contender"])
        newest[key] = i
    return [rows[i] for i in sorted(newest.values())]


def by_run(rows: list[dict]) -> list[list[dict]]:
    """Rows grouped by suite and run, the group appended last first."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["suite"], row["run"]), []).append(row)
    return list(groups.values())[::-1]


def _format(value, how: str) -> str:
    if value is None:
        return "-"
    if how == "ratio":
        return f"{value:.2f}x"
    if how == "percent":
        return f"{100 * value:.0f}%"
    if how == "list":
        return ", ".join(map(str, value))
    return format(value, how)


def _value(row: dict, key: str):
    if key.startswith("ratio:"):
        return row.get("ratios", {}).get(key.split(":", 1)[1])
    return row["metrics"].get(key)


def _describe(workload: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in workload.items())


def _versions(versions: dict) -> str:
    return ", ".join(f"{k.replace('_', '-')} {v}" for k, v in versions.items() if v)


def _gpu(gpu: str) -> str:
    return gpu.replace("NVIDIA ", "").split(" (")[0]


def render_table(rows: list[dict]) -> str:
    first = next((r for r in rows if not r.get("own_process")), rows[0])  # its versions head the table
    keys = list(first["workload"])
    shared = {k: first["workload"][k] for k in keys if all(r["workload"].get(k) == first["workload"][k] for r in rows)}
    varying = [k for k in keys if k not in shared]
    dates = sorted({r["date"] for r in rows})
    lines = [f"## {SUITE_TITLES.get(first['suite'], first['suite'])}: {_describe(shared)}", "",
             f"- GPU: {first['gpu']}; date: {' .. '.join([dates[0], dates[-1]] if len(dates) > 1 else dates)}",
             f"- code: fastgemma {', '.join(sorted({r['commit'] for r in rows}))}",
             f"- versions: {_versions(first['versions'])}"]
    others: dict = {}  # contenders that ran on other versions (in a process of their own)
    for row in rows:
        if row["versions"] != first["versions"]:
            others.setdefault(_versions(row["versions"]), []).append(row["label"])
    for versions, labels in others.items():
        lines.append(f"- versions of {', '.join(labels)}: {versions}")
    for command in dict.fromkeys(r["command"] for r in rows):
        lines.append(f"- command: `{command}`")
    for source in dict.fromkeys(r["source"] for r in rows):
        if source != "benchmarks.run":
            lines.append(f"- source: {source}")
    for note in dict.fromkeys(n for r in rows for n in r.get("notes", [])):
        lines.append(f"- {note}")
    columns = [c for c in COLUMNS if any(_value(r, c[0]) is not None for r in rows)]
    headers = [*varying, "contender", "status", *(c[1] for c in columns)]
    lines += ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [str(row["workload"].get(k, "-")) for k in varying] + [row["label"], row["status"]]
        cells += [_format(_value(row, key), how) for key, _, how in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render(rows: list[dict]) -> str:
    parts = ["# fastgemma benchmark results\n",
             "Generated by `python -m benchmarks.report` from [`results.jsonl`](results.jsonl): for each suite, GPU, "
             "workload and contender, the newest row; one table per run, newest first. Ratios compare rows of the "
             "same run only. How to run the suites: [README.md](README.md).\n"]
    parts += [render_table(group) for group in by_run(current(rows))]
    return "\n".join(parts)


def _matches(row: dict, where: dict) -> bool:
    return row["suite"] == where["suite"] and all(row["workload"].get(k) == v for k, v in where.items() if k != "suite")


def _short_versions(row: dict) -> str:
    minor = {k: ".".join(row["versions"].get(k, "?").split("+")[0].split(".")[:2]) for k in ("torch", "transformers")}
    return f"torch {minor['torch']}, transformers {minor['transformers']}"


def headline_table(rows: list[dict]) -> str:
    """The README's table: fastgemma and one peer of the same run per workload (the newest such run)."""
    out = ["| workload (rows × tokens × accumulation, trainer) | model | fastgemma | peer, same run | "
           "fastgemma / peer, speed | GPU, versions, date |", "|---|---|---|---|---|---|"]
    for where, peer in HEADLINE:
        rows_here = [r for r in current(rows) if _matches(r, where) and r["status"] == "ok"]
        runs = [r["run"] for r in rows_here if r["contender"] == "fastgemma"]
        run = next((run for run in reversed(runs) if any(r["run"] == run and r["contender"] == peer
                                                         for r in rows_here)), None)
        if run is None:
            continue
        mine = next(r for r in rows_here if r["run"] == run and r["contender"] == "fastgemma")
        theirs = next(r for r in rows_here if r["run"] == run and r["contender"] == peer)
        w = mine["workload"]
        speed = mine["metrics"]["tokens_per_s"] / theirs["metrics"]["tokens_per_s"]
        versions = _short_versions(mine)
        if theirs["versions"].get("transformers") != mine["versions"].get("transformers"):
            own = theirs["versions"].get(PEERS[peer].lower())  # a peer in its own process names its version
            versions += f" ({PEERS[peer]}{' ' + own if own else ''}: transformers {theirs['versions']['transformers']})"
        out.append(
            f"| {w['batch']} × {w['max_length']} × {w['grad_accum']}, {TRAINERS[w['trainer']]} | {w['model'].upper()} | "
            f"{mine['metrics']['tokens_per_s']:,.0f} tokens/s, {mine['metrics']['peak_gib']:.2f} GiB | "
            f"{theirs['label'].replace(' [lean trainer]', '')}: {theirs['metrics']['tokens_per_s']:,.0f} tokens/s, "
            f"{theirs['metrics']['peak_gib']:.2f} GiB | **{speed:.2f}x** | "
            f"{_gpu(mine['gpu'])}, {versions}, {mine['date'][:10]} |")
    return "\n".join(out) + "\n"


def with_headline(readme: str, table: str) -> str:
    """The README with the text between the headline markers replaced by `table`."""
    begin, end = readme.index(HEADLINE_BEGIN) + len(HEADLINE_BEGIN), readme.index(HEADLINE_END)
    return readme[:begin] + "\n" + table + readme[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=RESULTS_FILE, help="the results file (JSON lines)")
    p.add_argument("--out", default=REPORT_FILE, help="the markdown report to write")
    p.add_argument("--readme", default=README_FILE, help="the README whose headline table to rewrite ('' for none)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is not up to date")
    args = p.parse_args(argv)
    rows = R.load(args.results)
    wanted = {args.out: render(rows)}
    if args.readme:
        with open(args.readme) as f:
            wanted[args.readme] = with_headline(f.read(), headline_table(rows))
    stale = []
    for path, text in wanted.items():
        old = open(path).read() if os.path.exists(path) else None
        if old != text:
            stale.append(path)
            if not args.check:
                with open(path, "w") as f:
                    f.write(text)
    for path in stale:
        print(f"{path}: {'out of date, run python -m benchmarks.report' if args.check else 'rewritten'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
