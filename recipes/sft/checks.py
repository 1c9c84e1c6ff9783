"""Checks that run before anything is loaded or written; each raises a RecipeError (one line, exit status 2).

`check_and_resolve` runs them in order, cheapest first: the numbers, the output folder and the
runs in it, the model and dataset sources (their config and files, a single look at the hub),
then, with torch imported, what depends on the machine. The dataset's rows are checked later,
with the tokenizer (data.py), still before any weights load.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
from pathlib import Path

from . import config as recipe_config, distributed, runs
from .config import Knobs, RecipeConfig
from .errors import RecipeError

HUB_TIMEOUT_S = 10  # one look at the Hugging Face Hub per name, no retries
DATASET_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Suffixes that mark a --dataset as a file name (so never a hub name), supported or not.
DATA_FILE_SUFFIXES = {*DATASET_FILE_TYPES, ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zst", ".bz2", ".xz"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name
MODEL_WEIGHT_PATTERNS = ["*.safetensors", "*.bin"]
MODEL_TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model"]


def check_and_resolve(args: argparse.Namespace, real: Knobs, tiny: Knobs) -> RecipeConfig:
    """Every check that needs no weights and no dataset rows, and the config resolved from the flags."""
    check_flags(args)
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir)
    max_steps = recipe_config.planned_max_steps(args, real, tiny)
    epochs = args.epochs if args.epochs is not None else (tiny if args.model is None else real).epochs
    resume = runs.check_resume(args.resume, output_dir, max_steps, epochs)
    runs.check_new_run(output_dir, args.resume, args.overwrite)
    if args.model is not None:
        model_config = check_model_source(args.model)
    else:
        model_config = json.loads((recipe_config.TINY_MODEL_DIR / "config.json").read_text())
    for flag, name in (("--dataset", args.dataset), ("--eval-dataset", args.eval_dataset)):
        if name is not None:
            check_dataset_source(name, flag)
    if args.report_to != ["none"]:
        check_report_to(args.report_to)
    if importlib.util.find_spec("fastgemma") is None:
        raise RecipeError("fastgemma is not installed: run `pip install -e .` in the repository (or put it on PYTHONPATH)")
    import torch

    on_gpu = torch.cuda.is_available()
    if (problem := distributed.check_arguments(args.fsdp, distributed.detect_launch(), on_gpu)) is not None:
        raise RecipeError(problem)
    config = recipe_config.resolve(args, real, tiny, on_gpu, resume)
    check_max_seq_length(config, model_config)
    check_device(config)
    return config


def check_flags(args: argparse.Namespace) -> None:
    """The numbers. No I/O and no imports, so a typo is answered at once."""
    for flag, value in [
        ("--max-seq-length", args.max_seq_length),
        ("--batch-size", args.batch_size),
        ("--grad-accum", args.grad_accum),
        ("--lora-r", args.lora_r),
        ("--lora-alpha", args.lora_alpha),
        ("--logging-steps", args.logging_steps),
    ]:
        if value is not None and value < 1:
            raise RecipeError(f"{flag} must be a whole number of at least 1, got {value}")
    for flag, value in [("--lr", args.lr), ("--epochs", args.epochs)]:
        if value is not None and not (math.isfinite(value) and value > 0):  # also refuses nan and inf
            raise RecipeError(f"{flag} must be a number above 0, got {value}")
    if not 0 <= args.lora_dropout < 1:
        raise RecipeError(f"--lora-dropout must be at least 0 and below 1, got {args.lora_dropout}")
    if args.max_steps is not None and args.max_steps < 1 and args.max_steps != -1:
        raise RecipeError(f"--max-steps must be at least 1 (or -1: train for --epochs), got {args.max_steps}")
    if args.save_steps is not None and args.save_steps < 0:
        raise RecipeError(f"--save-steps must be at least 1 (or 0: save only on Ctrl-C), got {args.save_steps}")
    if args.show_generations is not None and args.show_generations < 0:
        raise RecipeError(f"--show-generations must be 0 or more, got {args.show_generations}")
    if not 0 <= args.seed < 2**32:  # numpy's seed range
        raise RecipeError(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    if args.overwrite and args.resume is not None:
        raise RecipeError("--overwrite starts a new run and --resume continues the earlier one: give one of them")
    if args.eval_steps is not None and args.eval_steps < 1:
        raise RecipeError(f"--eval-steps must be a whole number of at least 1, got {args.eval_steps}")
    if not (math.isfinite(args.eval_fraction) and 0 <= args.eval_fraction < 1):
        raise RecipeError(f"--eval-fraction must be at least 0 and below 1, got {args.eval_fraction}")
    if args.eval_fraction > 0 and args.eval_dataset is not None:
        raise RecipeError("--eval-fraction holds out training rows and --eval-dataset names other ones: give one of them")


def check_output_dir(output_dir: Path) -> None:
    """An existing, writable directory, or one that can be created."""
    if output_dir.exists():
        if not output_dir.is_dir():
            raise RecipeError(f"--output-dir {output_dir} is a file, not a directory")
        if not os.access(output_dir, os.W_OK | os.X_OK):
            raise RecipeError(f"--output-dir {output_dir} is not writable")
        return
    ancestor = output_dir.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RecipeError(f"--output-dir {output_dir} cannot be created: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RecipeError(f"--output-dir {output_dir} cannot be created: {ancestor} is not writable")



def first_line(error: BaseException) -> str:
    """The first line of the most specific message in an exception chain: wrappers such as
    datasets' "An error occurred while generating the dataset" hide the reason in __cause__."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    for candidate in reversed(chain):
        text = str(candidate).strip()
        if text:
            return text.splitlines()[0]
    return type(error).__name__


def is_hub_name(name: str) -> bool:
    """owner/name and nothing on disk under that name."""
    return HUB_ID.fullmatch(name) is not None and not Path(name).exists()


def check_hub_repo(name: str, repo_type: str, flag: str) -> None:
    """One quick look at the hub, so that a typo or no network fails within seconds instead of
    after the libraries' ~30 s of retries. With HF_HUB_OFFLINE set, the local cache is all there
    is: the loaders read it (and fail at once when the name is not cached)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return
    try:
        HfApi().repo_info(name, repo_type=repo_type, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise RecipeError(gated_message(name, repo_type, flag)) from None
    except RepositoryNotFoundError:
        raise RecipeError(
            f"{flag} {name!r}: no such {repo_type} on the Hugging Face Hub, and no such local path "
            "(a private one needs `hf auth login` or HF_TOKEN)"
        ) from None
    except Exception as error:  # no network, proxy, DNS, timeout, server error
        raise RecipeError(
            f"{flag} {name!r}: cannot reach the Hugging Face Hub ({first_line(error)}); without a network, "
            "set HF_HUB_OFFLINE=1 to use a copy in the local cache"
        ) from None


def gated_message(name: str, repo_type: str, flag: str) -> str:
    url = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{name}"
    return f"{flag} {name!r} is gated: accept its license at {url}, then log in (`hf auth login` or HF_TOKEN)"


def check_model_type(config: object, where: str) -> None:
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "gemma2":
        raise RecipeError(
            f"--model {where} is a {model_type!r} model; this recipe fine-tunes Gemma 2 only "
            "(config model_type 'gemma2', e.g. google/gemma-2-2b or google/gemma-2-9b)"
        )


def check_model_source(name: str) -> dict:
    """A local model directory (config, weights, tokenizer), or a Gemma 2 repository on the hub.
    Reads config.json only, and returns it."""
    if is_hub_name(name):
        check_hub_repo(name, "model", "--model")
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError

        try:
            config_file = hf_hub_download(name, "config.json")
        except GatedRepoError:
            raise RecipeError(gated_message(name, "model", "--model")) from None
        except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: first)
            offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
            raise RecipeError(f"--model {name!r} is not in the local Hugging Face cache{offline}") from None
        except EntryNotFoundError:
            raise RecipeError(f"--model {name!r} has no config.json on the hub: not a transformers model") from None
        except Exception as error:
            raise RecipeError(f"--model {name!r}: cannot read its config.json ({first_line(error)})") from None
        config = json.loads(Path(config_file).read_text())
        check_model_type(config, repr(name))
        return config

    path = Path(name).expanduser()
    if not path.exists():
        raise RecipeError(f"--model {name}: no such directory (a hub model is named like google/gemma-2-2b)")
    if not path.is_dir():
        raise RecipeError(f"--model {name} is a file; give the directory holding config.json, weights and tokenizer")
    if not any(path.iterdir()):
        raise RecipeError(f"--model {name} is an empty directory; expected config.json, weights and a tokenizer")
    if not (path / "config.json").is_file():
        raise RecipeError(f"--model {name} has no config.json: not a saved transformers model directory")
    try:
        config = json.loads((path / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise RecipeError(f"--model {name}: config.json is not valid JSON ({error})") from None
    check_model_type(config, name)
    if not any(any(path.glob(pattern)) for pattern in MODEL_WEIGHT_PATTERNS):
        raise RecipeError(f"--model {name} has a config but no weights (*.safetensors or *.bin)")
    if not any((path / file).is_file() for file in MODEL_TOKENIZER_FILES):
        raise RecipeError(f"--model {name} has no tokenizer ({' or '.join(MODEL_TOKENIZER_FILES)})")
    return config


def check_max_seq_length(config: RecipeConfig, model_config: dict) -> None:
    """No longer than the model's positions (RoPE and the sliding window are set up for those)."""
    limit = model_config.get("max_position_embeddings")
    if isinstance(limit, int) and config.max_seq_length > limit:
        model = config.model or "the tiny demo model"
        raise RecipeError(
            f"--max-seq-length {config.max_seq_length} is longer than {model} handles: its config's "
            f"max_position_embeddings is {limit}; use --max-seq-length {limit} or less"
        )


def dataset_is_local(name: str) -> bool:
    return not is_hub_name(name) or Path(name).suffix.lower() in DATA_FILE_SUFFIXES


def check_dataset_source(name: str, flag: str = "--dataset") -> None:
    """A non-empty local file of a supported type, or a dataset on the hub."""
    if not dataset_is_local(name):
        check_hub_repo(name, "dataset", flag)
        return
    path = Path(name)
    if not path.exists():
        raise RecipeError(f"dataset file not found: {name}")
    if path.is_dir():
        raise RecipeError(f"{flag} {name} is a directory; give a .jsonl, .json or .parquet file")
    if path.suffix not in DATASET_FILE_TYPES:
        raise RecipeError(f"dataset file {name} must be .jsonl, .json or .parquet")
    if path.stat().st_size == 0:
        raise RecipeError(f"dataset file {name} is empty")




def check_device(config: RecipeConfig) -> None:
    """Flags that depend on the machine."""
    if config.backend == "flex" and not config.on_gpu:
        raise RecipeError(
            "--backend flex needs a CUDA GPU (flex_attention's kernels are built with Triton); "
            "on a CPU use --backend compiled or eager"
        )
    fused_off = ("(--fused-ops off)" if config.fused_ops == "off"
                 else "(--fused-ops auto fuses on a GPU only)" if config.fused_ops == "auto" and not config.on_gpu
                 else None)
    if config.cuda_graphs == "on" and fused_off:
        raise RecipeError(f"--cuda-graphs on replays the fused ops' compiled layers, and fused ops are off here "
                          f"{fused_off}: add --fused-ops on, or drop --cuda-graphs on")
    if config.cuda_graphs == "on" and config.lora_dropout > 0:
        raise RecipeError(f"--cuda-graphs on cannot replay LoRA dropout (--lora-dropout {config.lora_dropout}): "
                          "a graph repeats one random draw; use --lora-dropout 0 or --cuda-graphs off")
    if config.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes")
    from transformers.training_args import OptimizerNames

    if config.optim not in {name.value for name in OptimizerNames}:
        raise RecipeError(
            f"--optim {config.optim!r} is not a transformers optimizer (e.g. adamw_torch, adamw_torch_fused, "
            "paged_adamw_8bit, adafactor)"
        )


def check_report_to(names: list[str]) -> None:
    """Tracker names transformers knows, each with its package installed (transformers would fail mid-setup)."""
    from transformers.integrations import integration_utils

    known = integration_utils.INTEGRATION_TO_CALLBACK
    for name in names:
        if name in ("all", "none"):
            if len(names) > 1:
                raise RecipeError(f"--report-to {name} stands alone, got {' '.join(names)}")
            continue
        if name not in known:
            raise RecipeError(f"--report-to {name!r} is not a transformers integration; one of: "
                              f"{', '.join(sorted(known))}, all, none")
        if name not in integration_utils.get_available_reporting_integrations():
            package = {"tensorboard": "tensorboard"}.get(name, name.replace("_", "-"))
            raise RecipeError(f"--report-to {name} needs its package: pip install {package}")
