"""Try flex_attention kernel options on fastgemma's own flex path: forward and backward timed apart.

    python -m benchmarks.tune_flex                          # 2B heads, 8K tokens: causal, sliding, packed; exact + approx tanh
    python -m benchmarks.tune_flex --model 27b              # 27B heads (32q/16kv, head_dim 128)
    python -m benchmarks.tune_flex --sweep fwd --tanh approx --masks causal        # forward grid, forward only
    python -m benchmarks.tune_flex --sweep bwd --tanh approx --masks causal        # backward grid
    python -m benchmarks.tune_flex --options default tuned "fwd_BLOCK_M=128,fwd_num_warps=8"

Times `fastgemma.attention.flex_softcap_attention` in bf16, B=1, with each kernel option set ("default" =
torch's choice, "tuned" = fastgemma's for this GPU and head_dim, or KEY=VALUE,...; a fwd_ / bwd_ prefix
addresses one direction) and each softcap tanh ("exact", "approx"). Per set: compile time (first
call), median forward and backward ms (CUDA events on each side of each), TFLOP/s, the speed-up over
"default" (same mask and tanh; forward time for --sweep fwd, backward for bwd, fwd+bwd otherwise)
and the kernel suite's errors against a float64 reference (benchmarks/suite_kernel.py).

--sweep fwd: BLOCK_M, BLOCK_N in 64/128, 1-3 stages, 4/8 warps; only the forward runs (and compiles).
--sweep bwd: BLOCK_M1/N1/M2/N2 tiles, 1-3 stages, 4/8 warps, each with --base (default: fastgemma's
forward options, so the forward stays the one in use). A set that does not compile or fit (shared
memory) is reported as failed. A winner goes into fastgemma.attention.FLEX_KERNEL_OPTIONS only after
benchmarks/check_softcap.py and the kernel suite confirm it.
"""

from __future__ import annotations

import argparse
import functools
import itertools

import torch

from . import common as C
from .masks import MaskSpec

DEFAULT_OPTIONS = (
    "default",
    "tuned",
    "fwd_BLOCK_M=128,fwd_BLOCK_N=64,fwd_num_stages=2,fwd_num_warps=8",
    "bwd_num_warps=8",
    "fwd_BLOCK_M=128,fwd_BLOCK_N=64,fwd_num_stages=2,fwd_num_warps=8,bwd_num_warps=8,bwd_num_stages=3",
)
FWD_GRID = [
    f"fwd_BLOCK_M={m},fwd_BLOCK_N={n},fwd_num_stages={s},fwd_num_warps={w}"
    for m, n, s, w in itertools.product((64, 128), (64, 128), (1, 2, 3), (4, 8))
]


def bwd_grid(head_dim: int) -> list[str]:
    """Backward tiles (M1, N1, M2, N2) x 1-3 stages x 4/8 warps. BLOCK_N1 = 128 only up to head_dim 128
    (torch's own Hopper default there): torch keeps it out of its autotuning for causing unspecified
    launch failures, which would poison the CUDA context for every later row."""
    tiles = [(32, 32, 32, 32), (32, 64, 64, 32), (64, 64, 64, 64)] + ([(64, 128, 128, 64)] if head_dim <= 128 else [])
    return [
        f"bwd_BLOCK_M1={m1},bwd_BLOCK_N1={n1},bwd_BLOCK_M2={m2},bwd_BLOCK_N2={n2},bwd_num_stages={s},bwd_num_warps={w}"
        for (m1, n1, m2, n2), s, w in itertools.product(tiles, (1, 2, 3), (4, 8))
    ]
MASKS = {"causal": "causal", "sliding": "sliding", "packed": "docs"}  # our name -> MaskSpec kind


def parse_options(text: str) -> dict | str | None:
    """'default' -> None (torch's own choice); 'tuned' -> 'tuned'; 'KEY=VALUE,...' -> {KEY: int | bool | str}."""
    if text.strip() in ("default", "tuned"):
        return None if text.strip() == "default" else "tuned"
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


def flop_rates(fwd_flops: float, result: dict) -> dict:
    """TFLOP/s with fwd_flops = 4·D·H·pairs: forward; backward at 2.5x that (FlashAttention's count);
    fwd+bwd at 2.5x (the kernel suite's count, benchmarks/README.md)."""
    rates = {}
    for key, flops in (("fwd", fwd_flops), ("bwd", 2.5 * fwd_flops), ("total", 2.5 * fwd_flops)):
        ms = result.get(f"{key}_ms")
        if ms:
            rates[f"{key}_tflops"] = flops / (ms * 1e-3) / 1e12
    return rates


def measure(forward, inputs, warmup: int, iters: int, backward: bool = True, check=None) -> dict:
    """Compile time and median forward / backward / fwd+bwd ms of `forward(query, key, value)`.

    `inputs` = (query, key, value, grad_out), the first three requiring grad (so the training forward
    runs); without `backward` only the forward runs and compiles. `check(out, query, key, value)`
    sees the first call's output and gradients; its dict joins the result.
    """
    query, key, value, grad_out = inputs
    device = query.device

    def step():
        for tensor in (query, key, value):
            tensor.grad = None
        fwd = C.Timer(device).start()
        out = forward(query, key, value)
        fwd.stop()
        bwd = None
        if backward:
            bwd = C.Timer(device).start()
            out.backward(grad_out)
            bwd.stop()
        return out, fwd, bwd

    first = C.Timer(device).start()
    out, _, _ = step()
    result = {"compile_s": first.stop().ms / 1e3}
    if check is not None:
        result.update(check(out, query, key, value))
    del out
    for _ in range(warmup):
        step()
    fwd_ms, bwd_ms, total_ms = [], [], []
    for _ in range(iters):
        _, fwd, bwd = step()
        fwd_ms.append(fwd.ms)
        if bwd is not None:
            bwd_ms.append(bwd.ms)
            total_ms.append(fwd.ms + bwd.ms)
    result.update(fwd_ms=C.median(fwd_ms), bwd_ms=C.median(bwd_ms), total_ms=C.median(total_ms))
    return result


def flex_forward(block_mask, scale, softcap, options, softcap_tanh):
    """fastgemma's flex path with these kernel options and softcap tanh, as forward(query, key, value)."""
    from fastgemma.attention import flex_softcap_attention

    def forward(query, key, value):
        return flex_softcap_attention(
            query, key, value, block_mask, scale, softcap, kernel_options=options, softcap_tanh=softcap_tanh
        )

    return forward


def attention_mask(spec: MaskSpec, device):
    """fastgemma's AttentionMask for a kernel-suite mask spec."""
    from fastgemma.masks import AttentionMask

    window = spec.window if spec.kind == "sliding" else None
    return AttentionMask(spec.seq, spec.seq, window=window, segment_ids=spec.segment_ids(device))


def option_sets(args) -> list[tuple[str, object]]:
    if args.sweep == "fwd":
        texts = ["default"] + FWD_GRID
    elif args.sweep == "bwd":
        texts = ["default"] + bwd_grid(args.head_dim)
    else:
        texts = list(args.options)
        if texts[0] != "default":
            texts.insert(0, "default")  # the reference every other set is compared with
    return [(text, parse_options(text)) for text in texts]


def resolve(options, base: dict, query) -> dict | None:
    """An option set for this GPU and head_dim: 'tuned' looked up, `base` filled in under it."""
    from fastgemma.attention import tuned_flex_kernel_options

    if options == "tuned":
        options = tuned_flex_kernel_options(query)
    if options is None and not base:
        return None
    return {**base, **(options or {})}


def run(args, device=None) -> list[dict]:
    if device is None and not torch.cuda.is_available():
        raise SystemExit("tune_flex needs a CUDA GPU: the kernel options it tries are flex_attention's Triton ones")
    from fastgemma.attention import resolve_softcap_tanh, tuned_flex_kernel_options

    from .suite_kernel import errors, make_inputs, reference_group

    C.raise_recompile_limits()
    device = device or torch.device("cuda")
    heads = (args.heads, args.kv_heads, args.head_dim)
    scale = args.scalar ** -0.5 if args.scalar else args.head_dim ** -0.5
    backward = args.sweep != "fwd"
    budget = C.Budget(args.budget_s)
    sets = option_sets(args)
    for tanh in args.tanh:
        print(f"softcap_tanh={tanh!r} runs as {resolve_softcap_tanh(tanh, device)!r} here", flush=True)
    rows = []
    for mask_name in args.masks:
        spec = MaskSpec.make(MASKS[mask_name], args.seq, args.window, (300, 3000), args.seed)
        fwd_flops = 4 * args.head_dim * args.heads * spec.pairs()
        block_mask = attention_mask(spec, device).block_mask(device)
        inputs = make_inputs(0, args.seed, heads, args.seq, device, torch.bfloat16, args.q_std, True)
        ref = None if args.no_ref else reference_group(*inputs, spec, scale, args.softcap)
        if args.base is not None:
            base = resolve(parse_options(args.base), {}, inputs[0]) or {}
        elif args.sweep == "bwd":  # keep the forward fastgemma runs
            base = {k: v for k, v in (tuned_flex_kernel_options(inputs[0]) or {}).items() if k.startswith("fwd_")}
        else:
            base = {}
        for tanh in args.tanh:
            reference_ms = None
            for text, options in sets:
                row = {"mask": spec.label, "tanh": tanh, "options": text, "seq": args.seq, "head_dim": args.head_dim}
                if budget.expired():
                    row["status"] = "skipped (time budget)"
                    rows.append(row)
                    continue
                chosen = resolve(options, base, inputs[0])
                row["resolved"] = chosen
                torch._dynamo.reset()  # compile each set from scratch, so compile times compare
                check = functools.partial(errors, ref) if ref is not None else None
                status, result = C.run_guarded(  # a set that fails (e.g. out of shared memory) is a result
                    functools.partial(measure, flex_forward(block_mask, scale, args.softcap, chosen, tanh), inputs,
                                      args.warmup, args.iters, backward, check),
                    f"tune_flex {spec.label} {tanh} {text}",
                )
                row["status"] = status
                if status == "ok":
                    row.update(result)
                    row.update(flop_rates(fwd_flops, result))
                    key = {"fwd": "fwd_ms", "bwd": "bwd_ms"}.get(args.sweep, "total_ms")
                    if text == "default":
                        reference_ms = result[key]
                    elif reference_ms and result[key]:  # no ratio against a default that failed
                        row["speedup"] = reference_ms / result[key]
                rows.append(row)
                print({k: v for k, v in row.items() if k != "resolved"}, flush=True)
        del inputs, ref
        C.free_memory(device)
    print(format_table(rows, args))
    if args.json:
        gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
        C.write_json(args.json, {"args": vars(args), "torch": torch.__version__, "gpu": gpu, "git": C.git_revision(),
                                 "rows": rows})
    return rows


def format_table(rows: list[dict], args) -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    versus = {"fwd": "forward", "bwd": "backward"}.get(args.sweep, "fwd+bwd")
    title = (f"\nflex_attention kernel options ({args.sweep}), bf16, B=1, {args.heads}/{args.kv_heads} heads, "
             f"head_dim {args.head_dim}, {args.seq} tokens; GPU: {gpu}, torch {torch.__version__}. TFLOP/s: forward "
             "4·D·H·pairs, backward 2.5x that, fwd+bwd 2.5x (kernel suite's count); 'vs default': "
             f"{versus} time against torch's options, same mask and tanh; errors against float64 as in the kernel suite\n")
    headers = ["mask", "tanh", "kernel options", "status", "compile s", "fwd ms", "bwd ms", "fwd TFLOP/s",
               "bwd TFLOP/s", "fwd+bwd TFLOP/s", "vs default", "err out", "err grad"]
    lines = []
    for row in rows:
        ok = row["status"] == "ok"
        lines.append([
            row["mask"], row["tanh"], f"`{row['options']}`", row["status"],
            *(C.fmt(row.get(k), d) if ok else "-" for k, d in (("compile_s", 1), ("fwd_ms", 2), ("bwd_ms", 2),
                                                               ("fwd_tflops", 1), ("bwd_tflops", 1),
                                                               ("total_tflops", 1))),
            C.fmt_ratio(row.get("speedup")) if ok else "-",
            C.fmt(row.get("err_out"), 4) if ok else "-", C.fmt(row.get("err_grad"), 4) if ok else "-",
        ])
    return title + C.markdown_table(headers, lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("2b", "9b", "27b"), default=None,
                        help="take heads, head_dim and query_pre_attn_scalar from this Gemma 2 size")
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--scalar", type=float, default=None, help="query_pre_attn_scalar (default: head_dim)")
    parser.add_argument("--softcap", type=float, default=50.0)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--masks", type=lambda s: C.parse_list(s, MASKS), default=list(MASKS),
                        help="comma-separated: causal, sliding, packed (300-3000-token documents)")
    parser.add_argument("--tanh", type=lambda s: C.parse_list(s, ()), default=["exact", "approx"],
                        help="comma-separated softcap tanh: exact, approx")
    parser.add_argument("--sweep", choices=("list", "fwd", "bwd"), default="list")
    parser.add_argument("--base", default=None, help="'tuned' or KEY=VALUE,... under every set (default for "
                        "--sweep bwd: fastgemma's forward options for this GPU, so 'default' is torch's backward)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--q-std", type=float, default=10.0, help="std of q (raw logit std), as in the kernel suite")
    parser.add_argument("--no-ref", action="store_true", help="skip the float64 reference (no error columns)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no new option set after this many s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--options", nargs="+", default=list(DEFAULT_OPTIONS),
                        help="--sweep list: 'default', 'tuned' or KEY=VALUE,... (fwd_/bwd_ prefixes: one direction)")
    args = parser.parse_args(argv)
    if args.model:
        shape = C.GEMMA2_SHAPES[args.model]
        args.heads, args.kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
        args.head_dim, args.scalar = shape["head_dim"], shape["query_pre_attn_scalar"]
    for name in args.masks:
        if name not in MASKS:
            parser.error(f"unknown mask {name!r}; choose from {', '.join(MASKS)}")
    for name in args.tanh:
        if name not in ("exact", "approx"):
            parser.error(f"unknown tanh {name!r}; choose from exact, approx")
    for text in list(args.options) + ([args.base] if args.base else []):
        try:
            parse_options(text)  # a typo fails here, before any GPU work
        except ValueError as error:
            parser.error(str(error))
    return run(args)


if __name__ == "__main__":
    main()
