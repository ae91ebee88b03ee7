"""Generated arithmetic problems: a seeded, checkable task small enough to show RL working on a
real model on a CPU in minutes (train.py --preset cpu-demo).

    "What is 482 + 917?"   answer "1399"
    "What is 63 * 48?"     answer "3024"
    "What is 705 - 398?"   answer "307"

Operands: a and b uniform in [100, 999] for + and -, in [12, 99] for *. Draw k of a split comes
from a generator seeded with (split seed, k), so the rows are the same on every machine and
Python version. A draw that repeats an earlier row of the split is skipped, and so is a test
draw that is also a train problem: the held-out split is disjoint from the training split.

Why this task: a small instruct model can do each sum, but, asked to reason step by step and
box the answer, it often writes long explanations that run past a short completion budget, or
forgets the box. RL on the boxed-answer reward teaches it to answer inside \\boxed{} within the
budget: a measurable gain (held-out accuracy) in a few steps, which is what a first real-model
run should show before the longer GSM8K recipe.
"""
import random

SPLIT_SEEDS = {"train": 0, "test": 1}
TRAIN_SIZE = 8192
TEST_SIZE = 500
OPERATIONS = ("+", "-", "*")


def _problem(rng: random.Random) -> tuple[str, int]:
    op = rng.choice(OPERATIONS)
    if op == "*":
        a, b = rng.randint(12, 99), rng.randint(12, 99)
        return f"{a} * {b}", a * b
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return (f"{a} + {b}", a + b) if op == "+" else (f"{a} - {b}", a - b)


def _draws(split: str):
    """An endless stream of (expression, value) for one split."""
    k = 0
    while True:
        yield _problem(random.Random(f"arithmetic/{SPLIT_SEEDS[split]}/{k}"))
        k += 1


def rows(split: str) -> list[dict]:
    """The rows of `split` ("train": TRAIN_SIZE problems, "test": TEST_SIZE, disjoint from train)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"arithmetic has splits {sorted(SPLIT_SEEDS)}, not {split!r}")
    size = TRAIN_SIZE if split == "train" else TEST_SIZE
    seen = {row["problem"] for row in rows("train")} if split == "test" else set()
    out = []
    for expr, value in _draws(split):
        problem = f"What is {expr}?"
        if problem in seen:
            continue
        seen.add(problem)
        out.append({"id": f"arithmetic-{split}/{len(out)}", "problem": problem, "answer": str(value)})
        if len(out) == size:
            return out

