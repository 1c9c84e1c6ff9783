"""recipes/README.md shows a sample run of the default recipe. The run is deterministic on a CPU, so a user
compares: keep the sample's summary laid out exactly as the recipe prints it now (fields, wording,
units), and its step and generation counts equal to the demo's knobs (the summary from the recipe's own
formatter, fed made-up numbers); and (slow) run the default and get the sample's losses, tokens and
generations."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_recipe
from sft import model as recipe_model, reporting
from sft.console import display_path

REPO = Path(__file__).resolve().parents[1]
RECIPE_PATH = REPO / "recipes" / "sft_gemma2.py"
README = REPO / "recipes" / "README.md"
NUMBER = re.compile(r"[+-]?\d+(?:[.,]\d+)*")
GENERATION = re.compile(r"  \[(ok|--)\] '.*' +expected '.*' +got '.*'")


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("sft_gemma2_readme")


@pytest.fixture(scope="module")
def sample() -> list[str]:
    """The fenced block of recipes/README.md that holds the summary."""
    blocks = re.findall(r"^```\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE)
    (block,) = [block for block in blocks if "fastgemma SFT summary" in block]
    return block.splitlines()


def summary_part(lines: list[str]) -> list[str]:
    start = next(i for i, line in enumerate(lines) if "fastgemma SFT summary" in line)
    end = next(i for i in range(start + 1, len(lines)) if set(lines[i]) == {"="})
    return lines[start : end + 1]


def field(line: str) -> str:
    return line[:13].strip()  # the 13-character label column: "model", "peak memory", ...


def masked(line: str) -> str:
    return NUMBER.sub("#", line.rstrip())


def printed_summary(recipe, monkeypatch) -> list[str]:
    """What the default run prints, from the recipe's functions, with made-up numbers."""
    monkeypatch.chdir(REPO)  # the README's run was started from the repository root
    demo = recipe.TINY_DEMO
    output_dir = REPO / demo.output_dir
    log_history = [
        {"step": step, "loss": 5.0 - step / 200, "num_tokens": 580 * step, "learning_rate": 1e-3}
        for step in range(1, demo.max_steps + 1)
    ]
    step_end_times = {step: 30.0 + 0.3 * step for step in range(1, demo.max_steps + 1)}
    summary = {
        "steps": demo.max_steps,
        "resumed_from_step": 0,
        "train_runtime_s": 180.0,
        **reporting.training_numbers(log_history, step_end_times, 0, 180.0),
        "model": recipe_model.describe_model(None, display_path(output_dir / "tiny_base_model"), "torch.float32"),
        "backend": demo.backend,
        "fused_ops": demo.fused_ops,
        "peak_memory": reporting.peak_memory_text(on_gpu=False),
        "output_dir": str(output_dir),
    }
    return reporting.summary_lines(summary)


def test_sample_summary_has_the_printed_fields(recipe, sample, monkeypatch):
    documented, printed = summary_part(sample), printed_summary(recipe, monkeypatch)
    assert [field(line) for line in documented] == [field(line) for line in printed]


def test_sample_summary_reads_like_the_printed_one(recipe, sample, monkeypatch):
    """Line by line, numbers aside: same wording, units, paths."""
    documented, printed = summary_part(sample), printed_summary(recipe, monkeypatch)
    assert [masked(line) for line in documented] == [masked(line) for line in printed]


def test_sample_counts_match_the_demo_knobs(recipe, sample):
    steps_line = next(line for line in summary_part(sample) if field(line) == "steps")
    assert steps_line.split()[1] == str(recipe.TINY_DEMO.max_steps)
    generations = [line for line in sample if GENERATION.fullmatch(line)]
    assert len(generations) == recipe.TINY_DEMO.show_generations
    right = sum(line.startswith("  [ok]") for line in generations)
    assert f"  {right}/{len(generations)} exactly right" in sample


@pytest.mark.slow
def test_the_default_run_gives_the_samples_numbers(sample, tmp_path):
    """`python recipes/sft_gemma2.py` as the README ran it (CPU, one thread, 500 steps: minutes): the same first
    and last loss, tokens and generations. Only the times and memory may differ."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(RECIPE_PATH)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.splitlines()
    summary = json.loads((tmp_path / "outputs" / "sft_gemma2" / "recipe_summary.json").read_text())
    documented = summary_part(sample)
    (first_step, first), (last_step, last) = summary["first_loss"], summary["last_loss"]
    loss_line = next(line for line in documented if field(line) == "loss")
    assert f"first {first:.4f} (step {first_step}) -> last {last:.4f} (step {last_step})" in loss_line
    steps_line = next(line for line in documented if field(line) == "steps")
    assert f" {summary['tokens']:,} tokens" in steps_line
    assert [line for line in printed if GENERATION.fullmatch(line)] == [line for line in sample if GENERATION.fullmatch(line)]
