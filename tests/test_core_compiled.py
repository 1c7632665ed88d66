"""The verifier's and the window's tensor work gives the same results compiled (core/compiled.py).

Compilation is on where the SJD runner sits on a CUDA device; this checks the
compiled graphs (inductor's CPU backend here) against eager on batches that
take every branch: requests with and without drafts, greedy and random ones,
coupled drafting with cells above and layout masks, Gumbel drafting.
"""

import numpy as np
import pytest
import torch

from vllm_sjd.core.compiled import compiled_enabled, set_compiled
from vllm_sjd.core.cpu_kernels import kernels_disabled
from vllm_sjd.core.verify import verify
from vllm_sjd.core.window import CellsAboveRows, PreviousWindow, StepRows, next_window

WIDTH = 40
SLOTS = 6


@pytest.fixture
def both_ways():
    """Runs a function eager, then compiled; returns both results (torch's code both
    times: on this CPU the numba kernels would otherwise take the eager calls)."""
    assert not compiled_enabled()

    def run(fn):
        with kernels_disabled():
            eager = fn()
            set_compiled(True)
            try:
                return eager, fn()
            finally:
                set_compiled(False)

    return run


def _probs(generator, *shape):
    probs = torch.softmax(torch.randn(*shape, WIDTH, generator=generator) * 2, dim=-1)
    probs[..., :3] = 0.0  # columns no row may hold, as a layout's
    return probs / probs.sum(dim=-1, keepdim=True)


def _verify_inputs(generator, n):
    total = sum(n)
    q = _probs(generator, total)
    drafts = torch.multinomial(q, 1, generator=generator)[:, 0]
    drafts[0] = -1  # a draft outside the columns
    target = 0.8 * q + 0.2 * _probs(generator, total)  # near q: some drafts pass
    return dict(
        target_probs=target, bonus_probs=_probs(generator, len(n)),
        num_draft_tokens=np.array(n), max_num_drafts=max(n), drafts=drafts, draft_q=q,
        greedy=torch.tensor([False, True, False, False]),
        keys=np.array([11, 12, 13, 14]), first_positions=np.array([100, 40, 7, 300]),
    )


def test_verification_compiled_gives_the_eager_tokens(both_ways):
    generator = torch.Generator().manual_seed(0)
    for n in ([3, 5, 0, 5], [5, 5, 5, 5]):
        inputs = _verify_inputs(generator, n)
        eager, compiled = both_ways(lambda: verify(**inputs))
        assert torch.equal(eager.tokens, compiled.tokens)
        assert torch.equal(eager.num_accepted, compiled.num_accepted)
        assert eager.num_accepted.sum() > 0  # some drafts pass, some do not
        assert (eager.num_accepted < torch.tensor(n)).any()


def _window_inputs(generator, drafting, initial_drafts):
    n, a = torch.tensor([SLOTS, 2, SLOTS]), torch.tensor([1, 2, 4])
    batch = len(n)
    rows = StepRows(_probs(generator, int(n.sum())), _probs(generator, batch), n, a)
    previous_q = _probs(generator, batch, SLOTS)
    previous_q[0, 2:] = 0.7 * rows.target_probs[2:SLOTS] + 0.3 * previous_q[0, 2:]  # often kept
    previous = PreviousWindow(torch.multinomial(previous_q.view(-1, WIDTH), 1, generator=generator)
                              .view(batch, SLOTS), previous_q, torch.tensor([True, True, False]))
    positions = torch.tensor([[-1, 3, 4, 5, 6, 7], [20, 21, 22, 23, 24, 25], [51, 52, 53, 54, 55, 56]])
    above = CellsAboveRows(positions, torch.rand(batch, SLOTS, generator=generator) < 0.5,
                           _probs(generator, batch, SLOTS))
    allowed = torch.ones(batch, SLOTS, WIDTH, dtype=torch.bool)
    allowed[..., :3] = False
    allowed[0, 2] = False
    allowed[0, 2, 7] = True  # a forced token
    return dict(
        rows=rows, num_slots=SLOTS, keys=np.array([5, 6, 7]), next_positions=np.array([10, 24, 55]),
        greedy=torch.tensor([False, False, True]), initial_drafts=initial_drafts,
        drafting=drafting, allowed=allowed, previous=previous, above=above,
    )


@pytest.mark.parametrize("drafting,initial_drafts", [("coupled", "above"), ("gumbel", "last_distribution")])
def test_windows_compiled_are_the_eager_windows(both_ways, drafting, initial_drafts):
    inputs = _window_inputs(torch.Generator().manual_seed(1), drafting, initial_drafts)
    eager, compiled = both_ways(lambda: next_window(**inputs))
    assert torch.equal(eager.drafts, compiled.drafts)
    assert torch.equal(eager.kept, compiled.kept)
    assert torch.equal(eager.fresh, compiled.fresh)
    assert torch.equal(eager.from_above, compiled.from_above)
    torch.testing.assert_close(eager.q, compiled.q)
    assert eager.fresh.any() and (~eager.fresh).any()
    if drafting == "coupled":
        assert eager.kept.any()  # the coupling kept some previous drafts
