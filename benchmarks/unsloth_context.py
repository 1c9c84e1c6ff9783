"""Unsloth as a contender of the context suite, in a process of its own (as benchmarks.unsloth_trl is for the trl
suite: ``import unsloth`` patches transformers and peft for the whole process):

    python -m benchmarks.unsloth_context --checkpoint DIR --start N --cap N --resolution N --budget-s S \\
        --seed S --lora-r R --loss chunked|hf --out row.json [--gpu-gib G] [--no-quant]

It loads the suite's checkpoint as Unsloth tells users to (``FastLanguageModel.from_pretrained(load_in_4bit=
True)``, ``get_peft_model`` with ``use_gradient_checkpointing="unsloth"``, its offloaded checkpointing) and runs
the suite's own search (benchmarks.suite_context.search) with the suite's step: the same random ids, the same
loss, AdamW on the adapters. ``--gpu-gib`` caps this process's GPU memory as the suite caps its own. The row holds
the search's keys plus ``unsloth_version`` and ``versions``; a failure is a row too (see unsloth_trl).
"""

from __future__ import annotations

import argparse
import sys

from .unsloth_trl import LORA_TARGETS, run_and_write


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.unsloth_context", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="the suite's saved random-init checkpoint")
    p.add_argument("--start", type=int, required=True, help="the first length tried")
    p.add_argument("--cap", type=int, required=True, help="the longest length tried")
    p.add_argument("--resolution", type=int, required=True, help="the bisection's last step")
    p.add_argument("--budget-s", type=float, required=True, help="the search's time cap (loading excluded)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--loss", choices=("chunked", "hf"), default="chunked", help="the suite's --context-loss")
    p.add_argument("--gpu-gib", type=float, default=None, help="cap this process's GPU memory (a smaller card)")
    p.add_argument("--no-quant", action="store_true", help="LoRA on bf16 weights instead of QLoRA nf4")
    p.add_argument("--out", required=True, help="where the row is written, as JSON")
    return p


def search_reach(args, device) -> dict:
    """Load and wrap as an Unsloth user does, then search the longest trainable length as the suite does."""
    import torch
    from unsloth import FastLanguageModel  # imported already, before transformers and peft

    from . import common as C
    from . import models as M
    from . import suite_context as S

    if args.gpu_gib:
        total = torch.cuda.mem_get_info(device)[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_gib * 2 ** 30 / total), device)
    model, _ = FastLanguageModel.from_pretrained(model_name=args.checkpoint, max_seq_length=args.cap,
                                                 dtype=torch.bfloat16, load_in_4bit=not args.no_quant)
    lora = M.lora_config(args.lora_r)
    model = FastLanguageModel.get_peft_model(
        model, r=args.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, bias=lora.bias,
        target_modules=list(LORA_TARGETS), use_gradient_checkpointing="unsloth", random_state=args.seed,
    )
    FastLanguageModel.for_training(model)  # training mode, with Unsloth's checkpointing on
    trainee = S.Trainee(model, "unsloth", args.seed, args.loss, device)
    return S.with_status(S.search(trainee, args.start, args.cap, args.resolution, C.Budget(args.budget_s), device))


def main(argv: list[str] | None = None) -> int:
    return run_and_write(build_parser().parse_args(argv), search_reach)


if __name__ == "__main__":
    sys.exit(main())
