"""The base model: the tiny demo's random weights or a real Gemma 2, loaded in bf16 / fp32 or 4-bit NF4
(QLoRA); the LoRA settings; and --merge, a standalone model with the adapter folded in."""

from __future__ import annotations

from pathlib import Path

import torch

from . import distributed
from .config import TINY_INIT_SEED, TINY_MODEL_DIR, RecipeConfig
from .console import display_path, transformers_progress_bars_off


def load_model(config: RecipeConfig, launch: distributed.Launch):
    """The base model to train, where it was loaded from, and a one-line description. The tiny demo's
    random weights are written to disk first and go through the same loading path as a real model."""
    precision = "4-bit NF4" if config.load_in_4bit else str(compute_dtype(config.on_gpu))
    if config.tiny:
        # Other ranks build the same seeded weights in a private temporary directory.
        base_dir = distributed.tiny_base_model_dir(launch, config.output_dir.resolve() / "tiny_base_model")
        with transformers_progress_bars_off():  # instant for a 3M-parameter model
            source = str(save_tiny_base_model(base_dir))
            model = load_base_model(source, config.load_in_4bit, config.on_gpu, fsdp=config.fsdp)
    else:
        source = config.model
        model = load_base_model(source, config.load_in_4bit, config.on_gpu, fsdp=config.fsdp)
    description = describe_model(config.model, display_path(source), precision)
    print(f"model        {description}")
    if config.load_in_4bit and not config.on_gpu:
        print("             (4-bit on a CPU runs bitsandbytes' slow reference kernels: it checks the path, not speed)")
    return model, source, description


def build_tiny_gemma2(seed: int = TINY_INIT_SEED):
    """The demo's base model: the shipped tiny Gemma 2 config with seeded random weights (float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(TINY_MODEL_DIR)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")


def save_tiny_base_model(directory: Path) -> Path:
    """Write the tiny random model and its tokenizer to disk, so it loads like any checkpoint
    (same code path as a real model, 4-bit included) and the saved adapter has a base to point to."""
    from transformers import AutoTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_gemma2().save_pretrained(directory)
    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(directory)
    return directory


def compute_dtype(on_gpu: bool):
    # bf16 is Gemma 2's native precision (fp16 overflows in its activations); CPUs train in fp32.
    if on_gpu and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# Loading options for every Gemma 2 the recipe reads. transformers 5.25 swaps in hub kernels while loading on a GPU
# (for Gemma 2: the attention's rotary embedding, which fastgemma's fused ops compute in training), and fetching them
# needs the hub even for a local model: a machine without network could not load at all.
NO_HUB_KERNELS = {"use_kernels": False}


def load_base_model(model_source: str, load_in_4bit: bool, on_gpu: bool, fsdp: bool = False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(on_gpu)
    quantization_config = None
    if load_in_4bit:
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=distributed.quantization_storage(fsdp, dtype),  # FSDP shards floats only
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_source,
        dtype=dtype,
        quantization_config=quantization_config,
        # The current device is this rank's GPU (distributed.use_this_ranks_device). Under FSDP a
        # bf16 base loads to CPU and FSDP moves each rank's shard to its GPU; a 4-bit one is quantised on the GPU.
        device_map={"": torch.cuda.current_device()} if on_gpu and not fsdp else None,
        # Gemma 2 needs softcapping, which sdpa lacks; eager is HF's exact path, and what
        # fastgemma leaves in place for anything it does not take over.
        attn_implementation="eager",
        **NO_HUB_KERNELS,
    )
    if load_in_4bit:
        prepare_4bit_model_for_training(model)
    return model


def prepare_4bit_model_for_training(model) -> None:
    """The parts of peft's prepare_model_for_kbit_training that a 4-bit Gemma 2 needs.

    Freeze the base, and feed gradients into the (frozen) embeddings' output so checkpointed
    layers get a graph. Unlike peft's helper, the embeddings (256k x hidden, tied with the
    LM head) stay in bf16 instead of being copied to fp32: that copy would cost more GPU
    memory than all the 4-bit layers of Gemma 2 2B, and Gemma2RMSNorm already normalises
    in fp32. Gradient checkpointing itself is switched on by SFTConfig.
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.enable_input_require_grads()


def lora_config(config: RecipeConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def describe_model(model: str | None, base_dir: str, precision: str) -> str:
    if model is None:
        model = f"tiny random-init Gemma 2 ({TINY_MODEL_DIR.name}, seed {TINY_INIT_SEED}), base saved in {base_dir}"
    return f"{model}, {precision}"


MERGED_DIR_NAME = "merged"


def save_merged_model(config: RecipeConfig, model_source: str, tokenizer) -> Path:
    """--merge: a standalone model in --output-dir/merged, loadable with AutoModelForCausalLM alone, in the
    precision it trained in (bf16 on a GPU; fp32 for a CPU run, where rounding to bf16 would change its answers).

    The base is loaded as it was trained (4-bit when it was) and dequantised, so the merged weights are the
    values the adapter was trained against, not the original checkpoint's; then the saved adapter is merged
    in. A 4-bit base stays dequantised: merging into 4-bit would round the adapter's update away."""
    from peft import PeftModel

    directory = config.output_dir / MERGED_DIR_NAME
    dtype = compute_dtype(config.on_gpu)
    print(f"merging      the adapter into a {str(dtype).removeprefix('torch.')} copy of the base, for "
          f"{display_path(directory)}")
    with transformers_progress_bars_off():
        base = load_base_model(model_source, config.load_in_4bit, config.on_gpu)
        base = base.dequantize(dtype=dtype) if config.load_in_4bit else base.to(dtype)
        merged = PeftModel.from_pretrained(base, str(config.output_dir)).merge_and_unload()
        merged.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
