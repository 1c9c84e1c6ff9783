"""The host's share of a QLoRA micro-step, measured on the CPU: a CPU proxy for host-bound GPU steps.

At 1 row of 2,048 tokens a Gemma 2 2B QLoRA step on an H100 keeps the GPU busy about 15% of the time:
the rest is the host issuing ops one at a time (Python, autograd, PEFT, bitsandbytes, torch.compile's
wrappers). That cost depends on how many ops a step issues, not on their size. This script builds a
model with Gemma 2 2B's structure (26 layers, GQA, sliding and global layers, nf4 with double
quantisation through bitsandbytes' CPU backend, LoRA r16 on every linear layer, non-reentrant gradient
checkpointing, packed rows) but a tiny width and few tokens, so the CPU's arithmetic is small and the
wall time per fwd+bwd step is mostly that per-op cost. It ranks levers for the host-bound step before a
GPU confirms them; it is no substitute for the GPU measurement (CUDA launches, bitsandbytes' CUDA ops
and flex_attention are not in it).

    python -m benchmarks.host_proxy                      # fastgemma, fastgemma-graphs, hf-eager
    python -m benchmarks.host_proxy --contenders fastgemma-graphs --tokens 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = {  # contender -> patch_model settings (None: Hugging Face eager, unpatched)
    "hf-eager": None,
    "fastgemma": {"fused_ops": True},
    "fastgemma-attn": {"fused_ops": False},
    "fastgemma-graphs": {"fused_ops": True, "cuda_graphs": True},
}


def build(path: Path, layers: int, hidden: int, seed: int) -> Path:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    if (path / "config.json").exists():
        return path
    config = Gemma2Config(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=4, head_dim=hidden // 4, query_pre_attn_scalar=hidden // 4, vocab_size=512,
        sliding_window=4096, max_position_embeddings=8192,
    )
    torch.manual_seed(seed)
    Gemma2ForCausalLM(config).save_pretrained(path)
    return path


def load(path: Path, contender: str, tokens: int):
    import fastgemma
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, Gemma2ForCausalLM

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    model = Gemma2ForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32,
                                              attn_implementation="eager")
    if SETTINGS[contender] is not None:
        fastgemma.patch_model(model, max_row_tokens=tokens, **SETTINGS[contender])
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model.train()


def measure(model, tokens: int, docs: int, warmup: int, steps: int, seed: int) -> float:
    """Wall ms per fwd+bwd step on one packed row of `docs` documents."""
    generator = torch.Generator().manual_seed(seed)
    bounds = torch.linspace(0, tokens, docs + 1).long()
    positions = torch.cat([torch.arange(int(n)) for n in bounds.diff()])[None]

    def step():
        ids = torch.randint(0, 512, (1, tokens), generator=generator)
        model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss.backward()

    for _ in range(warmup):  # compiles happen here
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e3


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contenders", default="fastgemma,fastgemma-graphs,hf-eager",
                        help=f"comma list of {', '.join(SETTINGS)}")
    parser.add_argument("--layers", type=int, default=26, help="decoder layers [26, as Gemma 2 2B]")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size [128: small, so the host dominates]")
    parser.add_argument("--tokens", type=int, default=64, help="tokens in the packed row [64]")
    parser.add_argument("--docs", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch [1: one core, like the host]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in contenders if c not in SETTINGS]
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory(prefix="fastgemma-host-proxy-") as tmp:
        path = build(Path(tmp) / "model", args.layers, args.hidden, args.seed)
        for contender in contenders:
            torch._dynamo.reset()
            model = load(path, contender, args.tokens)
            results[contender] = measure(model, args.tokens, args.docs, args.warmup, args.steps, args.seed)
            del model
    print(f"\nhost proxy: {args.layers} layers, hidden {args.hidden}, nf4 + LoRA r16, non-reentrant checkpointing, "
          f"{args.tokens} tokens in {args.docs} documents, {args.threads} thread(s); torch {torch.__version__}\n")
    print("| contender | ms per fwd+bwd step | vs fastgemma |\n|---|---|---|")
    base = results.get("fastgemma")
    for contender, ms in results.items():
        ratio = f"{base / ms:.2f}x" if base else "-"
        print(f"| {contender} | {ms:.1f} | {ratio} |")
    return results


if __name__ == "__main__":
    main()
