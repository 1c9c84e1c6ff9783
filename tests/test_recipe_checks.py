"""recipes/sft_gemma2.py refuses bad flags and inputs with one line and exit status 2, before
it loads a model or writes anything (so these tests take seconds, not minutes)."""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RECIPES_DIR, load_recipe
from sft import config as recipe_config, console, model as recipe_model, runs

REPO = Path(__file__).resolve().parents[1]
RECIPE_PATH = REPO / "recipes" / "sft_gemma2.py"
HEAVY_MODULES = ("torch", "transformers", "datasets", "peft", "trl", "bitsandbytes")


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("sft_gemma2_checks")


@pytest.fixture
def refuse(recipe, monkeypatch, tmp_path, capsys):
    """Run the recipe in-process with a bad input; any model build or load fails the test.
    Returns the one error line."""

    def must_not_load(*args, **kwargs):
        raise AssertionError("the recipe loaded a model before reporting the bad input")

    for name in ["build_tiny_gemma2", "save_tiny_base_model", "load_base_model", "load_model"]:
        monkeypatch.setattr(recipe_model, name, must_not_load)

    def run(*argv: str, output_dir: Path | None = None) -> str:
        output_dir = output_dir or tmp_path / "out"
        capsys.readouterr()
        status = recipe.main([*argv, "--output-dir", str(output_dir)])
        captured = capsys.readouterr()
        assert status == 2, captured.err
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1, captured.err  # one line, nothing logged besides (or twice)
        assert lines[0].startswith("sft_gemma2.py: error: ")
        assert not (output_dir / "tiny_base_model").exists()  # nothing written either
        return lines[0]

    return run


# ---------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-seq-length", "0"], "--max-seq-length must be a whole number of at least 1, got 0"),
        (["--max-seq-length", "-5"], "--max-seq-length must be a whole number of at least 1, got -5"),
        (["--batch-size", "0"], "--batch-size must be"),
        (["--grad-accum", "0"], "--grad-accum must be"),
        (["--lora-r", "0"], "--lora-r must be"),
        (["--lora-alpha", "-2"], "--lora-alpha must be"),
        (["--lora-dropout", "1"], "--lora-dropout must be"),
        (["--lr", "0"], "--lr must be a number above 0"),
        (["--lr", "-0.001"], "--lr must be a number above 0"),
        (["--lr", "nan"], "--lr must be a number above 0, got nan"),
        (["--lr", "-1e-3"], "--lr must be a number above 0, got -0.001"),  # argparse alone: "expected one argument"
        (["--lr", "-inf"], "--lr must be a number above 0, got -inf"),
        (["--epochs", "-2.5e0"], "--epochs must be a number above 0, got -2.5"),
        (["--max-seq-length", "4096"], "--max-seq-length 4096 is longer than the tiny demo model handles: its "
                                       "config's max_position_embeddings is 2048"),
        (["--epochs", "0"], "--epochs must be a number above 0"),
        (["--epochs", "-1"], "--epochs must be a number above 0"),
        (["--max-steps", "0"], "--max-steps must be at least 1 (or -1"),
        (["--save-steps", "-1"], "--save-steps must be"),
        (["--logging-steps", "0"], "--logging-steps must be"),
        (["--show-generations", "-1"], "--show-generations must be"),
        (["--seed", "-1"], "--seed must be"),
        (["--optim", "adamw_typo"], "--optim 'adamw_typo' is not a transformers optimizer"),
    ],
)
def test_bad_numbers(refuse, argv, message):
    assert message in refuse(*argv)


def test_output_dir_is_a_file(refuse, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    assert "--output-dir" in (error := refuse(output_dir=tmp_path / "a_file")) and "is a file" in error
    assert "cannot be created" in refuse(output_dir=tmp_path / "a_file" / "sub")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU refusal")
def test_flex_backend_on_cpu(refuse):
    assert "--backend flex needs a CUDA GPU" in refuse("--backend", "flex")


def test_cuda_graphs_without_fused_ops_or_with_lora_dropout(refuse):
    assert "--cuda-graphs on replays the fused ops' compiled layers" in refuse("--cuda-graphs", "on", "--fused-ops", "off")
    assert "cannot replay LoRA dropout" in refuse("--cuda-graphs", "on", "--fused-ops", "on", "--lora-dropout", "0.1")


def test_resume_without_a_checkpoint(refuse, tmp_path):
    assert "--resume: no checkpoint-N directory" in refuse("--resume")
    (tmp_path / "not_a_checkpoint").mkdir()
    assert "is not a training checkpoint" in refuse("--resume", str(tmp_path / "not_a_checkpoint"))


# ---------------------------------------------------------------------------------------
# --model
# ---------------------------------------------------------------------------------------
def test_missing_model_directory(refuse, tmp_path):
    error = refuse("--model", str(tmp_path / "nowhere"))
    assert "no such directory" in error and "hub" in error and "repo id" not in error
    assert "no such directory" in refuse("--model", "./not/here")


def test_empty_file_and_half_model_directories(refuse, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is an empty directory" in refuse("--model", str(empty))
    (tmp_path / "weights.bin").write_bytes(b"")
    assert "is a file" in refuse("--model", str(tmp_path / "weights.bin"))

    model = tmp_path / "model"
    model.mkdir()
    (model / "README.md").write_text("no config here")
    assert "has no config.json" in refuse("--model", str(model))
    (model / "config.json").write_text('{"model_type": "gemma2",')
    assert "config.json is not valid JSON" in refuse("--model", str(model))
    (model / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    assert "no weights" in refuse("--model", str(model))
    (model / "model.safetensors").write_bytes(b"")
    assert "no tokenizer" in refuse("--model", str(model))


def test_hub_model_unreachable_fails_fast(refuse, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    start = time.perf_counter()
    error = refuse("--model", "google/gemma-2-2b")
    assert "cannot reach the Hugging Face Hub" in error and "HF_HUB_OFFLINE=1" in error
    assert time.perf_counter() - start < 15  # one try, not the libraries' ~30 s of retries


def run_recipe_offline(tmp_path, *argv):
    """The recipe as a script with HF_HUB_OFFLINE=1 and an empty Hugging Face cache under `tmp_path`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    return subprocess.run(
        [sys.executable, str(RECIPE_PATH), *argv, "--output-dir", str(tmp_path / "out")],
        check=False, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )


def test_hub_model_offline_and_not_cached_as_a_script(tmp_path):
    result = run_recipe_offline(tmp_path, "--model", "google/gemma-2-2b")
    assert result.returncode == 2
    assert result.stderr == (
        "sft_gemma2.py: error: --model 'google/gemma-2-2b' is not in the local Hugging Face cache "
        "(HF_HUB_OFFLINE is set)\n"
    )


# ---------------------------------------------------------------------------------------
# --dataset
# ---------------------------------------------------------------------------------------
def test_dataset_files(refuse, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert refuse("--dataset", str(empty)).endswith(f"dataset file {empty} is empty")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    assert "no rows" in refuse("--dataset", str(blank))
    assert "is a directory" in refuse("--dataset", str(tmp_path))
    (tmp_path / "data.csv").write_text("text\nhello\n")
    assert "must be .jsonl, .json or .parquet" in refuse("--dataset", str(tmp_path / "data.csv"))


def test_malformed_json_line_names_file_and_line(refuse, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    error = refuse("--dataset", str(bad))
    assert str(bad) in error and "line 2 is not valid JSON" in error and "column 15" in error
    not_object = tmp_path / "list.jsonl"
    not_object.write_text('{"text": "one"}\n["two"]\n')
    assert "line 2 is a JSON list, not an object" in refuse("--dataset", str(not_object))
    array = tmp_path / "array.json"
    array.write_text('[\n  {"text": "one"},\n  {"text": "two"\n]\n')
    assert "line 4 is not valid JSON" in refuse("--dataset", str(array))


def test_no_document_fits(refuse):
    error = refuse("--max-seq-length", "8")
    assert "no document fits in --max-seq-length 8" in error and "shortest" in error


def test_row_of_the_wrong_shape(refuse, tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    dataset = tmp_path / "mixed.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in [chat, chat, {"messages": "hi, yo"}, chat]))
    error = refuse("--dataset", str(dataset))
    assert f"dataset {dataset}, row 2 (counting from 0): cannot render it for training" in error


def test_hub_dataset_unreachable_fails_fast(refuse, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    error = refuse("--dataset", "someone/some_chats")
    assert "--dataset 'someone/some_chats': cannot reach the Hugging Face Hub" in error
    assert time.perf_counter() - start < 15


@pytest.mark.slow
def test_hub_dataset_offline_fails_fast_as_a_script(tmp_path):
    """With HF_HUB_OFFLINE=1 (a machine without network), a name that is not cached: one line."""
    result = run_recipe_offline(tmp_path, "--dataset", "someone/some_chats")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sft_gemma2.py: error: cannot load dataset 'someone/some_chats'")
    assert "Retrying" not in result.stderr and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------
# As a script: fast answers, quiet console
# ---------------------------------------------------------------------------------------
def run_script_and_list_imports(argv: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the recipe as __main__ and report which heavy libraries it imported."""
    code = (
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(RECIPES_DIR)!r})\n"  # what `python recipes/sft_gemma2.py` does
        f"sys.argv = [{str(RECIPE_PATH)!r}, *{argv!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(RECIPE_PATH)!r}, run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    status = stop.code\n"
        f"print('IMPORTED', [name for name in {HEAVY_MODULES!r} if name in sys.modules])\n"
        "sys.exit(status)\n"
    )
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=cwd, timeout=120)
    imported = eval(result.stdout.strip().splitlines()[-1].removeprefix("IMPORTED "))
    return result, imported


def test_help_is_fast_and_quiet(tmp_path):
    result, imported = run_script_and_list_imports(["--help"], tmp_path)
    assert result.returncode == 0 and "--save-steps" in result.stdout and "--resume" in result.stdout
    assert imported == [] and result.stderr == ""  # no torch import, no bitsandbytes "pip install kernels" line


def test_bad_flag_as_a_script(tmp_path):
    result, imported = run_script_and_list_imports(["--batch-size", "0"], tmp_path)
    assert result.returncode == 2 and imported == []
    assert result.stderr == "sft_gemma2.py: error: --batch-size must be a whole number of at least 1, got 0\n"


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def test_known_noise_is_dropped_and_the_rest_kept(recipe, caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with console.console_settings(), caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. pip install kernels", "x")
        logger.warning("a real bitsandbytes problem")
    assert [record.getMessage() for record in caplog.records] == ["a real bitsandbytes problem"]
    assert not logger.filters  # undone after the run


def test_resume_command_keeps_the_flags():
    def resume_command(argv):
        return console.resume_command(str(RECIPE_PATH), argv)

    command = resume_command(["--max-steps", "50", "--resume", "out/checkpoint-20", "--lr", "1e-3"])
    assert command.endswith("sft_gemma2.py --max-steps 50 --lr 1e-3 --resume")
    assert resume_command(["--resume"]).endswith("sft_gemma2.py --resume")
    assert resume_command(["--overwrite", "--max-steps", "50"]).endswith("sft_gemma2.py --max-steps 50 --resume")


# ---------------------------------------------------------------------------------------
# Runs never mix in one --output-dir
# ---------------------------------------------------------------------------------------
def fake_checkpoint(directory: Path, step: int, max_steps: int, epoch: float = 0.5) -> Path:
    directory.mkdir(parents=True)
    state = {"global_step": step, "max_steps": max_steps, "epoch": epoch, "num_train_epochs": 1, "log_history": []}
    (directory / "trainer_state.json").write_text(json.dumps(state))
    return directory


def test_resume_of_a_finished_run_trains_nothing(recipe, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(recipe, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    for name in ["build_tiny_gemma2", "save_tiny_base_model", "load_base_model", "load_model"]:
        monkeypatch.setattr(recipe_model, name, lambda *a, **k: pytest.fail("a finished run was trained again"))
    output_dir = tmp_path / "out"
    fake_checkpoint(output_dir / "checkpoint-50", 50, 60)
    fake_checkpoint(output_dir / "checkpoint-60", 60, 60)
    capsys.readouterr()
    assert recipe.main(["--max-steps", "60", "--resume", "--output-dir", str(output_dir)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and len(out.strip().splitlines()) == 1
    assert "already finished (step 60 of --max-steps 60)" in out and "--overwrite" in out
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint-50", "checkpoint-60"]
    # An explicit checkpoint, and an epoch-based run whose state reached its planned steps
    assert recipe.main(["--max-steps", "60", "--resume", str(output_dir / "checkpoint-60"),
                        "--output-dir", str(output_dir)]) == 0
    done = fake_checkpoint(tmp_path / "epochs" / "checkpoint-9", 9, 9, epoch=1.0)
    assert recipe.main(["--epochs", "1", "--resume", "--output-dir", str(done.parent)]) == 0
    assert "the end of --epochs 1" in capsys.readouterr().out


def test_resume_with_steps_left_goes_on(tmp_path):
    output_dir = tmp_path / "out"
    fake_checkpoint(output_dir / "checkpoint-60", 60, 60)
    assert runs.check_resume("latest", output_dir, max_steps=100, epochs=1) == output_dir / "checkpoint-60"


@pytest.mark.parametrize("earlier", ["checkpoint-7", "trainer_state.json", "adapter_model.safetensors",
                                     "adapter_config.json", "recipe_summary.json"])
def test_new_run_into_an_earlier_runs_folder_is_refused(refuse, tmp_path, earlier):
    output_dir = tmp_path / "out"
    if earlier.startswith("checkpoint-"):
        fake_checkpoint(output_dir / earlier, 7, 60)
    else:
        output_dir.mkdir()
        (output_dir / earlier).write_text("{}")
    error = refuse(output_dir=output_dir)
    assert f"holds an earlier run ({earlier})" in error and "--resume" in error and "--overwrite" in error
    assert (output_dir / earlier).exists()


def test_overwrite_and_resume_together_are_refused(refuse):
    assert "--overwrite starts a new run and --resume continues" in refuse("--overwrite", "--resume")


def test_overwrite_deletes_only_the_recipes_own_files(tmp_path):
    output_dir = tmp_path / "out"
    fake_checkpoint(output_dir / "checkpoint-3", 3, 3)
    (output_dir / "tiny_base_model").mkdir()
    for name in ["trainer_state.json", "adapter_model.safetensors", "adapter_config.json", "recipe_summary.json",
                 "training_args.bin", "tokenizer.json", "notes.txt"]:
        (output_dir / name).write_text("x")
    (output_dir / "README.md").write_text("---\nlibrary_name: peft\n---\n")
    (output_dir / "checkpoint-best").mkdir()  # not a checkpoint-N of the Trainer's
    runs.remove_earlier_run(output_dir)
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint-best", "notes.txt"]
    (output_dir / "README.md").write_text("my own notes")
    runs.remove_earlier_run(output_dir)
    assert (output_dir / "README.md").is_file()
    runs.check_new_run(output_dir, resume=None, overwrite=False)  # what is left is no earlier run


def test_max_seq_length_beyond_a_local_models_positions(refuse, tmp_path):
    model = tmp_path / "short_gemma2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gemma2", "max_position_embeddings": 256}))
    (model / "model.safetensors").write_text("not read before the check")
    (model / "tokenizer.json").write_text("{}")
    error = refuse("--model", str(model))  # the real-model default, 2048
    assert f"--max-seq-length 2048 is longer than {model} handles" in error and "256 or less" in error


def test_negative_numbers_parse_as_values():
    assert recipe_config.negative_numbers_as_values(["--lr", "-1e-3", "--packing", "--resume", "--seed", "7"]) == [
        "--lr=-1e-3", "--packing", "--resume", "--seed", "7"]
