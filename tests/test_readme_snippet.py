"""The README's TRL snippet runs as printed, with only the model, the data and the run's length swapped for
the tiny ones shipped in recipes/assets (and bf16 off where there is no GPU)."""

import re
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "recipes" / "assets"


def readme_snippet() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.DOTALL | re.MULTILINE)
    (snippet,) = [block for block in blocks if "SFTTrainer" in block]
    return snippet


def swap(code: str, old: str, new: str) -> str:
    assert code.count(old) == 1, f"the README's snippet no longer holds {old!r} once"
    return code.replace(old, new)


@pytest.fixture
def tiny_model_dir(tmp_path):
    from transformers import AutoConfig, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(AutoConfig.from_pretrained(ASSETS / "tiny_gemma2"))
    model.save_pretrained(tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ASSETS / "tiny_gemma2" / name, tmp_path / "model" / name)
    return tmp_path / "model"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator:UserWarning")  # a CPU run
def test_the_readme_trl_snippet_trains(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    code = readme_snippet()
    code = swap(code, '"google/gemma-2-2b", 2048', f"{str(tiny_model_dir)!r}, 128")
    code = swap(code, 'load_dataset("trl-lib/Capybara", split="train")',
                f'load_dataset("json", data_files={str(ASSETS / "data" / "tiny_tasks_train.jsonl")!r}, '
                'split="train").select(range(200))')
    code = swap(code, 'output_dir="out",', f'output_dir={str(tmp_path / "out")!r}, max_steps=1, logging_steps=1, report_to="none",')
    if not torch.cuda.is_available():
        code = swap(code, "bf16=True,", "bf16=False,")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md (TRL snippet)", "exec"), namespace)

    import fastgemma

    trainer = namespace["trainer"]
    assert fastgemma.is_patched(trainer.model)
    assert trainer.state.global_step == 1
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(loss == loss and loss > 0 for loss in losses)
