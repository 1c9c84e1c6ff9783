"""Model FLOPs of a LoRA / QLoRA training step of Gemma 2, and the share of a GPU's bf16 peak a rate reaches.

The MFU convention: the FLOPs the model needs, not what an implementation spends, so a checkpoint's recompute is
not counted (`recompute=True` adds it, to show what checkpointing costs). The base weights are frozen: their
backward computes input gradients only (2 FLOPs per weight and token, like the forward); LoRA adapters also get
weight gradients. Attention is counted as if each row were one document (every token attends to all tokens before
it, within the window on sliding layers): with packed rows of shorter documents that is an upper bound.
"""

from __future__ import annotations

# Dense bf16 tensor-core peaks (no sparsity), by a name fragment of torch.cuda.get_device_name(); the first match
# wins, so the PCIe parts come before their SXM siblings.
BF16_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
)


def bf16_peak(device_name: str) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s, or None for a GPU not in the table."""
    return next((peak for fragment, peak in BF16_PEAK_FLOPS if fragment in device_name), None)


def linear_shapes(shape: dict) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's seven projections."""
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    queries = shape["num_attention_heads"] * shape["head_dim"]
    keys = shape["num_key_value_heads"] * shape["head_dim"]
    return [(hidden, queries), (hidden, keys), (hidden, keys), (queries, hidden),
            (hidden, inner), (hidden, inner), (inner, hidden)]


def mean_context(row_tokens: int, window: int | None) -> float:
    """Keys a query attends to on average in a causal row of `row_tokens` tokens (within `window` if given)."""
    total = sum(min(position + 1, window or row_tokens) for position in range(row_tokens))
    return total / row_tokens


def training_flops_per_token(shape: dict, row_tokens: int, lora_r: int = 16, recompute: bool = False) -> float:
    """FLOPs per trained token of a LoRA step (all seven projections adapted, base frozen) on rows of
    `row_tokens` tokens, layers alternating sliding and global as in Gemma 2."""
    layers = shape["num_hidden_layers"]
    linears = linear_shapes(shape)
    base = sum(i * o for i, o in linears)  # weights per layer
    adapters = sum(lora_r * (i + o) for i, o in linears)
    head = shape["hidden_size"] * shape["vocab_size"]
    heads, head_dim = shape["num_attention_heads"], shape["head_dim"]
    sliding = mean_context(row_tokens, shape["sliding_window"])
    full = mean_context(row_tokens, None)
    attention_forward = 4 * heads * head_dim * (sliding * ((layers + 1) // 2) + full * (layers // 2))
    forward = 2 * layers * (base + adapters) + 2 * head + attention_forward
    backward = 2 * layers * (base + 2 * adapters) + 2 * head + 2 * attention_forward
    layers_forward = 2 * layers * (base + adapters) + attention_forward
    return forward + backward + (layers_forward if recompute else 0)
