"""recipes/sft_gemma2.py end to end on CPU: a few training steps, the saved adapter, and the clear errors.

The recipe runs in-process through its `main(argv)`, on the embedded tiny Gemma 2 (no hub).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_recipe
import torch
from sft.model import build_tiny_gemma2

REPO = Path(__file__).resolve().parents[1]
RECIPE_PATH = REPO / "recipes" / "sft_gemma2.py"


def load_recipe_module():
    return load_recipe("sft_gemma2")


@pytest.fixture(scope="module")
def recipe():
    return load_recipe_module()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# A learning rate well above the default so that three steps visibly move the LoRA B matrices
# (they start at zero, so before training the adapter changes nothing).
FAST_STEPS = ["--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--max-seq-length", "128"]


@pytest.fixture(scope="module")
def trained_output(recipe, tmp_path_factory):
    """The default recipe (chat toy data, tiny model, backend auto = compiled on CPU) for 3 steps."""
    output_dir = tmp_path_factory.mktemp("sft_default")
    status = recipe.main([*FAST_STEPS, "--output-dir", str(output_dir), "--show-generations", "2"])
    assert status == 0
    return output_dir


def test_default_run_saves_adapter_tokenizer_and_state(trained_output):
    for name in ["adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "trainer_state.json"]:
        assert (trained_output / name).is_file(), name
    state = json.loads((trained_output / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 3  # logging_steps=1 on the tiny demo: first and last loss both visible
    assert all(torch.isfinite(torch.tensor(losses)))
    summary = json.loads((trained_output / "recipe_summary.json").read_text())
    assert summary["fastgemma_patched"] is True
    assert summary["steps"] == 3 and summary["tokens"] > 0
    assert len(summary["generations"]) == 2


def test_adapter_loads_with_peft_and_changes_the_output(recipe, trained_output):
    from peft import PeftModel

    adapter_config = json.loads((trained_output / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }
    input_ids = torch.tensor([[2, 4, 36, 34, 20, 33, 102, 16, 17, 18, 5, 102, 4, 28, 30, 19, 20, 27, 102]])

    base = build_tiny_gemma2().eval()  # a fresh base from the shipped config and seed
    with torch.no_grad():
        base_logits = base(input_ids).logits

    adapted = PeftModel.from_pretrained(build_tiny_gemma2(), trained_output).eval()
    lora_b = [p for name, p in adapted.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b), "training left every LoRA B matrix at zero"
    with torch.no_grad():
        adapted_logits = adapted(input_ids).logits

    assert torch.isfinite(adapted_logits).all()
    assert (adapted_logits - base_logits).abs().max() > 1e-3


def test_fresh_tiny_base_matches_the_one_saved_by_the_run(recipe, trained_output):
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(trained_output / "tiny_base_model")
    fresh = build_tiny_gemma2()
    for (name, a), b in zip(saved.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "rows, flags",
    [
        ([{"prompt": f"upper: {w}", "completion": w.upper()} for w in ["ab", "cde", "fgh", "ij"] * 4],
         ["--no-packing", "--show-generations", "2"]),
        ([{"text": f"{n} + {n} = {2 * n}"} for n in range(16)], ["--packing"]),
    ],
    ids=["prompt-completion", "text-packed"],
)
def test_other_dataset_formats(recipe, tmp_path, rows, flags):
    dataset = write_jsonl(tmp_path / "data.jsonl", rows)
    output_dir = tmp_path / "out"
    argv = [*FAST_STEPS, "--dataset", str(dataset), "--output-dir", str(output_dir), "--backend", "eager", *flags]
    assert recipe.main(argv) == 0
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert (output_dir / "adapter_model.safetensors").is_file()
    summary = json.loads((output_dir / "recipe_summary.json").read_text())
    if "--show-generations" in flags:  # the last rows were held out of training and generated for
        assert [g["expected"] for g in summary["generations"]] == [rows[-2]["completion"], rows[-1]["completion"]]


def test_4bit_loading_path(recipe, tmp_path):
    """--load-in-4bit: the tiny base goes through from_pretrained + BitsAndBytesConfig (nf4), as a real model would."""
    pytest.importorskip("bitsandbytes")
    output_dir = tmp_path / "out"
    # No generations: greedy decoding through bitsandbytes' CPU reference kernels takes a minute.
    argv = [*FAST_STEPS, "--load-in-4bit", "--backend", "eager", "--show-generations", "0"]
    argv += ["--output-dir", str(output_dir)]
    assert recipe.main(argv) == 0
    summary = json.loads((output_dir / "recipe_summary.json").read_text())
    assert summary["steps"] == 3 and summary["fastgemma_patched"] is True
    assert (output_dir / "adapter_model.safetensors").is_file()


def test_graphed_layers_run_the_recipe_like_the_op_by_op_path(recipe, tmp_path, capsys):
    """--cuda-graphs on (with --fused-ops on, on this CPU: graphs without capture)
    through TRL's packed batches on 4-bit weights: the same losses as the same run op by op, the summary
    says which ran, and the graphed layers really ran graphed (TRL hands every layer packed-sequence
    keyword arguments, which once made them fall back silently)."""
    pytest.importorskip("bitsandbytes")
    losses = {}
    for name, flags in (("ops", []), ("graphs", ["--cuda-graphs", "on"])):
        output_dir = tmp_path / name
        argv = [*FAST_STEPS, "--load-in-4bit", "--fused-ops", "on", "--show-generations", "0", *flags]
        assert recipe.main([*argv, "--output-dir", str(output_dir)]) == 0
        summary = json.loads((output_dir / "recipe_summary.json").read_text())
        assert summary["cuda_graphs"] is (name == "graphs")
        assert bool(summary["cuda_graph_lengths"]) is (name == "graphs")
        history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        losses[name] = [entry["loss"] for entry in history if "loss" in entry]
    out = capsys.readouterr().out
    assert "fused ops on, CUDA-graphed layers (recorded at" in out
    assert len(losses["graphs"]) == 3 and losses["graphs"] == pytest.approx(losses["ops"], rel=1e-4)


# ---------------------------------------------------------------------------------------
# Clear errors, before any weights are loaded
# ---------------------------------------------------------------------------------------
def test_missing_dataset_file(recipe, tmp_path, capsys):
    output_dir = tmp_path / "out"
    status = recipe.main(["--dataset", str(tmp_path / "missing.jsonl"), "--output-dir", str(output_dir)])
    assert status == 2
    assert "dataset file not found" in capsys.readouterr().err
    assert not (output_dir / "tiny_base_model").exists()  # failed before building/loading the model


def test_dataset_without_usable_column(recipe, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}] * 3)
    output_dir = tmp_path / "out"
    status = recipe.main(["--dataset", str(dataset), "--output-dir", str(output_dir)])
    assert status == 2
    error = capsys.readouterr().err
    assert "no usable column" in error and "question" in error and "messages" in error
    assert not (output_dir / "tiny_base_model").exists()


def test_non_gemma2_model_is_refused(recipe, tmp_path, capsys):
    from transformers import LlamaConfig

    llama_dir = tmp_path / "llama"
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        llama_dir
    )
    status = recipe.main(["--model", str(llama_dir), "--output-dir", str(tmp_path / "out")])
    assert status == 2
    error = capsys.readouterr().err
    assert "'llama' model" in error and "Gemma 2" in error


def test_missing_model_directory(recipe, tmp_path, capsys):
    status = recipe.main(["--model", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out")])
    assert status == 2
    assert "no such directory" in capsys.readouterr().err  # more bad inputs: tests/test_recipe_checks.py


def test_command_line_error_exit_status(tmp_path):
    """As a script: a short message on stderr and a non-zero exit status, no traceback."""
    result = subprocess.run(
        [sys.executable, str(RECIPE_PATH), "--dataset", str(tmp_path / "missing.parquet")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2
    assert "error: dataset file not found" in result.stderr
    assert "Traceback" not in result.stderr
