"""Data: the training set, an eval set, held-out prompts for the closing generations, and the tokenizer.

Every row is read and the first rows are rendered and tokenized before any weights load, so a
malformed file, a row the chat template cannot render, or a --max-seq-length that no document
fits in stops the recipe with one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .checks import DATASET_FILE_TYPES, dataset_is_local, first_line
from .config import TINY_HELDOUT_FILE, TINY_MODEL_DIR, TINY_TRAIN_FILE, RecipeConfig
from .console import display_path, quiet_logger
from .errors import RecipeError

LENGTH_CHECK_ROWS = 1000  # rows tokenized up front to see whether documents fit --max-seq-length


@dataclass
class Splits:
    train: object  # datasets.Dataset
    eval: object | None
    heldout: object  # rows for the closing generations (may be empty)
    data_format: str  # "chat", "prompt-completion" or "text"
    name: str  # as shown on the console


def load_tokenizer(config: RecipeConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR if config.tiny else config.model)


def load_splits(config: RecipeConfig, tokenizer) -> Splits:
    """The training rows (checked), the eval rows (--eval-dataset or --eval-fraction) and the held-out prompts."""
    name = config.dataset or str(TINY_TRAIN_FILE)
    dataset = load_rows(name, config.dataset_split)
    data_format = dataset_format(dataset, name)
    shown = display_path(name) if dataset_is_local(name) else name
    if data_format == "chat" and tokenizer.chat_template is None:
        # Base checkpoints may ship without a template: use Gemma's turn format (with the
        # {% generation %} markers that assistant-only loss needs).
        tokenizer.chat_template = (TINY_MODEL_DIR / "chat_template.jinja").read_text()
    check_document_lengths(dataset, data_format, tokenizer, config.max_seq_length, shown)
    if config.dataset is None:
        from datasets import load_dataset

        heldout = load_dataset("json", data_files=str(TINY_HELDOUT_FILE), split="train")
        heldout = heldout.select(range(min(config.show_generations, len(heldout))))
    elif data_format != "text":
        dataset, heldout = split_off_heldout(dataset, config.show_generations)
    else:
        heldout = dataset.select([])  # plain text has no expected answer to compare with
    eval_rows = None
    if config.eval_fraction > 0:
        if round(len(dataset) * config.eval_fraction) < 1 or round(len(dataset) * (1 - config.eval_fraction)) < 1:
            raise RecipeError(f"--eval-fraction {config.eval_fraction} of {len(dataset)} rows leaves no eval or no "
                              "training rows")
        parts = dataset.train_test_split(test_size=config.eval_fraction, seed=config.seed)
        dataset, eval_rows = parts["train"], parts["test"]
    elif config.eval_dataset is not None:
        eval_rows = load_rows(config.eval_dataset, config.eval_dataset_split)
        eval_shown = display_path(config.eval_dataset) if dataset_is_local(config.eval_dataset) else config.eval_dataset
        if (eval_format := dataset_format(eval_rows, eval_shown)) != data_format:
            raise RecipeError(f"--eval-dataset {eval_shown} is {eval_format} data and the training set is "
                              f"{data_format}: give both in one format")
        check_document_lengths(eval_rows, data_format, tokenizer, config.max_seq_length, eval_shown)
    evaluated = f", {len(eval_rows):,} for evaluation" if eval_rows is not None else ""
    print(f"dataset      {shown}: {len(dataset):,} {data_format} examples ({len(heldout)} held out{evaluated})")
    return Splits(dataset, eval_rows, heldout, data_format, shown)



def find_bad_json(path: Path) -> str | None:
    """Where a JSON / JSON-lines file stops being readable, e.g. 'line 7 is not valid JSON (...)'."""
    try:
        if path.suffix == ".json":  # one JSON document (array of rows), or JSON lines
            text = path.read_text(encoding="utf-8")
            try:
                json.loads(text)
                return None  # valid JSON: the problem is its layout, not its syntax
            except json.JSONDecodeError as error:
                first = next((line for line in text.splitlines() if line.strip()), "")
                try:
                    json.loads(first)  # the first line stands alone: JSON lines, scanned below
                except json.JSONDecodeError:
                    return f"line {error.lineno} is not valid JSON ({error.msg} at column {error.colno})"
        rows = 0
        with open(path, encoding="utf-8") as lines:  # JSON lines: one object per line
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip("\r\n"))  # (keeps error.colno on this line)
                except json.JSONDecodeError as error:
                    return f"line {number} is not valid JSON ({error.msg} at column {error.colno})"
                if not isinstance(row, dict):
                    return f"line {number} is a JSON {type(row).__name__}, not an object like {{\"text\": ...}}"
                rows += 1
        return None if rows else "it has no rows (only blank lines)"
    except UnicodeDecodeError as error:
        return f"it is not UTF-8 text ({error.reason} at byte {error.start})"


def load_rows(name: str, split: str):
    from datasets import load_dataset

    if not dataset_is_local(name):
        from huggingface_hub import constants

        try:
            with quiet_logger("datasets"):
                return load_dataset(name, split=split)
        except Exception as error:
            offline = "; HF_HUB_OFFLINE is set, so only the local cache is read" if constants.HF_HUB_OFFLINE else ""
            raise RecipeError(
                f"cannot load dataset {name!r} (split {split!r}) from the hub: {first_line(error)}{offline}"
            ) from None
    path = Path(name)
    try:
        with quiet_logger("datasets"):
            return load_dataset(DATASET_FILE_TYPES[path.suffix], data_files=str(path), split="train")
    except Exception as error:
        reason = (find_bad_json(path) if path.suffix in (".json", ".jsonl") else None) or first_line(error)
        raise RecipeError(f"cannot read dataset file {name}: {reason}") from None


def dataset_format(dataset, name: str) -> str:
    """'chat', 'prompt-completion' or 'text', from the columns, or a RecipeError naming them."""
    columns = dataset.column_names
    if len(dataset) == 0:
        raise RecipeError(f"dataset {name} has no rows")
    if "messages" in columns:
        return "chat"
    if "prompt" in columns and "completion" in columns:
        return "prompt-completion"
    if "text" in columns:
        return "text"
    raise RecipeError(
        f"dataset {name} has no usable column: found {columns}; expected 'messages' (chat), "
        "'prompt' and 'completion', or 'text'"
    )


def split_off_heldout(dataset, count: int):
    """The last `count` rows become held-out prompts for the closing generations."""
    count = min(count, len(dataset) - 1)
    if count <= 0:
        return dataset, dataset.select([])
    return dataset.select(range(len(dataset) - count)), dataset.select(range(len(dataset) - count, len(dataset)))


def document_text(row: dict, data_format: str, tokenizer) -> str:
    """The whole training document as text, the way TRL renders it before tokenizing."""
    if data_format == "chat":
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    if data_format == "prompt-completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):  # conversational prompt/completion
            return tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        return prompt + completion
    return row["text"]


def check_document_lengths(dataset, data_format: str, tokenizer, max_length: int, name: str) -> None:
    """Tokenize the first rows: refuse a --max-seq-length that no document fits in (TRL would drop
    or truncate them all), say how many are truncated otherwise. Also catches rows the chat
    template cannot render, before any weights load."""
    rows = dataset.select(range(min(LENGTH_CHECK_ROWS, len(dataset))))
    texts = []
    for index, row in enumerate(rows):
        try:
            texts.append(document_text(row, data_format, tokenizer))
        except Exception as error:
            raise RecipeError(
                f"dataset {name}, row {index} (counting from 0): cannot render it for training ({first_line(error)})"
            ) from None
    lengths = [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # + EOS
    which = f"the {len(lengths):,} documents" if len(rows) == len(dataset) else f"the first {len(lengths):,} documents"
    too_long = sum(length > max_length for length in lengths)
    if too_long == len(lengths):
        raise RecipeError(
            f"no document fits in --max-seq-length {max_length}: the shortest of {which} is {min(lengths):,} "
            f"tokens (the longest {max(lengths):,}); raise --max-seq-length"
        )
    if too_long:
        print(
            f"lengths      {too_long:,} of {which} are longer than --max-seq-length {max_length} and get "
            f"truncated (longest {max(lengths):,} tokens)"
        )
