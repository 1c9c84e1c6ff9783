"""Model suite: forward+backward of a whole random-init Gemma 2 (bf16 base, LoRA r16 on all linear
layers, gradient checkpointing, HF's own loss from labels) at batch×length 2×2048 and 1×8192.

Contenders (each on a freshly built model, same seed, same weights, same data):
  hf-eager   attn_implementation="eager"
  hf-flex    attn_implementation="flex_attention"
  liger      eager + liger_kernel.transformers.apply_liger_kernel_to_gemma2(model=...) with Liger's defaults
             (RoPE, RMSNorm, GEGLU, fused linear cross-entropy)
  fastgemma  eager + fastgemma.patch_model(model, max_row_tokens, backend="auto"), whose loss from labels runs
             chunked (fastgemma.ops.linear_cross_entropy): the row to hold against Liger's fused linear cross-entropy
"""

from __future__ import annotations

import torch

from . import common as C
from . import models as M

DEFAULT_CONTENDERS = ("hf-eager", "hf-flex", "liger", "fastgemma")


def parse_shapes(args) -> list[tuple[int, int]]:
    if args.shapes:
        out = []
        for item in args.shapes.split(","):
            b, s = item.lower().split("x")
            out.append((int(b), C.parse_int_list(s, [])[0]))
    else:
        out = [(2, 64), (1, 128)] if args.tiny else [(2, 2048), (1, 8192)]
    if args.seqs:
        keep = C.parse_int_list(args.seqs, [])
        known = {s for _, s in out}
        out = [bs for bs in out if bs[1] in keep] + [(1, s) for s in keep if s not in known]
    return out


def _steps(model, shape, vocab, device, seed, warmup, iters) -> dict:
    b, s = shape
    times, losses = [], []
    for step in range(warmup + iters):
        g = torch.Generator(device=device).manual_seed(seed * 7919 + step)
        ids = torch.randint(C.FIRST_TEXT_TOKEN, vocab, (b, s), generator=g, device=device)
        C.sync(device)
        t = C.Timer(device).start()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        t.stop()
        C.sync(device)
        losses.append(float(out.loss.detach()))
        if step >= warmup:
            times.append(t.ms)
        model.zero_grad(set_to_none=True)
        del out, ids
    ms = C.median(times)
    return {
        "ms": ms,
        "ms_all": times,
        "tokens_per_s": (b * s) / (ms / 1e3) if ms else None,
        "loss_first": losses[0],
        "losses": losses,
    }


def run(args, device: torch.device) -> C.SuiteResult:
    res = C.SuiteResult("model")
    tiny = args.tiny
    models = C.parse_list(args.models, ["tiny"] if tiny else ["2b", "9b"])
    shapes = parse_shapes(args)
    contenders = [c for c in C.parse_list(args.contenders, DEFAULT_CONTENDERS) if c in M.IMPL]
    warmup = C.pick(args.warmup, tiny, 1, 3)
    iters = C.pick(args.iters, tiny, 2, 5)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    max_len = max(s for _, s in shapes)
    budget = C.Budget(args.budget_s)
    res.notes.append(
        f"Random-init Gemma 2, {str(dtype).replace('torch.', '')} base weights, LoRA r={args.lora_r} (alpha={args.lora_r}) "
        "on all linear layers (peft, adapters fp32), gradient checkpointing (non-reentrant), HF loss from labels "
        f"(Liger: its fused linear cross-entropy; fastgemma: its chunked one). One forward+backward per step (no optimizer), warm-up {warmup}, "
        f"median of {iters} timed steps ({C.timer_name(device)}); fresh random token ids per step, identical for every "
        "contender. tokens/s = B·S / median step time. Peak = torch.cuda.max_memory_allocated over the steps "
        "(absolute: includes weights). 'loss@1' = loss of the first step (same weights, same data: should agree). "
        f"fastgemma backend: {M.fastgemma_backend(args, device)}."
    )
    for name in models:
        vocab = C.GEMMA2_SHAPES[name]["vocab_size"]
        for cname in contenders:
            base_row = dict(suite="model", model=name, contender=cname, label=C.LABELS.get(cname, cname))
            na = M.availability(cname, device)
            if na or budget.expired():
                for b, s in shapes:
                    res.rows.append(dict(base_row, batch=b, seq=s, status=na or "skipped (time budget)"))
                C.log(f"model {name} {cname}: {na or 'skipped (time budget)'}")
                if getattr(args, "on_row", None):
                    args.on_row(res)
                continue
            C.free_memory(device)
            with C.stock_guard():
                holder: dict = {}

                def build():
                    m = M.build_random_model(name, cname, device, dtype, args.seed, max_len)
                    M.apply_pre_peft(cname, m, max_len, args, device)
                    holder["model"] = M.wrap_lora(m, args.lora_r)

                C.log(f"model {name} {cname}: building")
                status, _ = C.run_guarded(build, f"model {name} {cname} build")
                for b, s in shapes:
                    row = dict(base_row, batch=b, seq=s, tokens=b * s)
                    if status != "ok":
                        row["status"] = f"{status} (model build)" if status != "OOM" else "OOM"
                    elif budget.expired():
                        row["status"] = "skipped (time budget)"
                    else:
                        C.free_memory(device)
                        C.reset_peak(device)
                        st, m = C.run_guarded(
                            lambda: _steps(holder["model"], (b, s), vocab, device, args.seed, warmup, iters),
                            f"model {name} {cname} {b}x{s}",
                        )
                        row["status"] = st
                        if m:
                            row.update(m)
                            row["peak_mib"] = C.peak_mib(device)
                    C.log(
                        f"  {name} {cname:<10} {b}x{s}: {row['status']} tok/s={C.fmt(row.get('tokens_per_s'), 0)} "
                        f"peak={C.fmt(row.get('peak_mib'), 0)}MiB loss@1={C.fmt(row.get('loss_first'), 4)}"
                    )
                    res.rows.append(row)
                    if getattr(args, "on_row", None):
                        args.on_row(res)
                if "model" in holder:
                    M.unpatch(cname, holder["model"])
                holder.clear()
            C.free_memory(device)
    res.table = table(res.rows)
    return res


def table(rows: list[dict]) -> str:
    headers = ["model", "B×S", "contender", "status", "tokens/s", "vs HF eager", "vs HF flex", "step ms",
               "peak GiB", "loss@1"]
    keyf = ("model", "batch", "seq")
    out = []
    for r in rows:
        ok = r.get("status") == "ok"
        out.append([
            r["model"],
            f"{r['batch']}×{r['seq']}",
            r.get("label", r["contender"]),
            r["status"],
            C.fmt(r.get("tokens_per_s"), 0),
            C.fmt_ratio(C.ratio(r, rows, keyf, "tokens_per_s", "hf-eager", True)) if ok else "-",
            C.fmt_ratio(C.ratio(r, rows, keyf, "tokens_per_s", "hf-flex", True)) if ok else "-",
            C.fmt(r.get("ms"), 1),
            C.fmt(r["peak_mib"] / 1024 if r.get("peak_mib") else None, 2),
            C.fmt(r.get("loss_first"), 4),
        ])
    return C.markdown_table(headers, out)
