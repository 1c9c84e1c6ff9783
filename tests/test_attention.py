"""The attention core against a float64 reference, for every backend that runs on CPU."""

import pytest
import torch

from conftest import reference_attention, relative_error
import fastgemma.attention as attention
from fastgemma import fast_tanh
from fastgemma.attention import (
    FLEX_KERNEL_OPTIONS,
    check_kernel_options,
    check_softcap_tanh,
    flex_head_dim_ok,
    resolve_backend,
    resolve_softcap_tanh,
    softcap_attention,
    tuned_flex_kernel_options,
)
from fastgemma.masks import DENSE_UNIFORM, AttentionMask

FP32_TOLERANCE = 1e-4  # float32 against float64; inputs are fresh each run (hash-seeded), and 1e-5 was once exceeded (1.7e-5)


def random_qkv(heads, kv_heads, length, head_dim, seed, batch=1):
    generator = torch.Generator().manual_seed(seed)
    # large enough that many scores sit in the softcap's curved region
    query = torch.randn(batch, heads, length, head_dim, generator=generator) * 3
    key = torch.randn(batch, kv_heads, length, head_dim, generator=generator) * 3
    value = torch.randn(batch, kv_heads, length, head_dim, generator=generator)
    return [t.requires_grad_() for t in (query, key, value)]


def packed_segments(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]


def padded_rows(length, rows):
    """(len(rows), length) real-token flags; each row a list of padded (start, stop) ranges."""
    real = torch.ones(len(rows), length, dtype=torch.bool)
    for row, ranges in enumerate(rows):
        for start, stop in ranges:
            real[row, start:stop] = False
    return real


CASES = {
    "causal-gqa2": dict(heads=4, kv_heads=2, length=200, head_dim=32, window=None, segments=None),
    "sliding-gqa4": dict(heads=8, kv_heads=2, length=300, head_dim=16, window=77, segments=None),
    "packed-sliding": dict(heads=4, kv_heads=1, length=260, head_dim=32, window=50, segments=[100, 30, 130]),
    "left-padded": dict(heads=4, kv_heads=2, length=140, head_dim=16, window=None, padding=[[(0, 13)], [(0, 70)]]),
    # right padding past the window, and a row of padding only: queries with no real key in reach
    "right-padded-sliding": dict(heads=4, kv_heads=2, length=150, head_dim=16, window=40,
                                 padding=[[(90, 150)], [(0, 150)], []]),
    "holes-packed-sliding": dict(heads=8, kv_heads=2, length=300, head_dim=16, window=50, segments=[120, 180],
                                 padding=[[(0, 5), (60, 130), (250, 300)]]),
}


def build(case, seed):
    spec = CASES[case]
    padding = spec.get("padding")
    batch = 1 if padding is None else len(padding)
    tensors = random_qkv(spec["heads"], spec["kv_heads"], spec["length"], spec["head_dim"], seed, batch=batch)
    segments = None if spec.get("segments") is None else packed_segments(spec["segments"])
    real = None if padding is None else padded_rows(spec["length"], padding)
    mask = AttentionMask(spec["length"], spec["length"], window=spec["window"], segment_ids=segments, real_tokens=real)
    return tensors, mask, spec["head_dim"] ** -0.5


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_match_float64(case, backend):
    (query, key, value), mask, scale = build(case, seed=hash(case) % 1000)
    out = softcap_attention(query, key, value, mask, scale=scale, softcap=50.0, backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    leaves = [t.detach().double().requires_grad_() for t in (query, key, value)]
    expected = reference_attention(*leaves, mask.dense("cpu"), scale, 50.0)
    expected.backward(grad_out.double())
    assert not torch.isnan(out).any()
    assert relative_error(out, expected) < FP32_TOLERANCE
    for tensor, leaf in zip((query, key, value), leaves):
        assert relative_error(tensor.grad, leaf.grad) < 1e-4
    if mask.real_tokens is not None:  # the case has queries with no real key: their rows, alone, match too
        uniform = (mask.dense("cpu") == DENSE_UNIFORM).all(-1)[:, 0]  # (B, Q)
        assert uniform.any()
        assert relative_error(out.transpose(1, 2)[uniform], expected.transpose(1, 2)[uniform]) < FP32_TOLERANCE


@pytest.mark.parametrize("case", list(CASES))
def test_flex_forward_on_cpu_matches_float64(case):
    (query, key, value), mask, scale = build(case, seed=7)
    with torch.no_grad():
        out = softcap_attention(query, key, value, mask, scale=scale, softcap=50.0, backend="flex")
    expected = reference_attention(query.double(), key.double(), value.double(), mask.dense("cpu"), scale, 50.0)
    assert not torch.isnan(out).any()
    assert relative_error(out, expected) < FP32_TOLERANCE


def test_flex_takes_other_softcaps_and_lengths_in_one_process():
    """Softcaps that change between calls, then another length: torch (2.15) would trace the softcap as a symbolic
    float, which flex_attention refuses."""
    for length, softcap in ((40, 50.0), (40, 30.0), (72, 50.0), (56, 20.0)):
        (query, key, value) = [t.detach() for t in random_qkv(4, 2, length, 16, seed=length)]
        mask = AttentionMask(length, length, window=24)
        with torch.no_grad():
            out = softcap_attention(query, key, value, mask, scale=0.25, softcap=softcap, backend="flex")
        expected = reference_attention(query.double(), key.double(), value.double(), mask.dense("cpu"), 0.25, softcap)
        assert relative_error(out, expected) < FP32_TOLERANCE


def test_flex_takes_inputs_padded_to_its_length_and_only_flex_does():
    """Query, key and value padded with zero rows to the mask's padded_length (as fused RoPE writes them): flex
    returns the mask's q_len queries, the same as from unpadded inputs; a dense backend refuses them."""
    (query, key, value) = [t.detach() for t in random_qkv(4, 2, 40, 16, seed=11)]
    mask = AttentionMask(40, 40, window=24)
    padded = [torch.nn.functional.pad(t, (0, 0, 0, mask.padded_length - 40)) for t in (query, key, value)]
    assert attention.flex_padded_length(mask, "flex", query.device, 16) == mask.padded_length > 40
    assert attention.flex_padded_length(mask, "compiled", query.device, 16) is None
    assert attention.flex_padded_length(torch.ones(1, 1, 40, 40, dtype=torch.bool), "flex", query.device, 16) is None
    with torch.no_grad():
        out = softcap_attention(*padded, mask, scale=0.25, softcap=50.0, backend="flex")
        assert torch.equal(out, softcap_attention(query, key, value, mask, scale=0.25, softcap=50.0, backend="flex"))
        with pytest.raises(ValueError, match="mask built for 40 queries / 40 keys, got 128 / 128"):
            softcap_attention(*padded, mask, scale=0.25, softcap=50.0, backend="eager")


def test_dense_mask_from_the_caller_for_decoding():
    """Queries after cached keys: the caller's additive mask is honoured; without one, every key is seen."""
    (query, key, value) = [t.detach() for t in random_qkv(4, 2, 40, 16, seed=3)]
    query = query[:, :, -1:]  # one new token over 40 keys
    allowed = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    allowed[..., :5] = False
    additive = torch.zeros(1, 1, 1, 40).masked_fill(~allowed, torch.finfo(torch.float32).min)
    expected = reference_attention(query, key, value, allowed, 0.25, 50.0)
    for mask in (allowed, additive):
        out = softcap_attention(query, key, value, mask, scale=0.25, softcap=50.0)
        assert relative_error(out, expected) < FP32_TOLERANCE
    everything = reference_attention(query, key, value, torch.ones_like(allowed), 0.25, 50.0)
    assert relative_error(softcap_attention(query, key, value, None, scale=0.25, softcap=50.0), everything) < 1e-5


def test_fully_masked_rows_give_no_nan():
    query, key, value = random_qkv(2, 2, 20, 16, seed=1)
    mask = AttentionMask(20, 20, real_tokens=torch.zeros(1, 20, dtype=torch.bool))
    for backend in ("eager", "compiled"):
        out = softcap_attention(query, key, value, mask, scale=0.25, softcap=50.0, backend=backend)
        out.sum().backward()
        assert not torch.isnan(out).any() and not torch.isnan(query.grad).any()
    with torch.no_grad():
        assert not torch.isnan(softcap_attention(query, key, value, mask, scale=0.25, softcap=50.0, backend="flex")).any()


def test_returned_weights_are_what_multiplies_the_values_and_get_its_gradient():
    """With dropout too: the output is the returned weights times V (per key head), and a gradient retained
    on the weights is d(loss)/d(weights) = grad_out · Vᵀ."""
    query, key, value = random_qkv(4, 2, 20, 16, seed=3)
    mask = AttentionMask(20, 20, window=8).dense(query.device)
    torch.manual_seed(0)
    out, weights = attention.dense_softcap_attention(query, key, value, mask, 0.25, 50.0, dropout_p=0.3,
                                                     return_weights=True)
    assert weights.shape == (1, 4, 20, 20) and (weights == 0).any()
    repeated = value.repeat_interleave(2, dim=1)
    assert relative_error(out, weights @ repeated) < 1e-6
    weights.retain_grad()
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert relative_error(weights.grad, grad_out @ repeated.transpose(-1, -2)) < 1e-6


def _transposed_qkv(seed):
    """Query, key and value as the attention layers hand them over (transposed views), whose compiled
    backward overwrites a saved tensor when it may (donated buffers)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 20, heads, 16, generator=generator).transpose(1, 2) * 3 for heads in (4, 2, 2)]


def _grads_after_backwards(fn, qkv, mask, times):
    inputs = [t.detach().clone().requires_grad_() for t in qkv]
    out = fn(*inputs, mask, 0.25, 50.0)
    for i in range(times):
        out.backward(torch.ones_like(out), retain_graph=i < times - 1)
    return [t.grad for t in inputs]


def test_compiled_backward_runs_again_through_a_retained_graph_whatever_the_caches_hold():
    """backward(retain_graph=True) twice through the compiled dense attention gives the eager gradients twice,
    also when torch's compile caches hold this graph's backward compiled with donated buffers (here by a
    stock torch.compile; another process or an older fastgemma leaves the same): torch keys a backward
    without its donations, so one compiled without them must not share keys with one compiled with them."""
    from fastgemma.ops.compile import compile_function

    qkv, mask = _transposed_qkv(seed=5), AttentionMask(20, 20, window=8).dense("cpu")
    torch._dynamo.reset()
    _grads_after_backwards(torch.compile(attention.dense_softcap_attention, dynamic=True), qkv, mask, 1)
    torch._dynamo.reset()
    ours = compile_function(attention.dense_softcap_attention, dynamic=True)
    _grads_after_backwards(ours, qkv, mask, 1)  # a plain backward compiles the backward the next one reuses
    expected = _grads_after_backwards(attention.dense_softcap_attention, qkv, mask, 2)
    for got, want in zip(_grads_after_backwards(ours, qkv, mask, 2), expected):
        assert relative_error(got, want) < 1e-5
    # create_graph=True: first-order gradients as eager's; differentiating them again is torch's one-line refusal
    inputs = [t.detach().clone().requires_grad_() for t in qkv]
    out = ours(*inputs, mask, 0.25, 50.0)
    got = torch.autograd.grad(out, inputs, torch.ones_like(out), create_graph=True)
    assert all(relative_error(g, w / 2) < 1e-5 for g, w in zip(got, expected))
    # (torch 2.11 refuses earlier: its compiled backward returns gradients without a grad_fn)
    with pytest.raises(RuntimeError, match="does not currently support double backward|does not have a grad_fn"):
        sum(g.square().sum() for g in got).backward()
    torch._dynamo.reset()


def test_auto_backend_choice_on_cpu():
    query, key, _ = random_qkv(2, 2, 8, 16, seed=0)
    mask = AttentionMask(8, 8)
    assert resolve_backend("auto", query, key, mask) == "compiled"
    assert resolve_backend("auto", query, key, torch.ones(1, 1, 8, 8, dtype=torch.bool)) == "eager"
    assert resolve_backend("auto", query, key, mask, dropout_p=0.1) == "eager"
    assert flex_head_dim_ok(128) and flex_head_dim_ok(256) and not flex_head_dim_ok(24) and not flex_head_dim_ok(8)


def test_clear_errors():
    query, key, value = random_qkv(2, 2, 8, 16, seed=0)
    mask = AttentionMask(8, 8)
    with pytest.raises(ValueError, match="unknown attention backend"):
        softcap_attention(query, key, value, mask, scale=1.0, softcap=50.0, backend="sdpa")
    with pytest.raises(NotImplementedError, match="no CPU backward"):
        softcap_attention(query, key, value, mask, scale=1.0, softcap=50.0, backend="flex")
    with pytest.raises(ValueError, match="multiple of key heads"):
        softcap_attention(query, key[:, :1].expand(1, 1, 8, 16)[:, :, :, :16].repeat(1, 3, 1, 1), value, mask,
                          scale=1.0, softcap=50.0)
    with pytest.raises(ValueError, match="built for 9 queries"):
        softcap_attention(query, key, value, AttentionMask(9, 9), scale=1.0, softcap=50.0, backend="eager")


class _QueryOn:
    """Stands in for a query tensor on a device this machine may not have."""

    def __init__(self, device, head_dim, dtype=torch.bfloat16):
        self.device, self.shape, self.dtype = torch.device(device), (1, 8, 128, head_dim), dtype


HOPPER_256 = {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 2, "fwd_num_warps": 8, "bwd_num_warps": 8}


@pytest.mark.parametrize("capability,head_dim,dtype,expected", [
    ((9, 0), 256, torch.bfloat16, HOPPER_256),
    ((9, 0), 256, torch.float16, HOPPER_256),
    ((9, 0), 128, torch.bfloat16, None),  # torch's choice measured as fast
    ((9, 0), 256, torch.float32, None),
    ((8, 0), 256, torch.bfloat16, None),  # A100: torch's own table
    ((8, 6), 256, torch.bfloat16, FLEX_KERNEL_OPTIONS[("99KB", 256)]),  # 99 KB of shared memory per block
    ((8, 9), 128, torch.bfloat16, FLEX_KERNEL_OPTIONS[("99KB", 128)]),
    ((12, 0), 256, torch.bfloat16, FLEX_KERNEL_OPTIONS[("99KB", 256)]),
    ((8, 9), 64, torch.bfloat16, None),
    ((10, 0), 256, torch.bfloat16, None),
])
def test_tuned_flex_kernel_options_by_gpu_and_head_dim(monkeypatch, capability, head_dim, dtype, expected):
    from fastgemma import attention

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(attention, "_CUDA_CAPABILITIES", {})  # the driver is asked once per device, then cached
    assert tuned_flex_kernel_options(_QueryOn("cuda", head_dim, dtype)) == expected
    assert tuned_flex_kernel_options(_QueryOn("cpu", head_dim, dtype)) is None
    monkeypatch.setattr(torch.version, "hip", "6.4")  # ROCm reports its own "capabilities": torch's choice
    assert tuned_flex_kernel_options(_QueryOn("cuda", head_dim, dtype)) is None


@pytest.mark.parametrize("entry", list(FLEX_KERNEL_OPTIONS))
def test_tuned_flex_kernel_options_obey_the_kernels_rules(entry):
    options = FLEX_KERNEL_OPTIONS[entry]
    known = {f"{d}_{k}" for d in ("fwd", "bwd") for k in ("num_warps", "num_stages")}
    known |= {"fwd_BLOCK_M", "fwd_BLOCK_N", "bwd_BLOCK_M1", "bwd_BLOCK_N1", "bwd_BLOCK_M2", "bwd_BLOCK_N2"}
    assert set(options) <= known
    blocks = {k: v for k, v in options.items() if "BLOCK" in k}
    assert all(128 % v == 0 for v in blocks.values())  # the block mask's sparse block is 128
    if "bwd_BLOCK_M1" in blocks:
        assert blocks["bwd_BLOCK_N1"] % blocks["bwd_BLOCK_M1"] == 0
        assert blocks["bwd_BLOCK_M2"] % blocks["bwd_BLOCK_N2"] == 0


def test_kernel_options_are_checked():
    assert check_kernel_options("auto") == "auto" and check_kernel_options(None) is None
    assert check_kernel_options({"bwd_num_warps": 8}) == {"bwd_num_warps": 8}
    for bad in ("fast", 8, {8: 8}, ["bwd_num_warps"]):
        with pytest.raises(ValueError, match="flex_kernel_options must be"):
            check_kernel_options(bad)
    query, key, value = random_qkv(2, 2, 8, 16, seed=0)
    with pytest.raises(ValueError, match="flex_kernel_options must be"):
        softcap_attention(query, key, value, AttentionMask(8, 8), scale=1.0, softcap=50.0, kernel_options="fast")


def test_full_length_batches_reach_flex_in_the_padded_layout():
    """A batch that fills the padded length exactly must not change the strides flex sees
    (a stride change recompiles the static-shape kernel: seen as a 28 s step at 64K tokens)."""
    from fastgemma.attention import _pad_length

    transposed = torch.randn(1, 256, 8, 64).transpose(1, 2)  # (B, H, S, D) view, as the layers pass it
    padded = _pad_length(transposed[:, :, :200], 256)
    full = _pad_length(transposed, 256)
    assert full.shape == padded.shape and full.stride() == padded.stride()
    assert torch.equal(full, transposed) and torch.equal(padded[:, :, :200], transposed[:, :, :200])


# --------------------------------------------------------------------------------------
# softcap_tanh: approximate tanh on NVIDIA flex only, exact everywhere else
# --------------------------------------------------------------------------------------
def test_softcap_tanh_is_checked():
    for good in ("auto", "exact", "approx"):
        assert check_softcap_tanh(good) == good
    query, key, value = random_qkv(2, 2, 8, 16, seed=0)
    for bad in ("fast", "APPROX", None, True, 1):
        with pytest.raises(ValueError, match="softcap_tanh must be 'auto', 'exact' or 'approx'"):
            check_softcap_tanh(bad)
        with pytest.raises(ValueError, match="softcap_tanh must be"):
            softcap_attention(query, key, value, AttentionMask(8, 8), scale=1.0, softcap=50.0, softcap_tanh=bad)


def test_resolve_softcap_tanh(monkeypatch):
    for choice in ("auto", "exact", "approx"):
        assert resolve_softcap_tanh(choice, torch.device("cpu")) == "exact"
    monkeypatch.setattr(fast_tanh, "register", lambda: True)
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert resolve_softcap_tanh("approx", cuda) == "approx"
    assert resolve_softcap_tanh("exact", cuda) == "exact"
    assert resolve_softcap_tanh("auto", cuda) == attention.AUTO_SOFTCAP_TANH
    monkeypatch.setattr(attention, "AUTO_SOFTCAP_TANH", "exact")  # the switch the GPU check may flip
    assert resolve_softcap_tanh("auto", cuda) == "exact"
    monkeypatch.setattr(torch.version, "hip", "6.4")  # no PTX on AMD GPUs
    assert resolve_softcap_tanh("approx", cuda) == "exact"
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(fast_tanh, "register", lambda: False)  # a torch without the APIs
    assert resolve_softcap_tanh("approx", cuda) == "exact"


@pytest.mark.parametrize("backend", ["eager", "compiled", "flex"])
def test_cpu_softcap_is_exact_whatever_is_asked(monkeypatch, backend):
    asked = []
    original = attention.tanh_softcap
    monkeypatch.setattr(attention, "tanh_softcap", lambda cap, approx=False: asked.append(approx) or original(cap, approx))
    (query, key, value), mask, scale = build("packed-sliding", seed=5)
    with torch.no_grad():
        outs = {choice: softcap_attention(query, key, value, mask, scale=scale, softcap=50.0, backend=backend,
                                          softcap_tanh=choice) for choice in ("approx", "exact", "auto")}
    assert torch.equal(outs["approx"], outs["exact"]) and torch.equal(outs["auto"], outs["exact"])
    assert not any(asked)


def test_tanh_approx_op_on_cpu_is_tanh_with_the_derivative_of_its_output():
    assert fast_tanh.register()
    x = torch.linspace(-30, 30, 301, dtype=torch.float64, requires_grad=True)
    t = fast_tanh.tanh_approx(x)
    assert torch.equal(t, torch.tanh(x))
    t.backward(torch.ones_like(t))
    assert torch.allclose(x.grad, 1 - t.detach() ** 2)
    assert torch.func.vmap(fast_tanh.tanh_approx)(x.detach().view(7, 43)).shape == (7, 43)


def test_flex_backward_of_the_approximate_softcap_uses_the_values_it_produced():
    """flex_attention derives a score function's backward from its joint graph: with the approximate
    tanh, the gradient must be built from that op's own output t (1 - t²), never from an exact tanh."""
    flex_hop = pytest.importorskip("torch._higher_order_ops.flex_attention")
    assert fast_tanh.register()
    score_mod = attention.tanh_softcap(50.0, approx=True)
    index = [torch.zeros((), requires_grad=True)] + [torch.zeros((), dtype=torch.int32) for _ in range(4)]
    _, joint = flex_hop.create_fw_bw_graph(score_mod, tuple(index), ())
    calls = [node for node in joint.graph.nodes if node.op == "call_function"]
    approx = [node for node in calls if node.target == torch.ops.fastgemma.tanh_approx.default]
    assert len(approx) == 1 and not any("tanh" in str(node.target) for node in calls if node not in approx)
    # 1 - t*t from t itself (detach and alias nodes are the same tensor)
    squares = [node for node in calls if node.target == torch.ops.aten.mul.Tensor and len(set(node.args)) == 1]
    assert squares
    source = squares[0].args[0]
    while source.target in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
        source = source.args[0]
    assert source is approx[0]
    grads = joint(torch.tensor(30.0), *index[1:], torch.tensor(1.0))
    assert torch.allclose(grads[0], 1 - torch.tanh(torch.tensor(0.6)) ** 2)


def test_tanh_approx_compiles_to_exact_tanh_off_nvidia():
    from torch._inductor.utils import run_and_get_code

    assert fast_tanh.register()
    compiled = torch.compile(lambda x: 3.0 * fast_tanh.tanh_approx(x / 3.0))
    x = torch.randn(1000) * 20
    out, code = run_and_get_code(compiled, x)
    assert torch.allclose(out, 3.0 * torch.tanh(x / 3.0), atol=1e-6, rtol=0)
    assert "fastgemma" not in "\n".join(code)  # lowered into the fused kernel, not called as an eager op


def test_tanh_approx_lowers_to_the_ptx_instruction_on_nvidia(monkeypatch):
    """Inductor's CPU backend has no inline assembly: it refusing the op proves the lowering emits it."""
    assert fast_tanh.register()
    monkeypatch.setattr(fast_tanh, "is_nvidia", lambda device: True)
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(fx_graph_cache=False):  # a cached graph would skip the lowering
            compiled = torch.compile(lambda x: fast_tanh.tanh_approx(x) + 1.0)
            with pytest.raises(Exception, match="inline_asm_elementwise"):
                compiled(torch.randn(64))
    finally:
        torch._dynamo.reset()


def test_importing_fastgemma_registers_nothing():
    import subprocess
    import sys

    code = ("import sys, torch, fastgemma\n"
            "assert 'torch._inductor.lowering' not in sys.modules\n"
            "assert not hasattr(torch.ops.fastgemma, 'tanh_approx')\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_kind_of_score_function_has_its_own_compiled_flex_entry():
    """torch 2.11 reused a flex kernel compiled for the approximate tanh when exact was asked for next
    (tests/test_gpu.py::test_exact_softcap_tanh_is_the_previous_path): torch.compile caches per code
    object, so each score-function key must get its own code object, and the same key the same entry."""
    from fastgemma import attention

    keys = [("softcap", 50.0, True), ("softcap", 50.0, False), ("softcap", 30.0, False), None]
    entries = [attention._compiled_flex(key) for key in keys]
    codes = {entry._torchdynamo_orig_callable.__code__ for entry in entries}
    assert len(codes) == len(keys)
    assert attention._compiled_flex(("softcap", 50.0, False)) is entries[1]


# --------------------------------------------------------------------------------------
# FlashAttention 4 under flex_attention: which calls get it (the kernels themselves: tests/test_gpu.py)
# --------------------------------------------------------------------------------------
@pytest.fixture
def hopper(monkeypatch):
    """This machine poses as an H100/H200 for the kernel choice; `set_flash(bool)` says whether FA4 imports."""
    from fastgemma import attention

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(attention, "_CUDA_CAPABILITIES", {})

    def set_flash(available):
        monkeypatch.setattr(attention, "flash_attention_4_available", lambda: available)

    return set_flash


@pytest.mark.parametrize("head_dim", [128, 256])
def test_auto_kernels_stay_triton_with_flash_attention_4_installed(hopper, head_dim):
    """FLASH measured slower for packed documents and 2K tokens: "auto" never switches to it."""
    from fastgemma.attention import flex_kernel_options_for

    hopper(True)
    query = _QueryOn("cuda", head_dim)
    assert flex_kernel_options_for("auto", query) == tuned_flex_kernel_options(query)


def test_flash_kernels_on_request_need_flash_attention_4(hopper):
    from fastgemma.attention import FLASH_OPTIONS, flex_kernel_options_for

    assert check_kernel_options("experimental-flash") == "experimental-flash"
    with pytest.raises(ValueError, match="flex_kernel_options must be 'auto', 'experimental-flash'"):
        check_kernel_options("flash")  # patch_model maps this former name, with a DeprecationWarning
    hopper(False)
    with pytest.raises(ImportError, match="pip install flash-attn-4"):
        flex_kernel_options_for("experimental-flash", _QueryOn("cuda", 256))
    hopper(True)
    assert flex_kernel_options_for("experimental-flash", _QueryOn("cuda", 256)) == FLASH_OPTIONS
    assert flex_kernel_options_for({"bwd_num_warps": 4}, _QueryOn("cuda", 128)) == {"bwd_num_warps": 4}
    assert flex_kernel_options_for(None, _QueryOn("cuda", 128)) is None


class _MaskStandIn:
    """Hands out labelled block masks, recording the key-block width asked for."""

    def block_mask(self, device, kv_block=None):
        return f"block mask, kv_block={kv_block}"

    def flex_inputs(self, device):
        return {}


@pytest.mark.parametrize("choice,head_dim,kv_block", [("experimental-flash", 128, None), ("experimental-flash", 256, 64),
                                                      ("auto", 256, None)])
def test_flash_calls_get_a_mask_its_tiles_divide(monkeypatch, hopper, choice, head_dim, kv_block):
    from fastgemma import attention

    hopper(True)
    calls = []
    monkeypatch.setattr(attention, "flex_softcap_attention",
                        lambda q, k, v, block_mask, scale, softcap, **kw: calls.append((block_mask, kw)) or "out")
    query = _QueryOn("cuda", head_dim)
    assert attention._flex_on_gpu(query, None, None, _MaskStandIn(), 1.0, 50.0, choice, "auto") == "out"
    options = attention.FLASH_OPTIONS if choice == "experimental-flash" else tuned_flex_kernel_options(query)
    assert calls == [(f"block mask, kv_block={kv_block}",
                      {"kernel_options": options, "softcap_tanh": "auto", "query_ids": None, "length": None})]
    assert attention.uses_flash(attention.FLASH_OPTIONS) and not attention.uses_flash({"bwd_num_warps": 8})


def test_padded_batches_keep_triton_kernels_when_flash_is_asked_for(monkeypatch, hopper):
    """A padded batch's score function (uniform rows) is checked on Triton's kernels only: it keeps them."""
    from fastgemma import attention

    class PaddedStandIn(_MaskStandIn):
        def flex_inputs(self, device):
            return {"query_ids": "query ids", "key_ids": "key ids"}

    hopper(True)
    calls = []
    monkeypatch.setattr(attention, "flex_softcap_attention",
                        lambda q, k, v, block_mask, scale, softcap, **kw: calls.append((block_mask, kw)) or "out")
    query = _QueryOn("cuda", 256)
    attention._flex_on_gpu(query, None, None, PaddedStandIn(), 1.0, 50.0, "experimental-flash", "auto")
    assert calls == [("block mask, kv_block=None", {"kernel_options": tuned_flex_kernel_options(query),
                                                    "softcap_tanh": "auto", "query_ids": "query ids",
                                                    "length": None})]


def test_flash_kernels_get_torch_tanh_in_their_score_function(monkeypatch):
    """The approximate tanh is a Triton-only op: FLASH calls get the exact score function and a compiled
    entry of their own, Triton calls keep the approximate one where it is asked for."""
    from fastgemma import attention
    from fastgemma.masks import AttentionMask

    monkeypatch.setattr(attention, "resolve_softcap_tanh", lambda choice, device: "approx")
    monkeypatch.setattr(attention.fast_tanh, "tanh_approx", lambda x: x)  # never run here
    entries = []

    def compiled_flex(score_key=None, kernels="triton"):
        def call(query, key, value, score_mod=None, **kwargs):
            entries.append((score_key, kernels, score_mod.__name__))
            return query
        return call

    monkeypatch.setattr(attention, "_compiled_flex", compiled_flex)
    query, key, value = random_qkv(1, 1, 8, 16, seed=0)
    block_mask = AttentionMask(8, 8).block_mask("cpu")
    for options in (attention.FLASH_OPTIONS, {"bwd_num_warps": 8}):
        attention.flex_softcap_attention(query, key, value, block_mask, 1.0, 50.0, kernel_options=options)
    assert entries == [(("softcap", 50.0, False), "flash", "softcap"),
                       (("softcap", 50.0, True), "triton", "softcap_approx")]


def test_the_float64_reference_of_long_rows_goes_one_checkpointed_head_at_a_time(monkeypatch):
    """The GPU tests' 8,192-token references take the per-head path: it must give what every head at once gives,
    forward and backward."""
    import conftest

    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, heads, 40, 8, generator=generator) * 3 for heads in (4, 2, 2))
    grad_out = torch.randn(1, 4, 40, 8, generator=generator)
    allowed = AttentionMask(40, 40, window=16).dense(torch.device("cpu"))
    results = []
    for whole in (conftest.REFERENCE_WHOLE_SCORES, 0):  # every head at once; then one head at a time
        monkeypatch.setattr(conftest, "REFERENCE_WHOLE_SCORES", whole)
        leaves = [t.double().requires_grad_() for t in (q, k, v)]
        out = reference_attention(*leaves, allowed, 8**-0.5, 50.0)
        out.backward(grad_out.double())
        results.append((out.detach(), [leaf.grad for leaf in leaves]))
    (whole_out, whole_grads), (per_head_out, per_head_grads) = results
    assert relative_error(per_head_out, whole_out) < 1e-12
    for grad, expected in zip(per_head_grads, whole_grads):
        assert relative_error(grad, expected) < 1e-12
