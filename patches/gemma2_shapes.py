"""The published Gemma 2 architectures (google/gemma-2-2b, -9b, -27b).

Used to build random-weight models with the real shapes (benchmarks, GPU checks) where
the weights themselves cannot be downloaded: speed and memory depend only on the shapes.
"""

PUBLISHED_SHAPES = {
    "2b": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, vocab_size=256000, sliding_window=4096),
    "9b": dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
               num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, vocab_size=256000, sliding_window=4096),
    "27b": dict(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,
                num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144, vocab_size=256000, sliding_window=4096),
}

# Fields every Gemma 2 size shares.
SHARED_FIELDS = dict(
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6,
    max_position_embeddings=8192,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    tie_word_embeddings=True,
    attention_dropout=0.0,
)


def published_config(size: str, **overrides):
    """A Gemma2Config with the published architecture of `size` ("2b", "9b" or "27b").

    Layer types alternate sliding / global, starting with sliding, as in the real models.
    """
    from transformers import Gemma2Config

    if size not in PUBLISHED_SHAPES:
        raise ValueError(f"unknown Gemma 2 size {size!r}; choose one of {', '.join(PUBLISHED_SHAPES)}")
    fields = {**SHARED_FIELDS, **PUBLISHED_SHAPES[size], **overrides}
    layers = fields["num_hidden_layers"]
    fields.setdefault("layer_types", ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
    config = Gemma2Config(**fields)
    config.architectures = ["Gemma2ForCausalLM"]
    return config
