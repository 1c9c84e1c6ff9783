"""CPU peak memory and time of one loss forward+backward: HF's full logits against fastgemma's chunks.

    python -m benchmarks.loss_memory [--tokens 2048] [--vocab 256000] [--features 256] [--dtype bfloat16]

Each variant runs in a process of its own; peak = the process's peak resident memory minus its resident memory
once the inputs exist (so it counts what the loss itself allocates). Gemma 2's softcap (30) throughout.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _measure(variant: str, tokens: int, vocab: int, features: int, dtype_name: str) -> dict:
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from fastgemma.ops.linear_cross_entropy import linear_cross_entropy

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, features, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, features, generator=generator) * features**-0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=generator)
    before = _resident_mib()
    start = time.perf_counter()
    if variant == "hf":  # Gemma2ForCausalLM.forward: logits, softcap, then HF's loss (float32 upcast, shift)
        logits = torch.nn.functional.linear(hidden, weight)
        logits = torch.tanh(logits / 30.0) * 30.0
        loss = ForCausalLMLoss(logits.unsqueeze(0), labels, vocab)
    else:
        targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        loss = linear_cross_entropy(hidden, weight, targets, softcap=30.0, fused=False)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"variant": variant, "peak_mib": round(peak - before), "seconds": round(seconds, 2), "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=256000)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # the child process's one measurement
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_measure(args.variant, args.tokens, args.vocab, args.features, args.dtype)))
        return
    full_logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"{args.tokens} tokens x {args.vocab} vocabulary x {args.features} features, {args.dtype}; "
          f"one float32 copy of the logits: {full_logits_mib:.0f} MiB")
    for variant in ("hf", "chunked"):
        child = subprocess.run([sys.executable, "-m", "benchmarks.loss_memory", *sys.argv[1:], "--variant", variant],
                               capture_output=True, text=True, check=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{variant:>8}: peak +{result['peak_mib']} MiB, {result['seconds']} s, loss {result['loss']:.6f}")


if __name__ == "__main__":
    main()
