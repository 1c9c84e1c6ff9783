"""Generate the small instruction dataset that the default recipe run trains on.

Four tiny tasks with exact answers, so a small model can learn them and a person can see
at a glance whether a generation is right:

    add: 47+385        -> 432        (multi-digit addition)
    reverse: planet    -> tenalp     (string reversal)
    upper: red fox     -> RED FOX    (uppercase)
    sort: dbca         -> abcd       (sort letters)

Each example is a chat (`messages`: one user turn, one assistant turn), so the recipe's
default run exercises TRL's assistant-only loss. The content is generated here from a
seeded random generator; nothing is taken from an existing corpus. The held-out file
holds prompts that do not occur in the training file.

Usage:
    python recipes/make_dataset.py [--train 4000] [--heldout 32] [--seed 0] [--out-dir recipes/assets/data]
"""

import argparse
import json
import random
import string
from pathlib import Path

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "assets" / "data"
TRAIN_FILE = "tiny_tasks_train.jsonl"
HELDOUT_FILE = "tiny_tasks_heldout.jsonl"

# Short made-up syllables glued into pseudo-words: varied strings, still readable.
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "be", "do", "fu", "ga", "hi", "ju", "pe", "zo", "x", "q"]


def random_word(rng: random.Random, min_chars: int = 3, max_chars: int = 8) -> str:
    target = rng.randint(min_chars, max_chars)
    word = ""
    while len(word) < target:
        word += rng.choice(SYLLABLES)
    return word[:target]


def make_addition(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(0, 10 ** rng.randint(1, 3) - 1)
    b = rng.randint(0, 10 ** rng.randint(1, 3) - 1)
    return f"add: {a}+{b}", str(a + b)


def make_reversal(rng: random.Random) -> tuple[str, str]:
    word = random_word(rng)
    return f"reverse: {word}", word[::-1]


def make_uppercase(rng: random.Random) -> tuple[str, str]:
    words = " ".join(random_word(rng, 2, 5) for _ in range(rng.randint(1, 3)))
    return f"upper: {words}", words.upper()


def make_sorting(rng: random.Random) -> tuple[str, str]:
    letters = "".join(rng.choice(string.ascii_lowercase[:12]) for _ in range(rng.randint(3, 7)))
    return f"sort: {letters}", "".join(sorted(letters))


TASKS = [make_addition, make_reversal, make_uppercase, make_sorting]


def as_chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def generate(num_train: int, num_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen_prompts: set[str] = set()
    heldout: list[dict] = []
    # Held-out first, a balanced handful per task, then training examples that avoid those prompts.
    while len(heldout) < num_heldout:
        prompt, answer = TASKS[len(heldout) % len(TASKS)](rng)
        if prompt not in seen_prompts:
            seen_prompts.add(prompt)
            heldout.append(as_chat(prompt, answer))
    train: list[dict] = []
    while len(train) < num_train:
        prompt, answer = rng.choice(TASKS)(rng)
        if prompt not in seen_prompts:
            seen_prompts.add(prompt)
            train.append(as_chat(prompt, answer))
    return train, heldout


def write_jsonl(rows: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=4000, help="number of training examples")
    parser.add_argument("--heldout", type=int, default=32, help="number of held-out examples (prompts not in train)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where to write the .jsonl files")
    args = parser.parse_args()
    train, heldout = generate(args.train, args.heldout, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, args.out_dir / TRAIN_FILE)
    write_jsonl(heldout, args.out_dir / HELDOUT_FILE)
    print(f"wrote {len(train)} training and {len(heldout)} held-out examples to {args.out_dir}")


if __name__ == "__main__":
    main()
