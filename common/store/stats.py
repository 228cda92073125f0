"""The statistics behind the store's numbers: 95% intervals and the paired test of two evaluations.

- Wilson score interval for one response per problem (the views compute it in SQL: `wilson_sql`;
  `wilson` is the same formula in Python).
- Percentile bootstrap over problems for k responses per problem (`bootstrap_intervals`): the
  problems are resampled, not the responses, since the k responses of a problem are not
  independent. Seeded, so recording an evaluation twice gives the same interval.
- Exact McNemar test (`mcnemar_exact`): the two-sided binomial test of the discordant pairs
  (b learned, c forgotten) at p = 1/2, in pure Python (math.comb); no scipy.
- The paired difference of two accuracies with its Wald interval (`paired_difference`,
  Agresti & Min 2005's standard paired-proportion interval, wide enough at MATH sizes).

Used by common/store/writer.py (bootstrap at record time), common/store/schema.py (Wilson in the
views) and common/store/compare.py (bin/query compare).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
BOOTSTRAP_REPLICATES = 2000
BOOTSTRAP_SEED = 0


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | tuple[None, None]:
    """Wilson score interval of successes / n (None, None for n = 0)."""
    if n == 0:
        return None, None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def wilson_sql(successes: str, n: str) -> tuple[str, str]:
    """SQL expressions for the low and high ends of the Wilson interval of two SQL expressions."""
    z2 = Z95 * Z95
    p = f"(({successes})::DOUBLE / nullif({n}, 0))"
    centre = f"(({p} + {z2} / (2.0 * ({n}))) / (1 + {z2} / ({n})))"
    half = f"({Z95} / (1 + {z2} / ({n})) * sqrt({p} * (1 - {p}) / ({n}) + {z2} / (4.0 * ({n}) * ({n}))))"
    return f"greatest(0.0, {centre} - {half})", f"least(1.0, {centre} + {half})"


def bootstrap_intervals(per_problem: Mapping[str, Sequence[float]], replicates: int = BOOTSTRAP_REPLICATES,
                        seed: int = BOOTSTRAP_SEED) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of the mean of each metric over problems, resampling problems.

    per_problem maps a metric name to one value per problem (all of the same length, in the same
    problem order), e.g. {"accuracy": [c_i / k ...]}; the same resampled problems serve every metric."""
    import numpy as np

    names = list(per_problem)
    values = np.asarray([per_problem[name] for name in names], dtype=np.float64)  # [metrics, problems]
    if values.shape[1] == 0:
        return {name: (None, None) for name in names}
    rng = np.random.default_rng(seed)
    means = np.empty((replicates, len(names)))
    for start in range(0, replicates, 200):  # 200 resamples at a time: bounded memory at 5,000 problems
        stop = min(replicates, start + 200)
        draw = rng.integers(0, values.shape[1], size=(stop - start, values.shape[1]))
        means[start:stop] = values[:, draw].mean(axis=2).T
    low, high = np.quantile(means, [0.025, 0.975], axis=0)
    return {name: (float(low[i]), float(high[i])) for i, name in enumerate(names)}


def mcnemar_exact(learned: int, forgotten: int) -> float:
    """Two-sided exact McNemar p-value: P(a Binomial(b + c, 1/2) is at least as far from (b + c)/2)."""
    n = learned + forgotten
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(learned, forgotten) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_difference(learned: int, forgotten: int, n: int, z: float = Z95) -> tuple[float, float, float]:
    """Accuracy difference (after - before) on n paired problems and its 95% Wald interval:
    d = (b - c) / n, var = (b + c - (b - c)^2 / n) / n^2."""
    d = (learned - forgotten) / n
    half = z * math.sqrt(max(0.0, learned + forgotten - (learned - forgotten) ** 2 / n)) / n
    return d, d - half, d + half


def interval_rows(samples: Sequence[Mapping]) -> list[dict]:
    """The bootstrap intervals of an evaluation with k responses per problem, as `intervals` rows:
    accuracy and format accuracy over all problems, per subject and per level."""
    problems: dict[str, list[Mapping]] = {}
    for sample in samples:
        problems.setdefault(sample["problem_id"], []).append(sample)
    groups: dict[tuple[str, str], list[list[Mapping]]] = {}
    for responses in problems.values():
        first = responses[0]
        for grouping, value in (("all", ""), ("subject", first.get("subject")), ("level", first.get("level"))):
            groups.setdefault((grouping, "" if value is None else str(value)), []).append(responses)
    rows = []
    for (grouping, value), members in groups.items():
        per_problem = {
            "accuracy": [sum(r["category"] == "correct" for r in rs) / len(rs) for rs in members],
            "format_accuracy": [sum(r["category"] != "format_failure" for r in rs) / len(rs) for rs in members],
        }
        for metric, (low, high) in bootstrap_intervals(per_problem).items():
            rows.append({"grouping": grouping, "group_value": value, "metric": metric, "low": low, "high": high})
    return rows
