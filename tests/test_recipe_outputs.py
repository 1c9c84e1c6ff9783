"""What recipes/sft_gemma2.py hands over besides the adapter: the eval loss (--eval-fraction, --eval-dataset),
tracking (--report-to tensorboard), a merged standalone model (--merge), and recipes/generate.py.

One short run of the tiny default (eager attention) feeds most tests; 4-bit merging has its own run.
"""

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import RECIPES_DIR, load_recipe
from sft.config import TINY_HELDOUT_FILE

GENERATE = RECIPES_DIR / "generate.py"
STEPS = 12
RUN = ["--max-steps", str(STEPS), "--batch-size", "8", "--lr", "1e-2", "--max-seq-length", "128", "--backend", "eager",
       "--eval-fraction", "0.01", "--eval-steps", "5", "--show-generations", "3", "--merge"]
TENSORBOARD = importlib.util.find_spec("tensorboard") is not None  # the test extra installs it


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("sft_gemma2_outputs")


@pytest.fixture(scope="module")
def run(recipe, tmp_path_factory):
    """The output directory and console of one run with an eval split, --merge and (if installed) TensorBoard."""
    output_dir = tmp_path_factory.mktemp("outputs") / "out"
    argv = [*RUN, "--output-dir", str(output_dir), *(["--report-to", "tensorboard"] if TENSORBOARD else [])]
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        assert recipe.main(argv) == 0
    return output_dir, console.getvalue()


def heldout_prompts(count: int) -> list[str]:
    rows = [json.loads(line) for line in TINY_HELDOUT_FILE.read_text().splitlines()[:count]]
    return [row["messages"][0]["content"] for row in rows]


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------
def test_eval_loss_in_the_log_the_state_and_the_summary(run):
    output_dir, console = run
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    evals = {entry["step"]: entry["eval_loss"] for entry in history if "eval_loss" in entry}
    assert sorted(evals) == [5, 10, STEPS]  # every --eval-steps, and after the last step
    assert all(torch.isfinite(torch.tensor(list(evals.values()))))
    summary = json.loads((output_dir / "recipe_summary.json").read_text())
    assert summary["last_eval_loss"] == [STEPS, evals[STEPS]] and summary["first_eval_loss"] == [5, evals[5]]
    assert summary["eval_examples"] == 40  # 1% of the toy set's 4,000 rows
    assert "3,960 chat examples (3 held out, 40 for evaluation)" in console
    assert f"eval loss    first {evals[5]:.4f} (step 5) -> last {evals[STEPS]:.4f} (step {STEPS})" in console


def test_eval_dataset_from_a_file(recipe, tmp_path, capsys):
    chats = [{"messages": [{"role": "user", "content": f"upper: {w}"}, {"role": "assistant", "content": w.upper()}]}
             for w in ["ab", "cde", "fgh", "ij", "klm", "no"]]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chats))
    argv = ["--max-steps", "2", "--batch-size", "4", "--max-seq-length", "128", "--backend", "eager",
            "--show-generations", "0", "--eval-dataset", str(tmp_path / "eval.jsonl"), "--eval-steps", "1"]
    assert recipe.main([*argv, "--output-dir", str(tmp_path / "out")]) == 0
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [1, 2]
    assert "on 6 examples" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--eval-fraction", "1"], "--eval-fraction must be at least 0 and below 1, got 1.0"),
    (["--eval-fraction", "-0.1"], "--eval-fraction must be at least 0 and below 1, got -0.1"),
    (["--eval-steps", "0"], "--eval-steps must be a whole number of at least 1, got 0"),
    (["--eval-fraction", "0.1", "--eval-dataset", "x.jsonl"], "--eval-fraction holds out training rows"),
    (["--eval-dataset", "missing.jsonl"], "dataset file not found: missing.jsonl"),
    (["--report-to", "tensorbored"], "--report-to 'tensorbored' is not a transformers integration"),
    (["--report-to", "none", "wandb"], "--report-to none stands alone"),
])
def test_bad_eval_and_tracking_flags(recipe, tmp_path, capsys, argv, message):
    assert recipe.main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------
# Tracking
# ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not TENSORBOARD, reason="tensorboard is not installed (pip install -e '.[test]' installs it)")
def test_tensorboard_event_files_hold_the_losses(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir, _ = run
    (event_file,) = (output_dir / "runs").rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent))
    events.Reload()
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    for tag, key in (("train/loss", "loss"), ("eval/loss", "eval_loss")):
        logged = {entry["step"]: entry[key] for entry in history if key in entry}
        written = {event.step: event.value for event in events.Scalars(tag)}
        assert written.keys() == logged.keys() and len(written) > 1, tag
        assert list(written.values()) == pytest.approx(list(logged.values()), rel=1e-6), tag


def test_tracker_that_is_not_installed_is_refused_before_loading(recipe, tmp_path, capsys, monkeypatch):
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "get_available_reporting_integrations", lambda: [])
    assert recipe.main(["--report-to", "tensorboard", "--output-dir", str(tmp_path / "out")]) == 2
    assert "--report-to tensorboard needs its package: pip install tensorboard" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# --merge and recipes/generate.py
# ---------------------------------------------------------------------------------------
def greedy_ids(model, tokenizer, prompts: list[str], tokens: int = 12) -> list[list[int]]:
    """`tokens` greedy tokens after each chat prompt (no early stop, so every position is compared)."""
    from sft.generation import chat_prompt

    results = []
    for prompt in prompts:
        text = chat_prompt(tokenizer, [{"role": "user", "content": prompt}])
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        results.append(output[0, inputs["input_ids"].shape[1]:].tolist())
    return results


def test_merged_model_stands_alone_and_generates_like_base_plus_adapter(run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir, console = run
    merged_dir = output_dir / "merged"
    assert f"merged       {merged_dir} (standalone model and tokenizer)" in console
    assert not (merged_dir / "adapter_config.json").exists() and (merged_dir / "tokenizer.json").is_file()
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config  # a CPU run trains in fp32
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not hasattr(merged, "peft_config")
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)

    base = AutoModelForCausalLM.from_pretrained(output_dir / "tiny_base_model")
    prompts = heldout_prompts(4)
    base_alone = greedy_ids(base.eval(), tokenizer, prompts)
    adapted = PeftModel.from_pretrained(base, output_dir).eval()
    expected = greedy_ids(adapted, tokenizer, prompts)
    assert greedy_ids(merged, tokenizer, prompts) == expected
    assert expected != base_alone  # the adapter changed what the model says, and the merge kept it


@pytest.mark.slow
def test_merge_dequantises_a_4bit_base(recipe, tmp_path):
    """A QLoRA run's merged weights are the 4-bit base's values (dequantised) plus the adapter's update,
    not the original full-precision base's."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file
    from sft.model import load_base_model

    output_dir = tmp_path / "out"
    argv = ["--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--max-seq-length", "128", "--backend", "eager",
            "--load-in-4bit", "--show-generations", "0", "--merge", "--output-dir", str(output_dir)]
    assert recipe.main(argv) == 0
    merged = load_file(output_dir / "merged" / "model.safetensors")
    original = load_file(output_dir / "tiny_base_model" / "model.safetensors")
    adapter = load_file(output_dir / "adapter_model.safetensors")
    dequantised = load_base_model(str(output_dir / "tiny_base_model"), load_in_4bit=True, on_gpu=False)
    dequantised = dequantised.dequantize(dtype=torch.float32).state_dict()  # a CPU run computes in fp32
    scaling = 32 / 16  # lora_alpha / r
    name = "model.layers.0.self_attn.q_proj.weight"
    lora_a = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    lora_b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    expected = dequantised[name].float() + scaling * lora_b.float() @ lora_a.float()
    assert merged[name].dtype == torch.float32
    torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-5)
    assert (lora_b.abs().max() > 0) and not torch.allclose(merged[name].float(), original[name].float(), atol=1e-3)


def generate_script(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GENERATE), *argv], input=stdin, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def test_generate_script_answers_like_the_recipes_closing_generations(run):
    output_dir, _ = run
    generations = json.loads((output_dir / "recipe_summary.json").read_text())["generations"]
    prompts = [generation["prompt"] for generation in generations]
    result = generate_script(str(output_dir), *[f"--prompt={prompt}" for prompt in prompts], "--max-new-tokens", "32")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [generation["generated"] for generation in generations]


def test_generate_script_chats_with_the_merged_model_like_with_base_plus_adapter(run):
    output_dir, _ = run
    prompts = "\n".join(heldout_prompts(3)) + "\n"
    merged = generate_script(str(output_dir / "merged"), "--max-new-tokens", "16", stdin=prompts)
    adapter = generate_script(str(output_dir), "--max-new-tokens", "16", stdin=prompts)
    assert merged.returncode == adapter.returncode == 0, merged.stderr[-3000:] + adapter.stderr[-3000:]
    assert len(merged.stdout.splitlines()) == 3 and merged.stdout == adapter.stdout


def test_generate_script_refuses_a_folder_without_a_model(tmp_path):
    result = generate_script(str(tmp_path), "--prompt", "hi")
    assert result.returncode == 2 and "holds neither an adapter" in result.stderr


def test_models_load_without_hub_kernels(monkeypatch, tmp_path):
    """transformers 5.25 fetches hub kernels while loading on a GPU, which fails without network even for a local
    model: the recipe and generate.py load without them (for Gemma 2 they swap only the rotary embedding, which
    fastgemma's fused ops compute themselves in training)."""
    import transformers
    from sft.model import load_base_model

    class Loaded(Exception):
        pass

    calls = []

    def from_pretrained(source, **kwargs):
        calls.append(kwargs)
        raise Loaded

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    (tmp_path / "config.json").write_text("{}")
    spec = importlib.util.spec_from_file_location("generate_script", RECIPES_DIR / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    for load in (lambda: load_base_model(str(tmp_path), load_in_4bit=False, on_gpu=False),
                 lambda: generate.load(tmp_path, "auto")):
        with pytest.raises(Loaded):
            load()
    assert [call.get("use_kernels") for call in calls] == [False, False]
