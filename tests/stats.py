"""Goodness of fit of sampled sequences against exact probabilities.

The function lives in the package (vllm_sjd/testing/stats.py) so that
`vllm-sjd selfcheck` can run it on a user's machine without scipy.
"""

from vllm_sjd.testing.stats import chi_square_pvalue

__all__ = ["chi_square_pvalue"]
