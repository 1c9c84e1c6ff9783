"""TRL suite: SFTTrainer QLoRA (nf4, double quant, bf16 compute), BFD packing (padding-free),
max_length 4096, per_device_train_batch_size 4, on a synthetic pre-tokenized dataset.

Measured per contender (hf-eager, hf-flex, fastgemma; liger opt-in):
  - time to first step: wall clock (after a CUDA sync) from ``trainer.train()`` and from the start of
    ``from_pretrained`` to the end of the first optimizer step (TrainerCallback.on_step_end);
  - steady tokens/s: median over the steps after warm-up of (real tokens of the step's batch) /
    (time between consecutive step ends), the last step left out when it is profiled; real tokens are
    counted from each batch in training_step;
  - GPU busy: CUDA kernel time of the profiled last step per computed token (padding included) over the
    unprofiled steps' wall time per computed token;
  - peak memory (torch.cuda.max_memory_allocated from before the load to the end of training).

The random-init model is saved once (bf16 safetensors + an offline word-level tokenizer) and loaded
with from_pretrained + BitsAndBytesConfig, as a user would load a real checkpoint.

Unsloth (opt-in contenders "unsloth", "unsloth-nocompile") runs in a process of its own,
``benchmarks/unsloth_trl.py``: importing it patches transformers and trl for the whole process, and it
needs transformers / trl versions of its own (``--unsloth-path``). It trains unpacked, on padded batches,
since it refuses packing for Gemma 2; that process reuses this module's dataset, config and callbacks and
writes one row as JSON, which joins the table like any other contender's.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time

import torch

from . import common as C
from . import models as M
from .unsloth_process import run_unsloth_process, unsloth_versions_note

DEFAULT_CONTENDERS = ("hf-eager", "hf-flex", "fastgemma")
TRAINERS = ("trl", "lean")  # --trl-trainer: TRL's SFTTrainer as users run it, or fastgemma.lean_trainer of it
CONTENDERS = (*M.IMPL, *M.UNSLOTH)  # Unsloth only here: the other suites run every contender in-process


def synthetic_dataset(vocab: int, n_tokens: int, doc_range: tuple[int, int], seed: int):
    """Pre-tokenized documents of random token ids, lengths uniform in doc_range, ending with <eos>."""
    from datasets import Dataset

    rng = random.Random(seed)
    docs, total = [], 0
    while total < n_tokens:
        n = rng.randint(*doc_range)
        ids = [rng.randrange(C.FIRST_TEXT_TOKEN, vocab) for _ in range(n - 1)] + [1]
        docs.append(ids)
        total += n
    return Dataset.from_dict({"input_ids": docs}), total


def doc_range(tiny: bool) -> tuple[int, int]:
    """Document lengths of the suite's dataset: around max_length on the real run, so that packing matters."""
    return (8, 100) if tiny else (200, 4000)


def trl_dataset(vocab: int, tiny: bool, steps: int, batch: int, max_length: int, accum: int, seed: int):
    """The suite's dataset, (Dataset, total tokens): enough documents for every step of every contender.

    The Unsloth process builds its own copy with this same function and the same arguments, so it gets the
    same documents as the contenders of this process."""
    n_tokens = int((steps + 2) * batch * max_length * accum * 1.2)
    return synthetic_dataset(vocab, n_tokens, doc_range(tiny), seed)


def _make_trainer_cls(pad_token_id: int | None = None, trainer: str = "trl"):
    """StepClock, CountingSFTTrainer and GpuBusyProbe, built on the SFTTrainer that ``trl`` holds now (in the
    Unsloth process: the one Unsloth patched), or on ``fastgemma.lean_trainer`` of it for ``trainer="lean"``.
    A batch without an attention mask counts every token, unless ``pad_token_id`` is given: then its pad
    tokens are left out (padded batches whose mask was dropped)."""
    from transformers import TrainerCallback
    from trl import SFTTrainer

    if trainer == "lean":  # (run() has refused any name not in TRAINERS)
        from fastgemma import lean_trainer

        SFTTrainer = lean_trainer(SFTTrainer)  # noqa: N806 (a class)

    class StepClock(TrainerCallback):
        def __init__(self, device):
            self.device = device
            self.t_begin = None
            self.ends: list[float] = []
            self.starts: list[float] = []  # each step's start: the previous end, after this clock's own work
            self.graph_lengths: list[int] = []  # after each step: how many lengths fastgemma has recorded graphs at

        def on_train_begin(self, args, state, control, **kw):
            C.sync(self.device)
            self.t_begin = time.perf_counter()
            self.starts = [self.t_begin]

        def on_step_end(self, args, state, control, **kw):
            C.sync(self.device)
            self.ends.append(time.perf_counter())
            model = kw.get("model")
            self.graph_lengths.append(len(_graph_lengths(model)) if model is not None else 0)
            self.starts.append(time.perf_counter())  # (the module walk above is no step's time)

    class CountingSFTTrainer(SFTTrainer):
        """SFTTrainer that records the real, the loss-bearing and the computed (padded) tokens of every
        micro-batch."""

        def training_step(self, *args, **kwargs):
            # The counts stay tensors until the run ends (summarize reads them): reading one here would make
            # the host wait for the GPU at every micro-step, a stall the contenders' own code may not have.
            inputs = args[1] if len(args) > 1 else kwargs.get("inputs")
            if inputs is not None:
                ids = inputs["input_ids"]
                if "attention_mask" in inputs:
                    real = inputs["attention_mask"].sum()
                elif pad_token_id is not None:  # the synthetic documents never hold the pad id
                    real = (ids != pad_token_id).sum()
                else:  # padding-free: one flattened row, no padding unless pad_to_multiple_of
                    real = ids.numel()
                labels = inputs.get("labels")
                loss_tokens = (labels != -100).sum() if labels is not None else None
                self._bench_tokens.append((real, loss_tokens, int(ids.shape[-1]), ids.numel()))
            return super().training_step(*args, **kwargs)

    class GpuBusyProbe(TrainerCallback):
        """Profiles one optimizer step (CUDA activity only) and keeps the seconds in which the GPU ran a
        kernel, and that over the step's wall time: near 1 the step is GPU-bound, far below it the host
        cannot keep the GPU fed. The profiler slows a host-bound step and its shutdown takes seconds, so
        the profiled step is the last one and stays out of the tokens/s median."""

        def __init__(self, device, step: int | None, trace_path: str | None = None):
            self.device, self.step, self.trace_path = device, step, trace_path
            self.profiler, self.t0, self.busy, self.kernel_s = None, None, None, None
            self.idle_gaps = None

        def on_step_begin(self, args, state, control, **kw):
            if self.device.type != "cuda" or self.step is None or state.global_step != self.step:
                return
            activities = [torch.profiler.ProfilerActivity.CUDA]
            if self.trace_path:  # the host's ops too, to say what ran while the GPU waited
                activities.append(torch.profiler.ProfilerActivity.CPU)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            C.sync(self.device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.profiler is None:
                return
            C.sync(self.device)
            wall_us = (time.perf_counter() - self.t0) * 1e6
            self.profiler.__exit__(None, None, None)
            events = self.profiler.events()
            kernels = kernel_union(
                (e.time_range.start, e.time_range.end) for e in events
                if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
            )
            busy = sum(stop - start for start, stop in kernels)
            self.kernel_s = busy / 1e6
            self.busy = min(1.0, busy / wall_us) if wall_us > 0 else None
            if self.trace_path:
                host = [(e.name, e.time_range.start, e.time_range.end) for e in events
                        if e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None]
                self.idle_gaps = idle_gaps(kernels, host)
                self.profiler.export_chrome_trace(self.trace_path)
                print(f"[bench] trace of the profiled step: {self.trace_path}; the GPU's longest idle gaps:")
                for gap in self.idle_gaps:
                    print(f"  {gap['ms']:8.2f} ms at +{gap['at_ms']:.1f} ms: " + "; ".join(gap["host"]))
            self.profiler = None

    return StepClock, CountingSFTTrainer, GpuBusyProbe


def kernel_union(intervals) -> list[tuple[float, float]]:
    """(start, stop) intervals merged where they overlap (kernels on several streams count once), in order."""
    merged: list[tuple[float, float]] = []
    for start, stop in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def idle_gaps(kernels: list[tuple[float, float]], host: list[tuple[str, float, float]], top: int = 12,
              names: int = 3) -> list[dict]:
    """The `top` longest stretches (µs in, ms out) with no kernel running on the GPU between two kernels,
    longest first, each with the top-level host ops that overlap it most (what the host did meanwhile)."""
    kernels = kernel_union(kernels)
    gaps = [(start - end, end, start) for (_, end), (start, _) in zip(kernels, kernels[1:])]
    origin = kernels[0][0] if kernels else 0.0
    result = []
    for length, begin, finish in sorted(gaps, reverse=True)[:top]:
        overlap = {}
        for name, start, stop in host:
            shared = min(stop, finish) - max(start, begin)
            if shared > 0:
                overlap[name] = overlap.get(name, 0.0) + shared
        busiest = sorted(overlap.items(), key=lambda item: -item[1])[:names]
        result.append({"ms": length / 1e3, "at_ms": (begin - origin) / 1e3,
                       "host": [f"{name} ({shared / 1e3:.2f} ms)" for name, shared in busiest] or ["(no host op)"]})
    return result


def steady_rates(per_step: list[float], warmup: int, profiled: int | None) -> list[float]:
    """tokens/s of the steps after warm-up, without the profiled step (the profiler slows it)."""
    steady = [rate for k, rate in enumerate(per_step) if k >= warmup and k != profiled]
    return steady or per_step[warmup:]


UNEVEN_STEPS = 3.0  # slowest over fastest steady step: beyond this a step compiled or recorded something


def uneven_steps_notes(rows: list[dict]) -> list[str]:
    """A warning per row whose steady steps (after warm-up, profiled one left out) differ by more than
    UNEVEN_STEPS in tokens/s: a recompile inside them makes its tokens/s and ratios no steady state."""
    notes = []
    for r in rows:
        per_step = r.get("tokens_per_s_all") or []
        steady = steady_rates(per_step, r.get("warmup_steps", 0), r.get("profiled_step")) if per_step else []
        if r.get("status") == "ok" and len(steady) > 1 and max(steady) > UNEVEN_STEPS * min(steady):
            rates = ", ".join(C.fmt(x, 0) for x in per_step)
            notes.append(f"WARNING: {r.get('label', r['contender'])} ({r['model']}): its steady steps ran "
                         f"{C.fmt(min(steady), 0)}-{C.fmt(max(steady), 0)} tokens/s (all steps: {rates}): a step "
                         "recompiled or recorded, so its tokens/s and ratios are not steady-state; run more "
                         "--steps / --warmup")
    return notes


def recording_steps(graph_lengths: list[int]) -> list[int]:
    """The steps (0-based) in which fastgemma recorded CUDA graphs at a new length, from the count of recorded
    lengths after each step."""
    return [k for k, count in enumerate(graph_lengths) if count > (graph_lengths[k - 1] if k else 0)]


def recording_notes(rows: list[dict]) -> list[str]:
    """A note per row that recorded CUDA graphs in a steady step: that recording's time is in its tokens/s."""
    notes = []
    for r in rows:
        warm, profiled = r.get("warmup_steps", 0), r.get("profiled_step")
        steady = [k for k in r.get("recording_steps") or [] if k >= warm and k != profiled]
        if r.get("status") == "ok" and steady:
            notes.append(f"NOTE: {r.get('label', r['contender'])} ({r['model']}) recorded CUDA graphs at a new "
                         f"length in steady step(s) {', '.join(map(str, steady))} (counting from 0), so its tokens/s "
                         f"includes those recordings; more --warmup moves them out")
    return notes


def busy_over_unprofiled(kernel_s: float | None, profiled_tokens: int, steady: list[float]) -> float | None:
    """CUDA time over wall time for an unprofiled step: the profiled step's kernel seconds per token
    times the steady steps' tokens per second (the profiler inflates the host's share of its own step)."""
    if kernel_s is None or not profiled_tokens or not steady:
        return None
    return min(1.0, kernel_s / profiled_tokens * C.median(steady))


def sft_kwargs(out_dir: str, steps: int, batch: int, accum: int, max_length: int, seed: int, device) -> dict:
    """The SFTConfig settings every contender shares (the Unsloth process too); batching and gradient
    checkpointing are left to the caller, since Unsloth decides those for itself."""
    return dict(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        max_length=max_length,
        bf16=device.type == "cuda",
        use_cpu=device.type != "cuda",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=seed,
        data_seed=seed,
    )


def probe_step(steps: int, warmup: int) -> int | None:
    """The step GpuBusyProbe profiles: the last one, when at least one steady step comes before it."""
    return steps - 1 if steps - 1 > warmup else None


def summarize(clock, probe, trainer, accum: int, warmup: int, t_load0: float, t_loaded: float, t_trainer: float,
              peak) -> dict:
    """The row's measurements from the callbacks of one finished ``trainer.train()`` (see the module docstring)."""
    ends = clock.ends
    micro = [tuple(None if n is None else int(n) for n in counts) for counts in trainer._bench_tokens]
    # one entry per optimizer step: the sums over its `accum` micro-batches
    toks = [tuple(sum(t[i] or 0 for t in micro[k:k + accum]) for i in range(4)) for k in range(0, len(micro), accum)]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    starts = clock.starts[:len(ends)]
    durs = [e - s for s, e in zip(starts, ends)]
    per_step = [t[0] / d for t, d in zip(toks, durs) if d > 0]
    warm = min(warmup, max(0, len(per_step) - 1))
    profiled = probe.step if probe.busy is not None else None
    steady = steady_rates(per_step, warm, profiled)
    busy = probe.busy
    if profiled is not None and profiled < len(toks):
        # the GPU's work follows the computed tokens, padding included: unpacked rows (Unsloth) pad each
        # batch to its longest row, so real tokens per step would over- or under-state the kernel time
        computed = steady_rates([t[3] / d for t, d in zip(toks, durs) if d > 0], warm, profiled)
        busy = busy_over_unprofiled(probe.kernel_s, toks[profiled][3], computed) or busy
    return {
        "steps_done": len(ends),
        "load_s": t_loaded - t_load0,
        "trainer_init_s": t_trainer - t_loaded,
        "first_step_from_train_s": ends[0] - t_trainer if ends else None,
        "first_step_from_load_s": ends[0] - t_load0 if ends else None,
        "first_step_s": durs[0] if durs else None,
        "tokens_per_s": C.median(steady),
        "tokens_per_s_all": per_step,
        "tokens_per_step": [t[0] for t in toks],
        "loss_tokens_per_step": [t[1] for t in toks],
        "row_lengths": [t[2] for t in toks],
        "step_s": durs,
        "losses": losses,
        "loss_first": losses[0] if losses else None,
        "peak_mib": peak,
        "warmup_steps": warm,
        "gpu_busy": busy,
        "gpu_busy_profiled_step": probe.busy,
        "gpu_kernel_s": probe.kernel_s,
        "gpu_idle_gaps": probe.idle_gaps,
        "profiled_step": profiled,
        "recording_steps": recording_steps(getattr(clock, "graph_lengths", [])),
    }


def _run_one(cname: str, name: str, path: str, ds, args, device, quantize: bool, steps: int, max_length: int,
             batch: int, out_dir: str, trainer_kind: str = "trl") -> dict:
    from transformers import AutoTokenizer
    from trl import SFTConfig

    tokenizer = AutoTokenizer.from_pretrained(path)  # not part of the timed load: a 256K-word vocabulary
    pad_multiple = getattr(args, "trl_pad_multiple", None)
    # Rows padded to a multiple hold pad ids at their end, which the real-token count must leave out.
    StepClock, CountingSFTTrainer, GpuBusyProbe = _make_trainer_cls(
        pad_token_id=tokenizer.pad_token_id if pad_multiple else None, trainer=trainer_kind)
    accum = args.trl_grad_accum
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    C.free_memory(device)
    C.reset_peak(device)
    C.sync(device)
    t_load0 = time.perf_counter()
    model = M.load_for_training(path, cname, device, quantize, dtype)
    if cname == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_gemma2

        # TRL replaces the forward with its fused LM head, so Liger's fused linear CE stays off.
        apply_liger_kernel_to_gemma2(model=model, fused_linear_cross_entropy=False)
    elif cname in M.FASTGEMMA_PATCH:
        M.apply_pre_peft(cname, model, batch * max_length, args, device)
    C.sync(device)
    t_loaded = time.perf_counter()
    cfg = SFTConfig(
        **sft_kwargs(out_dir, steps, batch, accum, max_length, args.seed, device),
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        **({"pad_to_multiple_of": pad_multiple} if pad_multiple else {}),
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    clock = StepClock(device)
    trace = getattr(args, "trl_trace_dir", None)
    if trace:
        os.makedirs(trace, exist_ok=True)
        lean = "-lean" if trainer_kind == "lean" else ""
        trace = os.path.join(trace, f"trl-{name}-{cname}{lean}-{batch}x{max_length}x{accum}.json.gz")
    probe = GpuBusyProbe(device, step=probe_step(steps, args.trl_warmup), trace_path=trace)
    torch.manual_seed(args.seed)
    trainer = CountingSFTTrainer(
        model=model,
        args=cfg,
        train_dataset=ds,
        processing_class=tokenizer,
        peft_config=M.lora_config(args.lora_r),
        callbacks=[clock, probe],
    )
    trainer._bench_tokens = []
    C.sync(device)
    t_trainer = time.perf_counter()
    trainer.train()
    C.sync(device)
    out = summarize(clock, probe, trainer, accum, args.trl_warmup, t_load0, t_loaded, t_trainer, C.peak_mib(device))
    # Reserved counts what allocated does not: CUDA graph pools, and blocks cached for other streams.
    out["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None
    out["graph_lengths"] = _graph_lengths(model)
    del trainer, model
    return out


def _graph_lengths(model) -> list:
    """The bucket lengths fastgemma recorded CUDA graphs at ([] when it ran op by op, or is not in use)."""
    import fastgemma

    try:
        return fastgemma.cuda_graph_lengths(model)
    except ValueError:  # not a fastgemma-patchable model (another contender's wrapper)
        return []


# --------------------------------------------------------------------------------------------------
# Unsloth, in a process of its own (benchmarks/unsloth_trl.py)
# --------------------------------------------------------------------------------------------------

UNSLOTH_NOTE = (
    "Unsloth trains unpacked: it refuses packing and padding-free batches for Gemma 2, so its batches are "
    "right-padded documents truncated to max_length, and its tokens/s counts real (unpadded) tokens only."
)


def unsloth_command(checkpoint: str, args, steps: int, max_length: int, batch: int, out_path: str) -> list[str]:
    """The command line of the Unsloth process: this Python, the suite's settings, one row written to out_path."""
    cmd = [sys.executable, "-m", "benchmarks.unsloth_trl", "--checkpoint", checkpoint,
           "--max-length", str(max_length), "--batch", str(batch), "--grad-accum", str(args.trl_grad_accum),
           "--steps", str(steps), "--warmup", str(args.trl_warmup), "--seed", str(args.seed),
           "--lora-r", str(args.lora_r), "--out", out_path]
    if args.tiny:
        cmd.append("--tiny")
    if args.no_quant:
        cmd.append("--no-quant")
    return cmd


def run_unsloth(cname: str, checkpoint: str, args, steps: int, max_length: int, batch: int, out_dir: str) -> dict:
    """One Unsloth contender's measurements (the keys of ``summarize`` and its own), or just its status."""
    out_path = os.path.join(out_dir, "row.json")
    cmd = unsloth_command(checkpoint, args, steps, max_length, batch, out_path)
    row = run_unsloth_process(cname, cmd, out_path, args)
    row["note"] = UNSLOTH_NOTE
    return row


def run(args, device: torch.device) -> C.SuiteResult:
    res = C.SuiteResult("trl")
    tiny = args.tiny
    models = C.parse_list(args.models, ["tiny"] if tiny else ["2b"])
    contenders = [c for c in C.parse_list(args.contenders, DEFAULT_CONTENDERS) if c in CONTENDERS]
    trainers = C.parse_list(getattr(args, "trl_trainer", None), ["trl"])
    unknown = [t for t in trainers if t not in TRAINERS]
    if unknown:
        raise ValueError(f"--trl-trainer: unknown {', '.join(unknown)}; choose from {', '.join(TRAINERS)}")
    # Unsloth builds its own trainer in its own process: it runs under TRL's only, once, even when only the
    # lean trainer was asked for (a contender asked for is never dropped without a row)
    runs = [(t, c) for t in trainers for c in contenders if t == "trl" or c not in M.UNSLOTH]
    unsloth_without_trl = "trl" not in trainers and any(c in M.UNSLOTH for c in contenders)
    if unsloth_without_trl:
        runs += [("trl", c) for c in contenders if c in M.UNSLOTH]
    steps = C.pick(args.steps, tiny, 3, 12)
    args.trl_warmup = C.pick(args.warmup, tiny, 1, 3)
    max_length = args.trl_max_length or (128 if tiny else 4096)
    pad_multiple = getattr(args, "trl_pad_multiple", None)
    batch = args.trl_batch
    quantize = device.type == "cuda" and not args.no_quant
    budget = C.Budget(args.budget_s)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    res.notes.append(
        f"TRL SFTTrainer, {'QLoRA: nf4 + double quant, bf16 compute' if quantize else 'LoRA without quantization (' + str(dtype).replace('torch.', '') + ')'}, "
        f"LoRA r={args.lora_r} all-linear, packing='bfd' (padding-free: each batch is one flattened row of "
        f"≤{batch}×{max_length} tokens with per-document position_ids), max_length {max_length}, "
        f"per_device_train_batch_size {batch}, gradient_accumulation_steps {args.trl_grad_accum}, gradient "
        f"checkpointing, {steps} optimizer steps, constant lr. "
        + (f"Each micro-batch padded to a multiple of {pad_multiple} tokens (pad_to_multiple_of). "
           if pad_multiple else "") +
        f"Synthetic pre-tokenized documents of {doc_range(tiny)[0]}..{doc_range(tiny)[1]} random tokens. "
        "'1st step' columns: wall clock to the end of the first optimizer step from trainer.train() and from "
        "the start of from_pretrained. tokens/s: median over optimizer steps after the first "
        f"{args.trl_warmup}, the profiled last step left out, of real tokens / step time. Peak: max allocated "
        "from before the load to the end. GPU busy: CUDA kernel time (torch.profiler, CUDA activity only, "
        "the last step) per computed token (padding included) over the unprofiled steps' wall time per "
        "computed token. "
        f"fastgemma backend: {M.fastgemma_backend(args, device)}."
    )
    if "lean" in trainers:
        res.notes.append(
            "'[lean trainer]' rows: the same SFTTrainer through fastgemma.lean_trainer (the recipe's): the loss's "
            "nan/inf filter on the GPU instead of a host read per micro-step, the FLOP estimate's parameter count "
            "read once, model.train() skipped when every module is in train mode already; their ratios are "
            "against the HF eager row of the same trainer."
        )
    if device.type != "cuda":
        res.notes.append("CPU run: bitsandbytes nf4 needs CUDA, so this smoke run trains LoRA on an fp32 model.")
    if any(c in M.UNSLOTH for c in contenders):
        res.notes.append(
            "Unsloth rows: benchmarks/unsloth_trl.py in a process of its own (Unsloth patches transformers and trl "
            "when imported), FastLanguageModel.from_pretrained ("
            + ("bf16, load_in_4bit=False" if args.no_quant else "load_in_4bit: nf4 + double quant, bf16") + ") and "
            "get_peft_model (same r and alpha, the 7 projections, use_gradient_checkpointing='unsloth'), then the "
            "same SFTTrainer settings, dataset and measurements, with packing=False. " + UNSLOTH_NOTE + " Their "
            "load time includes the tokenizer (Unsloth loads it with the model). 'Unsloth': its per-decoder-layer "
            "compile on, as it ships (UNSLOTH_BLOCK_COMPILE unset); 'no block compile': UNSLOTH_BLOCK_COMPILE=0."
        )
    if unsloth_without_trl:
        res.notes.append(
            "Unsloth ran under TRL's trainer as Unsloth patches it (the lean trainer is not applied to it), while "
            "the other rows ran under the lean trainer only: its 'vs HF eager' needs an HF eager row under TRL's "
            "trainer (--trl-trainer trl,lean)."
        )
    for name in models:
        vocab = C.GEMMA2_SHAPES[name]["vocab_size"]
        ds, total = trl_dataset(vocab, tiny, steps, batch, max_length, args.trl_grad_accum, args.seed)
        C.log(f"trl {name}: synthetic dataset {len(ds)} documents, {total:,} tokens")
        checkpoint = M.SharedCheckpoint(name, args, device, dtype, f"trl {name} checkpoint")
        for trainer_kind, cname in runs:
            lean = trainer_kind == "lean"
            row = dict(suite="trl", model=name, contender=cname,
                       label=C.LABELS.get(cname, cname) + (" [lean trainer]" if lean else ""),
                       quant="nf4" if quantize else "none", max_length=max_length, batch=batch,
                       grad_accum=args.trl_grad_accum, trainer=trainer_kind,
                       # the ratios compare rows of one trainer
                       config=f"{batch}x{max_length}x{args.trl_grad_accum}" + ("-lean" if lean else "")
                       + (f"-pad{pad_multiple}" if pad_multiple else ""))
            blocked = M.not_startable(cname, device, budget)
            if blocked:
                row["status"] = blocked
            else:
                st, path = checkpoint.get()
                if st != "ok":
                    res.rows.append(dict(row, status=f"{st} (saving the checkpoint)"))
                    continue
                out_dir = tempfile.mkdtemp(prefix=f"fastgemma_bench_trl_{cname}_")
                C.log(f"trl {name} {cname}{' (lean trainer)' if lean else ''}: training {steps} steps")
                if cname in M.UNSLOTH:
                    row.update(run_unsloth(cname, path, args, steps, max_length, batch, out_dir))
                    st, m = row["status"], None
                else:
                    with C.stock_guard():
                        st, m = C.run_guarded(
                            lambda: _run_one(cname, name, path, ds, args, device, quantize, steps, max_length,
                                             batch, out_dir, trainer_kind),
                            f"trl {name} {cname}",
                        )
                row["status"] = st
                if m:
                    row.update(m)
                    row.update(model_flops(name, max_length, args.lora_r, row.get("tokens_per_s"), device))
                C.free_memory(device)
                shutil.rmtree(out_dir, ignore_errors=True)  # the trainers' output: nothing the row needs
            C.log(
                f"  {name} {cname:<10} {row['status']} 1st step: {C.fmt(row.get('first_step_from_train_s'), 1)} s "
                f"(from load {C.fmt(row.get('first_step_from_load_s'), 1)} s) tok/s={C.fmt(row.get('tokens_per_s'), 0)} "
                f"peak={C.fmt(row.get('peak_mib'), 0)}MiB loss@1={C.fmt(row.get('loss_first'), 4)}"
            )
            res.rows.append(row)
            if getattr(args, "on_row", None):
                args.on_row(res)
    res.notes.extend(uneven_steps_notes(res.rows))
    res.notes.extend(recording_notes(res.rows))
    versions = unsloth_versions_note(res.rows)
    if versions:
        res.notes.append(versions)
    res.table = table(res.rows)
    return res


def model_flops(name: str, max_length: int, lora_r: int, tokens_per_s, device) -> dict:
    """The row's model TFLOP/s and its share of the GPU's bf16 peak (benchmarks/flops.py's convention)."""
    from .flops import bf16_peak, training_flops_per_token

    if name not in C.GEMMA2_SHAPES or not tokens_per_s:
        return {}
    per_token = training_flops_per_token(C.GEMMA2_SHAPES[name], max_length, lora_r)
    found = {"model_gflop_per_token": per_token / 1e9, "model_tflops": tokens_per_s * per_token / 1e12}
    peak = bf16_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if peak:
        found["mfu"] = tokens_per_s * per_token / peak
    return found


def table(rows: list[dict]) -> str:
    headers = ["model", "micro-batch × accum", "contender", "status", "1st step from train() s",
               "1st step from load s", "tokens/s", "GPU busy", "MFU", "vs HF eager", "vs HF flex", "peak GiB",
               "peak reserved GiB", "graphed lengths", "steps", "loss@1"]
    keyf = ("model", "config")
    out = []
    for r in rows:
        ok = r.get("status") == "ok"
        out.append([
            r["model"],
            f"{r.get('batch', '?')}×{r.get('max_length', '?')} × {r.get('grad_accum', 1)}",
            r.get("label", r["contender"]),
            r["status"],
            C.fmt(r.get("first_step_from_train_s"), 1),
            C.fmt(r.get("first_step_from_load_s"), 1),
            C.fmt(r.get("tokens_per_s"), 0),
            f"{100 * r['gpu_busy']:.0f}%" if r.get("gpu_busy") is not None else "-",
            f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-",
            C.fmt_ratio(C.ratio(r, rows, keyf, "tokens_per_s", "hf-eager", True)) if ok else "-",
            C.fmt_ratio(C.ratio(r, rows, keyf, "tokens_per_s", "hf-flex", True)) if ok else "-",
            C.fmt(r["peak_mib"] / 1024 if r.get("peak_mib") else None, 2),
            C.fmt(r["peak_reserved_mib"] / 1024 if r.get("peak_reserved_mib") else None, 2),
            ",".join(map(str, r["graph_lengths"])) if r.get("graph_lengths") else "-",
            r.get("steps_done", "-"),
            C.fmt(r.get("loss_first"), 4),
        ])
    return C.markdown_table(headers, out)
