"""Building random-init Gemma 2 models and applying each contender's changes (model, trl, context suites)."""

from __future__ import annotations

import os
import tempfile

import torch

from . import common as C

IMPL = {"hf-eager": "eager", "hf-flex": "flex_attention", "liger": "eager", "fastgemma": "eager", "fastgemma-ops": "eager",
        "fastgemma-attn": "eager", "fastgemma-graphs": "eager",
        "fastgemma-flash": "eager", "fastgemma-checkpoint-all": "eager", "fastgemma-offload": "eager",
        "fastgemma-dequantized": "eager"}
# patch_model's settings per fastgemma contender. fastgemma-attn: attention only, to measure what the fused
# elementwise ops add; fastgemma-graphs: per-layer CUDA graphs wherever they can run (cuda_graphs=True);
# fastgemma-flash: FlashAttention 4's kernels under flex_attention (flex_kernel_options="experimental-flash";
# needs flash-attn-4); fastgemma-checkpoint-all: every layer recomputed, as without the memory budget;
# fastgemma-offload: every checkpointed input offloaded to CPU memory, for what offloading costs;
# fastgemma-dequantized: graphed steps multiply with dequantised copies of the 4-bit weights (fastgemma.dense_weights);
FASTGEMMA_PATCH = {
    "fastgemma": {},  # patch_model's defaults: what the README's snippet runs
    "fastgemma-ops": {"cuda_graphs": False},  # the op-by-op layers, for the graphs' memory and speed
    "fastgemma-attn": {"fused_ops": False},
    "fastgemma-graphs": {"fused_ops": "auto", "cuda_graphs": True},
    "fastgemma-flash": {"fused_ops": "auto", "flex_kernel_options": "experimental-flash"},
    "fastgemma-checkpoint-all": {"memory_budget": None},
    "fastgemma-offload": {"force_offload": True},
    "fastgemma-dequantized": {"hold_dequantized_weights": True},
}

# Unsloth, trl suite only, in a process of its own (benchmarks/unsloth_trl.py): importing it patches transformers
# and trl for the whole process. Per contender, the environment that process gets (None: the variable is removed,
# so Unsloth's default applies). "unsloth": its per-decoder-layer compile on, as it ships; "unsloth-nocompile":
# UNSLOTH_BLOCK_COMPILE=0, which avoided that compile's crash in Inductor with torch 2.11 (an H100, 2026-11-22).
UNSLOTH = {
    "unsloth": {"UNSLOTH_BLOCK_COMPILE": None},
    "unsloth-nocompile": {"UNSLOTH_BLOCK_COMPILE": "0"},
}


def availability(contender: str, device: torch.device, training: bool = True) -> str | None:
    """None if the contender can run here, else the text of its n/a row."""
    if contender in UNSLOTH:
        # Its own process finds out (unsloth not importable, no GPU) and says so in its row: importing
        # unsloth here to check would patch this process.
        return None
    if contender not in IMPL:
        return f"n/a (unknown contender {contender!r})"
    if contender == "hf-flex":
        from transformers.utils import is_torch_flex_attn_available

        if not is_torch_flex_attn_available():
            return "n/a (torch flex_attention not available)"
        if training and device.type != "cuda":
            return "n/a (flex_attention has no CPU backward)"
    if contender == "fastgemma-flash":
        from fastgemma.attention import flash_attention_4_available

        if not flash_attention_4_available():
            return "n/a (flash-attn-4 not installed)"
    if contender == "liger":
        try:
            import liger_kernel.transformers  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"n/a (liger-kernel not installed / not importable: {type(exc).__name__})"
        if device.type != "cuda":
            return "n/a (Liger's Triton kernels need CUDA)"
    if contender in FASTGEMMA_PATCH:
        try:
            import fastgemma  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"n/a (fastgemma not importable: {type(exc).__name__}: {str(exc)[:80]})"
    return None


def not_startable(contender: str, device: torch.device, budget) -> str | None:
    """The row status of a contender that must not start (n/a here, or the suite is out of time), else None."""
    return availability(contender, device) or ("skipped (time budget)" if budget.expired() else None)


def fastgemma_backend(args, device: torch.device) -> str:
    if getattr(args, "fastgemma_backend", None) and args.fastgemma_backend != "auto":
        return args.fastgemma_backend
    # auto on a GPU; on CPU "auto" means torch.compile'd dense attention, whose compile time would
    # dominate a smoke run, so the CPU smoke configuration uses the eager backend.
    return "auto" if device.type == "cuda" else "eager"


def build_random_model(name: str, contender: str, device: torch.device, dtype: torch.dtype, seed: int, max_len: int):
    """A seeded random-init Gemma2ForCausalLM built directly on ``device`` in ``dtype``."""
    from transformers import Gemma2ForCausalLM

    cfg = C.gemma2_config(name, max_position_embeddings=max_len)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Gemma2ForCausalLM._from_config(cfg, attn_implementation=IMPL[contender], dtype=dtype)
    model.config.use_cache = False
    return model


def apply_pre_peft(contender: str, model, max_len: int, args, device: torch.device):
    """The contender's own change to a loaded (not yet LoRA-wrapped) model."""
    if contender == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_gemma2

        apply_liger_kernel_to_gemma2(model=model)  # Liger's defaults: rope, rms_norm, geglu, fused linear CE
    elif contender in FASTGEMMA_PATCH:
        import fastgemma

        options = fastgemma.PatchOptions(max_row_tokens=int(max_len), backend=fastgemma_backend(args, device),
                                         **FASTGEMMA_PATCH[contender])
        fastgemma.patch_model(model, options=options)
    return model


def lora_config(r: int):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules="all-linear", bias="none",
                      task_type="CAUSAL_LM")


def wrap_lora(model, r: int):
    from peft import get_peft_model

    model = get_peft_model(model, lora_config(r))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    return model


def unpatch(contender: str, model) -> None:
    if contender in FASTGEMMA_PATCH:
        try:
            import fastgemma

            fastgemma.unpatch_model(model)
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------------------------------
# Checkpoints for from_pretrained (+ bitsandbytes nf4) in the trl and context suites
# --------------------------------------------------------------------------------------------------


def ckpt_dir(args) -> str:
    return args.ckpt_dir or os.path.join(tempfile.gettempdir(), "fastgemma_bench_ckpt")


def offline_tokenizer(vocab_size: int):
    """A word-level fast tokenizer built in code (no hub access): specials + words w4..w{vocab-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for i in range(C.FIRST_TEXT_TOKEN, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


NF4_CHECKPOINTS = ("27b",)  # quantised runs read these from a checkpoint written straight in NF4


def ensure_checkpoint(name: str, args, device: torch.device, dtype: torch.dtype, nf4: bool = False) -> str:
    """Save a seeded random-init model (and the offline tokenizer) once; returns its directory.

    `nf4`: written straight as a pre-quantised NF4 checkpoint (benchmarks.random_4bit_gemma2), drawn and quantised
    a weight at a time: 27B's bf16 checkpoint is 54 GB to write and cannot be built on a GPU capped like a 40 GB
    card. Reach and speed depend on the shapes only."""
    kind = "nf4" if nf4 else str(dtype).replace("torch.", "")
    path = os.path.join(ckpt_dir(args), f"gemma2-{name}-seed{args.seed}-{kind}")
    done = os.path.join(path, ".complete")
    if os.path.exists(done):
        return path
    C.log(f"saving random-init Gemma 2 {name} checkpoint ({kind}) to {path} (once)")
    if nf4:
        from pathlib import Path

        from .random_4bit_gemma2 import write

        write(Path(path), name, seed=args.seed)
    else:
        model = build_random_model(name, "hf-eager", device, dtype, args.seed, 8192)
        model.save_pretrained(path, safe_serialization=True)
        offline_tokenizer(model.config.vocab_size).save_pretrained(path)
        del model
        C.free_memory(device)
    with open(done, "w") as f:
        f.write("ok\n")
    return path


class SharedCheckpoint:
    """One model's random-init checkpoint for a suite, saved on first use; a failed save is retried by the next contender.
    Quantised runs of the NF4_CHECKPOINTS models read one written in NF4."""

    def __init__(self, name: str, args, device: torch.device, dtype: torch.dtype, label: str, quantize: bool = False):
        self.name, self.args, self.device, self.dtype, self.label = name, args, device, dtype, label
        self.nf4 = quantize and name in NF4_CHECKPOINTS
        self.path = None

    def get(self) -> tuple[str, str | None]:
        """("ok", directory), or (failure status, None)."""
        if self.path is None:
            status, path = C.run_guarded(
                lambda: ensure_checkpoint(self.name, self.args, self.device, self.dtype, self.nf4), self.label
            )
            if status != "ok":
                return status, None
            self.path = path
        return "ok", self.path


def load_for_training(path: str, contender: str, device: torch.device, quantize: bool, dtype: torch.dtype):
    """from_pretrained with the contender's attention implementation, nf4 double-quant when ``quantize``."""
    from transformers import AutoModelForCausalLM

    # No hub kernels (transformers 5.25 loads them by default on a GPU; for Gemma 2 only the attention's rotary
    # embedding): fetching them needs the hub, which the GPU machines of these runs cannot reach.
    kw = dict(attn_implementation=IMPL[contender], dtype=dtype, use_kernels=False)
    if quantize:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if device.type == "cuda":
        kw["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    model.config.use_cache = False
    return model
