"""Kernel suite: softcapped attention forward+backward at Gemma 2 head shapes.

Contenders
  fastgemma          fastgemma.attention.softcap_attention(..., backend="flex") (backend "eager" on CPU)
  fastgemma-<b>      the same with backend <b> (auto, flex, compiled, eager), opt-in via --contenders
  fastgemma-exact    fastgemma with softcap_tanh="exact" / "approx" (the flex softcap's tanh; the default
  fastgemma-approx   is "auto": approximate on NVIDIA GPUs), opt-in via --contenders
  hf-eager           transformers.models.gemma2.modeling_gemma2.eager_attention_forward, dense additive
                     mask from transformers.masking_utils.eager_mask
  hf-flex            transformers.integrations.flex_attention.flex_attention_forward, BlockMask from
                     transformers.masking_utils.flex_attention_mask (create_block_mask, built per call)

Every contender gets the same inputs (seeded per step) and the same upstream gradient. The timed region
is forward + backward only; the mask is built (and timed separately) before it, per step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import common as C
from .masks import MaskSpec

DEFAULT_CONTENDERS = ("fastgemma", "hf-eager", "hf-flex")
KERNEL_SHAPES = {  # model -> (q heads, kv heads, head_dim)
    name: (s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]) for name, s in C.GEMMA2_SHAPES.items()
}

CONVENTION = (
    "FLOP convention: pairs = exact number of allowed (q,k) pairs of the mask; forward = 4·D·H·pairs "
    "(QKᵀ and PV), forward+backward = 2.5 × forward; TFLOP/s = that count / median fwd+bwd time. "
    "Dense (eager) kernels are credited only with the unmasked work. Timed region: forward + backward "
    "(CUDA events on a GPU), mask built per step outside it (its time is the 'mask ms' column). 'peak extra' = "
    "max allocated during fwd+bwd minus allocated before it (inputs excluded). Errors: the step-0 inputs "
    "against a float64 reference (chunked exact softmax with the analytic backward) on the query heads of "
    "kv head 0; 'err out' = max |Δ| of the output, 'err grad' = max over dq, dk, dv of max|Δ| / max|ref|. "
    "Inputs: q ~ N(0, q_std²), k, v, dO ~ N(0, 1) in bf16 (q_std makes the raw logits' std ≈ q_std so the "
    "softcap is active)."
)


class _AttnModule(nn.Module):
    """Stand-in for Gemma2Attention: the attributes HF's attention functions read."""

    def __init__(self, n_heads: int, n_kv: int, head_dim: int):
        super().__init__()
        self.num_key_value_groups = n_heads // n_kv
        self.head_dim = head_dim
        self.is_causal = True
        self.train()


# --------------------------------------------------------------------------------------------------
# Contenders: prepare(spec) -> mask object, forward(q, k, v, mask) -> (B, H, Q, D)
# --------------------------------------------------------------------------------------------------


class Contender:
    name = "?"
    label = "?"
    supports_backward = True

    def __init__(self, device: torch.device, heads: tuple[int, int, int], scale: float, softcap: float):
        self.device = device
        self.n_heads, self.n_kv, self.head_dim = heads
        self.scale = scale
        self.softcap = softcap
        self.module = _AttnModule(self.n_heads, self.n_kv, self.head_dim)

    def availability(self) -> str | None:
        """None when runnable, else the reason for an n/a row."""
        return None

    def prepare(self, spec: MaskSpec) -> Any:
        raise NotImplementedError

    def forward(self, q, k, v, mask):
        raise NotImplementedError


class HFEager(Contender):
    name = "hf-eager"
    label = "HF eager"

    def prepare(self, spec: MaskSpec):
        from transformers import masking_utils as mu

        return mu.eager_mask(
            batch_size=1,
            q_length=spec.seq,
            kv_length=spec.seq,
            mask_function=spec.hf_mask_function(self.device),
            dtype=torch.bfloat16 if self.device.type == "cuda" else torch.float32,
            device=self.device,
        )

    def forward(self, q, k, v, mask):
        from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

        if mask is not None and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        out, _ = eager_attention_forward(
            self.module, q, k, v, mask, dropout=0.0, scaling=self.scale, softcap=self.softcap
        )
        return out.transpose(1, 2)


class HFFlex(Contender):
    name = "hf-flex"
    label = "HF flex_attention"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        # torch's flex_attention has no CPU backward: forward only there.
        self.supports_backward = self.device.type == "cuda"

    def availability(self):
        from transformers.utils import is_torch_flex_attn_available

        if not is_torch_flex_attn_available():
            return "n/a (torch flex_attention not available)"
        return None

    def prepare(self, spec: MaskSpec):
        from transformers import masking_utils as mu

        return mu.flex_attention_mask(
            batch_size=1,
            q_length=spec.seq,
            kv_length=spec.seq,
            mask_function=spec.hf_mask_function(self.device),
            device=self.device,
        )

    def forward(self, q, k, v, mask):
        from transformers.integrations.flex_attention import flex_attention_forward

        out, _ = flex_attention_forward(self.module, q, k, v, mask, scaling=self.scale, softcap=self.softcap)
        return out.transpose(1, 2)


class FastGemma(Contender):
    name = "fastgemma"
    label = "fastgemma"

    def __init__(self, *a, backend: str | None = None, softcap_tanh: str = "auto", **kw):
        super().__init__(*a, **kw)
        if backend is None:
            backend = "flex" if self.device.type == "cuda" else "eager"
        self.backend = backend
        self.softcap_tanh = softcap_tanh
        self.label = f"fastgemma ({backend})"
        if backend in ("flex", "auto") and self.device.type == "cuda":
            from fastgemma.attention import resolve_softcap_tanh

            self.label = f"fastgemma ({backend}, {resolve_softcap_tanh(softcap_tanh, self.device)} tanh)"
        if self.device.type != "cuda" and backend == "flex":
            self.supports_backward = False

    def availability(self):
        try:
            from fastgemma.attention import softcap_attention  # noqa: F401
            from fastgemma.masks import AttentionMask  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"n/a (fastgemma not importable: {type(exc).__name__}: {str(exc)[:80]})"
        return None

    def prepare(self, spec: MaskSpec):
        from fastgemma.masks import AttentionMask

        mask = AttentionMask(
            spec.seq,
            spec.seq,
            window=spec.window if spec.kind == "sliding" else None,
            segment_ids=spec.segment_ids(self.device),
        )
        # AttentionMask builds its block / dense mask lazily on first use: build it here so the
        # mask cost lands in 'mask ms' as for the HF contenders, not in the timed kernel.
        backend = self.backend
        if backend == "auto":
            from fastgemma.attention import flex_supported

            backend = "flex" if flex_supported(self.device) else "compiled"
        if backend == "flex" and hasattr(mask, "block_mask"):
            mask.block_mask(self.device)
        elif hasattr(mask, "dense"):
            mask.dense(self.device)
        return mask

    def forward(self, q, k, v, mask):
        from fastgemma.attention import softcap_attention

        return softcap_attention(
            q, k, v, mask, scale=self.scale, softcap=self.softcap, backend=self.backend, softcap_tanh=self.softcap_tanh
        )


def make_contender(name: str, device, heads, scale, softcap) -> Contender:
    if name == "hf-eager":
        return HFEager(device, heads, scale, softcap)
    if name == "hf-flex":
        return HFFlex(device, heads, scale, softcap)
    if name == "fastgemma":
        return FastGemma(device, heads, scale, softcap)
    if name in ("fastgemma-exact", "fastgemma-approx"):
        c = FastGemma(device, heads, scale, softcap, softcap_tanh=name.split("-", 1)[1])
        c.name = name
        return c
    if name.startswith("fastgemma-"):
        c = FastGemma(device, heads, scale, softcap, backend=name.split("-", 1)[1])
        c.name = name
        return c
    raise ValueError(f"unknown kernel contender {name!r}")


# --------------------------------------------------------------------------------------------------
# Inputs and float64 reference
# --------------------------------------------------------------------------------------------------


def make_inputs(step: int, seed: int, heads, seq: int, device, dtype, q_std: float, requires_grad: bool):
    h, hkv, d = heads
    g = torch.Generator(device=device).manual_seed(seed * 100_003 + step)

    def rnd(shape, std=1.0):
        x = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        if std != 1.0:
            x.mul_(std)
        return x.to(dtype)

    q = rnd((1, h, seq, d), q_std)
    k = rnd((1, hkv, seq, d))
    v = rnd((1, hkv, seq, d))
    do = rnd((1, h, seq, d))
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, do


def reference_group(q, k, v, do, spec: MaskSpec, scale: float, softcap: float, kv_head: int = 0, chunk: int = 1024):
    """Exact float64 softcapped attention (forward and analytic backward) for the query heads of one kv head.

    Returns (out, dq, dk, dv, q_heads): out/dq (g, S, D), dk/dv (S, D) float64, q_heads a slice.
    """
    h, hkv = q.shape[1], k.shape[1]
    g = h // hkv
    sl = slice(kv_head * g, (kv_head + 1) * g)
    qs = q.detach()[0, sl].double()
    ks = k.detach()[0, kv_head].double()
    vs = v.detach()[0, kv_head].double()
    dos = do.detach()[0, sl].double()
    seq = qs.shape[1]
    seg = spec.segment_ids(q.device)
    out = torch.empty_like(qs)
    dq = torch.empty_like(qs)
    dk = torch.zeros_like(ks)
    dv = torch.zeros_like(vs)
    for i0 in range(0, seq, chunk):
        i1 = min(seq, i0 + chunk)
        allowed = spec.dense_rows(i0, i1, q.device, seg)  # (c, S)
        s = torch.matmul(qs[:, i0:i1], ks.T) * scale  # (g, c, S)
        t = torch.tanh(s / softcap)
        del s
        z = (softcap * t).masked_fill(~allowed, float("-inf"))
        m = z.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(z - m)
        del z
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
        o = p @ vs
        out[:, i0:i1] = o
        dob = dos[:, i0:i1]
        dp = dob @ vs.T
        delta = (dob * o).sum(-1, keepdim=True)
        ds = p * (dp - delta) * (1.0 - t * t)
        del dp, t
        dq[:, i0:i1] = (ds @ ks) * scale
        dk += torch.einsum("gcs,gcd->sd", ds, qs[:, i0:i1]) * scale
        dv += torch.einsum("gcs,gcd->sd", p, dob)
        del ds, p
    return out, dq, dk, dv, sl


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).abs().max())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(b.abs().max())
    return _max_abs(a, b) / denom if denom > 0 else float("nan")


def errors(ref, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """One run's errors against `reference_group`'s float64 result (grads read from q, k, v).

    The suite's two columns: err_out = max |Δ| of the output, err_grad = max over dq, dk, dv of
    max|Δ| / max|ref|; and each tensor's max|Δ| / max|ref| (rel_out, rel_dq, rel_dk, rel_dv).
    Gradient entries only when the run did a backward.
    """
    r_out, r_dq, r_dk, r_dv, sl = ref
    out = out.detach()[0, sl]
    result = {"err_out": _max_abs(out, r_out), "rel_out": _rel(out, r_out)}
    if q.grad is not None:
        result.update(rel_dq=_rel(q.grad[0, sl], r_dq), rel_dk=_rel(k.grad[0, 0], r_dk), rel_dv=_rel(v.grad[0, 0], r_dv))
        result["err_grad"] = max(result["rel_dq"], result["rel_dk"], result["rel_dv"])
    return result


# --------------------------------------------------------------------------------------------------
# Suite
# --------------------------------------------------------------------------------------------------


def _measure(contender: Contender, spec: MaskSpec, seed: int, heads, device, dtype, args, ref) -> dict:
    backward = contender.supports_backward
    warmup, iters = args.k_warmup, args.k_iters
    times, mask_times, peaks = [], [], []
    err_out = err_grad = None
    for step in range(warmup + iters):
        q, k, v, do = make_inputs(step, seed, heads, spec.seq, device, dtype, args.q_std, backward)
        C.sync(device)
        tm = C.Timer(device).start()
        mask = contender.prepare(spec)
        tm.stop()
        C.sync(device)
        base = C.allocated_mib(device)
        C.reset_peak(device)
        t = C.Timer(device).start()
        if backward:
            out = contender.forward(q, k, v, mask)
            out.backward(do)
        else:
            with torch.no_grad():
                out = contender.forward(q, k, v, mask)
        t.stop()
        C.sync(device)
        peak = C.peak_mib(device)
        if step >= warmup:
            times.append(t.ms)
            mask_times.append(tm.ms)
            if peak is not None:
                peaks.append(peak - base)
        if step == 0 and ref is not None:
            found = errors(ref, out, q, k, v)
            err_out, err_grad = found["err_out"], found.get("err_grad")
        del out, q, k, v, do, mask
    return {
        "ms": C.median(times),
        "ms_all": times,
        "mask_ms": C.median(mask_times),
        "peak_extra_mib": max(peaks) if peaks else None,
        "err_out": err_out,
        "err_grad": err_grad,
        "fwd_only": not backward,
    }


def run(args, device: torch.device) -> C.SuiteResult:
    res = C.SuiteResult("kernel")
    tiny = args.tiny
    models = C.parse_list(args.models, ["tiny"] if tiny else ["2b", "27b"])
    seqs = C.parse_int_list(args.seqs, [128] if tiny else [2048, 8192, 16384])
    masks = C.parse_list(args.masks, ["causal", "sliding", "docs"])
    contenders = C.parse_list(args.contenders, DEFAULT_CONTENDERS)
    contenders = [c for c in contenders if c in ("hf-eager", "hf-flex", "fastgemma") or c.startswith("fastgemma-")]
    window = 32 if tiny else 4096
    doc_range = (10, 60) if tiny else (300, 3000)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    softcap = C.COMMON_GEMMA2["attn_logit_softcapping"]
    budget = C.Budget(args.budget_s)
    args.k_warmup = C.pick(args.warmup, tiny, 1, 3)
    args.k_iters = C.pick(args.iters, tiny, 2, 10)
    res.notes.append(CONVENTION)
    res.notes.append(
        f"dtype {str(dtype).replace('torch.', '')}, B=1, q_std={args.q_std}, warm-up {args.k_warmup}, "
        f"median of {args.k_iters} timed steps; window {window}; document lengths uniform in {doc_range}. "
        "torch.compile's recompile limit is raised so every configuration runs compiled (warm-up absorbs it)."
    )
    if device.type != "cuda":
        res.notes.append("CPU run: perf_counter timing, no memory numbers; flex runs forward only (no CPU backward).")

    for model in models:
        heads = KERNEL_SHAPES[model]
        scale = C.attn_scale(model)
        for seq in seqs:
            for mkind in masks:
                spec = MaskSpec.make(mkind, seq, window, doc_range, args.seed)
                pairs = spec.pairs()
                flops_fb = 2.5 * 4 * heads[2] * heads[0] * pairs
                key = dict(model=model, heads=f"{heads[0]}q/{heads[1]}kv d{heads[2]}", seq=seq, mask=spec.label)
                C.log(f"kernel {model} S={seq} {spec.label}: pairs={pairs:,}")
                ref = None
                if not args.no_ref:
                    q, k, v, do = make_inputs(0, args.seed, heads, seq, device, dtype, args.q_std, False)
                    status, ref = C.run_guarded(
                        lambda: reference_group(q, k, v, do, spec, scale, softcap), "float64 reference"
                    )
                    del q, k, v, do
                    if status != "ok":
                        res.notes.append(f"{model} S={seq} {spec.label}: float64 reference {status}")
                for cname in contenders:
                    row = dict(key, suite="kernel", contender=cname, pairs=pairs, flops_fwd_bwd=flops_fb)
                    c = make_contender(cname, device, heads, scale, softcap)
                    row["label"] = c.label
                    na = c.availability()
                    if na:
                        row["status"] = na
                    elif budget.expired():
                        row["status"] = "skipped (time budget)"
                    else:
                        C.free_memory(device)
                        with C.stock_guard():
                            status, m = C.run_guarded(
                                lambda: _measure(c, spec, args.seed, heads, device, dtype, args, ref),
                                f"kernel {cname} {model} S={seq} {spec.label}",
                            )
                        row["status"] = status
                        if m:
                            row.update(m)
                            if m["ms"] and not m["fwd_only"]:
                                row["tflops"] = flops_fb / (m["ms"] * 1e-3) / 1e12
                            if m["fwd_only"]:
                                row["status"] = "ok (fwd only)"
                    C.log(
                        f"  {c.label:<24} {row['status']:<10} ms={C.fmt(row.get('ms'), 2)} "
                        f"TFLOP/s={C.fmt(row.get('tflops'), 1)} peak+={C.fmt(row.get('peak_extra_mib'), 0)}MiB "
                        f"err_out={C.fmt(row.get('err_out'), 4)} err_grad={C.fmt(row.get('err_grad'), 4)}"
                    )
                    res.rows.append(row)
                    if getattr(args, "on_row", None):
                        args.on_row(res)
                ref = None
                C.free_memory(device)
    res.table = table(res.rows)
    return res


def table(rows: list[dict]) -> str:
    headers = [
        "model (heads)",
        "S",
        "mask",
        "contender",
        "status",
        "fwd+bwd ms",
        "TFLOP/s",
        "vs HF eager",
        "vs HF flex",
        "peak extra MiB",
        "mask ms",
        "err out",
        "err grad",
    ]
    out = []
    keyf = ("model", "seq", "mask")
    for r in rows:
        ok = r.get("status") == "ok"
        out.append(
            [
                f"{r['model']} ({r['heads']})",
                r["seq"],
                r["mask"],
                r.get("label", r["contender"]),
                r["status"],
                C.fmt(r.get("ms"), 2),
                C.fmt(r.get("tflops"), 1),
                C.fmt_ratio(C.ratio(r, rows, keyf, "ms", "hf-eager", False)) if ok else "-",
                C.fmt_ratio(C.ratio(r, rows, keyf, "ms", "hf-flex", False)) if ok else "-",
                C.fmt(r.get("peak_extra_mib"), 0),
                C.fmt(r.get("mask_ms"), 2),
                C.fmt(r.get("err_out"), 4),
                C.fmt(r.get("err_grad"), 4),
            ]
        )
    return C.markdown_table(headers, out)
