"""Goodness of fit of sampled sequences against exact probabilities."""

from collections import Counter

from scipy.stats import chisquare


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
    scale = sum(observed) / sum(expected)  # exact sums to 1 up to rounding
    return float(chisquare(observed, [e * scale for e in expected]).pvalue)
