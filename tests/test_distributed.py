"""The recipe past one process, on CPU with gloo: torchrun on one machine, two "nodes" on one machine,
and FSDP2 around a patched model.

Every run is a torchrun subprocess in its own process group with a timeout, so a hang fails the
test (and its processes are killed) instead of stalling CI. Ports are picked free.
"""

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipe_with_rank_checksums import checksum_of

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "sft_gemma2.py"
RECIPE_WITH_CHECKSUMS = REPO / "tests" / "recipe_with_rank_checksums.py"  # the recipe; each rank writes rank<N>.json
FSDP2_CHECK = REPO / "tests" / "distributed_fsdp2_check.py"

pytestmark = pytest.mark.slow

TIMEOUT_S = 420  # per torchrun; a healthy run takes well under two minutes on 2 cores
STEPS = 24
PER_RANK_BATCH = 2
# Large learning rate so that a few dozen steps visibly lower the loss of the tiny demo.
RECIPE_ARGS = ["--max-steps", str(STEPS), "--lr", "1e-2", "--max-seq-length", "128", "--logging-steps", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict:
    env = dict(os.environ)
    # fastgemma from this checkout; recipes/ for the recipe's parts (`sft`), which the FSDP2 check imports
    paths = [str(REPO), str(REPO / "recipes"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(paths).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"  # one core per process (torchrun's default too); the reference run matches it
    return env


def start(command: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """A subprocess in its own session, so a timeout can kill torchrun and all its workers."""
    with log.open("w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait(processes: list[subprocess.Popen], logs: list[Path], timeout: float = TIMEOUT_S) -> None:
    try:
        for process in processes:
            process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs)
        pytest.fail(f"torchrun did not finish within {timeout} s (a hang?)\n{tails}")
    for process, log in zip(processes, logs):
        assert process.returncode == 0, f"exit status {process.returncode}\n{log.read_text()[-6000:]}"


def torchrun(*arguments) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *map(str, arguments)]


def losses_of(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def rank_records(checksum_dir: Path, world_size: int) -> list[dict]:
    files = sorted(checksum_dir.glob("rank*.json"))
    assert [f.name for f in files] == [f"rank{r}.json" for r in range(world_size)], files
    return [json.loads(f.read_text()) for f in files]


def check_ranks_agree_with_the_saved_adapter(records: list[dict], adapter_file: Path, world_size: int) -> None:
    """Every rank ran inside DDP over gloo, ended with bit-identical adapter weights, and the one
    adapter on disk is exactly those weights."""
    from safetensors.torch import load_file

    for record in records:
        assert record["world_size"] == record["trainer_world_size"] == world_size, record
        assert record["parallel_mode"] == "ParallelMode.DISTRIBUTED", record
        assert record["wrapped_in"] == "DistributedDataParallel", record
        assert record["backend"] == "gloo", record
    assert len({record["sha256"] for record in records}) == 1, [r["sha256"] for r in records]
    on_disk = checksum_of(load_file(adapter_file))
    assert on_disk["sha256"] == records[0]["sha256"]
    assert on_disk["tensors"] == records[0]["tensors"] > 0


def adapters_under(directory: Path) -> list[Path]:
    return sorted(directory.rglob("adapter_model.safetensors"))


def test_ddp_two_processes(tmp_path):
    """torchrun --nproc_per_node 2 on the tiny default (compiled attention per rank): the loss falls,
    both ranks end bit-identical, and only rank 0 writes the adapter, the summary and the console."""
    output_dir = tmp_path / "out"
    checksums = tmp_path / "checksums"
    log = tmp_path / "torchrun.log"
    port = free_port()
    command = torchrun(
        "--nproc_per_node", 2, "--master_addr", "127.0.0.1", "--master_port", port,
        RECIPE_WITH_CHECKSUMS, checksums, *RECIPE_ARGS, "--batch-size", PER_RANK_BATCH, "--output-dir", output_dir,
        "--show-generations", 2,
    )
    wait([start(command, tmp_path, environment(), log)], [log])

    losses = losses_of(output_dir)
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses  # the loss falls

    check_ranks_agree_with_the_saved_adapter(rank_records(checksums, 2), output_dir / "adapter_model.safetensors", 2)
    assert adapters_under(tmp_path) == [output_dir / "adapter_model.safetensors"]  # exactly one adapter written

    summary = json.loads((output_dir / "recipe_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS and summary["fastgemma_patched"] is True
    assert summary["warm_tokens_per_s_per_gpu"] == pytest.approx(summary["warm_tokens_per_s"] / 2)
    assert len(summary["peak_memory_mib"]["max_rss"]) == 2
    assert len(summary["generations"]) == 2  # rank 0 generated after training, the other rank waited

    console = log.read_text()
    assert console.count("fastgemma SFT summary") == 1  # rank 0 alone prints
    assert "2 processes (1 node x 2), DDP" in console


def test_two_nodes_on_one_machine_match_one_process(tmp_path):
    """torchrun --nnodes 2 --node_rank 0|1 (one process per "node", rendezvous on 127.0.0.1), each node in
    its own directory as on separate machines: it finishes like the one-node run, only global rank 0
    writes (node 1's local rank 0 writes nothing), and with the same global batch it trains exactly
    like one process: the same tokens, the same losses (DDP averages the gradients of the two halves)."""
    checksums = tmp_path / "checksums"
    port = free_port()
    processes, logs = [], []
    for node in range(2):
        node_dir = tmp_path / f"node{node}"
        node_dir.mkdir()
        command = torchrun(
            "--nnodes", 2, "--node_rank", node, "--nproc_per_node", 1,
            "--master_addr", "127.0.0.1", "--master_port", port,
            RECIPE_WITH_CHECKSUMS, checksums, *RECIPE_ARGS, "--batch-size", PER_RANK_BATCH, "--output-dir", "out",
            "--backend", "eager", "--show-generations", 0,
        )
        logs.append(tmp_path / f"node{node}.log")
        processes.append(start(command, node_dir, environment(), logs[-1]))
    # The reference: one process, the same global batch (2 x 2 rows), after the two nodes are done.
    wait(processes, logs)
    reference_log = tmp_path / "reference.log"
    reference = [
        sys.executable, RECIPE, *RECIPE_ARGS, "--batch-size", 2 * PER_RANK_BATCH,
        "--output-dir", tmp_path / "reference", "--backend", "eager", "--show-generations", 0,
    ]
    wait([start(list(map(str, reference)), tmp_path, environment(), reference_log)], [reference_log])

    node_output = tmp_path / "node0" / "out"
    check_ranks_agree_with_the_saved_adapter(rank_records(checksums, 2), node_output / "adapter_model.safetensors", 2)
    assert adapters_under(tmp_path / "node0") == [node_output / "adapter_model.safetensors"]
    assert not (tmp_path / "node1" / "out").exists(), sorted((tmp_path / "node1").rglob("*"))  # node 1 wrote nothing
    assert "fastgemma SFT summary" not in logs[1].read_text()

    summary = json.loads((node_output / "recipe_summary.json").read_text())
    reference_summary = json.loads((tmp_path / "reference" / "recipe_summary.json").read_text())
    assert summary["world_size"] == 2 and reference_summary["world_size"] == 1
    assert summary["tokens"] == reference_summary["tokens"] > 0  # the same samples, counted over both ranks
    losses, reference_losses = losses_of(node_output), losses_of(tmp_path / "reference")
    assert len(losses) == len(reference_losses) == STEPS
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses
    assert torch.allclose(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-3, atol=1e-3), (
        losses, reference_losses,
    )


def worker_with_rank(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=rank (Linux /proc)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for child in map(int, children):
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return child
    raise AssertionError(f"no worker with RANK={rank} among {children}")


def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """A Ctrl-C that reaches one rank only (signals reach the ranks at different points of a step): every
    rank stops after the same step, rank 0 saves a checkpoint and the adapter, and nothing hangs. Without
    the ranks agreeing, rank 1 would stop a step early and rank 0 would wait for it, or be killed unsaved."""
    import re
    import time

    output_dir = tmp_path / "out"
    checksums = tmp_path / "checksums"
    log = tmp_path / "torchrun.log"
    command = torchrun(
        "--nproc_per_node", 2, "--master_addr", "127.0.0.1", "--master_port", free_port(),
        RECIPE_WITH_CHECKSUMS, checksums, "--max-steps", 2000, "--lr", "1e-2", "--max-seq-length", "128", "--batch-size", PER_RANK_BATCH,
        "--backend", "eager", "--save-steps", 0, "--output-dir", output_dir, "--show-generations", 0,
    )
    process = start(command, tmp_path, environment(), log)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:  # wait for a few training steps
        steps = [int(n) for n in re.findall(r"(\d+)/2000", log.read_text(errors="replace"))]
        if steps and max(steps) >= 3:
            break
        time.sleep(0.5)
    assert process.poll() is None, log.read_text()[-3000:]
    os.kill(worker_with_rank(process.pid, 1), signal.SIGINT)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"no exit within 120 s of Ctrl-C (a rank waiting for another?)\n{log.read_text()[-3000:]}")
    console = log.read_text(errors="replace")
    assert "continue with:" in console and "--resume" in console, console[-3000:]
    checkpoints = sorted(output_dir.glob("checkpoint-*"))
    assert len(checkpoints) == 1, (checkpoints, console[-3000:])
    step = int(checkpoints[0].name.split("-")[1])
    assert 3 <= step < 2000
    assert json.loads((checkpoints[0] / "trainer_state.json").read_text())["global_step"] == step
    check_ranks_agree_with_the_saved_adapter(rank_records(checksums, 2), output_dir / "adapter_model.safetensors", 2)


@pytest.mark.parametrize("base", ["fp32", "4bit"])
def test_fsdp2_around_a_patched_model(tmp_path, base):
    """FSDP2 (fully_shard per Gemma2DecoderLayer, found by class name after patching) with LoRA, transformers'
    gradient checkpointing and fused ops on, over gloo: the same losses and weights as an unsharded model,
    and the full state dict the Trainer saves from holds the same adapter. 4bit: an NF4 base stored in the
    compute dtype, as --fsdp loads it, sharded by FSDP."""
    if base == "4bit":
        pytest.importorskip("bitsandbytes")
    out = tmp_path / "fsdp2"
    log = tmp_path / "fsdp2.log"
    port = free_port()
    command = torchrun(
        "--nproc_per_node", 2, "--master_addr", "127.0.0.1", "--master_port", port, FSDP2_CHECK, out, base
    )
    wait([start(command, tmp_path, environment(), log)], [log])
    records = rank_records(out, 2)
    for record in records:
        assert record["linear4bit_layers"] == (4 * 7 if base == "4bit" else 0), record
        assert record["fsdp_units"] == 4 and record["patched_after_sharding"] is True, record
        assert record["any_rank"] == [True, False], record  # distributed.any_rank: one rank's flag reaches all
        assert record["root_class"].startswith("FSDP"), record
        assert max(record["loss_gaps"]) < 1e-5, record
        assert record["weights_moved"] > 1e-3, record  # training did change the adapters
        assert record["weight_gap"] < 1e-5, record
    assert records[0]["saved_adapter_gap"] is not None and records[0]["saved_adapter_gap"] < 1e-5, records[0]
    assert records[0]["adapter_tensors"] == 4 * 7 * 2


def test_fsdp_flag_needs_a_distributed_gpu_launch(tmp_path, capsys):
    """--fsdp in a single process, or on CPU, stops with a one-line error before loading weights."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sft_gemma2_for_fsdp_flag", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    assert recipe.main(["--fsdp", "--output-dir", str(tmp_path / "out")]) == 2
    assert "--fsdp shards the model over several processes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


BUDGET_CHECK = REPO / "tests" / "distributed_budget_check.py"


def test_ddp_ranks_under_different_memory_plans_train_like_checkpointing_every_layer(tmp_path):
    """DDP on two processes, one keeping every layer's activations and the other offloading every checkpointed
    input (their plans changing over the first steps), ends with the weights of checkpointing every layer."""
    runs = {}
    for plans in ("none", "mixed"):
        output = tmp_path / plans
        output.mkdir()
        log = tmp_path / f"{plans}.log"
        command = torchrun("--nproc_per_node", 2, "--master_addr", "127.0.0.1", "--master_port", free_port(),
                           BUDGET_CHECK, output, plans)
        env = environment()
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env["PYTHONPATH"]])
        wait([start(command, tmp_path, env, log)], [log])
        runs[plans] = [torch.load(output / f"rank{rank}.pt") for rank in range(2)]
    assert [(r["kept"], r["offloaded"]) for r in runs["mixed"]] == [(4, 0), (0, 4)]
    assert all(r["kept"] is None for r in runs["none"])
    reference = runs["none"][0]["weights"]
    for rank in runs["mixed"] + runs["none"]:
        assert rank["weights"].keys() == reference.keys() and reference
        for name, weight in rank["weights"].items():
            assert torch.allclose(weight, reference[name], rtol=1e-6, atol=1e-7), name
