"""Engine-free tests of the draft samplers and initial drafts "above" (vllm_sjd/core)."""

import numpy as np
import torch
from scipy.stats import chisquare

from vllm_sjd.core.cells_above import CellsAbove
from vllm_sjd.core.drafting import draw, maximal_coupling, sample_inverse_cdf
from vllm_sjd.core.rng import token_exponentials, window_uniforms
from vllm_sjd.core.window import CellsAboveRows, PreviousWindow, StepRows, next_window
from vllm_sjd.layouts.grid import ImageGrid

N = 40_000
P = torch.tensor([0.5, 0.1, 0.4, 0.0])
Q_OLD = torch.tensor([0.2, 0.5, 0.1, 0.2])


def _uniforms(stream_offset: int) -> torch.Tensor:
    keys = torch.arange(N, dtype=torch.int64) + stream_offset * N
    return window_uniforms(keys, torch.zeros(N, dtype=torch.int64), 1)


def _fits(samples: torch.Tensor, probs: torch.Tensor) -> float:
    support = probs > 0
    counts = torch.bincount(samples.flatten(), minlength=len(probs)).double()
    assert counts[~support].sum() == 0
    expected = probs[support].double() * samples.numel()
    return float(chisquare(counts[support].numpy(), expected.numpy()).pvalue)


def test_maximal_coupling_samples_the_new_row_and_keeps_what_it_can():
    old = sample_inverse_cdf(Q_OLD.expand(N, 1, 4), _uniforms(0))
    drafts, kept = maximal_coupling(
        P.expand(N, 1, 4), old, Q_OLD.expand(N, 1, 4), _uniforms(1), _uniforms(2)
    )
    assert _fits(drafts, P) > 1e-4
    # Keeps the old draft with probability sum(min(p, q)) = 1 - TV(p, q) = 0.5.
    assert abs(kept.double().mean().item() - torch.minimum(P, Q_OLD).sum().item()) < 0.01
    assert torch.equal(drafts[kept], old[kept])
    # What the public SCD code does (a kept draft reports its old q) would be
    # verified against the wrong q; the test in test_lossless.py catches it.
    # Independent re-drafts keep the old token far less often.
    fresh = sample_inverse_cdf(P.expand(N, 1, 4), _uniforms(3))
    assert (fresh == old).double().mean() < 0.3 < (drafts == old).double().mean()


def test_gumbel_drafts_are_exact_and_stable_per_position():
    keys = torch.arange(N, dtype=torch.int64)
    positions = torch.full((N, 1), 7)
    noise = token_exponentials(keys, positions, 4)
    assert noise.shape == (N, 1, 4) and bool((noise > 0).all())
    drafts = (P / noise).argmax(-1)
    assert _fits(drafts, P) > 1e-4
    # The same position keeps its noise: a nearby row re-drafts the same token.
    nearby = torch.tensor([0.45, 0.15, 0.4, 0.0])
    again = (nearby / token_exponentials(keys, positions, 4)).argmax(-1)
    assert (again == drafts).double().mean() > 0.9
    other_position = (P / token_exponentials(keys, positions + 1, 4)).argmax(-1)
    assert (other_position == drafts).double().mean() < 0.6


def test_draw_falls_back_to_independent_samples_where_no_previous_draft_exists():
    q = P.expand(2, 3, 4).contiguous()
    keys, start = torch.tensor([3, 4]), torch.tensor([10, 10])
    independent, _ = draw("independent", q, keys=keys, next_positions=start)
    has_previous = torch.tensor([[True, False, False], [False, False, False]])
    coupled, kept = draw(
        "coupled", q, keys=keys, next_positions=start,
        previous_drafts=torch.full((2, 3), 1), previous_q=Q_OLD.expand(2, 3, 4),
        has_previous=has_previous,
    )
    assert torch.equal(coupled[~has_previous], independent[~has_previous])
    assert not kept[~has_previous].any()


def _step(rows_per_request: list[torch.Tensor], n: list[int], a: list[int]) -> StepRows:
    target = [r[:count] for r, count in zip(rows_per_request, n)]
    return StepRows(
        target_probs=torch.cat(target),
        bonus_probs=torch.stack([r[count] for r, count in zip(rows_per_request, n)]),
        num_draft_tokens=torch.tensor(n),
        num_accepted=torch.tensor(a),
    )


def test_coupled_window_couples_each_slot_with_the_draft_at_its_position():
    # 4 drafts verified, 1 accepted: next slots 0, 1, 2 sit where old slots 2, 3, 4 did.
    vocab, num_slots = 8, 5
    rows = torch.full((5, vocab), 1 / vocab)
    previous_q = torch.zeros(1, num_slots, vocab)
    previous_q[0, torch.arange(num_slots), torch.arange(num_slots)] = 1.0  # slot s drafted s
    previous = PreviousWindow(
        torch.arange(num_slots)[None], previous_q, torch.tensor([True])
    )
    window = next_window(
        _step([rows], n=[4], a=[1]), num_slots=num_slots, keys=torch.tensor([1]),
        next_positions=torch.tensor([20]), greedy=torch.tensor([False]),
        initial_drafts="uniform", drafting="coupled", previous=previous,
    )
    assert torch.equal(window.previous_q[0, :3], previous_q[0, 2:5])
    # A kept draft is the old one at the same position; its q is the new row.
    kept = window.kept[0]
    assert not kept[3:].any()  # fresh slots have no previous draft at their position
    assert torch.equal(window.drafts[0, :3][kept[:3]], torch.arange(2, 5)[kept[:3]])
    assert torch.allclose(window.q[0, :3], rows[2:5])


def test_cells_above_hold_the_last_row_of_committed_cells():
    grid = ImageGrid(width=8, height=8, rows=3, cols=2, header=(5,), row_end=7,
                     trailer=(9,), code_low=10, code_high=30)
    # Relative positions: 0 header, 1-2 codes, 3 end-of-line, 4-5 codes, ...
    cells = grid.cell_above(torch.arange(12))
    assert cells.tolist() == [-1, -1, -1, -1, 1, 2, -1, 4, 5, -1, -1, -1]
    ring = CellsAbove()
    rows = torch.eye(16)[:5]
    ring.record(["r"] * 5, [grid.row_stride] * 5, np.arange(0, 5), rows)
    found, got = ring.lookup(["r", "other"], np.array([[1, 2, 4, -1, 0], [0, 1, 2, 3, 4]]))
    assert found[0].tolist() == [False, True, True, False, False]  # 1 was overwritten by 4
    assert not found[1].any()  # a request with no ring holds nothing
    assert torch.equal(got[0, 1], rows[2]) and torch.equal(got[0, 2], rows[4])
    ring.evict(["r"])
    assert ring.tracked_requests() == set()
    ring.record(["s", "s"], [grid.row_stride] * 2, np.array([7, 8]), rows[:2])
    found, _ = ring.lookup(["s"], np.array([[4, 7, 8]]))
    assert found[0].tolist() == [False, True, True]  # r's rows went with r
    # Entries may name their rows in a larger tensor (the step's rows, unselected).
    ring.record(["s", "s"], [grid.row_stride] * 2, np.array([9, 10]), rows, rows=np.array([4, 0]))
    found, got = ring.lookup(["s"], np.array([[9, 10]]))
    assert found.all() and torch.equal(got[0], rows[[4, 0]])


def test_above_initial_drafts_draw_from_the_cell_above_and_uniform_elsewhere():
    # Next window at positions 30..35; 2 drafts verified, none accepted: slots
    # 0 and 1 are recycled (rows 1 and 2), slots 2..5 fresh. Cells above:
    # slot 2 -> 25 (committed, held), slot 4 -> 30 (slot 0 of this window),
    # slot 5 -> none (an end-of-line cell), slot 3 -> 28 (committed, not held).
    vocab, num_slots = 12, 6
    rows = torch.zeros(3, vocab)
    rows[torch.arange(3), torch.tensor([0, 1, 2])] = 1.0
    held_row = torch.zeros(vocab)
    held_row[[4, 5]] = 0.5
    above = CellsAboveRows(
        positions=torch.tensor([[-1, -1, 25, 28, 30, -1]]),
        held=torch.tensor([[False, False, True, False, False, False]]),
        rows=held_row.expand(1, num_slots, vocab),
    )
    window = next_window(
        _step([rows], n=[2], a=[0]), num_slots=num_slots, keys=torch.tensor([2]),
        next_positions=torch.tensor([30]), greedy=torch.tensor([False]),
        initial_drafts="above", above=above,
    )
    q = window.q[0]
    assert window.fresh[0].tolist() == [False, False, True, True, True, True]
    assert window.from_above[0].tolist() == [False, False, True, False, True, False]
    assert torch.equal(q[2], held_row) and int(window.drafts[0, 2]) in (4, 5)
    assert torch.equal(q[4], rows[1])  # this pass's row for position 30
    for slot in (3, 5):
        assert torch.allclose(q[slot], torch.full((vocab,), 1 / vocab))
