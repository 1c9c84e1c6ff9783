"""Greedy generations: the closing check on held-out prompts, and recipes/generate.py's chat."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HeldOutExample:
    model_prompt: str  # exactly what the model sees (chat-templated where needed)
    shown_prompt: str  # what a person reads: the last user message, or the plain prompt
    expected: str


def held_out_example(row: dict, tokenizer) -> HeldOutExample | None:
    """A generation prompt and its expected answer; None for a chat without an assistant turn."""
    if "messages" in row:
        messages = row["messages"]
        answers = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        if not answers:
            return None
        context = messages[: answers[-1]]
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        return HeldOutExample(prompt, context[-1]["content"], messages[answers[-1]]["content"])
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):  # conversational prompt/completion
        templated = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return HeldOutExample(templated, prompt[-1]["content"], completion[-1]["content"])
    return HeldOutExample(prompt, prompt, completion)


def stop_token_ids(tokenizer) -> list[int]:
    """End of sequence, and Gemma's end of a chat turn (<end_of_turn>) where the tokenizer has one."""
    stop_ids = [tokenizer.eos_token_id]
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        stop_ids.append(end_of_turn)
    return stop_ids


def generate_ids(model, tokenizer, model_prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy continuation of `model_prompt` (exactly the text the model sees), as token ids."""
    # Chat templates already start with <bos>; plain prompts get it from the tokenizer.
    starts_with_bos = model_prompt.startswith(tokenizer.bos_token)
    device = next(model.parameters()).device
    inputs = tokenizer(model_prompt, return_tensors="pt", add_special_tokens=not starts_with_bos).to(device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The text that asks the model for the next assistant turn (the chat template, or the last message as is)."""
    if tokenizer.chat_template is None:
        return messages[-1]["content"]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def show_generations(model, tokenizer, heldout, max_new_tokens: int) -> list[dict]:
    """Greedy generations from the trained adapter, next to the expected answers."""
    examples = [example for row in heldout if (example := held_out_example(row, tokenizer)) is not None]
    if not examples:
        return []
    model.eval()
    results = []
    print(f"\nGreedy generations from the trained adapter on {len(examples)} held-out prompts:")
    for example in examples:
        ids = generate_ids(model, tokenizer, example.model_prompt, max_new_tokens)
        generated = tokenizer.decode(ids, skip_special_tokens=True).strip()
        expected = example.expected.strip()
        correct = generated == expected
        print(f"  [{'ok' if correct else '--'}] {example.shown_prompt!r:34} expected {expected!r:20} got {generated!r}")
        results.append(
            {"prompt": example.shown_prompt, "expected": expected, "generated": generated, "correct": correct}
        )
    print(f"  {sum(result['correct'] for result in results)}/{len(results)} exactly right")
    return results
