"""recipes/sft_gemma2.py: Ctrl-C saves the adapter and a checkpoint, --resume finishes the run,
and the resumed run ends where an uninterrupted one does. Short tiny runs, eager attention."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import load_recipe
from sft import distributed, training
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
RECIPE_PATH = REPO / "recipes" / "sft_gemma2.py"
SHORT_RUN = [
    "--max-steps", "5", "--batch-size", "4", "--max-seq-length", "128", "--backend", "eager",
    "--show-generations", "0",
]


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("sft_gemma2_resume")


def press_ctrl_c_after(monkeypatch, step: int, times: int = 1):
    """Send this process real SIGINTs at the end of an optimizer step (what a person at the
    terminal does), through the recipe's own handler."""
    make_callbacks = training.recipe_callbacks

    def callbacks_with_a_finger_on_ctrl_c():
        callbacks = make_callbacks()
        stop = callbacks["interrupt"]
        on_step_end = stop.on_step_end

        def on_step_end_after_ctrl_c(args, state, control, **kwargs):
            if state.global_step == step:
                for _ in range(times):
                    signal.raise_signal(signal.SIGINT)
            return on_step_end(args, state, control, **kwargs)

        stop.on_step_end = on_step_end_after_ctrl_c
        return callbacks

    monkeypatch.setattr(training, "recipe_callbacks", callbacks_with_a_finger_on_ctrl_c)


def losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_finishes_like_an_uninterrupted_run(recipe, tmp_path, monkeypatch, capsys):
    uninterrupted = tmp_path / "uninterrupted"
    assert recipe.main([*SHORT_RUN, "--output-dir", str(uninterrupted)]) == 0

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        press_ctrl_c_after(patch, step=2)
        capsys.readouterr()
        assert recipe.main([*SHORT_RUN, "--output-dir", str(interrupted)]) == 130
    err = capsys.readouterr().err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("sft_gemma2.py: interrupted at step 2/5: adapter saved in ")
    assert last_line.endswith(" --output-dir " + str(interrupted) + " --resume") and "Traceback" not in err
    assert (interrupted / "adapter_model.safetensors").is_file()  # usable right away
    assert (interrupted / "checkpoint-2" / "optimizer.pt").is_file()  # and resumable
    assert not (interrupted / "recipe_summary.json").exists()  # no summary for a run cut short

    assert recipe.main([*SHORT_RUN, "--output-dir", str(interrupted), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming     from" in out and "resumed from step 2, 3 in this run" in out
    summary = json.loads((interrupted / "recipe_summary.json").read_text())
    assert summary["steps"] == 5 and summary["resumed_from_step"] == 2
    # Same data order, optimizer state, schedule and RNG: the resumed run ends where the other one does.
    assert losses(interrupted).keys() == losses(uninterrupted).keys() == {1, 2, 3, 4, 5}
    for step, loss in losses(uninterrupted).items():
        assert losses(interrupted)[step] == pytest.approx(loss, rel=1e-4), step
    resumed, straight = (load_file(d / "adapter_model.safetensors") for d in (interrupted, uninterrupted))
    for name, weight in straight.items():
        torch.testing.assert_close(resumed[name], weight, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_second_ctrl_c_quits_without_saving(recipe, tmp_path, monkeypatch, capsys):
    output_dir = tmp_path / "out"
    press_ctrl_c_after(monkeypatch, step=1, times=2)
    assert recipe.main([*SHORT_RUN, "--output-dir", str(output_dir)]) == 130
    err = capsys.readouterr().err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("sft_gemma2.py: interrupted again: quit at step 1 without saving; no checkpoint")
    assert "--resume" not in last_line and "Traceback" not in err
    assert not (output_dir / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_ctrl_c_at_the_terminal(tmp_path):
    """The script under a real SIGINT to its process group: one closing line, no traceback, the
    adapter and a checkpoint saved, and the per-step log dicts kept off the console."""
    output_dir = tmp_path / "out"
    argv = [*SHORT_RUN, "--max-steps", "200", "--save-steps", "1", "--output-dir", str(output_dir)]
    process = subprocess.Popen(
        [sys.executable, str(RECIPE_PATH), *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (output_dir / "checkpoint-1").is_dir():  # training is under way
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("sft_gemma2.py: interrupted at step ") and last_line.endswith(" --resume")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "{'loss'" not in err + out and "Failed to load CPU gemm_4bit_forward" not in err + out
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert recipe_checkpoint_steps(output_dir)


def recipe_checkpoint_steps(output_dir: Path) -> list[int]:
    return [int(path.name.removeprefix("checkpoint-")) for path in output_dir.glob("checkpoint-*")]


def test_a_ctrl_c_that_lands_during_the_ranks_all_reduce_is_not_lost(monkeypatch):
    """Under torchrun a rank spends much of a step waiting in the all-reduce that agrees on the stop; a
    signal that lands there runs the handler before that all-reduce's answer (from before the signal) is
    stored. The stop must still come, one step later and on every rank, not be overwritten."""
    from transformers import TrainerControl, TrainerState

    monkeypatch.setattr(distributed, "detect_launch", lambda: distributed.Launch(rank=1, world_size=2))
    stop = training.recipe_callbacks()["interrupt"]
    ranks_saw = []

    def all_reduce_with_a_ctrl_c_in_flight(launch, flag):
        ranks_saw.append(flag)
        if len(ranks_saw) == 1:
            stop.handle(signal.SIGINT, None)  # Python runs the handler when the blocking C call returns
        return flag  # the other rank saw nothing: the answer is this rank's flag as sent

    monkeypatch.setattr(distributed, "any_rank", all_reduce_with_a_ctrl_c_in_flight)
    state, controls = TrainerState(), []
    for step in (1, 2):
        state.global_step = step
        control = TrainerControl()
        stop.on_step_end(None, state, control)
        controls.append(control)
    assert ranks_saw == [False, True]
    first, second = controls
    assert stop.interrupted
    assert not stop_requested(first) and stop_requested(second)


def stop_requested(control) -> bool:
    return control.should_training_stop and control.should_save and control.should_log
