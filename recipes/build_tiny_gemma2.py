"""Build the tiny Gemma 2 that the default recipe run trains: its config and its tokenizer.

Writes recipes/assets/tiny_gemma2/ (config.json, tokenizer.json, tokenizer_config.json,
chat_template.jinja). No weights: the recipe initialises them at random from a fixed seed.

Why our own: the default run must work on a machine with no Hugging Face hub access, so it
cannot download Gemma's weights or its 256k-token SentencePiece model.

The config is a small but complete Gemma 2: grouped-query attention (4 query heads, 2 key/
value heads), layers alternating sliding-window (first) and global attention, a sliding
window of 32 tokens (the toy chats run 27-59 tokens, so the window cuts into most of them and
the sliding layers really differ from the global ones), attention logit softcapping 50,
final logit softcapping 30, and query_pre_attn_scalar = head_dim, as in Gemma 2 2B/9B.

The tokenizer is character-level over printable ASCII, plus Gemma's special tokens (<pad>,
<eos>, <bos>, <unk>, <start_of_turn>, <end_of_turn>) and a Gemma-style chat template with
`{% generation %}` markers, which TRL needs for assistant-only loss. Character level keeps
the toy tasks (reversal, sorting, digit-wise addition) learnable for a tiny model: every
character the model must move around is its own token.

Usage:
    python recipes/build_tiny_gemma2.py [--out recipes/assets/tiny_gemma2]
"""

import argparse
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, processors
from transformers import Gemma2Config, PreTrainedTokenizerFast

DEFAULT_OUT = Path(__file__).resolve().parent / "assets" / "tiny_gemma2"

# Same order as Gemma's own vocabulary for the first ids: pad=0, eos=1, bos=2, unk=3,
# so the Gemma2Config defaults (pad_token_id=0, eos_token_id=1, bos_token_id=2) hold.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
CHARACTERS = list(string.printable)  # digits, letters, punctuation, space, \t \n \r \x0b \x0c

# Gemma's turn format; the model's turn (content plus its <end_of_turn>, which teaches the
# model when to stop) sits inside {% generation %} so only it counts toward the loss.
# Written for this project; the role header stays outside the generation block because it
# is a prompt cue, not something the model generates.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<start_of_turn>model\\n' -}}"
    "{%- generation -%}"
    "{{- message['content'] | trim + '<end_of_turn>\\n' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<start_of_turn>' + message['role'] + '\\n' + message['content'] | trim + '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<start_of_turn>model\\n' -}}"
    "{%- endif -%}"
)


def build_config(vocab_size: int) -> Gemma2Config:
    config = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        query_pre_attn_scalar=64,
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention"] * 2,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        max_position_embeddings=2048,
        # Larger than Gemma's 0.02: the LM head is the (frozen, tied) embedding matrix, and
        # with 0.02 at this width its logits cannot get confident enough for LoRA to bring
        # the loss down far. At 0.05 the untrained model still starts near uniform
        # (loss ~ ln(vocab)).
        initializer_range=0.05,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
        dtype="float32",
    )
    config.architectures = ["Gemma2ForCausalLM"]
    return config


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # A BPE model with no merges splits every word into single characters; with no
    # pre-tokenizer the whole text is one "word", so spaces and newlines are kept as tokens.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.decoder = decoders.Fuse()  # join characters back without inserting spaces
    # Like Gemma's tokenizer, start plain text with <bos>. (Chat templates write <bos>
    # themselves and are tokenized without this post-processor, so it is not doubled.)
    bos_id = vocab["<bos>"]
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=8192,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory to write config and tokenizer to")
    args = parser.parse_args()
    tokenizer = build_tokenizer()
    vocab_size = 128  # room above the 106 tokens, rounded to a multiple of 64 like real vocabularies
    assert len(tokenizer) <= vocab_size
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.out)
    build_config(vocab_size).save_pretrained(args.out)
    print(f"wrote a tiny Gemma 2 config (vocab {vocab_size}) and a {len(tokenizer)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
