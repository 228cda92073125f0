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

# Each generator returns (subject, problem, solution, level). The solutions work the answer out in
# small steps a tiny transformer can learn from a few thousand examples (copying digits, a last-digit
# rule, a carry), so that answer accuracy on unseen problems rises during the demo; the gcd problems
# (level 5) stay out of its reach, so not every subject and level learns alike.


def _row(subject: str, level: int, problem: str, working: str, answer) -> tuple[str, str, str, int]:
    return subject, problem, f"{working} So the answer is $\\boxed{{{answer}}}$.", level


def _units_digit(rng: random.Random) -> tuple[str, str, str, int]:
    n = rng.randint(100, 9999)
    return _row("prealgebra", 1, f"What is the units digit of ${n}$?", f"The last digit is ${n % 10}$.", n % 10)


def _tens_digit(rng: random.Random) -> tuple[str, str, str, int]:
    n = rng.randint(100, 9999)
    t, u = n // 10 % 10, n % 10
    return _row("prealgebra", 2, f"What is the tens digit of ${n}$?", f"The last two digits are ${t}$ and ${u}$.", t)


def _remainder_by_five(rng: random.Random) -> tuple[str, str, str, int]:
    n = rng.randint(100, 9999)
    return _row("number_theory", 3, f"What is the remainder when ${n}$ is divided by $5$?",
                f"The last digit is ${n % 10}$, which leaves ${n % 5}$.", n % 5)


def _of_three(word: str, pick, level: int):
    """The smallest or largest of three different digits."""
    def generate(rng: random.Random) -> tuple[str, str, str, int]:
        a, b, c = rng.sample(range(10), 3)
        return _row("algebra", level, f"What is the {word} of ${a}$, ${b}$ and ${c}$?",
                    f"The {word} is ${pick(a, b, c)}$.", pick(a, b, c))
    return generate


def _successor(rng: random.Random) -> tuple[str, str, str, int]:
    x = rng.randint(10, 998)
    return _row("algebra", 5, f"If $x = {x}$, what is $x + 1$?", f"We add one: ${x} + 1 = {x + 1}$.", x + 1)


def _gcd(rng: random.Random) -> tuple[str, str, str, int]:
    g = rng.randint(2, 9)
    a, b = g * rng.randint(2, 9), g * rng.randint(2, 9)
    return _row("number_theory", 5, f"What is the greatest common divisor of ${a}$ and ${b}$?",
                f"The common divisors of ${a}$ and ${b}$ end at ${math.gcd(a, b)}$.", math.gcd(a, b))


GENERATORS = [_units_digit, _tens_digit, _remainder_by_five, _of_three("smallest", min, 3),
              _of_three("largest", max, 4), _successor, _gcd]


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
