"""Try flex_attention kernel options on fastgemma's own flex path: time fwd+bwd per option set.

    python -m benchmarks.tune_flex                                   # 2B heads, 16K packed row, both layer kinds
    python -m benchmarks.tune_flex --head-dim 128 --heads 32 --kv-heads 16 --scalar 144   # 27B heads
    python -m benchmarks.tune_flex --options "default" "bwd_num_warps=8" "fwd_BLOCK_M=128,fwd_num_warps=8"

The profile of a packed 2B QLoRA step puts flex_attention's head_dim-256 backward at about a quarter
of the device time (benchmarks/RESULTS.md), and torch picks its block sizes from a fixed per-GPU table.
This tool times `fastgemma.attention.flex_softcap_attention` with each option set on one packed row
(documents of 300-3000 tokens), sliding (4096) and global, in bf16. It reports the compile time, the
median forward+backward time (CUDA events, after warm-up), the ratio to torch's defaults, and the
relative error of the output and of dq, dk, dv against the defaults. An option set that does not
compile or fit (shared memory) is reported as failed. A winner goes into fastgemma only after the
kernel and trl suites confirm it.
"""

from __future__ import annotations

import argparse
import functools

import torch

from . import common as C
from .masks import random_doc_lengths

DEFAULT_OPTIONS = (
    "default",
    "fwd_num_warps=8",
    "fwd_BLOCK_M=128,fwd_BLOCK_N=32,fwd_num_warps=8,fwd_num_stages=2",
    "bwd_num_warps=8",
    "bwd_num_stages=1,bwd_num_warps=8",
    "bwd_BLOCK_M1=32,bwd_BLOCK_N1=64,bwd_BLOCK_M2=64,bwd_BLOCK_N2=32",
    "bwd_BLOCK_M1=32,bwd_BLOCK_N1=64,bwd_BLOCK_M2=64,bwd_BLOCK_N2=32,bwd_num_warps=8,bwd_num_stages=2",
)


def parse_options(text: str) -> dict | None:
    """'default' -> None (torch's own choice); 'KEY=VALUE,...' -> {KEY: int | bool | str}."""
    if text.strip() == "default":
        return None
    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"kernel option {item!r} is not KEY=VALUE (in {text!r})")
        value = value.strip()
        if value in ("True", "False"):
            options[key.strip()] = value == "True"
        else:
            try:
                options[key.strip()] = int(value)
            except ValueError:
                options[key.strip()] = value
    return options


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def measure(inputs, block_mask, scale, softcap, options, warmup: int, iters: int) -> dict:
    """Compile time, median fwd+bwd ms and the results (output and grads) for one option set."""
    from fastgemma.attention import flex_softcap_attention

    query, key, value, grad_out = inputs

    def step():
        for tensor in (query, key, value):
            tensor.grad = None
        out = flex_softcap_attention(query, key, value, block_mask, scale, softcap, kernel_options=options)
        out.backward(grad_out)
        return out

    device = query.device
    first = C.Timer(device).start()
    out = step()
    compile_s = first.stop().ms / 1e3
    results = [out.detach().clone()] + [t.grad.clone() for t in (query, key, value)]
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        timer = C.Timer(device).start()
        step()
        times.append(timer.stop().ms)
    return {"compile_s": compile_s, "ms": C.median(times), "results": results}


def run(args) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("tune_flex needs a CUDA GPU: the kernel options it tries are flex_attention's Triton ones")
    from fastgemma.masks import AttentionMask

    device = torch.device("cuda")
    option_sets = [(text, parse_options(text)) for text in args.options]
    if option_sets[0][1] is not None:
        option_sets.insert(0, ("default", None))  # the reference every other set is compared with
    generator = torch.Generator().manual_seed(args.seed)
    lengths = random_doc_lengths(args.seq, 300, 3000, args.seed)
    segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(device)
    scale = args.scalar ** -0.5 if args.scalar else args.head_dim ** -0.5

    def tensor(heads, std=1.0):
        data = torch.randn(1, heads, args.seq, args.head_dim, generator=generator) * std
        return data.to(device=device, dtype=torch.bfloat16).requires_grad_()

    rows = []
    for kind, window in (("sliding", args.window), ("global", None)):
        mask = AttentionMask(args.seq, args.seq, window=window, segment_ids=segments)
        block_mask = mask.block_mask(device)
        inputs = (tensor(args.heads, 2.0), tensor(args.kv_heads), tensor(args.kv_heads),
                  torch.randn(1, args.heads, args.seq, args.head_dim, generator=generator).to(device, torch.bfloat16))
        reference = None
        for text, options in option_sets:
            torch._dynamo.reset()  # compile each set from scratch, so compile times compare
            status, result = C.run_guarded(  # a set that fails (e.g. out of shared memory) is a result
                functools.partial(measure, inputs, block_mask, scale, args.softcap, options, args.warmup, args.iters),
                f"tune_flex {kind} {text}",
            )
            row = {"mask": f"packed {kind}", "options": text, "status": status}
            if status == "ok":
                if options is None:
                    reference = result
                row.update(compile_s=result["compile_s"], ms=result["ms"])
                if reference is not None:  # no ratios against a default that failed
                    row.update(speedup=reference["ms"] / result["ms"],
                               error=max(relative_error(a, b) for a, b in zip(result["results"], reference["results"])))
            rows.append(row)
            print(row, flush=True)
    print(format_table(rows, args))
    return rows


def format_table(rows: list[dict], args) -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    title = (f"\nflex_attention kernel options, fwd+bwd, bf16, B=1, {args.heads}/{args.kv_heads} heads, "
             f"head_dim {args.head_dim}, {args.seq} tokens of 300-3000-token documents; GPU: {gpu}, "
             f"torch {torch.__version__}\n")
    lines = [
        title,
        "| mask | kernel options | status | compile s | fwd+bwd ms | vs default | max rel. error vs default |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['mask']} | `{row['options']}` | {row['status']} | - | - | - | - |")
            continue
        speedup = f"{row['speedup']:.2f}x" if "speedup" in row else "- (default failed)"
        error = f"{row['error']:.1e}" if "error" in row else "-"
        lines.append(f"| {row['mask']} | `{row['options']}` | ok | {row['compile_s']:.1f} | {row['ms']:.2f} | "
                     f"{speedup} | {error} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--scalar", type=float, default=None, help="query_pre_attn_scalar (default: head_dim)")
    parser.add_argument("--softcap", type=float, default=50.0)
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", nargs="+", default=list(DEFAULT_OPTIONS),
                        help="option sets: 'default' or KEY=VALUE,... (fwd_/bwd_ prefixes: one direction)")
    args = parser.parse_args(argv)
    for text in args.options:
        try:
            parse_options(text)  # a typo fails here, before any GPU work
        except ValueError as error:
            parser.error(str(error))
    return run(args)


if __name__ == "__main__":
    main()
