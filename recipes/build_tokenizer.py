"""Build the small character-level tokenizer that ships with the recipe.

Why a tokenizer of our own: the default recipe run must work on a machine with no
Hugging Face hub access, so it cannot download Gemma's 256k-token SentencePiece model.
This one covers printable ASCII one character per token, plus Gemma's special tokens
(<pad>, <eos>, <bos>, <unk>, <start_of_turn>, <end_of_turn>) and a Gemma-style chat
template with `{% generation %}` markers, which TRL needs for assistant-only loss.

Character level keeps the toy tasks (reversal, sorting, digit-wise addition) learnable
for a tiny model: every character the model must move around is its own token.

Usage (writes next to recipes/assets/tiny_gemma2/config.json):
    python recipes/build_tokenizer.py [--out recipes/assets/tiny_gemma2]
"""

import argparse
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

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
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory to write the tokenizer files to")
    args = parser.parse_args()
    tokenizer = build_tokenizer()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.out)
    print(f"wrote a {len(tokenizer)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
