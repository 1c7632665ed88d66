"""Goodness of fit of sampled sequences against exact probabilities (torch only)."""

from collections import Counter

import torch


def chi_square_pvalue(
    samples: list[tuple[int, ...]],
    exact: dict[tuple[int, ...], float],
    min_expected: float = 5.0,
) -> float:
    """Pearson's chi-square p-value; outcomes expected < min_expected times are pooled.

    A sample outside the support of `exact` is a hard failure (p = 0).
    """
    counts = Counter(samples)
    if set(counts) - set(exact):
        return 0.0
    total = len(samples)
    observed, expected = [], []
    pooled_obs = pooled_exp = 0.0
    for outcome, prob in exact.items():
        if prob * total >= min_expected:
            observed.append(counts.get(outcome, 0))
            expected.append(prob * total)
        else:
            pooled_obs += counts.get(outcome, 0)
            pooled_exp += prob * total
    if pooled_exp > 0:
        observed.append(pooled_obs)
        expected.append(pooled_exp)
    if len(observed) < 2:
        return 1.0
    observed_t = torch.tensor(observed, dtype=torch.float64)
    expected_t = torch.tensor(expected, dtype=torch.float64)
    expected_t *= observed_t.sum() / expected_t.sum()  # exact sums to 1 up to rounding
    statistic = ((observed_t - expected_t) ** 2 / expected_t).sum()
    degrees = torch.tensor((len(observed) - 1) / 2, dtype=torch.float64)
    # The chi-square survival function is the upper regularised gamma function.
    return float(torch.special.gammaincc(degrees, statistic / 2))
