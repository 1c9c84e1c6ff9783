"""The recipe's automatic micro-batch: tokens per optimizer step kept, rows per micro-step sized to memory."""

import pytest

from sft.batch_sizing import activation_bytes_per_token, choose_micro_batch

GIB = 2**30


def published(size):
    from fastgemma.patches.gemma2_shapes import published_config

    return published_config(size)


def test_estimate_is_close_to_measured_peaks():
    # trl suite, 4 x 4096 packed tokens: 2B peaked at 6.0 GiB with ~2 GiB of nf4 weights and embeddings,
    # 9B at 13.7 GiB with ~6 GiB (measured on an H200)
    for size, measured_per_token in (("2b", 4.0 * GIB / 16384), ("9b", 7.7 * GIB / 16384)):
        estimate = activation_bytes_per_token(published(size))
        assert 0.8 * measured_per_token < estimate < 1.5 * measured_per_token, size


@pytest.mark.parametrize("size, free_gib, expected_batch", [
    ("2b", 70, 8),   # an 80 GB card: the whole optimizer step in one micro-step
    ("2b", 6, 4),    # a small card
    ("27b", 8, 2),   # 27B on a 24 GB card after its weights
    ("27b", 0.5, 1),  # nothing fits: one row, with a warning in the reason
])
def test_choice_keeps_tokens_per_step_and_fits(size, free_gib, expected_batch):
    config = published(size)
    choice = choose_micro_batch(8, 2048, int(free_gib * GIB), config)
    assert choice.batch_size == expected_batch
    assert choice.batch_size * choice.grad_accum == 8
    assert "16384 tokens per optimizer step" in choice.reason
    fits = choice.batch_size * 2048 * activation_bytes_per_token(config) <= 0.75 * free_gib * GIB
    assert fits == ("may not fit" not in choice.reason)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="positive"):
        choose_micro_batch(0, 2048, GIB, published("2b"))


def _recipe():
    from conftest import load_recipe

    return load_recipe("sft_gemma2_batch_sizing")


def resolved_config(recipe, argv, on_gpu):
    from sft import config

    parser = config.build_parser(recipe.REAL_MODEL, recipe.TINY_DEMO, prog="sft_gemma2.py", description="")
    return config.resolve(parser.parse_args(argv), recipe.REAL_MODEL, recipe.TINY_DEMO, on_gpu=on_gpu, resume=None)


@pytest.mark.parametrize("argv, on_gpu, auto", [
    (["--model", "google/gemma-2-2b"], True, True),
    (["--model", "google/gemma-2-2b", "--batch-size", "2"], True, False),  # the user's choice stands
    (["--model", "google/gemma-2-2b", "--grad-accum", "4"], True, False),
    (["--model", "google/gemma-2-2b", "--no-packing"], True, False),
    (["--model", "google/gemma-2-2b"], False, False),  # CPU
    ([], True, False),  # the tiny demo keeps its own knobs
])
def test_recipe_sizes_the_micro_batch_only_when_nobody_chose_it(argv, on_gpu, auto):
    recipe = _recipe()
    config = resolved_config(recipe, argv, on_gpu)
    assert config.size_micro_batch_to_gpu is auto
    if auto:  # the knobs still define the tokens per optimizer step that the recipe redistributes
        assert config.batch_size * config.grad_accum == recipe.REAL_MODEL.batch_size_packed * recipe.REAL_MODEL.grad_accum


def test_summary_names_an_automatic_micro_batch():
    from sft.reporting import summary_lines

    summary = {"steps": 10, "resumed_from_step": 0, "train_runtime_s": 10.0, "tokens": 1000, "tokens_per_s": 100.0,
               "warm_from_step": None, "model": "m", "backend": "auto", "fused_ops": "auto", "peak_memory": "1 GiB",
               "first_loss": None, "last_loss": None, "output_dir": "out", "batch_size": 8, "grad_accum": 1,
               "micro_batch_auto": "8 rows ..."}
    assert any(line.startswith("micro-batch  8 row(s) x 1 accumulation") for line in summary_lines(summary))
    summary["micro_batch_auto"] = None
    assert not any(line.startswith("micro-batch") for line in summary_lines(summary))


def test_a_resumed_run_keeps_its_checkpoints_micro_batch(tmp_path):
    import json

    from sft.batch_sizing import resumed_micro_batch

    (tmp_path / "trainer_state.json").write_text(json.dumps({"train_batch_size": 4, "global_step": 7}))
    choice = resumed_micro_batch(tmp_path, 8)
    assert (choice.batch_size, choice.grad_accum) == (4, 2) and "checkpoint" in choice.reason
    assert resumed_micro_batch(tmp_path, 6) is None  # 4 rows do not divide 6: choose afresh
    assert resumed_micro_batch(tmp_path / "missing", 8) is None


@pytest.mark.parametrize("batch, length, world, graphs", [
    (1, 2048, 1, True),    # the shape users run: host-bound op by op (3.2K against 18.4K tokens/s graphed, H100)
    (2, 2048, 1, True),
    (8, 2048, 1, False),   # the automatic micro-batch of an 80 GB card: GPU-bound already
    (1, 8192, 1, False),
    (1, 2048, 2, False),   # graphed layers are measured on one GPU only
])
def test_cuda_graphs_auto_only_for_small_micro_steps_on_one_gpu(batch, length, world, graphs):
    from sft.batch_sizing import cuda_graphs_pay_off

    chosen, why = cuda_graphs_pay_off(batch, length, world)
    assert chosen is graphs and why.startswith("on:" if graphs else "off:")


@pytest.mark.parametrize("flags, on_gpu, resolved", [
    ([], True, "auto"),                                   # the default: settled once the micro-batch is known
    (["--cuda-graphs", "auto"], True, "auto"),
    (["--lora-dropout", "0.1"], True, "off"),             # a graph would replay one dropout draw
    (["--fused-ops", "off"], True, "off"),                # the graphs replay the fused ops' compiled layers
    ([], False, "off"),                                   # CPU
    (["--cuda-graphs", "on", "--fused-ops", "on"], False, "on"),
    (["--cuda-graphs", "off"], True, "off"),
])
def test_recipe_leaves_cuda_graphs_auto_undecided_only_where_they_can_run(flags, on_gpu, resolved):
    from sft import checks

    config = resolved_config(_recipe(), ["--model", "google/gemma-2-2b", "--no-load-in-4bit", *flags], on_gpu)
    checks.check_device(config)
    assert config.cuda_graphs == resolved


@pytest.mark.parametrize("batch, world, settled", [(1, 1, "on"), (8, 1, "off"), (1, 2, "off")])
def test_cuda_graphs_auto_is_settled_with_the_micro_batch(batch, world, settled, capsys):
    from sft import batch_sizing, distributed

    recipe = _recipe()
    argv = ["--model", "google/gemma-2-2b", "--no-load-in-4bit", "--batch-size", str(batch)]
    config, reason = batch_sizing.settle_micro_step(resolved_config(recipe, argv, on_gpu=True), model=None,
                                                    launch=distributed.Launch(world_size=world))
    assert config.cuda_graphs == settled and reason is None and config.batch_size == batch
    assert capsys.readouterr().out.startswith(f"cuda graphs  {settled}:")
