"""Context suite: the longest sequence (to the nearest 1K) that trains one step — forward, backward and an
AdamW step on the LoRA weights — with QLoRA nf4 (double quant, bf16 compute), LoRA r16 on all linear
layers, gradient checkpointing, batch 1, for each contender on the GPU at hand.

Search: start at --context-start (4096) and double while a step succeeds, up to --context-max (64K);
then bisect between the longest success and the shortest failure down to --context-step (1024).
A failure other than OOM is reported as such. Each contender has a time cap (--contender-budget-s);
a search cut short reports what it established ("≥ N").

Unsloth (opt-in contenders "unsloth", "unsloth-nocompile") runs in a process of its own,
``benchmarks/unsloth_context.py`` (importing it patches transformers and peft for the whole process): loaded and
wrapped as Unsloth tells users to, with its offloaded checkpointing, then searched with this module's `search`
and `Trainee.step`, under the same GPU memory cap.

Loss (--context-loss): "chunked" (default) computes the LM head + softcapped cross-entropy in
checkpointed 512-token chunks, the same code for every contender, so full-vocabulary logits are never
materialised (what TRL's fused LM head does) and the limit reflects attention and activations; "hf"
uses the model's own loss from labels (fp32 logits of the whole sequence: the limit is then mostly the
LM head's).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import common as C
from . import models as M
from .unsloth_process import run_unsloth_process, unsloth_versions_note

DEFAULT_CONTENDERS = ("fastgemma", "hf-eager", "hf-flex")
LOSS_CHUNK = 512  # 0.5 GiB of float32 logits at a 256K vocabulary: small beside the model, so the loss never sets the reach


def _chunk_loss(h, lm_head, labels, cap):
    logits = lm_head(h).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")


def chunked_lm_loss(hidden, lm_head, input_ids, final_softcap, chunk: int = LOSS_CHUNK):
    """Mean next-token cross-entropy, computed chunk by chunk with activation checkpointing."""
    h = hidden[:, :-1]
    y = input_ids[:, 1:]
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[1], chunk):
        total = total + checkpoint(
            _chunk_loss, h[:, i : i + chunk], lm_head, y[:, i : i + chunk], final_softcap, use_reentrant=False
        )
    return total / y.numel()


class Trainee:
    """A LoRA-wrapped model plus its optimizer; ``step(L)`` trains one step at length L."""

    def __init__(self, model, cname: str, seed: int, loss_mode: str, device):
        self.model = model
        self.base = model.get_base_model()
        self.cname = cname
        self.device = device
        self.seed, self.loss_mode = seed, loss_mode
        self.vocab = self.base.config.vocab_size
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    @classmethod
    def load(cls, cname, path, args, device, quantize, cap) -> "Trainee":
        """The suite's checkpoint loaded, set up for `cname` and wrapped with LoRA."""
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = M.load_for_training(path, cname, device, quantize, dtype)
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, cap)
        M.apply_pre_peft(cname, model, cap, args, device)
        torch.manual_seed(args.seed)
        model = M.wrap_lora(model, args.lora_r)
        if quantize:  # as TRL does for QLoRA: adapters in bf16
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
        return cls(model, cname, args.seed, args.context_loss, device)

    def step(self, length: int) -> float:
        g = torch.Generator(device=self.device).manual_seed(self.seed * 31 + length)
        ids = torch.randint(C.FIRST_TEXT_TOKEN, self.vocab, (1, length), generator=g, device=self.device)
        if self.loss_mode == "hf":
            loss = self.model(input_ids=ids, labels=ids).loss
        else:
            hidden = self.base.model(input_ids=ids).last_hidden_state
            loss = chunked_lm_loss(hidden, self.base.lm_head, ids, self.base.config.final_logit_softcapping)
            del hidden
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        del loss, ids
        C.sync(self.device)
        return value

    def close(self):
        M.unpatch(self.cname, self.base)
        self.opt = None
        self.model = self.base = None


def search(trainee: Trainee, start: int, cap: int, resolution: int, budget: C.Budget, device) -> dict:
    tries: list[dict] = []
    outcome: dict[int, str] = {}

    def attempt(length: int) -> str | None:
        if length in outcome:
            return outcome[length]
        if budget.expired():
            return None
        C.free_memory(device)
        C.reset_peak(device)
        t0 = time.perf_counter()
        st, loss = C.run_guarded(lambda: trainee.step(length), f"context {trainee.cname} L={length}")
        rec = {"length": length, "status": st, "s": time.perf_counter() - t0, "peak_mib": C.peak_mib(device),
               "loss": loss}
        tries.append(rec)
        C.log(f"    L={length:>6}: {st:<8} {rec['s']:.1f} s peak={C.fmt(rec['peak_mib'], 0)}MiB")
        outcome[length] = st
        return st

    best, worst_fail, fail_reason, cut = None, None, None, False
    length = start
    while True:  # grow
        st = attempt(length)
        if st is None:
            cut = True
            break
        if st == "ok":
            best = length
            if length >= cap:
                break
            length = min(length * 2, cap)
        else:
            worst_fail, fail_reason = length, st
            break
    if best is None and worst_fail is not None and not cut:  # even the start failed: go down
        length = start // 2
        while length >= resolution:
            st = attempt(length)
            if st is None:
                cut = True
                break
            if st == "ok":
                best = length
                break
            worst_fail, fail_reason = length, st
            length //= 2
    if best is not None and worst_fail is not None and not cut:  # bisect
        while worst_fail - best > resolution:
            mid = ((best + worst_fail) // 2) // resolution * resolution
            if mid <= best:
                mid = best + resolution
            st = attempt(mid)
            if st is None:
                cut = True
                break
            if st == "ok":
                best = mid
            else:
                worst_fail, fail_reason = mid, st
    return {
        "max_ok": best,
        "first_fail": worst_fail,
        "fail_reason": fail_reason,
        "reached_cap": best is not None and best >= cap,
        "cut_by_time": cut,
        "tries": tries,
        "peak_mib_at_max": next((t["peak_mib"] for t in tries if t["length"] == best), None),
        "s_at_max": next((t["s"] for t in tries if t["length"] == best), None),
    }


def run(args, device: torch.device) -> C.SuiteResult:
    res = C.SuiteResult("context")
    tiny = args.tiny
    models = C.parse_list(args.models, ["tiny"] if tiny else ["2b", "9b"])
    contenders = [c for c in C.parse_list(args.contenders, DEFAULT_CONTENDERS) if c in M.IMPL or c in M.UNSLOTH]
    start = args.context_start or (64 if tiny else 4096)
    cap = args.context_max or (256 if tiny else 65536)
    resolution = args.context_step or (64 if tiny else 1024)
    per_budget = args.contender_budget_s or (60 if tiny else 240)
    quantize = device.type == "cuda" and not args.no_quant
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    suite_budget = C.Budget(args.budget_s)
    res.notes.append(
        f"One training step (fwd + bwd + AdamW on LoRA weights), batch 1, "
        f"{'QLoRA nf4 + double quant, bf16 compute' if quantize else 'LoRA without quantization'}, LoRA r={args.lora_r} "
        f"all-linear, gradient checkpointing; random token ids. Search: from {start}, doubling to the cap "
        f"{cap}, then bisection to {resolution} tokens; time cap {per_budget:.0f} s per contender (model load "
        f"excluded). Loss: {args.context_loss} "
        + ("(LM head + softcapped CE in checkpointed 512-token chunks, identical for every contender: logits "
           "never materialised, as with TRL's fused LM head)" if args.context_loss == "chunked"
           else "(the model's own loss from labels: full fp32 logits)")
        + f". fastgemma backend: {M.fastgemma_backend(args, device)}. 'peak' = max allocated during the longest "
        "successful step."
    )
    if device.type != "cuda":
        res.notes.append("CPU run: no OOM can occur, so the search simply reaches its cap.")
    elif getattr(args, "context_gpu_gib", None):
        total = torch.cuda.mem_get_info(device)[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.context_gpu_gib * 2 ** 30 / total), device)
        res.notes.append(f"GPU memory capped at {args.context_gpu_gib:g} GiB for every contender "
                         "(torch.cuda.set_per_process_memory_fraction), emulating a smaller card.")
    for name in models:
        checkpoint = M.SharedCheckpoint(name, args, device, dtype, f"context {name} checkpoint", quantize)
        for cname in contenders:
            row = dict(suite="context", model=name, contender=cname, label=C.LABELS.get(cname, cname), cap=cap,
                       resolution=resolution, loss_mode=args.context_loss)
            blocked = M.not_startable(cname, device, suite_budget)
            if blocked:
                row["status"] = blocked
            else:
                st, path = checkpoint.get()
                if st != "ok":
                    res.rows.append(dict(row, status=f"{st} (saving the checkpoint)"))
                    continue
                C.free_memory(device)
                budget_s = min(per_budget, max(1.0, suite_budget.left()))
                search_range = (start, cap, resolution)
                if cname in M.UNSLOTH:
                    row.update(run_unsloth(cname, path, args, search_range, budget_s))
                else:
                    row.update(search_in_process(name, cname, path, args, device, quantize, search_range, budget_s))
                C.free_memory(device)
            C.log(f"  {name} {cname}: {row['status']} max={_fmt_len(row)}")
            res.rows.append(row)
            if getattr(args, "on_row", None):
                args.on_row(res)
    versions = unsloth_versions_note(res.rows)
    if versions:
        res.notes.append(versions)
    res.table = table(res.rows)
    return res


def search_in_process(name, cname, path, args, device, quantize, search_range, budget_s) -> dict:
    """One in-process contender's search (the keys of `search` and its status): loaded, searched, unpatched."""
    start, cap, resolution = search_range
    C.log(f"context {name} {cname}: loading")
    with C.stock_guard():
        holder = {}
        st, _ = C.run_guarded(lambda: holder.__setitem__("t", Trainee.load(cname, path, args, device, quantize, cap)),
                              f"context {name} {cname} load")
        if st != "ok":
            return {"status": f"{st} (model load)"}
        try:
            out = search(holder["t"], start, cap, resolution, C.Budget(budget_s), device)
        finally:
            holder["t"].close()
            holder.clear()
    return with_status(out)


def with_status(out: dict) -> dict:
    """A search's result with its row status: "ok" unless it found no length for a reason other than OOM."""
    failed = out["max_ok"] is None and out["fail_reason"] and out["fail_reason"] != "OOM"
    return {**out, "status": out["fail_reason"] if failed else "ok"}


def unsloth_command(checkpoint: str, args, search_range: tuple, budget_s: float, out_path: str) -> list[str]:
    """The Unsloth process's command line: this Python, the suite's search and settings, one row to out_path."""
    start, cap, resolution = search_range
    cmd = [sys.executable, "-m", "benchmarks.unsloth_context", "--checkpoint", checkpoint, "--start", str(start),
           "--cap", str(cap), "--resolution", str(resolution), "--budget-s", f"{budget_s:g}", "--seed",
           str(args.seed), "--lora-r", str(args.lora_r), "--loss", args.context_loss, "--out", out_path]
    if getattr(args, "context_gpu_gib", None):
        cmd += ["--gpu-gib", f"{args.context_gpu_gib:g}"]
    if args.no_quant:
        cmd.append("--no-quant")
    return cmd


def run_unsloth(cname: str, checkpoint: str, args, search_range: tuple, budget_s: float) -> dict:
    """One Unsloth contender's search (the keys of `search`, its status and versions), from its own process."""
    with tempfile.TemporaryDirectory(prefix="fastgemma_unsloth_context_") as out_dir:
        out_path = os.path.join(out_dir, "row.json")
        cmd = unsloth_command(checkpoint, args, search_range, budget_s, out_path)
        return run_unsloth_process(cname, cmd, out_path, args, extra_timeout_s=budget_s)


def _fmt_len(r: dict) -> str:
    best = r.get("max_ok")
    if r.get("status") != "ok":
        return "-"
    if best is None:
        return f"< {r.get('first_fail')}" if r.get("first_fail") else "-"
    text = f"{best:,}"
    if r.get("reached_cap"):
        text = f"≥ {text} (cap)"
    elif r.get("cut_by_time"):
        text = f"≥ {text} (time cap)"
    return text


def _k(n):
    return None if n is None else f"{n / 1024:.0f}K"


def _bound_ratio(r: dict, rows: list[dict], baseline: str) -> str:
    """max_ok ratio against ``baseline``; '≥' / '≤' where a search stopped at its cap or time limit."""
    if r.get("status") != "ok" or not r.get("max_ok"):
        return "-"
    for o in rows:
        if (o.get("contender") == baseline and o.get("model") == r.get("model") and o.get("status") == "ok"
                and o.get("run") == r.get("run")):
            if not o.get("max_ok"):
                return "-"
            x = r["max_ok"] / o["max_ok"]
            mine_open = r.get("reached_cap") or r.get("cut_by_time")
            theirs_open = o.get("reached_cap") or o.get("cut_by_time")
            if o is r:
                return "1.00x"
            if mine_open and theirs_open:
                return "-"
            if mine_open:
                return f"≥ {x:.2f}x"
            if theirs_open:
                return f"≤ {x:.2f}x"
            return f"{x:.2f}x"
    return "-"


def table(rows: list[dict]) -> str:
    headers = ["model", "contender", "status", "max trainable length", "first failure", "vs HF eager",
               "vs HF flex", "peak GiB at max", "step s at max", "tries"]
    out = []
    for r in rows:
        fail = r.get("first_fail")
        out.append([
            r["model"],
            r.get("label", r["contender"]),
            r["status"],
            _fmt_len(r),
            f"{fail:,} ({r.get('fail_reason')})" if fail else "-",
            _bound_ratio(r, rows, "hf-eager"),
            _bound_ratio(r, rows, "hf-flex"),
            C.fmt(r["peak_mib_at_max"] / 1024 if r.get("peak_mib_at_max") else None, 2),
            C.fmt(r.get("s_at_max"), 2),
            len(r.get("tries", [])) or "-",
        ])
    return C.markdown_table(headers, out)
