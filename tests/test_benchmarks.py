"""CPU smoke tests of the benchmark harness (benchmarks/): every suite's --tiny configuration on a tiny
Gemma 2, plus the pieces the numbers rest on (exact pair counts, the float64 reference, the chunked loss,
OOM classification, the module guard)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from benchmarks import common as C
from benchmarks import report
from benchmarks import results as R
from benchmarks import run as bench_run
from benchmarks.masks import MaskSpec

CPU = ["--cpu"]


def _results_file_state():
    path = bench_run.DEFAULT_RESULTS
    if not os.path.exists(path):
        return None
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bench_ckpt"))


def _run_suite(suite, tmp_path, *extra):
    """Runs one suite; returns its payload, the markdown section it printed and its raw JSON."""
    results = tmp_path / "results.jsonl"
    js = tmp_path / "raw.json"
    payload = bench_run.main(
        ["--suite", suite, "--tiny", *CPU, "--results", str(results), "--json", str(js), *extra]
    )
    raw = json.loads(js.read_text())
    _check_results_rows(results, suite, raw["suites"][suite]["rows"])
    return payload, payload["sections"][suite], raw


def _check_results_rows(path, suite, harness_rows):
    """One results-file row per harness row, with its provenance, and a report that renders them."""
    rows = R.load(str(path))
    assert [(r["suite"], r["contender"], r["status"]) for r in rows] == [
        (suite, h["contender"], h["status"]) for h in harness_rows]
    for row in rows:
        assert row["date"] and row["commit"] and row["gpu"].startswith("none (CPU")
        assert row["versions"]["torch"] and row["versions"]["transformers"] and " -m benchmarks.run " in row["command"]
    text = report.render(rows)
    headers = sum(line.startswith("|---") for line in text.splitlines())
    assert sum(line.startswith("| ") for line in text.splitlines()) - headers == len(rows)


def _check_header(text, suite, argv_fragment):
    assert f"## {suite} suite" in text
    assert "- GPU:" in text and "- versions: torch" in text and "transformers" in text and "liger-kernel" in text
    assert "- command: `" in text and " -m benchmarks.run " in text
    assert argv_fragment in text


def _table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| model")]


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [1, 7, 64, 130])
def test_pair_counts_are_exact(seq):
    for spec in (
        MaskSpec.make("causal", seq, 16, (3, 20), 0),
        MaskSpec.make("sliding", seq, 16, (3, 20), 0),
        MaskSpec.make("sliding", seq, 200, (3, 20), 0),
        MaskSpec.make("docs", seq, 16, (3, 20), 0),
    ):
        dense = spec.dense_rows(0, seq, torch.device("cpu"))
        assert int(dense.sum()) == spec.pairs(), spec


def test_hf_mask_functions_agree_with_spec():
    from transformers import masking_utils as mu

    for kind in ("causal", "sliding", "docs"):
        spec = MaskSpec.make(kind, 96, 20, (5, 30), 3)
        hf = mu.eager_mask(batch_size=1, q_length=96, kv_length=96, mask_function=spec.hf_mask_function("cpu"),
                           dtype=torch.float32, device="cpu")
        assert torch.equal(hf[0, 0] == 0, spec.dense_rows(0, 96, torch.device("cpu"))), kind


def test_float64_reference_matches_autograd():
    from benchmarks.suite_kernel import make_inputs, reference_group

    heads, seq, scale, cap = (4, 2, 8), 40, 8**-0.5, 5.0  # small cap: the softcap is strongly active
    spec = MaskSpec.make("docs", seq, 16, (5, 15), 1)
    q, k, v, do = make_inputs(0, 7, heads, seq, torch.device("cpu"), torch.float64, 3.0, False)
    out, dq, dk, dv, sl = reference_group(q, k, v, do, spec, scale, cap, kv_head=1, chunk=16)

    qs = q[0, sl].clone().requires_grad_(True)
    ks = k[0, 1].clone().requires_grad_(True)
    vs = v[0, 1].clone().requires_grad_(True)
    s = (qs @ ks.T) * scale
    s = cap * torch.tanh(s / cap)
    s = s.masked_fill(~spec.dense_rows(0, seq, torch.device("cpu")), float("-inf"))
    o = torch.softmax(s, -1) @ vs
    o.backward(do[0, sl])
    torch.testing.assert_close(out, o.detach())
    torch.testing.assert_close(dq, qs.grad)
    torch.testing.assert_close(dk, ks.grad)
    torch.testing.assert_close(dv, vs.grad)


def test_chunked_loss_matches_hf_loss():
    from benchmarks import models as M
    from benchmarks.suite_context import chunked_lm_loss

    model = M.build_random_model("tiny", "hf-eager", torch.device("cpu"), torch.float32, 0, 256)
    ids = torch.randint(C.FIRST_TEXT_TOKEN, 512, (1, 100), generator=torch.Generator().manual_seed(0))
    hf = model(input_ids=ids, labels=ids).loss
    hidden = model.model(input_ids=ids).last_hidden_state
    mine = chunked_lm_loss(hidden, model.lm_head, ids, model.config.final_logit_softcapping, chunk=32)
    torch.testing.assert_close(mine, hf, rtol=1e-5, atol=1e-5)


def test_oom_is_reported_not_raised(capsys):
    def boom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    assert C.run_guarded(boom, "test") == ("OOM", None)
    assert "test: OOM (CUDA out of memory. Tried to allocate 20.00 GiB)" in capsys.readouterr().out

    def wrapped():
        try:
            boom()
        except torch.OutOfMemoryError as e:
            raise RuntimeError("compile failed") from e

    assert C.run_guarded(wrapped, "test")[0] == "OOM"
    status, _ = C.run_guarded(lambda: 1 / 0, "test")
    assert status.startswith("failed (ZeroDivisionError")


def test_module_guard_undoes_module_level_patches():
    import transformers.models.gemma2.modeling_gemma2 as mg

    norm, fwd = mg.Gemma2RMSNorm, mg.Gemma2ForCausalLM.forward
    with C.stock_guard():
        mg.Gemma2RMSNorm = object
        mg.Gemma2ForCausalLM.forward = lambda self: None
        mg._bench_added = 1
    assert mg.Gemma2RMSNorm is norm and mg.Gemma2ForCausalLM.forward is fwd
    assert not hasattr(mg, "_bench_added")


# --------------------------------------------------------------------------------------------------
# Suites, --tiny on CPU
# --------------------------------------------------------------------------------------------------


def test_kernel_suite_tiny(tmp_path):
    payload, text, raw = _run_suite("kernel", tmp_path, "--masks", "causal,sliding,docs")
    _check_header(text, "kernel", "--masks causal,sliding,docs")
    assert "FLOP convention" in text
    rows = raw["suites"]["kernel"]["rows"]
    assert {r["contender"] for r in rows} == {"fastgemma", "hf-eager", "hf-flex"}
    assert {r["mask"].split("(")[0] for r in rows} == {"causal", "sliding", "docs"}
    table = _table_rows(text)
    assert len(table) == len(rows) == 9
    for name in ("fastgemma (eager)", "HF eager", "HF flex_attention"):
        assert sum(name in line for line in table) == 3
    for r in rows:
        assert r["status"].startswith("ok"), r
        assert r["ms"] > 0
        assert r["err_out"] < 1e-4  # fp32 on CPU against the float64 reference
        if r["contender"] != "hf-flex":
            assert r["err_grad"] < 1e-4 and r["tflops"] > 0


def test_model_suite_tiny(tmp_path):
    payload, text, raw = _run_suite("model", tmp_path, "--plot", str(tmp_path / "model.png"))
    _check_header(text, "model", "--suite model --tiny")
    rows = raw["suites"]["model"]["rows"]
    assert [r["contender"] for r in rows] == ["hf-eager"] * 2 + ["hf-flex"] * 2 + ["liger"] * 2 + ["fastgemma"] * 2
    table = _table_rows(text)
    assert len(table) == 8
    for label in ("HF eager", "HF flex_attention", "Liger", "fastgemma"):
        assert any(label in line for line in table)
    by = {(r["contender"], r["seq"]): r for r in rows}
    for seq in (64, 128):
        assert by[("hf-eager", seq)]["status"] == "ok" and by[("fastgemma", seq)]["status"] == "ok"
        assert by[("hf-eager", seq)]["tokens_per_s"] > 0
        assert by[("liger", seq)]["status"].startswith("n/a")
        assert by[("hf-flex", seq)]["status"].startswith("n/a")
        # same weights, same data: the first-step losses agree
        assert abs(by[("fastgemma", seq)]["loss_first"] - by[("hf-eager", seq)]["loss_first"]) < 1e-4
    try:
        import matplotlib  # noqa: F401  (the "bench" extra; not installed by every test environment)
    except ImportError:
        assert not (tmp_path / "model.png").exists()
    else:
        assert (tmp_path / "model.png").stat().st_size > 1000
        assert f"![model suite]({tmp_path / 'model.png'})" in text


def test_trl_suite_tiny(tmp_path, ckpt_dir):
    payload, text, raw = _run_suite("trl", tmp_path, "--ckpt-dir", ckpt_dir, "--steps", "3")
    _check_header(text, "trl", "--steps 3")
    rows = raw["suites"]["trl"]["rows"]
    assert [r["contender"] for r in rows] == ["hf-eager", "hf-flex", "fastgemma"]
    assert len(_table_rows(text)) == 3
    for r in rows:
        if r["contender"] == "hf-flex":
            assert r["status"].startswith("n/a")
            continue
        assert r["status"] == "ok", r
        assert r["steps_done"] == 3
        assert 0 < r["first_step_from_train_s"] <= r["first_step_from_load_s"]
        assert r["tokens_per_s"] > 0
        assert all(0 < t <= 4 * 128 for t in r["tokens_per_step"])
    assert abs(rows[0]["loss_first"] - rows[2]["loss_first"]) < 1e-3


def test_trl_suite_runs_each_contender_under_each_trainer(tmp_path, ckpt_dir):
    payload, text, raw = _run_suite("trl", tmp_path, "--ckpt-dir", ckpt_dir, "--steps", "2",
                                    "--contenders", "hf-eager,fastgemma", "--trl-trainer", "trl,lean")
    rows = raw["suites"]["trl"]["rows"]
    assert [(r["trainer"], r["contender"]) for r in rows] == [
        ("trl", "hf-eager"), ("trl", "fastgemma"), ("lean", "hf-eager"), ("lean", "fastgemma")]
    assert all(r["status"] == "ok" for r in rows), rows
    assert "HF eager [lean trainer]" in text and "lean_trainer" in text
    # the lean trainer trains the same: the same first loss per contender; ratios stay within one trainer
    assert rows[2]["loss_first"] == rows[0]["loss_first"] and rows[3]["loss_first"] == rows[1]["loss_first"]
    assert rows[0]["config"] != rows[2]["config"]


def test_trl_suite_pads_rows_to_a_multiple_and_counts_only_real_tokens(tmp_path, ckpt_dir):
    payload, text, raw = _run_suite("trl", tmp_path, "--ckpt-dir", ckpt_dir, "--steps", "3",
                                    "--contenders", "fastgemma", "--trl-pad-multiple", "96")
    (row,) = raw["suites"]["trl"]["rows"]
    assert row["status"] == "ok" and row["config"].endswith("-pad96")
    assert all(length % 96 == 0 for length in row["row_lengths"])
    assert all(real <= length for real, length in zip(row["tokens_per_step"], row["row_lengths"]))
    assert any(real < length for real, length in zip(row["tokens_per_step"], row["row_lengths"]))
    assert "padded to a multiple of 96 tokens" in text


def test_trl_steady_rate_leaves_out_the_profiled_step_and_rescales_gpu_busy():
    from benchmarks.suite_trl import busy_over_unprofiled, steady_rates

    # warm-up step 0 and the profiled step 3 (slowed by the profiler) stay out of the median
    assert steady_rates([100.0, 900.0, 1100.0, 500.0], warmup=1, profiled=3) == [900.0, 1100.0]
    assert steady_rates([100.0, 900.0], warmup=1, profiled=1) == [900.0]  # nothing else left: keep it
    assert steady_rates([100.0, 900.0, 700.0], warmup=1, profiled=None) == [900.0, 700.0]
    # 0.5 s of kernels for 2,000 tokens while unprofiled steps run 1,000 tokens/s: busy a quarter of the time
    assert busy_over_unprofiled(0.5, 2000, [800.0, 1000.0, 1200.0]) == pytest.approx(0.5 / 2000 * 1000)
    assert busy_over_unprofiled(3.0, 1000, [1000.0]) == 1.0
    assert busy_over_unprofiled(None, 1000, [1000.0]) is None


def test_trl_gpu_busy_follows_the_computed_tokens_of_padded_batches():
    """Unpadded counts would misjudge a padded step's GPU work: a short-real-token profiled step must not make
    the steady steps look busier than they are (it read 100% for Unsloth's unpacked batches)."""
    from types import SimpleNamespace

    from benchmarks.suite_trl import summarize

    # three 1 s steps computing 4,000 padded tokens each; the profiled last one holds only 1,000 real tokens
    # and 0.5 s of kernels: the GPU is busy half of each steady step whatever their real-token counts
    clock = SimpleNamespace(t_begin=0.0, ends=[1.0, 2.0, 3.0], starts=[0.0, 1.0, 2.0, 3.0])
    probe = SimpleNamespace(step=2, busy=0.5, kernel_s=0.5, idle_gaps=None)
    trainer = SimpleNamespace(_bench_tokens=[(3000, 2900, 1000, 4000), (3500, 3400, 1000, 4000),
                                             (1000, 900, 1000, 4000)],
                              state=SimpleNamespace(log_history=[{"loss": 1.0}]))
    row = summarize(clock, probe, trainer, accum=1, warmup=1, t_load0=0.0, t_loaded=0.0, t_trainer=0.0, peak=None)
    assert row["tokens_per_s"] == 3500.0  # real tokens per second, the profiled step left out
    assert row["gpu_busy"] == pytest.approx(0.5)  # not min(1, 0.5 / 1000 * 3500)


def test_trl_step_times_leave_out_the_clocks_own_work_between_steps():
    """The step clock's bookkeeping after a step (reading the recorded graph lengths) is no step's time."""
    from types import SimpleNamespace

    from benchmarks.suite_trl import summarize

    clock = SimpleNamespace(t_begin=0.0, ends=[1.0, 2.5, 3.5], starts=[0.0, 1.5, 2.5, 3.7], graph_lengths=[1, 1, 1])
    probe = SimpleNamespace(step=None, busy=None, kernel_s=None, idle_gaps=None)
    trainer = SimpleNamespace(_bench_tokens=[(1000, 900, 1000, 1000)] * 3,
                              state=SimpleNamespace(log_history=[{"loss": 1.0}]))
    row = summarize(clock, probe, trainer, accum=1, warmup=1, t_load0=0.0, t_loaded=0.0, t_trainer=0.0, peak=None)
    assert row["step_s"] == [1.0, 1.0, 1.0] and row["tokens_per_s"] == 1000.0


def test_idle_gaps_name_the_longest_kernel_free_stretches_and_what_the_host_ran():
    from benchmarks.suite_trl import idle_gaps

    # kernels (µs) on two streams: 0-100 and 50-150 overlap (no gap), then gaps of 350 and 100 µs
    kernels = [(50.0, 150.0), (0.0, 100.0), (500.0, 600.0), (700.0, 800.0)]
    host = [("aten::item", 140.0, 480.0), ("Optimizer.step", 160.0, 200.0), ("collate", 610.0, 690.0),
            ("after", 900.0, 950.0)]
    gaps = idle_gaps(kernels, host, top=5)
    assert [gap["ms"] for gap in gaps] == [0.35, 0.1] and [gap["at_ms"] for gap in gaps] == [0.15, 0.6]
    assert gaps[0]["host"] == ["aten::item (0.33 ms)", "Optimizer.step (0.04 ms)"]
    assert gaps[1]["host"] == ["collate (0.08 ms)"]
    assert idle_gaps([(0.0, 10.0)], host) == [] and idle_gaps([], host) == []


def test_context_suite_tiny_and_default_results_untouched(tmp_path, ckpt_dir, request):
    before = _results_file_state()
    js = tmp_path / "ctx.json"
    payload = bench_run.main(["--suite", "context", "--tiny", *CPU, "--ckpt-dir", ckpt_dir, "--json", str(js)])
    assert _results_file_state() == before  # --tiny never writes benchmarks/results.jsonl by itself
    assert payload["results_file"] and os.path.abspath(payload["results_file"]) != bench_run.DEFAULT_RESULTS
    request.addfinalizer(lambda: shutil.rmtree(os.path.dirname(payload["results_file"]), ignore_errors=True))
    text = payload["sections"]["context"]
    _check_header(text, "context", "--suite context --tiny")
    rows = json.loads(js.read_text())["suites"]["context"]["rows"]
    _check_results_rows(payload["results_file"], "context", rows)
    assert [r["contender"] for r in rows] == ["fastgemma", "hf-eager", "hf-flex"]
    assert len(_table_rows(text)) == 3
    for r in rows[:2]:
        assert r["status"] == "ok" and r["max_ok"] == 256 and r["reached_cap"]
    assert rows[2]["status"].startswith("n/a")

    # the JSON of a GPU run becomes results-file rows here
    out = tmp_path / "from_json.jsonl"
    bench_run.main(["--from-json", str(js), "--results", str(out)])
    _check_results_rows(out, "context", rows)


def test_profile_step_breaks_a_packed_step_down_by_category():
    from benchmarks import profile_step

    result = profile_step.main(["--model", "tiny", "--tokens", "200", "--docs", "3", "--cpu",
                                "--warmup", "1", "--steps", "1", "--top", "5"])
    assert result["total_ms"] > 0
    assert result["categories"]["matmul"] > 0 and "attention" in result["categories"]
    assert profile_step.category("triton_tem_fused_flex_attention_backward_0") == "attention"
    assert profile_step.category("void kgemm_4bit_inference_naive<bf16>") == "4-bit dequant"
    assert profile_step.category("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "compiled elementwise"


@pytest.mark.parametrize("variant,label", [("fastgemma-attn", "fastgemma, attention only"),
                                           ("fastgemma-graphs", "fastgemma, CUDA-graphed layers")])
def test_model_suite_runs_fastgemma_variants_next_to_fastgemma(tmp_path, variant, label):
    """fastgemma-attn (fused_ops=False, to measure the fused ops) and fastgemma-graphs (cuda_graphs=True)
    run next to fastgemma, with the same loss."""
    payload, text, raw = _run_suite("model", tmp_path, "--contenders", f"fastgemma,{variant}", "--seqs", "64")
    rows = {r["contender"]: r for r in raw["suites"]["model"]["rows"]}
    assert rows["fastgemma"]["status"] == rows[variant]["status"] == "ok"
    assert label in text
    assert abs(rows["fastgemma"]["loss_first"] - rows[variant]["loss_first"]) < 1e-4


def test_host_proxy_measures_each_contender_and_refuses_unknown_ones(capsys):
    pytest.importorskip("bitsandbytes")
    from benchmarks import host_proxy

    results = host_proxy.main(["--contenders", "fastgemma,fastgemma-graphs", "--layers", "2", "--hidden", "32",
                               "--tokens", "24", "--warmup", "1", "--steps", "1"])
    assert set(results) == {"fastgemma", "fastgemma-graphs"} and all(ms > 0 for ms in results.values())
    assert "| fastgemma-graphs |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        host_proxy.main(["--contenders", "fastgemma,nonsense"])


def test_tune_flex_reads_option_sets_and_refuses_typos(capsys):
    from benchmarks import tune_flex

    assert tune_flex.parse_options("default") is None
    assert tune_flex.parse_options("bwd_num_warps=8, USE_TMA=True") == {"bwd_num_warps": 8, "USE_TMA": True}
    for text in tune_flex.DEFAULT_OPTIONS:
        tune_flex.parse_options(text)
    with pytest.raises(SystemExit):
        tune_flex.main(["--options", "bwd_num_warps"])
    assert "not KEY=VALUE" in capsys.readouterr().err


def test_scale_suite_tells_an_oom_in_training_from_one_while_loading():
    """The FSDP table said "OOM while loading" for runs that had trained a step: it looked for a line the recipe
    no longer prints. The recipe's LoRA line, as an H200 run logged it, marks the end of loading."""
    from benchmarks import suite_scale

    loaded = ("lora         r=16, alpha=32 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: "
              "114,180,096 trainable parameters (0.42% of 27,341,308,416)\n")
    assert suite_scale.reached_training("Loading weights: 100%\n" + loaded + "CUDA out of memory")
    assert not suite_scale.reached_training("Loading weights:  40%\nCUDA out of memory")
    record = {"status": 3, "oom": True, "reached_training": suite_scale.reached_training(loaded)}
    assert suite_scale.outcome(record) == "OOM in training"
    assert suite_scale.outcome({**record, "reached_training": False}) == "OOM while loading"


# --------------------------------------------------------------------------------------------------
# Unsloth, a trl contender in a process of its own (benchmarks/unsloth_trl.py); unsloth is not installed here
# --------------------------------------------------------------------------------------------------


def _trl_args(*extra):
    args = bench_run.build_parser().parse_args(["--suite", "trl", "--tiny", *extra])
    args.trl_warmup = 1
    return args


def test_unsloth_contenders_are_opt_in_in_the_trl_and_context_suites():
    from benchmarks import models as M
    from benchmarks import suite_context, suite_trl

    assert set(M.UNSLOTH) == {"unsloth", "unsloth-nocompile"}
    assert C.LABELS["unsloth"] == "Unsloth" and C.LABELS["unsloth-nocompile"] == "Unsloth, no block compile"
    for cname in M.UNSLOTH:
        assert cname in suite_trl.CONTENDERS and cname not in suite_trl.DEFAULT_CONTENDERS
        assert cname not in suite_context.DEFAULT_CONTENDERS
        assert cname not in M.IMPL  # the model suite, which runs every contender in-process, leaves them out
        assert M.availability(cname, torch.device("cpu")) is None  # its own process decides


def test_unsloth_command_and_environment(monkeypatch):
    import sys

    from benchmarks import suite_trl, unsloth_process

    monkeypatch.setenv("FASTGEMMA_UNSLOTH_PATH", "/tmp/site-unsloth:.wu/pkgs")
    args = _trl_args("--seed", "7", "--lora-r", "8", "--trl-grad-accum", "2")
    assert args.unsloth_path == "/tmp/site-unsloth:.wu/pkgs"
    cmd = suite_trl.unsloth_command("/ckpt", args, 5, 256, 2, "/out/row.json")
    assert cmd[:3] == [sys.executable, "-m", "benchmarks.unsloth_trl"]
    assert cmd[-1] == "--tiny"
    flags = dict(zip(cmd[3:-1:2], cmd[4:-1:2]))
    assert flags == {"--checkpoint": "/ckpt", "--max-length": "256", "--batch": "2", "--grad-accum": "2",
                     "--steps": "5", "--warmup": "1", "--seed": "7", "--lora-r": "8", "--out": "/out/row.json"}
    from benchmarks.unsloth_trl import build_parser  # the script accepts exactly that command line

    child = build_parser().parse_args(cmd[3:])
    assert (child.checkpoint, child.max_length, child.batch, child.grad_accum, child.steps, child.warmup,
            child.seed, child.lora_r, child.tiny) == ("/ckpt", 256, 2, 2, 5, 1, 7, 8, True)

    base = {"PYTHONPATH": "/tmp/site:/repo", "UNSLOTH_BLOCK_COMPILE": "1", "KEEP": "x"}
    env = unsloth_process.unsloth_env("unsloth", args.unsloth_path, base)
    # the Unsloth site first, then the repository; the parent's /tmp/site (transformers 5.23) is left out
    assert env["PYTHONPATH"].split(os.pathsep) == ["/tmp/site-unsloth", os.path.abspath(".wu/pkgs"),
                                                   unsloth_process.REPO_ROOT]
    assert "UNSLOTH_BLOCK_COMPILE" not in env  # Unsloth's default
    assert env["HF_HUB_OFFLINE"] == "1" and env["KEEP"] == "x"
    assert unsloth_process.unsloth_env("unsloth-nocompile", args.unsloth_path, base)["UNSLOTH_BLOCK_COMPILE"] == "0"
    # no --unsloth-path: the parent's environment, with the repository root in front
    assert unsloth_process.unsloth_env("unsloth", None, base)["PYTHONPATH"] == os.pathsep.join(
        [unsloth_process.REPO_ROOT, "/tmp/site:/repo"])
    assert base["UNSLOTH_BLOCK_COMPILE"] == "1"  # the caller's dict is left alone


@pytest.fixture
def no_unsloth_path(tmp_path):
    """An empty folder as --unsloth-path: the real Unsloth process then cannot import unsloth."""
    import importlib.util

    if importlib.util.find_spec("unsloth") is not None:
        pytest.skip("unsloth is installed here")
    empty = tmp_path / "no-unsloth"
    empty.mkdir()
    return str(empty)


def test_missing_unsloth_is_na_through_the_real_subprocess(tmp_path, ckpt_dir, no_unsloth_path):
    payload, text, raw = _run_suite("trl", tmp_path, "--ckpt-dir", ckpt_dir, "--contenders",
                                    "unsloth,unsloth-nocompile", "--unsloth-path", no_unsloth_path)
    rows = raw["suites"]["trl"]["rows"]
    assert [r["contender"] for r in rows] == ["unsloth", "unsloth-nocompile"]
    for r in rows:
        assert r["status"].startswith("n/a (unsloth not importable: ModuleNotFoundError"), r
        assert "packing" in r["note"] and r["unsloth_packing_notes"] == []
    assert rows[0]["block_compile"] is None and rows[1]["block_compile"] == "0"
    table = _table_rows(text)
    assert any("| Unsloth | n/a (unsloth not importable" in line for line in table)
    assert any("| Unsloth, no block compile | n/a" in line for line in table)
    assert "Unsloth trains unpacked" in text


FAKE_CHILD = '''
import json, sys
out = sys.argv[sys.argv.index("--out") + 1]
print("Unsloth: packing=True ignored (unsupported model type(s): gemma2).")
json.dump({"status": "ok", "tokens_per_s": 1.0e9, "steps_done": 2, "peak_mib": 2048.0, "loss_first": 6.25,
           "first_step_from_train_s": 1.5, "first_step_from_load_s": 2.5, "unsloth_version": "2026.10.9",
           "versions": {"unsloth": "2026.10.9", "transformers": "5.17.0"}}, open(out, "w"))
'''


@pytest.fixture
def fake_unsloth(tmp_path, monkeypatch):
    """The Unsloth process replaced by FAKE_CHILD, a stand-in script taking the same command line."""
    import sys

    from benchmarks import suite_trl

    fake = tmp_path / "fake_unsloth_trl.py"
    fake.write_text(FAKE_CHILD)
    real = suite_trl.unsloth_command
    monkeypatch.setattr(suite_trl, "unsloth_command", lambda *a, **k: [sys.executable, str(fake), *real(*a, **k)[3:]])


def test_unsloth_row_joins_the_table_with_ratios(tmp_path, ckpt_dir, fake_unsloth):
    """A row from the Unsloth process (here a stand-in script taking the same command line) sits in the table
    beside HF eager, with its ratio to HF eager taken like any contender's."""
    payload, text, raw = _run_suite("trl", tmp_path, "--ckpt-dir", ckpt_dir, "--steps", "2", "--contenders",
                                    "hf-eager,unsloth")
    rows = {r["contender"]: r for r in raw["suites"]["trl"]["rows"]}
    assert rows["hf-eager"]["status"] == "ok"
    u = rows["unsloth"]
    assert u["status"] == "ok" and u["tokens_per_s"] == 1.0e9 and u["label"] == "Unsloth"
    assert u["config"] == rows["hf-eager"]["config"] and u["run"] == rows["hf-eager"]["run"]
    line = next(line for line in _table_rows(text) if "| Unsloth |" in line)
    ratio = 1.0e9 / rows["hf-eager"]["tokens_per_s"]
    assert f"| {ratio:.2f}x |" in line and "| 2.00 |" in line  # vs HF eager; 2048 MiB peak
    assert "Unsloth rows ran on: unsloth 2026.10.9, transformers 5.17.0." in text


def test_unsloth_asked_for_beside_the_lean_trainer_only_still_gets_its_row(tmp_path, ckpt_dir, fake_unsloth):
    """``--trl-trainer lean`` with an Unsloth contender once dropped Unsloth without a row (it runs under TRL's
    trainer only): it now runs under TRL's, once, and a note says so."""
    payload, text, raw = _run_suite("trl", tmp_path, "--ckpt-dir", ckpt_dir, "--steps", "2", "--trl-trainer", "lean",
                                    "--contenders", "hf-eager,unsloth")
    rows = raw["suites"]["trl"]["rows"]
    assert [(r["contender"], r["trainer"]) for r in rows] == [("hf-eager", "lean"), ("unsloth", "trl")]
    assert rows[1]["status"] == "ok"
    assert "Unsloth ran under TRL's trainer as Unsloth patches it" in text


def test_unsloth_process_that_hangs_or_dies_without_a_row(tmp_path):
    import sys
    import time

    from benchmarks import unsloth_process

    out = str(tmp_path / "row.json")
    t0 = time.perf_counter()
    row = unsloth_process.run_child([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), out,
                                    1.0, "t")
    assert row["status"] == "failed (timeout: the Unsloth process ran past 1 s)"
    assert time.perf_counter() - t0 < 15
    row = unsloth_process.run_child([sys.executable, "-c", "import sys; print('Segmentation fault'); sys.exit(139)"],
                              dict(os.environ), out, 30.0, "t")
    assert row["status"] == "failed (the Unsloth process exited with code 139 without a row: Segmentation fault)"


def test_unsloth_script_reports_oom_and_errors_as_rows(tmp_path, monkeypatch):
    """The script's own failure path, run in this process with a stand-in ``unsloth`` module: an OOM while
    loading is status "OOM", another error "failed (...)" with its traceback, both with a non-zero exit code,
    and what Unsloth prints about packing is kept."""
    import sys
    import types

    from benchmarks import unsloth_trl

    class FastLanguageModel:
        error = None

        @staticmethod
        def from_pretrained(**kw):
            print("Unsloth: Padded batches chosen over padding-free (gemma2).")
            raise FastLanguageModel.error

    fake = types.ModuleType("unsloth")
    fake.__version__ = "0.0-test"
    fake.FastLanguageModel = FastLanguageModel
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    monkeypatch.setattr(unsloth_trl, "cuda_device", lambda: torch.device("cpu"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"vocab_size": 512}))
    argv = ["--checkpoint", str(ckpt), "--max-length", "64", "--batch", "1", "--steps", "2", "--warmup", "1",
            "--tiny", "--out", str(tmp_path / "row.json")]

    FastLanguageModel.error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert unsloth_trl.main(argv) == unsloth_trl.EXIT_FAILED
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["status"] == "OOM" and row["unsloth_version"] == "0.0-test"
    assert row["unsloth_packing_notes"] == ["Unsloth: Padded batches chosen over padding-free (gemma2)."]

    FastLanguageModel.error = ValueError("no such checkpoint\nsecond line")
    assert unsloth_trl.main(argv) == unsloth_trl.EXIT_FAILED
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["status"] == "failed (ValueError: no such checkpoint second line)"
    assert "ValueError" in row["traceback"] and not isinstance(sys.stdout, unsloth_trl.NoteTee)


@pytest.fixture
def stand_in_unsloth(ckpt_dir, monkeypatch):
    """transformers + peft standing in for Unsloth's FastLanguageModel (a module `unsloth` of their own), its
    scripts' device the CPU: (the calls it records, the tiny checkpoint's path)."""
    import sys
    import types

    from benchmarks import models as M
    from benchmarks import unsloth_trl

    calls = {}

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(model_name, max_seq_length, dtype, load_in_4bit):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            calls["load"] = (max_seq_length, dtype, load_in_4bit)
            model = AutoModelForCausalLM.from_pretrained(model_name, attn_implementation="eager")
            model.config.use_cache = False
            return model, AutoTokenizer.from_pretrained(model_name)

        @staticmethod
        def get_peft_model(model, r, lora_alpha, lora_dropout, bias, target_modules, use_gradient_checkpointing,
                           random_state):
            from peft import LoraConfig, get_peft_model

            calls["peft"] = (r, lora_alpha, tuple(target_modules), use_gradient_checkpointing, random_state)
            return get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                    bias=bias, target_modules=list(target_modules),
                                                    task_type="CAUSAL_LM"))

        @staticmethod
        def for_training(model):
            calls["for_training"] = True
            model.train()

    fake = types.ModuleType("unsloth")
    fake.__version__ = "0.0-test"
    fake.FastLanguageModel = FastLanguageModel
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    monkeypatch.setattr(unsloth_trl, "cuda_device", lambda: torch.device("cpu"))
    args = bench_run.build_parser().parse_args(["--ckpt-dir", ckpt_dir])
    return calls, M.ensure_checkpoint("tiny", args, torch.device("cpu"), torch.float32)


def test_unsloth_script_trains_padded_batches_with_a_stand_in(tmp_path, stand_in_unsloth):
    """The script's training path end to end on CPU, with transformers + peft standing in for Unsloth's
    FastLanguageModel: unpacked, padded batches whose real tokens alone are counted, and a row with every
    key the suite's other contenders have."""
    from benchmarks import unsloth_trl

    calls, path = stand_in_unsloth
    out = tmp_path / "row.json"
    code = unsloth_trl.main(["--checkpoint", path, "--max-length", "64", "--batch", "2", "--grad-accum", "2",
                             "--steps", "3", "--warmup", "1", "--seed", "5", "--lora-r", "4", "--tiny",
                             "--out", str(out)])
    row = json.loads(out.read_text())
    assert code == 0 and row["status"] == "ok", row.get("traceback")
    assert calls["load"] == (64, torch.bfloat16, True)
    assert calls["peft"] == (4, 4, unsloth_trl.LORA_TARGETS, "unsloth", 5)
    assert row["packing"] is False and row["padding_free"] is False and row["steps_done"] == 3
    for key in ("tokens_per_s", "first_step_from_train_s", "first_step_from_load_s", "peak_mib", "loss_first",
                "gpu_busy", "tokens_per_step", "row_lengths", "warmup_steps", "profiled_step"):
        assert key in row
    assert row["tokens_per_s"] > 0
    # 2 accumulated micro-batches of 2 padded rows each: fewer real tokens than the padded rows hold
    assert all(0 < t <= 2 * 2 * 64 for t in row["tokens_per_step"])
    assert any(t < 2 * n for t, n in zip(row["tokens_per_step"], row["row_lengths"]))  # padding left out
    assert row["versions"]["unsloth"] == "0.0-test" and row["block_compile"] is None


def test_trl_rows_with_a_recompile_among_their_steady_steps_are_flagged():
    """As HF flex_attention at 4x4096 (2026-12-02): a 42.8 s second step among 1 s ones."""
    from benchmarks.suite_trl import uneven_steps_notes

    uneven = {"status": "ok", "contender": "hf-flex", "label": "HF flex_attention", "model": "2b",
              "tokens_per_s_all": [39.0, 332.5, 13753.4, 14500.5], "warmup_steps": 1, "profiled_step": 3}
    even = {**uneven, "contender": "fastgemma", "label": "fastgemma",
            "tokens_per_s_all": [448.4, 18036.4, 19383.2, 16968.7]}
    notes = uneven_steps_notes([uneven, even, {**uneven, "status": "failed"}])
    assert len(notes) == 1 and "HF flex_attention (2b)" in notes[0] and "332-13,753" in notes[0]


def test_trl_rows_that_record_cuda_graphs_in_a_steady_step_are_noted():
    """Each step's count of recorded lengths gives the steps that recorded; only steady ones get a note."""
    from benchmarks.suite_trl import recording_notes, recording_steps

    assert recording_steps([2, 3, 3, 4]) == [0, 1, 3] and recording_steps([0, 0]) == [] and recording_steps([]) == []
    late = {"status": "ok", "contender": "fastgemma", "label": "fastgemma", "model": "2b", "warmup_steps": 2,
            "profiled_step": 5, "recording_steps": [0, 1, 3, 5]}
    notes = recording_notes([late, {**late, "recording_steps": [0, 1, 5]}, {**late, "status": "failed"}])
    assert len(notes) == 1 and "fastgemma (2b)" in notes[0] and "step(s) 3 " in notes[0]


def test_unsloth_documents_are_cut_to_max_length_before_its_trainer_sees_them():
    """Unsloth cuts an over-long batch's input_ids but not its labels, and its fused loss then indexed out of
    bounds on the GPU: the Unsloth process cuts every document to max_length first."""
    from datasets import Dataset

    from benchmarks.unsloth_trl import truncate_documents

    ds = Dataset.from_dict({"input_ids": [list(range(10)), list(range(3)), list(range(7))]})
    cut, n = truncate_documents(ds, 5)
    assert n == 2 and cut["input_ids"] == [list(range(5)), list(range(3)), list(range(5))]
    same, n = truncate_documents(ds, 10)
    assert n == 0 and same["input_ids"] == ds["input_ids"]


# --------------------------------------------------------------------------------------------------
# The results file and the report generated from it
# --------------------------------------------------------------------------------------------------


def test_results_md_and_the_readme_headline_are_what_the_results_file_gives():
    """benchmarks/RESULTS.md and the README's headline table are generated: edit results.jsonl and run
    `python -m benchmarks.report`, never the tables by hand."""
    rows = R.load(report.RESULTS_FILE)
    assert rows and all(r["status"] and r["run"] and r["source"] and r["versions"] for r in rows)
    with open(report.REPORT_FILE) as f:
        assert f.read() == report.render(rows)
    with open(report.README_FILE) as f:
        readme = f.read()
    assert readme == report.with_headline(readme, report.headline_table(rows))
    assert report.main(["--check"]) == 0


def _row(contender, tokens_per_s, run="r1", model="2b", date="2026-01-01"):
    return {"date": date, "commit": "abc", "gpu": "NVIDIA H200 (140 GiB)", "versions": {"torch": "2.11"},
            "command": "python -m benchmarks.run", "run": run, "source": "benchmarks.run", "notes": [],
            "suite": "trl", "contender": contender, "label": contender, "status": "ok",
            "workload": {"model": model, "trainer": "lean", "batch": 1, "max_length": 2048, "grad_accum": 8},
            "metrics": {"tokens_per_s": tokens_per_s, "peak_gib": 3.0}}


def test_ratios_stay_within_a_run_and_newer_rows_replace_older_ones():
    rows = [_row("hf-eager", 100.0), _row("fastgemma", 400.0), _row("hf-eager", 200.0, run="r2", date="2026-02-01")]
    R.ratios(rows[:2], "trl")
    R.ratios(rows[2:], "trl")
    assert rows[1]["ratios"] == {"hf-eager": 4.0} and rows[2]["ratios"] == {"hf-eager": 1.0}
    assert report.current(rows) == rows[1:]  # r2's HF eager replaces r1's; r1's fastgemma stays
    tables = [t for t in report.render(rows).split("\n## ")[1:]]
    assert len(tables) == 2 and "2026-02-01" in tables[0] and "| fastgemma | ok | 400 | 4.00x |" in tables[1]
    # the headline takes fastgemma and its peer from one run: r1 no longer has its HF eager row
    assert report.headline_table(rows).count("\n") == 2


def test_harness_rows_become_results_rows_with_their_provenance():
    env = {"date": "2026-01-01 10:00 UTC", "fastgemma_git": "abc", "gpu": "NVIDIA H200 (140 GiB)", "cuda": "13.0",
           "torch": "2.11", "transformers": "5.25.0", "liger_kernel": "not installed", "command": "python -m benchmarks.run"}
    base = {"suite": "trl", "model": "2b", "trainer": "trl", "quant": "nf4", "batch": 4, "max_length": 4096,
            "grad_accum": 1, "config": "4x4096x1", "run": "r", "status": "ok"}
    rows = R.from_harness("trl", [
        dict(base, contender="hf-eager", tokens_per_s=100.0, peak_mib=2048.0, gpu_busy=0.5, losses=[1.0]),
        dict(base, contender="unsloth", tokens_per_s=150.0, versions={"transformers": "5.17.0"}, note="unpacked"),
    ], env)
    eager, unsloth = rows
    assert eager["workload"] == {"model": "2b", "trainer": "trl", "quant": "nf4", "batch": 4, "max_length": 4096,
                                 "grad_accum": 1}
    assert eager["metrics"] == {"tokens_per_s": 100.0, "peak_gib": 2.0, "gpu_busy": 0.5}
    assert eager["versions"] == {"torch": "2.11", "cuda": "13.0", "transformers": "5.25.0"}
    assert "own_process" not in eager and unsloth["own_process"] and unsloth["versions"]["transformers"] == "5.17.0"
    assert unsloth["ratios"] == {"hf-eager": 1.5} and unsloth["notes"] == ["unpacked"]


def test_model_flops_of_a_2b_step_and_the_share_of_a_gpu():
    """The issue's hand count: a 2B LoRA r16 step at 4,096 tokens costs 11.9 GFLOP per token, 16.4 with the
    checkpoint's recompute; a rate's share of an H200's 989 TFLOP/s follows."""
    from benchmarks.flops import bf16_peak, mean_context, training_flops_per_token
    from benchmarks.suite_trl import model_flops

    shape = C.GEMMA2_SHAPES["2b"]
    assert training_flops_per_token(shape, 4096) / 1e9 == pytest.approx(11.89, abs=0.01)
    assert training_flops_per_token(shape, 4096, recompute=True) / 1e9 == pytest.approx(16.42, abs=0.01)
    assert mean_context(4, None) == 2.5 and mean_context(4, 2) == 1.75
    assert bf16_peak("NVIDIA H200") == bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert bf16_peak("NVIDIA H100 PCIe") == 756e12 and bf16_peak("Some GPU") is None
    row = model_flops("2b", 4096, 16, 21_500, torch.device("cpu"))
    assert row["model_tflops"] == pytest.approx(21_500 * 11.89e9 / 1e12, rel=1e-3) and "mfu" not in row


def test_quantised_27b_runs_read_a_random_checkpoint_written_in_nf4(tmp_path):
    """27B's bf16 checkpoint (54 GB) cannot be built under a 40 GiB cap, so quantised runs read one written
    straight in NF4; it is written once, and loads as 4-bit layers."""
    from types import SimpleNamespace

    import bitsandbytes

    from benchmarks import models as M

    args, cpu = SimpleNamespace(ckpt_dir=str(tmp_path), seed=3), torch.device("cpu")
    assert M.SharedCheckpoint("27b", args, cpu, torch.bfloat16, "27b", quantize=True).nf4
    assert not M.SharedCheckpoint("27b", args, cpu, torch.float32, "27b", quantize=False).nf4
    assert not M.SharedCheckpoint("9b", args, cpu, torch.bfloat16, "9b", quantize=True).nf4
    path = M.ensure_checkpoint("tiny", args, cpu, torch.bfloat16, nf4=True)
    assert os.path.basename(path) == "gemma2-tiny-seed3-nf4"
    written = os.path.getmtime(os.path.join(path, "model.safetensors.index.json"))
    assert M.ensure_checkpoint("tiny", args, cpu, torch.bfloat16, nf4=True) == path
    assert os.path.getmtime(os.path.join(path, "model.safetensors.index.json")) == written
    model = M.load_for_training(path, "fastgemma", cpu, True, torch.bfloat16)
    assert isinstance(model.model.layers[0].mlp.down_proj, bitsandbytes.nn.Linear4bit)


# --------------------------------------------------------------------------------------------------
# Unsloth in the context suite (benchmarks/unsloth_context.py), in a process of its own
# --------------------------------------------------------------------------------------------------


def test_unsloth_context_command_is_what_its_script_takes():
    import sys

    from benchmarks import suite_context
    from benchmarks.unsloth_context import build_parser

    args = bench_run.build_parser().parse_args(["--suite", "context", "--context-gpu-gib", "24", "--seed", "7",
                                                "--lora-r", "8", "--context-loss", "hf"])
    cmd = suite_context.unsloth_command("/ckpt", args, (4096, 65536, 1024), 240.0, "/out/row.json")
    assert cmd[:3] == [sys.executable, "-m", "benchmarks.unsloth_context"]
    child = build_parser().parse_args(cmd[3:])
    assert (child.checkpoint, child.start, child.cap, child.resolution, child.budget_s, child.seed, child.lora_r,
            child.loss, child.gpu_gib, child.no_quant, child.out) == (
        "/ckpt", 4096, 65536, 1024, 240.0, 7, 8, "hf", 24.0, False, "/out/row.json")


def test_missing_unsloth_is_na_in_the_context_suite_through_the_real_subprocess(tmp_path, ckpt_dir,
                                                                               no_unsloth_path):
    payload, text, raw = _run_suite("context", tmp_path, "--ckpt-dir", ckpt_dir, "--contenders",
                                    "hf-eager,unsloth", "--unsloth-path", no_unsloth_path)
    rows = raw["suites"]["context"]["rows"]
    assert [r["contender"] for r in rows] == ["hf-eager", "unsloth"]
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"].startswith("n/a (unsloth not importable: ModuleNotFoundError"), rows[1]
    assert any("| Unsloth | n/a (unsloth not importable" in line for line in _table_rows(text))


def test_unsloth_context_script_searches_with_a_stand_in(tmp_path, stand_in_unsloth):
    """The script's path end to end on CPU, with transformers + peft standing in for Unsloth's
    FastLanguageModel: loaded and wrapped as Unsloth's users do, then the suite's own search (on a CPU nothing
    runs out of memory, so it reaches its cap)."""
    from benchmarks import unsloth_context

    calls, path = stand_in_unsloth
    out = tmp_path / "row.json"
    code = unsloth_context.main(["--checkpoint", path, "--start", "64", "--cap", "256", "--resolution", "64",
                                 "--budget-s", "60", "--seed", "5", "--lora-r", "4", "--out", str(out)])
    row = json.loads(out.read_text())
    assert code == 0 and row["status"] == "ok", row.get("traceback")
    assert calls == {"load": (256, torch.bfloat16, True),
                     "peft": (4, 4, unsloth_context.LORA_TARGETS, "unsloth", 5), "for_training": True}
    assert row["max_ok"] == 256 and row["reached_cap"] and [t["length"] for t in row["tries"]] == [64, 128, 256]
    assert all(t["status"] == "ok" and t["loss"] > 0 for t in row["tries"])
    assert row["versions"]["unsloth"] == "0.0-test"
