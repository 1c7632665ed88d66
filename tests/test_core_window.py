"""Engine-free tests of the SJD window math (vllm_sjd/core)."""

import math

import numpy as np
import pytest
import torch

from vllm_sjd.core.rng import (
    COUPLING_STREAM,
    _splitmix64_host,
    key_from_seed,
    splitmix64,
    splitmix64_reference,
    window_uniforms,
)
from vllm_sjd.core.window import StepRows, next_window, sample_inverse_cdf


def test_splitmix64_matches_reference_with_wraparound():
    values = [0, 1, 2**62, -(2**63), -1, 123456789123456789]
    got = splitmix64(torch.tensor(values, dtype=torch.int64)).tolist()
    for value, out in zip(values, got):
        assert out & ((1 << 64) - 1) == splitmix64_reference(value & ((1 << 64) - 1))
    host = _splitmix64_host(np.array(values, dtype=np.int64).view(np.uint64)).tolist()
    assert host == [splitmix64_reference(v & ((1 << 64) - 1)) for v in values]


def test_window_uniforms_of_several_streams_are_those_of_one_call_each():
    keys, positions = np.array([3, -(2**62), 77]), np.array([0, 10, 2**40])
    both = window_uniforms(keys, positions, 5, (0, COUPLING_STREAM))
    assert np.array_equal(both[0], window_uniforms(keys, positions, 5))
    assert np.array_equal(both[1], window_uniforms(keys, positions, 5, COUPLING_STREAM))
    assert not np.array_equal(both[0], both[1])


def test_window_uniforms_are_uniform_and_depend_on_every_input():
    keys = torch.arange(4000, dtype=torch.int64) * 7919
    u = window_uniforms(keys, torch.full((4000,), 10), 8)
    assert u.shape == (4000, 8) and u.dtype == torch.float64
    assert 0 <= u.min() and u.max() < 1
    # Mean and variance of U(0,1): 1/2 and 1/12, within 5 standard errors.
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())
    assert abs(u.var().item() - 1 / 12) < 0.005
    one = torch.tensor([key_from_seed(3)])
    base = window_uniforms(one, torch.tensor([5]), 4)
    assert torch.equal(base, window_uniforms(one, torch.tensor([5]), 4))
    assert not torch.equal(base, window_uniforms(one, torch.tensor([6]), 4))
    assert not torch.equal(base, window_uniforms(one + 1, torch.tensor([5]), 4))
    assert len(set(base.flatten().tolist())) == 4


def test_inverse_cdf_sampling_follows_the_distribution_and_skips_zeros():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    u = window_uniforms(torch.arange(20000, dtype=torch.int64), torch.zeros(20000, dtype=torch.int64), 1)[:, 0]
    samples = sample_inverse_cdf(probs.expand(20000, 5), u)
    freq = torch.bincount(samples, minlength=5).double() / 20000
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, probs.double(), atol=0.015)


def _rows(vocab: int, n: list[int], a: list[int]) -> StepRows:
    """Rows whose argmax encodes (request, row index): token = 10*b + j."""
    target, bonus = [], []
    for b, count in enumerate(n):
        for j in range(count):
            target.append(torch.nn.functional.one_hot(torch.tensor(10 * b + j), vocab))
        bonus.append(torch.nn.functional.one_hot(torch.tensor(10 * b + count), vocab))
    target_probs = torch.stack(target).float() if target else torch.zeros(0, vocab)
    return StepRows(
        target_probs=target_probs,
        bonus_probs=torch.stack(bonus).float(),
        num_draft_tokens=torch.tensor(n),
        num_accepted=torch.tensor(a),
    )


def _window(rows, **kwargs):
    window = next_window(rows, **kwargs)
    return window.drafts, window.q


@pytest.mark.parametrize("initial", ["uniform", "last_distribution"])
def test_tail_rows_are_recycled_into_the_next_window(initial):
    # Request 0: 4 drafts, 1 accepted -> rows 2, 3 (target) and 4 (bonus) recycled.
    # Request 1: 3 drafts, all accepted -> nothing recycled.
    # Request 2: no drafts (first step) -> nothing recycled.
    rows = _rows(40, n=[4, 3, 0], a=[1, 3, 0])
    drafts, q = _window(
        rows,
        num_slots=4,
        keys=torch.tensor([1, 2, 3]),
        next_positions=torch.tensor([10, 20, 30]),
        greedy=torch.zeros(3, dtype=torch.bool),
        initial_drafts=initial,
    )
    assert drafts.shape == (3, 4) and q.shape == (3, 4, 40)
    assert drafts[0, :3].tolist() == [2, 3, 4]
    for b in range(3):  # every draft is a sample of its own q
        assert torch.all(q[b, torch.arange(4), drafts[b]] > 0)
        assert torch.allclose(q[b].sum(-1), torch.ones(4))
    fresh = [(0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)]
    for b, slot in fresh:
        if initial == "uniform":
            assert torch.allclose(q[b, slot], torch.full((40,), 1 / 40))
        else:  # the newest row: the bonus row
            assert drafts[b, slot] == 10 * b + [4, 3, 0][b]


def test_uniform_initial_drafts_respect_the_allowed_tokens():
    allowed = torch.zeros(40, dtype=torch.bool)
    allowed[[5, 9, 33]] = True
    drafts, q = _window(
        _rows(40, n=[0, 0], a=[0, 0]),
        num_slots=16,
        keys=torch.tensor([4, 5]),
        next_positions=torch.tensor([3, 3]),
        greedy=torch.zeros(2, dtype=torch.bool),
        initial_drafts="uniform",
        allowed=allowed,
    )
    assert set(drafts.flatten().tolist()) <= {5, 9, 33}
    assert torch.allclose(q[0, 0][allowed], torch.full((3,), 1 / 3))


@pytest.mark.parametrize("initial", ["uniform", "last_distribution"])
def test_per_slot_constraints_force_tokens_in_fresh_slots(initial):
    # Slot 1 of every window is forced to token 7; the others allow 20..39.
    allowed = torch.zeros(2, 3, 40, dtype=torch.bool)
    allowed[:, :, 20:] = True
    allowed[:, 1, :] = False
    allowed[:, 1, 7] = True
    drafts, q = _window(
        _rows(40, n=[0, 0], a=[0, 0]),
        num_slots=3,
        keys=torch.tensor([4, 5]),
        next_positions=torch.tensor([3, 3]),
        greedy=torch.zeros(2, dtype=torch.bool),
        initial_drafts=initial,
        allowed=allowed,
    )
    assert drafts[:, 1].tolist() == [7, 7]
    assert torch.all(q[:, 1, 7] == 1.0)
    assert torch.all(drafts[:, [0, 2]] >= 20)
    assert torch.allclose(q.sum(-1), torch.ones(2, 3))


def test_greedy_requests_draft_the_argmax_with_one_hot_q():
    rows = _rows(40, n=[3], a=[0])
    rows.target_probs = rows.target_probs * 0.7 + 0.3 / 40  # not one-hot any more
    drafts, q = _window(
        rows,
        num_slots=3,
        keys=torch.tensor([9]),
        next_positions=torch.tensor([4]),
        greedy=torch.tensor([True]),
        initial_drafts="uniform",
    )
    assert drafts[0].tolist() == [1, 2, 3]
    assert torch.equal(q[0], torch.nn.functional.one_hot(drafts[0], 40).float())


def test_same_key_and_position_give_the_same_window_in_any_batch():
    alone = _rows(40, n=[0], a=[0])
    pair = _rows(40, n=[0, 0], a=[0, 0])
    common = dict(num_slots=6, initial_drafts="uniform")
    d1, _ = _window(alone, keys=torch.tensor([77]), next_positions=torch.tensor([12]),
                        greedy=torch.tensor([False]), **common)
    d2, _ = _window(pair, keys=torch.tensor([5, 77]), next_positions=torch.tensor([3, 12]),
                        greedy=torch.tensor([False, False]), **common)
    assert torch.equal(d1[0], d2[1])
