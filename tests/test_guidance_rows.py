"""The guided blend of a step's rows (guidance.guide_pairs), against the formula row by row."""

import numpy as np
import pytest
import torch

from vllm_sjd import guidance
from vllm_sjd.guidance import guide_pairs
from vllm_sjd.layouts.grid import ImageGrid

GRID = ImageGrid(width=32, height=32, rows=2, cols=2, header=(7, 8, 9), row_end=5,
                 trailer=(6,), code_low=10, code_high=20)


@pytest.mark.parametrize("sliced_pairs", [0, 2])  # the batched path, then one slice a pair
def test_pairs_blend_image_rows_and_keep_header_rows_conditional(monkeypatch, sliced_pairs):
    monkeypatch.setattr(guidance, "SLICED_PAIRS", sliced_pairs)
    # Requests: 0 = twin of 2, 1 unguided, 2 conditional (starts inside the header),
    # 3 conditional, 4 = twin of 3; rows per request 3, 2, 3, 4, 4.
    counts = np.array([3, 2, 3, 4, 4])
    prompt_len = 10
    first_positions = np.array([11, 30, 11, 20, 20])  # request 2: rows 1..3 of the image
    entries = [(GRID, prompt_len)] * 5
    logits = torch.randn(int(counts.sum()), 21, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    guide_pairs(logits, [(2, 0, 3.0), (3, 4, 1.5)], counts, first_positions, entries)

    first = np.cumsum(counts) - counts
    for cond, twin, scale in [(2, 0, 3.0), (3, 4, 1.5)]:
        for k in range(counts[cond]):
            c, u = before[first[cond] + k], before[first[twin] + k]
            in_header = first_positions[cond] - prompt_len + k < len(GRID.header)
            expected = c if in_header else u + scale * (c - u)
            torch.testing.assert_close(logits[first[cond] + k], expected)
            torch.testing.assert_close(logits[first[twin] + k], expected)
    # Request 2's first two rows are header rows (positions 1 and 2): conditional kept.
    assert torch.equal(logits[first[2]], before[first[2]])
    assert not torch.equal(logits[first[2] + 2], before[first[2] + 2])
    # The unguided request is untouched.
    assert torch.equal(logits[first[1]:first[1] + 2], before[first[1]:first[1] + 2])


def test_sliced_and_batched_pairs_give_the_same_bits():
    counts = np.array([4, 4, 1, 3, 3])
    first_positions = np.array([12, 12, 40, 10, 10])  # pair (3, 4) starts in the header
    entries = [(GRID, 10)] * 5
    logits = torch.randn(int(counts.sum()), 33, generator=torch.Generator().manual_seed(2))
    results = []
    for sliced_pairs in (0, 2):
        got = logits.clone()
        guidance.SLICED_PAIRS, old = sliced_pairs, guidance.SLICED_PAIRS
        try:
            guide_pairs(got, [(0, 1, 2.5), (3, 4, 4.0)], counts, first_positions, entries)
        finally:
            guidance.SLICED_PAIRS = old
        results.append(got)
    assert torch.equal(results[0], results[1])
