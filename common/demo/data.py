"""The demo's embedded dataset: small math problems the project writes itself, in the MATH release
layout (`<root>/{train,test}/<subject>/<n>.json`, solutions ending in `\\boxed{}`), so the whole
product runs offline on CPU with no downloaded data.

    python -m common.demo.data OUT_DIR [--train 600 --test 60 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path


def _addition(rng: random.Random) -> tuple[str, str, str, int]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    level = 1 if a + b < 50 else 2
    return "prealgebra", f"What is ${a} + {b}$?", f"We add: ${a} + {b} = {a + b}$. So the answer is $\\boxed{{{a + b}}}$.", level


def _subtraction(rng: random.Random) -> tuple[str, str, str, int]:
    a, b = rng.randint(20, 99), rng.randint(1, 19)
    return "prealgebra", f"What is ${a} - {b}$?", f"We subtract: ${a} - {b} = {a - b}$. So the answer is $\\boxed{{{a - b}}}$.", 1


def _product(rng: random.Random) -> tuple[str, str, str, int]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return "prealgebra", f"Compute ${a} \\times {b}$.", f"We multiply: ${a} \\times {b} = {a * b}$. So the answer is $\\boxed{{{a * b}}}$.", 2


def _linear(rng: random.Random) -> tuple[str, str, str, int]:
    x, a, b = rng.randint(1, 20), rng.randint(2, 9), rng.randint(1, 30)
    c = a * x + b
    solution = f"Subtract {b}: ${a}x = {c - b}$. Divide by {a}: $x = {x}$. So the answer is $\\boxed{{{x}}}$."
    return "algebra", f"Solve ${a}x + {b} = {c}$ for $x$.", solution, 3


def _remainder(rng: random.Random) -> tuple[str, str, str, int]:
    a, m = rng.randint(10, 99), rng.randint(3, 9)
    q, r = divmod(a, m)
    solution = f"We write ${a} = {q} \\cdot {m} + {r}$. So the remainder is $\\boxed{{{r}}}$."
    return "number_theory", f"What is the remainder when ${a}$ is divided by ${m}$?", solution, 3


def _gcd(rng: random.Random) -> tuple[str, str, str, int]:
    g = rng.randint(2, 9)
    a, b = g * rng.randint(2, 9), g * rng.randint(2, 9)
    d = math.gcd(a, b)
    solution = f"The common divisors of ${a}$ and ${b}$ end at ${d}$. So the answer is $\\boxed{{{d}}}$."
    return "number_theory", f"What is the greatest common divisor of ${a}$ and ${b}$?", solution, 4


def _fraction(rng: random.Random) -> tuple[str, str, str, int]:
    a, b = rng.randint(1, 9), rng.randint(2, 9)
    g = math.gcd(a, 2 * b)
    num, den = a // g, 2 * b // g
    answer = str(num) if den == 1 else f"\\frac{{{num}}}{{{den}}}"
    solution = f"Half of $\\frac{{{a}}}{{{b}}}$ is $\\frac{{{a}}}{{{2 * b}}} = {answer}$. So the answer is $\\boxed{{{answer}}}$."
    return "algebra", f"What is half of $\\frac{{{a}}}{{{b}}}$?", solution, 5


GENERATORS = [_addition, _subtraction, _product, _linear, _remainder, _gcd, _fraction]


def generate_problems(count: int, seed: int) -> list[dict]:
    """`count` MATH-style rows (problem, solution, level, type, subject), deterministic in seed."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        subject, problem, solution, level = GENERATORS[index % len(GENERATORS)](rng)
        rows.append({"problem": problem, "solution": solution, "level": f"Level {level}",
                     "type": subject.replace("_", " ").title(), "subject": subject})
    return rows


def write_demo_dataset(root: str | Path, train: int = 600, test: int = 60, seed: int = 0) -> Path:
    """Write the demo dataset in the MATH release layout; returns root."""
    root = Path(root)
    train_rows = generate_problems(train, seed)
    seen = {row["problem"] for row in train_rows}
    # Test problems never repeat a train problem, so test accuracy is not memorisation.
    test_rows = [row for row in generate_problems(test * 3, seed + 1_000_003) if row["problem"] not in seen][:test]
    for split, rows in (("train", train_rows), ("test", test_rows)):
        for index, row in enumerate(rows):
            folder = root / split / row.pop("subject")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{index}.json").write_text(json.dumps(row, indent=1))
    return root


def demo_corpus(root: str | Path) -> list[str]:
    """Texts of the demo set, for training the tiny model's tokenizer."""
    texts = []
    for path in sorted(Path(root).glob("*/*/*.json")):
        row = json.loads(path.read_text())
        texts += [row["problem"], row["solution"]]
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_demo_dataset(args.out_dir, args.train, args.test, args.seed)


if __name__ == "__main__":
    main()
