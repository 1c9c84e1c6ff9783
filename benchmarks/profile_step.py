"""Where the time of one packed QLoRA training step goes: a torch.profiler breakdown for the speed work.

    python -m benchmarks.profile_step --model 2b --tokens 16384 --docs 6            # on the GPU machine
    python -m benchmarks.profile_step --model tiny --tokens 256 --docs 3 --cpu      # smoke run

It builds the random-init model with the published shapes (nf4 + double quant on a GPU),
patches it with fastgemma (or leaves HF's attention with --contender hf-eager / hf-flex),
adds LoRA r16 on all linear layers with gradient checkpointing, and trains on one packed
padding-free row as TRL does: TRL's fused LM head when TRL is installed, HF's loss otherwise.
After warm-up it profiles a few forward+backward steps and prints the ops with the most
self time on the device, each tagged with a rough category, and the category totals.
Numbers are for finding levers; speed claims come from the suites in benchmarks.run.
"""

from __future__ import annotations

import argparse
import collections

import torch

from . import common as C
from . import models as M

CATEGORIES = (  # first match wins; names of CUDA kernels and aten ops, lower-cased
    ("attention", ("flex_attention", "triton_tem_fused", "softcap", "_softmax", "bmm")),
    ("4-bit dequant", ("dequant", "kgemm_4bit", "bnb")),
    ("compiled elementwise", ("triton_poi", "triton_per", "triton_red")),
    ("matmul", ("gemm", "matmul", "aten::mm", "aten::addmm", "cutlass", "nvjet", "sm90_xmma")),
    ("norm", ("rsqrt", "norm", "pow", "mean")),
    ("activation", ("gelu", "tanh")),
    ("loss", ("cross_entropy", "log_softmax", "logsumexp", "nll")),
    ("copies", ("copy", "cat", "fill", "pad", "index", "to_copy")),
)


def category(name: str) -> str:
    lowered = name.lower()
    for label, needles in CATEGORIES:
        if any(needle in lowered for needle in needles):
            return label
    return "other"


def packed_row(tokens: int, docs: int, vocab: int, generator: torch.Generator, device):
    """One padding-free row of `docs` documents: input ids, per-document positions, labels, cu_seq_lens."""
    cuts = torch.sort(torch.randperm(tokens - 1, generator=generator)[: docs - 1] + 1).values
    bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([tokens])])
    positions = torch.cat([torch.arange(int(n)) for n in bounds.diff()])[None]
    ids = torch.randint(C.FIRST_TEXT_TOKEN, vocab, (1, tokens), generator=generator)
    labels = ids.clone()
    labels[positions == 0] = -100
    batch = dict(input_ids=ids, position_ids=positions, labels=labels,
                 cu_seq_lens_q=bounds.to(torch.int32), cu_seq_lens_k=bounds.to(torch.int32))
    return {key: value.to(device) for key, value in batch.items()}


def build(args, device):
    quantize = device.type == "cuda" and not args.no_quantize
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quantize:
        path = M.ensure_checkpoint(args.model, args, device, dtype)
        model = M.load_for_training(path, args.contender, device, True, dtype)
    else:
        model = M.build_random_model(args.model, args.contender, device, dtype, args.seed, args.tokens)
    M.apply_pre_peft(args.contender, model, args.tokens, args, device)
    fused = False
    try:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)  # what SFTTrainer does; must come before PEFT
        fused = True
    except ImportError:
        pass
    model = M.wrap_lora(model, args.lora_r)
    return model, fused


def run(args) -> dict:
    device = torch.device("cpu") if args.cpu or not torch.cuda.is_available() else torch.device("cuda")
    model, fused = build(args, device)
    generator = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size

    def forward():
        batch = packed_row(args.tokens, args.docs, vocab, generator, device)
        # bf16 autocast around the forward, as the HF Trainer does with bf16=True
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            output = model(**batch, fused_lm_head=True) if fused else model(**batch)
        return output.loss

    def step():
        forward().backward()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        memory_readout(model, forward, device)
    if args.host:
        return host_profile(step, device, args)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":  # kernels only: operators' device time would count their kernels twice
        events = [e for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        device_time = "self_device_time_total"
    else:
        events, device_time = profiler.key_averages(), "self_cpu_time_total"
    rows = [(event.key, getattr(event, device_time, 0.0) / args.steps / 1e3, event.count // args.steps)
            for event in events]
    rows = [row for row in rows if row[1] > 0]
    rows.sort(key=lambda row: -row[1])
    total = sum(row[1] for row in rows)
    totals = collections.Counter()
    for name, ms, _ in rows:
        totals[category(name)] += ms
    print(f"\n{args.contender}, {args.model} shapes, {args.tokens} tokens in {args.docs} documents, "
          f"{'nf4' if device.type == 'cuda' and not args.no_quantize else str(next(model.parameters()).dtype)}, "
          f"loss: {'TRL fused LM head' if fused else 'HF'}; per step, {'device' if device.type == 'cuda' else 'CPU'} "
          f"self time {total:.1f} ms\n")
    print("| category | ms/step | share |\n|---|---|---|")
    for label, ms in totals.most_common():
        print(f"| {label} | {ms:.1f} | {ms / total:.0%} |")
    print(f"\n| op / kernel (top {args.top}) | category | calls/step | ms/step | share |\n|---|---|---|---|---|")
    for name, ms, calls in rows[: args.top]:
        print(f"| `{name[:90]}` | {category(name)} | {calls} | {ms:.2f} | {ms / total:.1%} |")
    return {"total_ms": total, "categories": dict(totals), "top": rows[: args.top]}


def memory_readout(model, forward, device) -> dict:
    """What one step holds on the GPU: the tensors kept from the forward for the backward (activations,
    and whatever a compiled region saves), and the step's peak above what was allocated before it."""
    model.zero_grad(set_to_none=True)  # the previous step's gradients would count as held
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    loss = forward()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated(device) - before
    loss.backward()
    del loss
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - before
    mib = 2**20
    print(f"\nmemory per step: held after the forward {held / mib:,.0f} MiB, peak above the step's start "
          f"{peak / mib:,.0f} MiB (allocated before it {before / mib:,.0f} MiB)")
    return {"held_after_forward_mib": held / mib, "step_peak_mib": peak / mib}


def host_profile(step, device, args) -> dict:
    """Where the host's time goes: wall time per step, then cProfile's functions with the most own time.

    A step whose wall time far exceeds its device time is bound by the host (Python, autograd, PEFT,
    bitsandbytes dispatch, compiled-graph guards); this names the functions to make cheaper.
    """
    import cProfile
    import pstats
    import time

    C.sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    C.sync(device)
    wall_ms = (time.perf_counter() - start) / args.steps * 1e3
    profile = cProfile.Profile()
    profile.enable()
    step()
    C.sync(device)
    profile.disable()
    stats = pstats.Stats(profile)
    rows = sorted(((key, value[2] * 1e3, value[0], value[3] * 1e3) for key, value in stats.stats.items()),
                  key=lambda row: -row[1])
    traced_ms = sum(row[1] for row in rows)
    print(f"\n{args.contender}, {args.model} shapes, {args.tokens} tokens: {wall_ms:.0f} ms per fwd+bwd step "
          f"(wall, untraced); under cProfile {traced_ms:.0f} ms, of which the top {args.top} functions by own time:\n")
    print("| function | calls/step | own ms | cumulative ms |\n|---|---|---|---|")
    for (filename, line, name), own, calls, cumulative in rows[: args.top]:
        where = "/".join(filename.split("/")[-2:])
        print(f"| `{where}:{line}({name})` | {calls} | {own:.1f} | {cumulative:.1f} |")
    return {"wall_ms": wall_ms, "traced_ms": traced_ms}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="2b", choices=list(C.GEMMA2_SHAPES), help="Gemma 2 shapes")
    parser.add_argument("--contender", default="fastgemma", choices=sorted(M.IMPL))
    parser.add_argument("--tokens", type=int, default=16384, help="length of the packed row")
    parser.add_argument("--docs", type=int, default=6, help="documents in the row")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled steps first (compiles happen here)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--top", type=int, default=25, help="rows of the op table")
    parser.add_argument("--host", action="store_true",
                        help="profile the host instead: wall ms per step and cProfile's top functions by own time")
    parser.add_argument("--no-quantize", action="store_true", help="bf16 base instead of nf4 on a GPU")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--ckpt-dir", default=None, help="where the nf4 path saves the random checkpoint once")
    parser.add_argument("--fastgemma-backend", default="auto")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
