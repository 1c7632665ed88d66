"""The numba kernels of a CPU device give the torch implementation's tokens bit for bit.

core/cpu_kernels.py runs the verifier's test and the window's draws on a CPU;
the torch code (core/verify.py, core/drafting.py) runs on a GPU. The engine's
chi-square suites on this machine test the kernels; this checks that both
give the same tokens, acceptance counts, drafts and kept flags on random
batches that take every branch: requests without drafts, drafts outside the
columns, greedy requests, rejections with and without a residual, coupled
slots with and without a previous draft, rows equal to the old q.
"""

import numpy as np
import pytest
import torch

from vllm_sjd.core import cpu_kernels
from vllm_sjd.core.drafting import draw_with
from vllm_sjd.core.rng import COUPLING_STREAM, DRAFT_STREAM, RESIDUAL_STREAM, window_uniforms
from vllm_sjd.core.verify import verify

WIDTH = 33


def _rows(generator, *shape, temperature=2.0):
    probs = torch.softmax(torch.randn(*shape, WIDTH, generator=generator) * temperature, dim=-1)
    probs[..., :3] = 0.0  # columns no row may hold, as a layout's
    return probs / probs.sum(dim=-1, keepdim=True)


def _both(fn):
    """fn() through the kernels, then through torch."""
    with_kernels = fn()
    with cpu_kernels.kernels_disabled():
        return with_kernels, fn()


def _verify_case(generator, n, greedy):
    total = sum(n)
    q = _rows(generator, total)
    drafts = torch.zeros(0, dtype=torch.int64)
    if total:
        drafts = torch.multinomial(q, 1, generator=generator)[:, 0]
    if total > 2:
        drafts[2] = -1  # a draft outside the columns
    mix = torch.rand(total, 1, generator=generator)
    target = mix * q + (1 - mix) * _rows(generator, total)  # near q: some drafts pass
    if total > 4:
        target[4] = q[4]  # q covers p: a rejection there draws from p
    batch = len(n)
    return dict(
        target_probs=target, bonus_probs=_rows(generator, batch), num_draft_tokens=np.array(n),
        max_num_drafts=max(n), drafts=drafts, draft_q=q, greedy=torch.tensor(greedy),
        keys=np.arange(batch) * 7 + int(torch.randint(1 << 30, (1,), generator=generator)),
        first_positions=np.arange(batch) * 100 + 3,
    )


def test_verification_gives_the_torch_tokens_and_counts():
    generator = torch.Generator().manual_seed(0)
    cases = [([5, 0, 7], [False, False, False]), ([4, 4, 4], [False, True, False]),
             ([0, 0], [False, True]), ([16], [False])]
    accepted_total = rejected = 0
    for trial in range(200):
        n, greedy = cases[trial % len(cases)]
        inputs = _verify_case(generator, n, greedy)
        kernel, reference = _both(lambda: verify(**inputs))
        assert torch.equal(kernel.tokens, reference.tokens), (trial, kernel.tokens, reference.tokens)
        assert torch.equal(kernel.num_accepted, reference.num_accepted)
        accepted_total += int(reference.num_accepted.sum())
        rejected += int((reference.num_accepted < torch.tensor(n)).sum())
    assert accepted_total > 100 and rejected > 100  # both branches taken, often


def _draw_case(generator, batch, slots):
    old_q = _rows(generator, batch, slots)
    old_drafts = torch.multinomial(old_q.view(-1, WIDTH), 1, generator=generator).view(batch, slots)
    mix = torch.rand(batch, slots, 1, generator=generator)
    q = mix * old_q + (1 - mix) * _rows(generator, batch, slots)  # often kept
    q[0, 0] = old_q[0, 0]  # p equal to the old q: no residual
    coupled = torch.rand(batch, slots, generator=generator) < 0.7
    keys = np.arange(batch) + int(torch.randint(1 << 30, (1,), generator=generator))
    positions = np.arange(batch) * 50
    return q, old_drafts, old_q, coupled, keys, positions


@pytest.mark.parametrize("coupled_drafting", [True, False])
def test_draws_give_the_torch_drafts(coupled_drafting):
    generator = torch.Generator().manual_seed(1)
    kept = 0
    for trial in range(100):
        q, old_drafts, old_q, coupled, keys, positions = _draw_case(generator, 3, 6)
        if coupled_drafting:
            streams = (DRAFT_STREAM, COUPLING_STREAM, RESIDUAL_STREAM)
            numbers = torch.from_numpy(window_uniforms(keys, positions, 6, streams))
            run = lambda: draw_with("coupled", q, numbers, old_drafts, old_q, coupled)  # noqa: E731
        else:
            numbers = torch.from_numpy(window_uniforms(keys, positions, 6))
            run = lambda: draw_with("independent", q, numbers)  # noqa: E731
        (drafts, kept_flags), (reference, reference_kept) = _both(run)
        assert torch.equal(drafts, reference), trial
        assert torch.equal(kept_flags, reference_kept)
        kept += int(reference_kept.sum())
    assert (kept > 100) == coupled_drafting


def test_kernels_are_off_inside_the_disabled_block_and_for_other_devices():
    cpu = torch.zeros(1)
    assert cpu_kernels.enabled_for(cpu)
    with cpu_kernels.kernels_disabled():
        assert not cpu_kernels.enabled_for(cpu)
    assert cpu_kernels.enabled_for(cpu)
    assert not cpu_kernels.enabled_for(torch.zeros(1, device="meta"))


def _window_case(generator, drafting, initial_drafts, with_allowed, greedy):
    from vllm_sjd.core.window import CellsAboveRows, PreviousWindow, StepRows

    slots = 6
    n, a = torch.tensor([slots, 2, slots, 0]), torch.tensor([1, 2, 4, 0])
    batch = len(n)
    rows = StepRows(_rows(generator, int(n.sum())), _rows(generator, batch), n, a)
    previous_q = _rows(generator, batch, slots)
    previous_q[0, 2:] = 0.7 * rows.target_probs[2:slots] + 0.3 * previous_q[0, 2:]  # often kept
    previous_drafts = torch.multinomial(previous_q.view(-1, WIDTH), 1, generator=generator).view(batch, slots)
    previous_drafts[2, 3] = -1  # outside the columns: nothing to couple with
    previous = PreviousWindow(previous_drafts, previous_q, torch.tensor([True, True, False, True]))
    positions = torch.tensor([[-1, 3, 4, 5, 6, 7], [20, 21, 22, 23, 24, 25], [51, 52, 53, 54, 55, 56],
                              [-1, -1, 0, 1, 2, 3]])
    above = CellsAboveRows(positions, torch.rand(batch, slots, generator=generator) < 0.5,
                           _rows(generator, batch, slots))
    allowed = None
    if with_allowed:
        allowed = torch.ones(batch, slots, WIDTH)
        allowed[..., :3] = 0.0
        allowed[0, 2] = 0.0
        allowed[0, 2, 7] = 1.0  # a forced token
        allowed = allowed / allowed.sum(dim=-1, keepdim=True)
    keys = np.arange(batch) + int(torch.randint(1 << 30, (1,), generator=generator))
    return dict(
        rows=rows, num_slots=slots, keys=keys, next_positions=np.array([10, 24, 55, 2]),
        greedy=torch.tensor(greedy), initial_drafts=initial_drafts, drafting=drafting,
        allowed=allowed, previous=previous, above=above,
    )


@pytest.mark.parametrize("drafting", ["coupled", "independent"])
@pytest.mark.parametrize("initial_drafts", ["above", "uniform"])
def test_windows_are_the_torch_windows(drafting, initial_drafts):
    from vllm_sjd.core.window import next_window

    generator = torch.Generator().manual_seed(2)
    kept = from_above = 0
    for trial in range(40):
        greedy = [False, trial % 2 == 1, False, trial % 4 == 3]
        inputs = _window_case(generator, drafting, initial_drafts, trial % 3 > 0, greedy)
        if trial % 5 == 4:
            inputs["above"] = None
        if trial % 3 == 2:  # a table's rows, as a layout hands them (read in place by the kernel)
            from vllm_sjd.core.window import TableRows

            table = inputs["allowed"].view(-1, WIDTH)[:5]
            inputs["allowed"] = TableRows(table, np.arange(24).reshape(4, 6) % 5)
        kernel, reference = _both(lambda: next_window(**inputs))
        for field in ("drafts", "q", "kept", "fresh", "from_above", "previous_q"):
            mine, theirs = getattr(kernel, field), getattr(reference, field)
            assert (mine is None) == (theirs is None), field
            assert mine is None or torch.equal(mine, theirs), (trial, field)
        kept += int(reference.kept.sum())
        from_above += int(reference.from_above.sum())
    assert (kept > 20) == (drafting == "coupled")
    assert (from_above > 20) == (initial_drafts == "above")


def test_hashing_gives_numpys_bits():
    from vllm_sjd.core.rng import ACCEPT_STREAM, TOKEN_STREAM, counter_uniforms

    cpu_kernels.warm_up()
    assert cpu_kernels.loaded() is not None
    keys = np.array([-5, 123456789012345, 2**62, -(2**63)], dtype=np.int64)
    positions = np.array([3, 10**12, 7, 0], dtype=np.int64)
    streams = np.array([[ACCEPT_STREAM], [TOKEN_STREAM], [COUPLING_STREAM]], dtype=np.int64)
    for slots in (0, np.arange(16)):
        args = (keys[:, None, None], positions[:, None, None], slots, streams[None])
        kernel, reference = _both(lambda: counter_uniforms(*args))
        assert kernel.dtype == reference.dtype == np.float64
        assert np.array_equal(kernel, reference)
        assert len(np.unique(reference)) == reference.size  # no two numbers alike


def test_window_index_layout_is_numpys():
    from vllm_sjd.core.window import _slot_layout

    cpu_kernels.warm_up()
    rng = np.random.default_rng(0)
    for trial in range(300):
        batch, slots = rng.integers(1, 5), rng.integers(1, 20)
        n = rng.integers(0, slots + 1, batch)
        a = np.array([rng.integers(0, x + 1) for x in n])
        first = rng.integers(0, 100, batch)
        above = None
        if trial % 3:
            above = first[:, None] + np.arange(slots) - rng.integers(-3, slots + 3, (batch, 1))
            above[rng.random(above.shape) < 0.2] = -1
        kernel, reference = _both(lambda: _slot_layout(n, a, slots, above, first))
        assert np.array_equal(kernel, reference), trial


def test_cells_above_record_and_look_up_as_torch_does():
    from vllm_sjd.core.cells_above import CellsAbove

    generator = torch.Generator().manual_seed(3)
    rings = CellsAbove()
    with cpu_kernels.kernels_disabled():
        reference = CellsAbove()
    strides = {"a": 4, "b": 6, "c": 5}
    end = {r: 10 for r in strides}
    hits = 0
    for step in range(60):
        req_ids = ["a", "b", "c"] if step % 7 else ["b", "c"]
        entries, entry_strides, positions = [], [], []
        for r in req_ids:
            committed = int(torch.randint(1, 8, (1,), generator=generator))  # may pass a stride
            entries += [r] * committed
            entry_strides += [strides[r]] * committed
            positions += range(end[r], end[r] + committed)
            end[r] += committed
        probs = _rows(generator, len(entries) + 2)
        source = np.arange(len(entries)) + 1
        if step % 2:  # as a step's target and bonus rows
            probs = (probs[:3], probs[3:])
        rings.record(entries, entry_strides, np.array(positions), probs, rows=source)
        with cpu_kernels.kernels_disabled():
            reference.record(entries, entry_strides, np.array(positions), probs, rows=source)
        above = np.array([[end[r] - strides[r] + s - 2 for s in range(8)] for r in req_ids]
                         + [list(range(8))])  # "d": a request without a ring
        above[0, 0] = -1
        found, rows = rings.lookup(req_ids + ["d"], above)
        with cpu_kernels.kernels_disabled():
            found_ref, rows_ref = reference.lookup(req_ids + ["d"], above)
        assert torch.equal(found, found_ref), step
        assert torch.equal(rows[found], rows_ref[found_ref])
        hits += int(found.sum())
        if step % 11 == 10:
            rings.evict(["a"])
            reference.evict(["a"])
    assert hits > 100


@pytest.mark.parametrize("kind", ["penalty", "uniform", "allowed"])
def test_layout_rows_of_one_grid_are_numpys(kind):
    from vllm_sjd import demo
    from vllm_sjd.layouts.constraints import LayoutConstraints, image_extra_args

    cpu_kernels.warm_up()
    grid = demo.layout().grid(demo.IMAGE_SIZE, demo.IMAGE_SIZE)
    layouts = LayoutConstraints()
    entries = layouts.lookup(["a", "b"], lambda r: image_extra_args(grid), lambda r: {"a": 20, "b": 9}[r])
    vocab_size, device = 8960, torch.device("cpu")
    columns = layouts.columns(entries, vocab_size, device)
    for first, counts in (([21, 9], [17, 5]), ([19, 500], [3, 16]), ([20 + grid.num_tokens - 2, 9], [4, 1])):
        args = (entries, np.array(first), np.array(counts), vocab_size, device, columns, kind)
        kernel, reference = _both(lambda: layouts.row_masks(*args))
        assert torch.equal(kernel, reference)
        # Both against the per-row lookup every layout takes (masks_at).
        request = np.repeat(np.arange(2), counts)
        relative = np.concatenate([np.arange(c) + f - p for c, f, p in zip(counts, first, [20, 9])])
        assert torch.equal(reference, layouts.masks_at(entries, request, relative, vocab_size, device,
                                                       columns, kind))


def test_cells_above_positions_are_numpys():
    from vllm_sjd import demo
    from vllm_sjd.layouts.constraints import LayoutConstraints

    cpu_kernels.warm_up()
    layout = demo.layout()
    small, large = layout.grid(64, 64), layout.grid(128, 32)
    entries = [(small, 20), (None, 5), (large, 9), (small, 31)]
    cells = 0
    for first in range(0, small.num_tokens + 40, 7):
        firsts = np.array([20, 5, 9, 31]) + first - 3
        kernel, reference = _both(lambda: LayoutConstraints.cells_above(entries, firsts, 16))
        assert np.array_equal(kernel[0], reference[0]), first
        assert kernel[1] == reference[1]
        cells += int((reference[0] >= 0).sum())
    assert cells > 100


def test_slot_rows_of_one_grid_are_the_row_masks():
    from vllm_sjd import demo
    from vllm_sjd.core.window import TableRows
    from vllm_sjd.layouts.constraints import LayoutConstraints, image_extra_args

    grid = demo.layout().grid(64, 64)
    layouts = LayoutConstraints()
    entries = layouts.lookup(["a", "b"], lambda r: image_extra_args(grid), lambda r: {"a": 20, "b": 9}[r])
    columns = layouts.columns(entries, 8960, torch.device("cpu"))
    for first in ([21, 9], [19, 500], [20 + grid.num_tokens - 2, 9]):
        slots = layouts.slot_rows(entries, np.array(first), 16, 8960, torch.device("cpu"), columns)
        assert isinstance(slots, TableRows)
        masks = layouts.row_masks(entries, np.array(first), np.array([16, 16]), 8960, torch.device("cpu"),
                                  columns, kind="uniform")
        assert torch.equal(slots.gathered(), masks.view(2, 16, -1))


def test_committed_entries_are_the_committed_row_sources():
    from vllm_sjd.core.window import committed_row_sources

    cpu_kernels.warm_up()
    rng = np.random.default_rng(4)
    for trial in range(200):
        batch = rng.integers(1, 6)
        n = rng.integers(0, 9, batch)
        a = np.array([rng.integers(0, x + 1) for x in n])
        num_tokens = rng.integers(20, 90, batch)
        include = rng.random(batch) < 0.7
        request, positions, sources = cpu_kernels.loaded().committed_entries(n, a, num_tokens, include,
                                                                            int(n.sum()))
        expected = committed_row_sources(n.tolist(), a.tolist(), int(n.sum()))
        want = [(i, int(num_tokens[i]) - len(rows) + j, int(row))
                for i, rows in enumerate(expected) if include[i] for j, row in enumerate(rows)]
        assert list(zip(request.tolist(), positions.tolist(), sources.tolist())) == want, trial


def test_penalty_rows_added_in_place_are_the_row_masks_added():
    from vllm_sjd import demo
    from vllm_sjd.layouts.constraints import LayoutConstraints, image_extra_args

    grid = demo.layout().grid(64, 64)
    layouts = LayoutConstraints()
    entries = layouts.lookup(["a", "b"], lambda r: image_extra_args(grid), lambda r: {"a": 20, "b": 9}[r])
    device = torch.device("cpu")
    columns = layouts.columns(entries, 8960, device)
    generator = torch.Generator().manual_seed(5)
    for first, counts in (([21, 9], [17, 5]), ([19, 500], [3, 16])):
        scores = torch.randn(sum(counts), columns.ids.numel(), generator=generator)
        expected = scores + layouts.row_masks(entries, np.array(first), np.array(counts), 8960, device,
                                              columns, kind="penalty")
        layouts.add_row_masks(scores, entries, np.array(first), np.array(counts), 8960, columns)
        assert torch.equal(scores, expected)
        assert torch.isinf(scores).any() and torch.isfinite(scores).any()
