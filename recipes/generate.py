#!/usr/bin/env python
"""Chat with, or generate from, what recipes/sft_gemma2.py trained.

    python recipes/generate.py outputs/sft_gemma2 --prompt "sort: hieaia"    # one reply, from base + adapter
    python recipes/generate.py outputs/sft_gemma2/merged                     # a chat on the terminal (--merge's model)
    python recipes/generate.py outputs/sft_gemma2 --raw --prompt "add: 2+2"  # plain continuation, no chat template

MODEL_DIR is a recipe --output-dir (a PEFT adapter: its base model is loaded from where adapter_config.json
says, then the adapter), its merged/ folder, or any saved Gemma 2. Decoding is greedy, and stops at the end of
the model's turn. Without --prompt it reads one message per line from the terminal, keeping the conversation,
until an empty line or end of input.
"""

import argparse
import json
import sys
from pathlib import Path

DTYPES = ("auto", "bfloat16", "float32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a recipe --output-dir (adapter), its merged/ folder, "
                        "or a saved model directory")
    parser.add_argument("--prompt", action="append", help="a user message; repeat for several (each answered on "
                        "its own). Without it: a chat on the terminal")
    parser.add_argument("--raw", action="store_true", help="continue the prompt as plain text, without the chat "
                        "template")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens [256]")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights' precision: auto = as saved for a "
                        "merged model, bf16 on a GPU and fp32 on a CPU for base + adapter [auto]")
    return parser


def load(model_dir: Path, dtype_name: str):
    """The model (base + adapter, or a standalone one) and its tokenizer, on the GPU when there is one."""
    import torch
    from sft.model import NO_HUB_KERNELS
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter = (model_dir / "adapter_config.json").is_file()
    if dtype_name == "auto" and adapter:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    else:
        dtype = "auto" if dtype_name == "auto" else getattr(torch, dtype_name)
    if adapter:
        from peft import PeftModel

        base_source = json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = AutoModelForCausalLM.from_pretrained(base_source, dtype=dtype, attn_implementation="eager",
                                                    **NO_HUB_KERNELS)
        model = PeftModel.from_pretrained(base, str(model_dir))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager",
                                                     **NO_HUB_KERNELS)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(model_dir)


def reply(model, tokenizer, messages: list[dict], raw: bool, max_new_tokens: int) -> str:
    from sft.generation import chat_prompt, generate_ids

    prompt = messages[-1]["content"] if raw else chat_prompt(tokenizer, messages)
    return tokenizer.decode(generate_ids(model, tokenizer, prompt, max_new_tokens), skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model_dir = Path(args.model_dir)
    if not ((model_dir / "adapter_config.json").is_file() or (model_dir / "config.json").is_file()):
        print(f"{Path(__file__).name}: error: {model_dir} holds neither an adapter (adapter_config.json) nor a "
              "model (config.json)", file=sys.stderr)
        return 2
    if args.max_new_tokens < 1:
        print(f"{Path(__file__).name}: error: --max-new-tokens must be at least 1, got {args.max_new_tokens}",
              file=sys.stderr)
        return 2
    model, tokenizer = load(model_dir, args.dtype)
    if args.prompt:
        for prompt in args.prompt:
            print(reply(model, tokenizer, [{"role": "user", "content": prompt}], args.raw, args.max_new_tokens))
        return 0
    messages = []
    print("(one message per line; an empty line or Ctrl-D ends the chat)", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.strip()})
        answer = reply(model, tokenizer, messages, args.raw, args.max_new_tokens)
        messages.append({"role": "assistant", "content": answer})
        print(answer, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
