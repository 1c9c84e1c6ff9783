"""A random-init Gemma 2 checkpoint written directly in 4-bit NF4 (bitsandbytes' serialised format).

    python -m benchmarks.random_4bit_gemma2 --size 27b --out /tmp/gemma2-27b-nf4

recipes/make_random_gemma2.py writes bf16 weights, which the recipe then quantises while loading. For 27B
that is a 54 GB file to write and read back. Here every linear weight is drawn on the GPU (or CPU), quantised
at once with bitsandbytes (NF4, double quantisation, packed in bf16 so that FSDP can shard it) and written
as a pre-quantised checkpoint, about 16 GB for 27B: the embedding and the norms stay bf16, as in any QLoRA
model. `from_pretrained` (the recipe's loading path) reads it like a checkpoint that was quantised and saved
by transformers, and keeps its quantisation settings (NF4, bf16 storage) whatever the caller passes.

Speed and memory depend only on the shapes, which follow the published configs (`fastgemma.patches.
gemma2_shapes`). Weights are N(0, 0.02) like transformers' initialisation, norms zero (Gemma scales by 1 + w).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL_DIR = REPO / "recipes" / "assets" / "tiny_gemma2"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
SHARD_BYTES = 4 * 2**30
INIT_STD = 0.02


def quantization_config(compute_dtype=torch.bfloat16, storage=torch.bfloat16):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=storage,
    )


def gemma2_config(size: str, layers: int | None):
    if size == "tiny":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(TINY_MODEL_DIR)
        if layers is not None:
            config.num_hidden_layers = layers
            config.layer_types = config.layer_types[:layers]
        return config
    try:
        from fastgemma.patches.gemma2_shapes import published_config
    except ModuleNotFoundError:  # a bare checkout, not installed
        sys.path.insert(0, str(REPO))
        from patches.gemma2_shapes import published_config
    return published_config(size, **({} if layers is None else {"num_hidden_layers": layers}))


def write(directory: Path, size: str, layers: int | None = None, seed: int = 0, device: str | None = None) -> dict:
    """Write config.json (with its quantization_config), sharded safetensors and the tiny tokenizer."""
    import bitsandbytes.functional as bnb_functional
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    config = gemma2_config(size, layers)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    linears = {
        f"{name}.weight"
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    }
    shapes = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)

    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    shard, shard_bytes, weight_map, files, total_bytes, parameters = {}, 0, {}, [], 0, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
            files.append(name)
            shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        parameters += int(torch.Size(shape).numel())
        if name in linears:
            weight = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0, INIT_STD, generator=generator)
            packed, state = bnb_functional.quantize_4bit(
                weight, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.bfloat16
            )
            tensors = {name: packed, **{f"{name}.{key}": value for key, value in state.as_dict(packed=True).items()}}
            del weight
        elif name.endswith("norm.weight"):
            tensors = {name: torch.zeros(shape, dtype=torch.bfloat16)}
        else:  # the embedding (tied with the LM head)
            tensors = {name: torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0, INIT_STD,
                                                                                          generator=generator)}
        for key, value in tensors.items():
            value = value.detach().to("cpu").contiguous()
            shard[key] = value
            shard_bytes += value.numel() * value.element_size()
            total_bytes += value.numel() * value.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()

    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2)
    )
    config.quantization_config = quantization_config().to_dict()
    config.architectures = ["Gemma2ForCausalLM"]
    config.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY_MODEL_DIR / name, directory / name)
    return {"parameters": parameters, "bytes": total_bytes, "files": len(files), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "2b", "9b", "27b"], required=True)
    parser.add_argument("--layers", type=int, help="keep the layer shapes, use this many layers [all]")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="where to draw and quantise [cuda if available]")
    args = parser.parse_args()
    done = write(args.out, args.size, args.layers, args.seed, args.device)
    print(f"wrote a random Gemma 2 ({args.size}, {done['parameters'] / 1e9:.2f}B parameters) in NF4 to {args.out}: "
          f"{done['bytes'] / 2**30:.1f} GiB in {done['files']} files, {done['seconds']:.0f} s")


if __name__ == "__main__":
    main()
