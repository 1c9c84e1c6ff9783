"""Unsloth as a contender of the trl suite, in a process of its own.

``import unsloth`` patches transformers, peft and trl for the whole process (and Unsloth 2026.10 wants
transformers ≤ 5.17 and trl ≤ 1.15, which the other contenders do not run on), so ``benchmarks.suite_trl``
starts this script once per Unsloth contender and reads back the one row it writes:

    python -m benchmarks.unsloth_trl --checkpoint DIR --max-length L --batch B --grad-accum A --steps N \\
        --warmup W --seed S --lora-r R --out row.json [--tiny] [--no-quant]

It trains the suite's checkpoint on the suite's synthetic documents the way Unsloth tells users to:
``FastLanguageModel.from_pretrained(load_in_4bit=True)``, ``FastLanguageModel.get_peft_model`` with
``use_gradient_checkpointing="unsloth"``, then TRL's SFTTrainer (as patched by Unsloth) with the suite's
learning rate, schedule and logging. ``packing=False``: Unsloth refuses packing and padding-free batches for
Gemma 2, so batches are right-padded and tokens/s counts real tokens only. The measurements are the suite's
own callbacks and summary, so the row has the same keys as the other contenders', plus ``unsloth_version``,
``block_compile`` (UNSLOTH_BLOCK_COMPILE as this process saw it; None: unset, Unsloth's default),
``unsloth_packing_notes`` (what Unsloth printed about packing or padding) and ``versions``.

A failure is a row too: {"status": "OOM" | "failed (...)" | "n/a (...)", "traceback": ...}, with a non-zero
exit code. Only the standard library is imported before ``unsloth``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

# What peft's "all-linear" (the suite's LoRA targets) resolves to on Gemma 2; Unsloth takes an explicit list.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXIT_FAILED, EXIT_NA = 1, 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.unsloth_trl", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="the suite's saved random-init checkpoint (with tokenizer)")
    p.add_argument("--max-length", type=int, required=True)
    p.add_argument("--batch", type=int, required=True, help="per_device_train_batch_size")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--warmup", type=int, required=True, help="steps left out of the tokens/s median")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--tiny", action="store_true", help="the suite's --tiny dataset (short documents)")
    p.add_argument("--no-quant", action="store_true", help="LoRA on bf16 weights instead of QLoRA nf4")
    p.add_argument("--out", required=True, help="where the row is written, as JSON")
    return p


class NoteTee:
    """A stream that passes everything through and keeps the lines in which Unsloth speaks of packing or
    padding: Unsloth decides those for Gemma 2 itself (it refuses packing, picks padded batches), mostly in
    log warnings, and the row should say what it decided. Installed before ``import unsloth`` so that the
    log handlers Unsloth creates write through it."""

    def __init__(self, stream, notes: list[str]):
        self.stream, self.notes, self._line = stream, notes, ""

    def write(self, text: str) -> int:
        self._line += text
        *done, self._line = self._line.split("\n")
        for line in done:
            self._keep(line)
        return self.stream.write(text)

    def _keep(self, line: str) -> None:
        low = line.lower()
        if "unsloth" in low and ("pack" in low or "padding" in low):
            line = line.strip()[:300]
            if line not in self.notes and len(self.notes) < 20:
                self.notes.append(line)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)


def write_row(path: str, row: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(row, f, indent=1, default=repr)
    os.replace(tmp, path)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cuda_device():
    """The GPU to train on, or None: Unsloth's kernels are Triton, CUDA only."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def module_versions() -> dict:
    """Versions of what this process imported, read from the modules: on our GPU machine two trl / datasets
    dist-infos can sit in one --target folder, and package metadata then names the wrong one."""
    out = {}
    for name in ("unsloth", "unsloth_zoo", "torch", "transformers", "trl", "peft", "bitsandbytes", "datasets"):
        module = sys.modules.get(name)
        out[name] = getattr(module, "__version__", "?") if module is not None else "not imported"
    return out


def truncate_documents(ds, max_length: int):
    """(dataset with every document cut to max_length tokens, how many were cut). Unsloth's SFTTrainer does not
    truncate a pre-tokenized dataset itself: it cuts an over-long batch's input_ids in the model's forward but not
    its labels ("Input IDs ... > the model's max sequence length ... We shall truncate it ourselves"), and its
    fused loss then indexed out of bounds (a device-side assert, H100, 2026-12-02). Cut here, as a user must."""
    cut = sum(len(ids) > max_length for ids in ds["input_ids"])
    if not cut:
        return ds, 0
    return ds.map(lambda row: {"input_ids": row["input_ids"][:max_length]}), cut


def train(args, device) -> dict:
    """Load, wrap and train as an Unsloth user does, timed and counted as suite_trl does for every contender."""
    import torch
    from unsloth import FastLanguageModel  # imported already, before transformers and trl
    from trl import SFTConfig

    from . import common as C
    from . import models as M
    from . import suite_trl as T

    with open(os.path.join(args.checkpoint, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    ds, total = T.trl_dataset(vocab, args.tiny, args.steps, args.batch, args.max_length, args.grad_accum, args.seed)
    ds, cut = truncate_documents(ds, args.max_length)
    C.log(f"unsloth: synthetic dataset {len(ds)} documents, {total:,} tokens; {cut} cut to {args.max_length}")
    lora = M.lora_config(args.lora_r)

    C.free_memory(device)
    C.reset_peak(device)
    C.sync(device)
    t_load0 = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.checkpoint, max_seq_length=args.max_length, dtype=torch.bfloat16,
        load_in_4bit=not args.no_quant,
    )
    C.sync(device)
    t_loaded = time.perf_counter()
    # LoRA wrapping is part of the trainer's set-up for the other contenders (SFTTrainer's peft_config), so
    # it is timed with the trainer here too.
    model = FastLanguageModel.get_peft_model(
        model, r=args.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, bias=lora.bias,
        target_modules=list(LORA_TARGETS), use_gradient_checkpointing="unsloth", random_state=args.seed,
    )
    # Gradient checkpointing is left at TRL's default (on) and Unsloth's choice of how, as its notebooks do.
    cfg = SFTConfig(
        **T.sft_kwargs(os.path.join(os.path.dirname(os.path.abspath(args.out)), "trainer"), args.steps, args.batch,
                       args.grad_accum, args.max_length, args.seed, device),
        packing=False,
        padding_free=False,
    )
    StepClock, CountingSFTTrainer, GpuBusyProbe = T._make_trainer_cls(pad_token_id=tokenizer.pad_token_id)
    clock = StepClock(device)
    probe = GpuBusyProbe(device, step=T.probe_step(args.steps, args.warmup))
    torch.manual_seed(args.seed)
    trainer = CountingSFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tokenizer,
                                 callbacks=[clock, probe])
    trainer._bench_tokens = []
    C.sync(device)
    t_trainer = time.perf_counter()
    trainer.train()
    C.sync(device)
    row = T.summarize(clock, probe, trainer, args.grad_accum, args.warmup, t_load0, t_loaded, t_trainer,
                      C.peak_mib(device))
    row["status"] = "ok"
    row["packing"] = bool(getattr(trainer.args, "packing", False))
    row["padding_free"] = bool(getattr(trainer.args, "padding_free", False))
    return row


def main(argv: list[str] | None = None) -> int:
    return run_and_write(build_parser().parse_args(argv), train)


def run_and_write(args, measure) -> int:
    """Import Unsloth, run `measure(args, device)` and write its row (with what Unsloth said about packing and
    the UNSLOTH_* settings) to args.out; the exit code. Shared with benchmarks.unsloth_context."""
    notes: list[str] = []
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = NoteTee(sys.stdout, notes), NoteTee(sys.stderr, notes)
    try:
        row, code = _measure(args, measure)
    finally:
        sys.stdout, sys.stderr = saved
    row.update(block_compile=os.environ.get("UNSLOTH_BLOCK_COMPILE"),
               block_cudagraphs=os.environ.get("UNSLOTH_BLOCK_CUDAGRAPHS"), unsloth_packing_notes=notes)
    write_row(args.out, row)
    return code


def _measure(args, measure) -> tuple[dict, int]:
    """(row, exit code). Everything Unsloth raises, on import too, becomes the row's status."""
    t0 = time.perf_counter()
    try:
        import unsloth  # first: it patches transformers and trl when imported
    except Exception as exc:  # noqa: BLE001 - not installed, wrong transformers, no GPU: all say "not here"
        return {"status": f"n/a (unsloth not importable: {_one_line(exc, 160)})",
                "traceback": traceback.format_exc()[-4000:]}, EXIT_NA
    meta = {"unsloth_version": getattr(unsloth, "__version__", "?"), "import_s": time.perf_counter() - t0}
    device = cuda_device()
    if device is None:
        return {"status": "n/a (Unsloth needs a CUDA GPU)", **meta, "versions": module_versions()}, EXIT_NA
    try:
        row = measure(args, device)
        code = 0
    except Exception as exc:  # noqa: BLE001 - reported in the row, as suite_trl reports its own contenders
        from .common import describe_failure

        row = {"status": describe_failure(exc), "traceback": traceback.format_exc()[-8000:]}
        code = EXIT_FAILED
    return {**row, **meta, "versions": module_versions()}, code


if __name__ == "__main__":
    sys.exit(main())
