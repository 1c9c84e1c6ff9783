"""GPU check of the softcap's speed levers: the approximate softcap tanh and fastgemma's flex kernel options.

    python -m benchmarks.check_softcap                      # all of it, about 3-4 min on an H100
    python -m benchmarks.check_softcap --models 2b --cases 8192:causal

Gemma 2 attention heads of 2B (8q/4kv, head_dim 256) and 27B (32q/16kv, head_dim 128), bf16, B=1,
at 8192 tokens causal, 2048 causal and 8192 sliding(4096). Variants:

  approx+tuned  fastgemma flex, softcap_tanh="approx", fastgemma's kernel options for this GPU
                (`tuned_flex_kernel_options`; skipped where those are torch's own)
  approx        softcap_tanh="approx", torch's kernel options
  exact         softcap_tanh="exact", torch's kernel options
  hf-eager      transformers' Gemma 2 eager attention in bf16 (the accuracy yardstick)
  fa4           FlashAttention 4 (`flash_attn.cute`, CuTe DSL) with its own softcap, causal / window /
                varlen documents (needs `pip install flash-attn-4`; not run by default)
  flex-flash    fastgemma's flex call with flex_kernel_options="experimental-flash": torch's BACKEND="FLASH"
                (FlashAttention 4 under flex_attention, its own tanh; 64-key mask blocks at head_dim 256;
                needs flash-attn-4; not run by default)

Each is timed forward and backward apart (benchmarks/tune_flex.py's `measure`) and checked against the
kernel suite's float64 reference on the first call (benchmarks/suite_kernel.py). The verdict: the
approximate tanh passes the accuracy rule where its 'err out' and 'err grad' (the kernel
suite's two error columns) are no larger than HF eager bf16's. Writes $OUT/softcap.json (or --json)
after every row. A variant that fails prints its error in its row and the table goes on.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from importlib.metadata import PackageNotFoundError, version

import torch

from . import common as C
from .masks import MaskSpec
from .suite_kernel import KERNEL_SHAPES, HFEager, errors, make_inputs, reference_group
from .tune_flex import attention_mask, flex_forward, flop_rates, measure

VARIANTS = ("approx+tuned", "approx", "exact", "hf-eager", "fa4", "flex-flash")
DEFAULT_VARIANTS = ("approx+tuned", "approx", "exact", "hf-eager")
CASES = ((8192, "causal"), (2048, "causal"), (8192, "sliding"))  # the target first, in case time runs out
WINDOW = 4096
TARGET_TFLOPS = 200  # the softcapped kernels' goal: fwd+bwd at 8192 tokens causal, kernel suite's count


def variant_forward(variant: str, spec: MaskSpec, heads, scale: float, softcap: float, query):
    """(forward(q, k, v), kernel options) of one variant; forward None where it would repeat another."""
    from fastgemma.attention import tuned_flex_kernel_options

    device = query.device
    if variant == "fa4":
        return fa4_forward(spec, scale, softcap), None
    if variant == "flex-flash":  # as fastgemma runs it (flex_kernel_options="experimental-flash")
        from fastgemma.attention import FLASH_KV_BLOCK, FLASH_OPTIONS

        block_mask = attention_mask(spec, device).block_mask(device, kv_block=FLASH_KV_BLOCK.get(query.shape[-1]))
        return flex_forward(block_mask, scale, softcap, dict(FLASH_OPTIONS), "auto"), dict(FLASH_OPTIONS)
    if variant == "hf-eager":
        hf = HFEager(device, heads, scale, softcap)
        mask = hf.prepare(spec)
        return (lambda q, k, v: hf.forward(q, k, v, mask)), None
    options = tuned_flex_kernel_options(query) if variant == "approx+tuned" else None
    if variant == "approx+tuned" and options is None:
        return None, None
    block_mask = attention_mask(spec, device).block_mask(device)
    tanh = "exact" if variant == "exact" else "approx"
    return flex_forward(block_mask, scale, softcap, options, tanh), options


def fa4_forward(spec: MaskSpec, scale: float, softcap: float):
    """FlashAttention 4's softcapped attention as forward(q, k, v) on (1, H, S, D) tensors."""
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    window = (spec.window - 1, 0) if spec.kind == "sliding" else (None, None)
    if spec.kind == "docs":
        lengths = torch.tensor([0] + list(spec.doc_lengths)).cumsum(0).to(torch.int32)
        longest = max(spec.doc_lengths)

        def forward(q, k, v):
            cu = lengths.to(q.device)
            out = flash_attn_varlen_func(
                q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_seqlens_q=cu,
                cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest, softmax_scale=scale,
                causal=True, softcap=softcap,
            )
            out = out[0] if isinstance(out, tuple) else out
            return out.transpose(0, 1)[None]

        return forward

    def forward(q, k, v):
        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=True,
            window_size=window, softcap=softcap,
        )
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)

    return forward


def verdicts(rows: list[dict]) -> list[dict]:
    """Per case: does each approximate variant stay within HF eager bf16's errors?"""
    found = []
    cases = {(r["model"], r["seq"], r["mask"]) for r in rows}
    for case in sorted(cases, key=str):
        same = {r["variant"]: r for r in rows if (r["model"], r["seq"], r["mask"]) == case and r["status"] == "ok"}
        hf = same.get("hf-eager")
        for variant in ("approx", "approx+tuned", "fa4", "flex-flash"):
            row = same.get(variant)
            if row is None or hf is None or row.get("err_grad") is None or hf.get("err_grad") is None:
                continue
            worse = [f"{k} {row[k]:.4f} > HF {hf[k]:.4f}" for k in ("err_out", "err_grad") if row[k] > hf[k]]
            found.append({"model": case[0], "seq": case[1], "mask": case[2], "variant": variant,
                          "passes": not worse, "why": "; ".join(worse)})
    return found


def run(args, device=None) -> dict:
    if device is None and not torch.cuda.is_available():
        raise SystemExit("check_softcap needs a CUDA GPU")
    device = device or torch.device("cuda")
    from fastgemma.attention import (
        AUTO_SOFTCAP_TANH,
        FLEX_KERNEL_OPTIONS,
        gpu_class,
        resolve_softcap_tanh,
    )

    C.raise_recompile_limits()
    budget = C.Budget(args.budget_s)
    softcap = C.COMMON_GEMMA2["attn_logit_softcapping"]
    env = C.env_info(device)
    env.update(triton=_triton_version(), gpu_class=gpu_class(device), approx_runs_as=resolve_softcap_tanh("approx", device),
               auto_softcap_tanh=AUTO_SOFTCAP_TANH,
               tuned_options={str(k): v for k, v in FLEX_KERNEL_OPTIONS.items() if k[0] == gpu_class(device)})
    env["command"] = "python3 -m benchmarks.check_softcap " + " ".join(args.argv)
    C.log(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}; softcap_tanh='approx' runs as "
          f"{env['approx_runs_as']!r}; GPU class {env['gpu_class']}; tuned options {env['tuned_options']}")
    out_path = args.json or (os.path.join(os.environ["OUT"], "softcap.json") if os.environ.get("OUT") else None)
    result = {"env": env, "rows": [], "verdicts": [], "table": ""}

    def save():
        result["verdicts"] = verdicts(result["rows"])
        result["table"] = table(result["rows"], result["verdicts"], env)
        if out_path:
            C.write_json(out_path, result)

    for seq, kind in args.cases:
        for model in args.models:
            heads = KERNEL_SHAPES[model]
            scale = C.attn_scale(model)
            spec = MaskSpec.make(kind, seq, WINDOW, (300, 3000), args.seed)
            fwd_flops = 4 * heads[2] * heads[0] * spec.pairs()
            inputs = make_inputs(0, args.seed, heads, seq, device, torch.bfloat16, args.q_std, True)
            status, ref = C.run_guarded(
                functools.partial(reference_group, *inputs, spec, scale, softcap), f"float64 reference {model} S={seq}"
            )
            if status != "ok":
                C.log(f"{model} S={seq} {spec.label}: float64 reference {status}; no error columns")
            for variant in args.variants:
                row = {"model": model, "heads": f"{heads[0]}q/{heads[1]}kv d{heads[2]}", "seq": seq,
                       "mask": spec.label, "variant": variant, "pairs": spec.pairs()}
                if budget.expired():
                    row["status"] = "skipped (time budget)"
                else:
                    C.free_memory(device)
                    row.update(_run_variant(variant, spec, heads, scale, softcap, inputs, ref, fwd_flops, args))
                result["rows"].append(row)
                C.log(f"{model} S={seq} {spec.label} {variant}: {row['status']} "
                      f"fwd {C.fmt(row.get('fwd_ms'), 2)} ms, bwd {C.fmt(row.get('bwd_ms'), 2)} ms, "
                      f"fwd+bwd {C.fmt(row.get('total_tflops'), 1)} TFLOP/s, err out {C.fmt(row.get('err_out'), 4)}, "
                      f"err grad {C.fmt(row.get('err_grad'), 4)}")
                save()
            del inputs, ref
            C.free_memory(device)
    save()
    print(result["table"], flush=True)
    if out_path:
        print(f"\nwrote {out_path}")
    return result


def _run_variant(variant, spec, heads, scale, softcap, inputs, ref, fwd_flops, args) -> dict:
    found = {}

    def go():
        forward, options = variant_forward(variant, spec, heads, scale, softcap, inputs[0])
        found["options"] = options
        if forward is None:
            return None
        check = functools.partial(errors, ref) if ref is not None else None
        return measure(forward, inputs, args.warmup, args.iters, backward=True, check=check)

    status, measured = C.run_guarded(go, f"check_softcap {variant} S={spec.seq} {spec.label}")
    if status == "ok" and measured is None:
        return {"status": "= approx (fastgemma keeps torch's options here)", **found}
    found["status"] = status
    if measured:
        found.update(measured)
        found.update(flop_rates(fwd_flops, measured))
    return found


def table(rows: list[dict], found: list[dict], env: dict) -> str:
    headers = ["model (heads)", "S", "mask", "variant", "status", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd TFLOP/s",
               "bwd TFLOP/s", "fwd+bwd TFLOP/s", "vs HF eager", "err out", "err grad", "rel out", "rel dq", "rel dk",
               "rel dv", "compile s"]
    lines = []
    for r in rows:
        ok = r["status"] == "ok"
        hf = next((o for o in rows if o["variant"] == "hf-eager" and o["status"] == "ok"
                   and (o["model"], o["seq"], o["mask"]) == (r["model"], r["seq"], r["mask"])), None)
        ratio = hf["total_ms"] / r["total_ms"] if ok and hf and r.get("total_ms") else None
        lines.append([
            f"{r['model']} ({r['heads']})", r["seq"], r["mask"], r["variant"], r["status"],
            *(C.fmt(r.get(k), d) if ok else "-" for k, d in (
                ("fwd_ms", 2), ("bwd_ms", 2), ("total_ms", 2), ("fwd_tflops", 1), ("bwd_tflops", 1),
                ("total_tflops", 1))),
            C.fmt_ratio(ratio),
            *(C.fmt(r.get(k), 4) if ok else "-" for k in (
                "err_out", "err_grad", "rel_out", "rel_dq", "rel_dk", "rel_dv")),
            C.fmt(r.get("compile_s"), 1) if ok else "-",
        ])
    notes = [
        (
            "TFLOP/s: forward 4·D·H·pairs; backward 2.5x that (FlashAttention's count); "
            "fwd+bwd 2.5x forward (the kernel suite's count). 'vs HF eager': fwd+bwd time ratio. Errors against "
            "float64 on kv head 0's query heads: err out = max|Δ| of the output, rel = max|Δ|/max|ref|, "
            "err grad = worst of rel dq, dk, dv. compile s = first call (fwd+bwd, compiles included)."
        ),
        "",
        "Accuracy rule (approx within HF eager bf16's err out and err grad):",
    ]
    for v in found:
        notes.append(f"- {v['model']} S={v['seq']} {v['mask']} {v['variant']}: "
                     + ("passes" if v["passes"] else f"FAILS ({v['why']})"))
    if not found:
        notes.append("- no case with both an approx row and an HF eager row")
    passed = sum(v["passes"] for v in found)
    notes.append(f"approx passes in {passed} of {len(found)} cases")
    if env.get("approx_runs_as") != "approx":
        notes.append("WARNING: softcap_tanh='approx' ran as exact tanh here (see the log): the approx rows are exact")
    for r in rows:
        if r["variant"] == "approx+tuned" and r["status"] == "ok" and r["seq"] == 8192 and r["mask"] == "causal":
            notes.append(f"target: {r['model']} 8192 causal approx+tuned fwd+bwd {C.fmt(r.get('total_tflops'), 1)} "
                         f"TFLOP/s (target >= {TARGET_TFLOPS})")
    return C.markdown_table(headers, lines) + "\n\n" + "\n".join(notes)


def _triton_version() -> str:
    try:
        return version("triton")
    except PackageNotFoundError:
        return "not installed"


def _cases(text: str) -> list[tuple[int, str]]:
    """'8192:causal,2048:causal' -> [(8192, 'causal'), (2048, 'causal')]."""
    found = []
    for item in C.parse_list(text, ()):
        seq, _, kind = item.partition(":")
        if kind not in ("causal", "sliding", "docs"):
            raise argparse.ArgumentTypeError(f"case {item!r} is not SEQ:causal|sliding|docs")
        found.append((C.parse_int_list(seq, ())[0], kind))
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=lambda s: C.parse_list(s, ()), default=["2b", "27b"])
    parser.add_argument("--cases", type=_cases, default=list(CASES), help="SEQ:MASK,... (mask causal, sliding, docs)")
    parser.add_argument("--variants", type=lambda s: C.parse_list(s, ()), default=list(DEFAULT_VARIANTS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--q-std", type=float, default=10.0, help="std of q (raw logit std), as in the kernel suite")
    parser.add_argument("--budget-s", type=float, default=225.0, help="start no new variant after this many s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="default: $OUT/softcap.json when $OUT is set")
    args = parser.parse_args(argv)
    for model in args.models:
        if model not in KERNEL_SHAPES:
            parser.error(f"unknown model {model!r}; choose from {', '.join(KERNEL_SHAPES)}")
    for variant in args.variants:
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return run(args)


if __name__ == "__main__":
    main()
