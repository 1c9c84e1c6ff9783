"""Run under torchrun (CPU, gloo) by tests/test_distributed.py: FSDP2 around a fastgemma-patched Gemma 2 with LoRA.

accelerate applies FSDP on GPUs only, so on a CPU the recipe's --fsdp cannot run end to end. This
script does, with torch's own calls, what accelerate's FSDP2 preparation does with the recipe's
settings (recipes/sft/distributed.py), to check how it meets fastgemma's patch:

- the decoder-layer class is found by name (accelerate's `get_module_class_from_name`) after patching;
- transformers' non-reentrant gradient checkpointing is on (as the recipe sets it), each decoder layer
  gets its own `fully_shard`, then the root;
- training steps with fused ops on (LoRA added inside its GEMM and fused norms read weights inside the
  layer's forward, where FSDP has gathered them) match an unsharded reference on every rank;
- the full state dict as accelerate gathers it for saving gives the reference's adapter.

With `4bit` as the second argument the base is loaded in 4-bit NF4 with the quantised weights stored in the
compute dtype (float32 on CPU), as the recipe's --fsdp loads it: FSDP then shards the packed 4-bit weights and
bitsandbytes recovers their quantisation state after each all-gather.

Each rank writes rank<N>.json with its findings into the directory given as the first argument.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import fastgemma
from conftest import random_gemma2, tiny_gemma2_config  # (this script's folder, tests/, is on sys.path)
from sft import distributed as recipe_distributed  # recipes/sft/, on sys.path through conftest

STEPS = 4
ROWS_PER_RANK = 1
LENGTH = 48


def build(checkpoint: Path | None = None):
    """The tiny Gemma 2, random weights (or loaded in 4-bit from `checkpoint`), patched, with LoRA."""
    from peft import LoraConfig, get_peft_model

    if checkpoint is None:
        model = random_gemma2(tiny_gemma2_config(), seed=0)
    else:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_quant_storage=recipe_distributed.quantization_storage(True, torch.float32),
        )
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint, quantization_config=quantization, dtype=torch.float32, attn_implementation="eager"
        )
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    fastgemma.patch_model(model, max_row_tokens=64, backend="eager", fused_ops=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(1)  # the same LoRA initialisation for both copies
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # nonzero, so the adapters matter from the first step
            torch.nn.init.normal_(parameter, std=0.02)
    return model


def shard(model):
    """accelerate's FSDP2 preparation with the recipe's fsdp_config, done with torch's own calls."""
    from accelerate.utils.dataclasses import get_module_class_from_name
    from torch.distributed.fsdp import fully_shard

    (layer_name,) = recipe_distributed.trainer_settings(
        recipe_distributed.detect_launch(), on_gpu=True, fsdp=True
    )["fsdp_config"]["transformer_layer_cls_to_wrap"]
    layer_class = get_module_class_from_name(model, layer_name)
    assert layer_class is not None, f"{layer_name} not found by class name in the patched model"
    layers = [module for module in model.modules() if isinstance(module, layer_class)]
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model, len(layers)


def lora_weights(model) -> dict:
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def main(out_dir: Path, base: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    checkpoint = None
    if base == "4bit":
        checkpoint = out_dir / "tiny_checkpoint"
        if rank == 0:
            random_gemma2(tiny_gemma2_config(), seed=0).save_pretrained(checkpoint)
        dist.barrier()
    torch.manual_seed(2)
    batches = [torch.randint(3, 97, (ROWS_PER_RANK * world, LENGTH)) for _ in range(STEPS)]

    reference = build(checkpoint)
    sharded, units = shard(build(checkpoint))
    initial = {name: weight.clone() for name, weight in lora_weights(reference).items()}
    optimizers = [
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5) for model in (reference, sharded)
    ]
    loss_gaps = []
    for batch in batches:
        mine = batch[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]
        # use_cache=False, as TRL passes it in training.
        loss = sharded(input_ids=mine, labels=mine, use_cache=False).loss
        loss.backward()
        # The reference sees the whole global batch; FSDP averages the ranks' gradients, so the
        # reference loss is the mean of the per-rank losses.
        rows = [batch[r * ROWS_PER_RANK : (r + 1) * ROWS_PER_RANK] for r in range(world)]
        reference_loss = sum(reference(input_ids=r, labels=r, use_cache=False).loss for r in rows) / world
        reference_loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        losses = [None] * world
        dist.all_gather_object(losses, loss.item())
        loss_gaps.append(abs(sum(losses) / world - reference_loss.item()))

    trained, expected = lora_weights(sharded), lora_weights(reference)
    weight_gap = max((trained[name] - expected[name]).abs().max().item() for name in expected)
    moved = max((expected[name] - initial[name]).abs().max().item() for name in expected)

    # What accelerate gathers for the Trainer's save_model under FSDP2 (FULL_STATE_DICT), filtered by PEFT.
    from peft import get_peft_model_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    saved = get_peft_model_state_dict(sharded, state_dict=full) if rank == 0 else {}
    wanted = get_peft_model_state_dict(reference)
    saved_gap = None
    if rank == 0:
        assert set(saved) == set(wanted), (len(saved), len(wanted), sorted(set(saved) ^ set(wanted))[:4])
        saved_gap = max((saved[name].float() - wanted[name].float()).abs().max().item() for name in wanted)

    quantized = [
        m for m in sharded.modules() if type(m).__module__.startswith("bitsandbytes") and "4bit" in type(m).__name__
    ]
    launch = recipe_distributed.detect_launch()
    agreement = [recipe_distributed.any_rank(launch, rank == world - 1), recipe_distributed.any_rank(launch, False)]
    record = {
        "rank": rank,
        "base": base,
        "any_rank": agreement,
        "linear4bit_layers": len(quantized),
        "world_size": world,
        "fsdp_units": units,
        "patched_after_sharding": fastgemma.is_patched(sharded),
        "root_class": type(sharded).__name__,
        "loss_gaps": loss_gaps,
        "weight_gap": weight_gap,
        "weights_moved": moved,
        "saved_adapter_gap": saved_gap,
        "adapter_tensors": len(wanted),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "fp32")
