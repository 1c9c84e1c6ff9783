"""Write a random-init Gemma 2 checkpoint with the real 2B / 9B / 27B shapes, for benchmarks.

Measuring speed and memory does not need trained weights, only the right shapes. This writes
config.json + bf16 safetensors + the project's small tokenizer into a directory, so that
the recipe's normal loading path (4-bit NF4 included) can be timed without hub access:

    python recipes/make_random_gemma2.py --size 2b --out /tmp/gemma2-2b-random
    python recipes/sft_gemma2.py --model /tmp/gemma2-2b-random --load-in-4bit --packing --max-steps 20

The shapes follow the published Gemma 2 configs, including the real 256000-token vocabulary
(the embedding and LM head are a large share of the 2B model's memory, so they must be
honest). The tokenizer is the tiny character-level one from recipes/assets/tiny_gemma2: its
ids stay below its 106 tokens, which the big embedding table serves without trouble. The
outputs are of course meaningless; the losses still fall a little as LoRA fits the data.

Sizes on disk (bf16): 2b ~5.2 GB, 9b ~18.5 GB, 27b ~54 GB; "tiny" writes the recipe's demo
model with weights (seed 0, as the recipe builds it).
"""

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fastgemma.patches.gemma2_shapes import PUBLISHED_SHAPES, published_config

TINY_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny_gemma2"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]


def gemma2_config(size: str):
    if size == "tiny":
        return AutoConfig.from_pretrained(TINY_MODEL_DIR)
    return published_config(size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", *PUBLISHED_SHAPES], required=True, help="which Gemma 2 shapes")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights [0]")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to run the random init (a GPU is much faster for 9b/27b) [cuda if available]",
    )
    args = parser.parse_args()

    config = gemma2_config(args.size)
    dtype = torch.float32 if args.size == "tiny" else torch.bfloat16  # the tiny demo trains in fp32 on CPU
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    parameters = sum(p.numel() for p in model.parameters())
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY_MODEL_DIR / name, args.out / name)
    print(f"wrote a random-init Gemma 2 ({args.size}, {parameters / 1e6:,.1f}M parameters, {dtype}) to {args.out}")


if __name__ == "__main__":
    main()
