"""Diagnose: does softcap_tanh="exact" compute differently after approx calls in one process?

Ran on an H100 against 3d2c431, before the fix (python3 benchmarks/.../softcap_order.py approx-first|fresh-first;
FG_SEPARATE=1 tried the fix by hand). Kept as the record of the diagnosis in benchmarks/RESULTS.md.
"""
import json, os, sys
import torch
sys.path.insert(0, "tests")
from conftest import reference_attention, relative_error
from test_gpu import random_documents, run_fwd_bwd
from fastgemma import attention
from fastgemma.attention import softcap_attention
from fastgemma.masks import AttentionMask

dev = torch.device("cuda")
report = {}

def failing_case(window=300):
    g = torch.Generator().manual_seed(256)
    length = 1024
    tensors = [(torch.randn(1, n, length, 256, generator=g) * 3).to(dev, torch.bfloat16) for n in (8, 4, 4)]
    grad_out = torch.randn(1, 8, length, 256, generator=g).to(dev, torch.bfloat16)
    segs = random_documents(length, g, 50, 600).to(dev)
    return tensors, grad_out, segs

def exact_and_previous(tag):
    print("=== START", tag, flush=True)
    tensors, grad_out, segs = failing_case()
    mask = AttentionMask(1024, 1024, window=300, segment_ids=segs)
    bm = mask.block_mask(dev)
    opts = attention.tuned_flex_kernel_options(tensors[0])
    def prev_sc(score, b, h, q, k):
        return 50.0 * torch.tanh(score / 50.0)
    prev = run_fwd_bwd(lambda q, k, v: attention._compiled_flex()(q, k, v, score_mod=prev_sc, block_mask=bm,
                       scale=256**-0.5, enable_gqa=True, kernel_options=opts), tensors, grad_out)
    ex = run_fwd_bwd(lambda q, k, v: softcap_attention(q, k, v, mask, scale=256**-0.5, softcap=50.0, backend="flex",
                     softcap_tanh="exact"), tensors, grad_out)
    refs = {}
    for w in (300, 256):
        allowed = AttentionMask(1024, 1024, window=w, segment_ids=segs).dense(dev)
        leaves = [t.detach().double().requires_grad_() for t in tensors]
        r = reference_attention(*leaves, allowed, 256**-0.5, 50.0)
        r.backward(grad_out.double())
        refs[w] = [r.detach()] + [t.grad for t in leaves]
    names = ("out", "dq", "dk", "dv")
    report[tag] = {n: {"exact_vs_prev": relative_error(ex[i], prev[i]),
                       "exact_vs_f64_w300": relative_error(ex[i], refs[300][i]),
                       "exact_vs_f64_w256": relative_error(ex[i], refs[256][i]),
                       "prev_vs_f64_w300": relative_error(prev[i], refs[300][i])} for i, n in enumerate(names)}
    from torch._dynamo.utils import counters
    report[tag]["counters"] = {k: dict(v) for k, v in counters.items() if k in ("inductor", "aot_autograd")}
    print(tag, json.dumps(report[tag], indent=1), flush=True)
    return ex

def approx_tests():
    for hd, heads, kvh, scalar in [(256, 8, 4, 256), (128, 16, 8, 144)]:
        for kind in ("causal", "sliding", "packed"):
            g = torch.Generator().manual_seed(hd + len(kind))
            length = 1000
            q = (torch.randn(1, heads, length, hd, generator=g) * 10).to(dev, torch.bfloat16)
            k, v = (torch.randn(1, kvh, length, hd, generator=g).to(dev, torch.bfloat16) for _ in range(2))
            go = torch.randn(1, heads, length, hd, generator=g).to(dev, torch.bfloat16)
            segs = random_documents(length, g, low=50, high=400).to(dev) if kind == "packed" else None
            mask = AttentionMask(length, length, window=256 if kind == "sliding" else None, segment_ids=segs)
            for tanh in ("approx", "exact"):
                run_fwd_bwd(lambda a, b, c: softcap_attention(a, b, c, mask, scale=scalar**-0.5, softcap=50.0,
                            backend="flex", softcap_tanh=tanh), (q, k, v), go)

if os.environ.get("FG_SEPARATE"):
    from torch.nn.attention.flex_attention import flex_attention as _fa
    def _flex_approx(*a, **k):
        return _fa(*a, **k)
    def _flex_exact(*a, **k):
        return _fa(*a, **k)
    _c = {True: torch.compile(_flex_approx, dynamic=False), False: torch.compile(_flex_exact, dynamic=False)}
    _orig = attention.tanh_softcap
    import fastgemma.attention as A
    def flex_softcap_attention(query, key, value, block_mask, scale, softcap, compiled=True, kernel_options=None, softcap_tanh="auto"):
        approx = A.resolve_softcap_tanh(softcap_tanh, query.device) == "approx"
        sm = A.tanh_softcap(float(softcap), approx=approx)
        length, padded = query.shape[-2], block_mask.seq_lengths[0]
        query, key, value = (A._pad_length(t, padded) for t in (query, key, value))
        out = _c[approx](query, key, value, score_mod=sm, block_mask=block_mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1], kernel_options=kernel_options)
        return out[:, :, :length]
    A.flex_softcap_attention = flex_softcap_attention
    _prev_compiled = A._compiled_flex
    A._compiled_flex = lambda: _c[False]
order = sys.argv[1] if len(sys.argv) > 1 else "fresh-first"
if order == "fresh-first":
    e0 = exact_and_previous("fresh")
approx_tests()
e1 = exact_and_previous("after_approx")
torch._dynamo.reset()
e2 = exact_and_previous("after_reset")
json.dump(report, open(os.path.join(os.environ.get("OUT", "/tmp"), f"softcap_order_{order}{os.environ.get('FG_TAG', '')}.json"), "w"), indent=1)
