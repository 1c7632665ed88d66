"""Windows built on a layout's columns (with its uniform rows) equal the full-vocabulary
windows (with its bool masks), bit for bit."""

from types import SimpleNamespace

import pytest
import torch

from vllm_sjd.core.columns import Columns
from vllm_sjd.core.window import StepRows
from vllm_sjd.layouts.constraints import LayoutConstraints
from vllm_sjd.layouts.grid import ImageGrid
from vllm_sjd.proposer import SJDProposer

VOCAB, SLOTS, PROMPT = 48, 5, 3
GRID = ImageGrid(width=8, height=8, rows=4, cols=4, header=(5, 6), row_end=7,
                 trailer=(9,), code_low=12, code_high=30)


def _proposer(drafting: str, initial: str) -> SJDProposer:
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=SLOTS),
        additional_config={"sjd": {"drafting": drafting, "initial_drafts": initial}},
        model_config=SimpleNamespace(max_model_len=64),
    )
    return SJDProposer(config)


def _masked_rows(generator, layouts, entries, first, counts) -> torch.Tensor:
    mask = layouts.row_masks(entries, first, counts, VOCAB, torch.device("cpu"))
    logits = torch.randn(mask.shape, generator=generator) * 2
    return logits.masked_fill(~mask, float("-inf")).softmax(-1)


@pytest.mark.parametrize("drafting", ["independent", "coupled", "gumbel"])
@pytest.mark.parametrize("initial", ["uniform", "above", "last_distribution"])
def test_windows_on_the_layout_columns_equal_full_vocabulary_windows(drafting, initial):
    layouts = LayoutConstraints()
    entries = [(GRID, PROMPT), (GRID, PROMPT)]
    columns = layouts.columns(entries, VOCAB, torch.device("cpu"))
    assert columns.ids.tolist() == [5, 6, 7, 9, *range(12, 30)]
    full, compact = _proposer(drafting, initial), _proposer(drafting, initial)
    generator = torch.Generator().manual_seed(7)
    req_ids, seeds = ["a", "b"], [11, None]
    compact._keys, full._keys = {"b": 99}, {"b": 99}  # the unseeded request's key
    num_tokens = torch.tensor([PROMPT, PROMPT])
    scheduled = [0, 0]
    for step in range(12):
        counts = torch.tensor(scheduled) + 1
        rows = _masked_rows(generator, layouts, entries, num_tokens, counts)
        accepted = [int(torch.randint(0, n + 1, (), generator=generator)) for n in scheduled]
        bonus_index = torch.cumsum(counts, 0) - 1
        target = torch.ones(rows.shape[0], dtype=torch.bool)
        target[bonus_index] = False
        step_rows = StepRows(rows[target], rows[bonus_index], torch.tensor(scheduled),
                             torch.tensor(accepted))
        num_tokens = num_tokens + torch.tensor(accepted) + 1
        slots = torch.full((2,), SLOTS)
        above = layouts.cells_above(entries, num_tokens, SLOTS)
        common = dict(num_tokens=num_tokens, seeds=seeds, greedy=torch.tensor([False, step % 3 == 0]),
                      has_output=[True, True], above=above[0], row_strides=above[1])
        got_full = full.propose_window(
            req_ids, step_rows,
            allowed=layouts.row_masks(entries, num_tokens, slots, VOCAB, "cpu").view(2, SLOTS, -1),
            **common)
        # The compact proposer gets the layout's uniform rows, as the runner hands them.
        got_compact = compact.propose_window(
            req_ids, step_rows, columns=columns,
            allowed=layouts.row_masks(entries, num_tokens, slots, VOCAB, "cpu", columns,
                                      kind="uniform").view(2, SLOTS, -1),
            **common)
        assert got_compact == got_full, f"step {step}"
        assert torch.equal(compact._drafts, full._drafts)
        # The compact proposer keeps q on the layout's columns only.
        assert compact._q.shape[-1] == columns.ids.numel() and full._q.shape[-1] == VOCAB
        compact_q = columns.expand(compact._q)
        if initial == "last_distribution":
            # Renormalised rows: a sum over more (zero) terms rounds differently.
            torch.testing.assert_close(compact_q, full._q, rtol=1e-6, atol=1e-9)
        else:
            assert torch.equal(compact_q, full._q)
        scheduled = [len(d) for d in got_full]
    # Every draft is one of the layout's ids.
    assert bool((columns.index_of[full._drafts] >= 0).all())


def test_columns_map_tokens_both_ways_and_expand_with_zeros():
    columns = Columns.of(torch.tensor([9, 3, 3, 5]), 12)
    assert columns.ids.tolist() == [3, 5, 9]
    assert columns.indices(torch.tensor([9, -1, 4, 3])).tolist() == [2, -1, -1, 0]
    assert columns.tokens(torch.tensor([1, 2])).tolist() == [5, 9]
    assert columns.tokens(torch.tensor([-1, 0])).tolist() == [-1, 3]  # a placeholder stays -1
    from vllm_sjd.core.verify import PLACEHOLDER
    assert PLACEHOLDER == -1
    full = columns.expand(torch.tensor([[0.5, 0.25, 0.25]]))
    assert full[0, [3, 5, 9]].tolist() == [0.5, 0.25, 0.25] and float(full.sum()) == 1.0
    assert torch.equal(columns.select(full), torch.tensor([[0.5, 0.25, 0.25]]))


def test_mask_table_rows_equal_the_layout_at_every_position_and_past_the_image():
    layouts = LayoutConstraints()
    entries = [(GRID, PROMPT), (None, 0)]
    first = torch.tensor([PROMPT, 4])
    counts = torch.tensor([GRID.num_tokens + 3, 2])
    mask = layouts.row_masks(entries, first, counts, VOCAB, "cpu")
    expected = GRID.allowed_mask(torch.arange(GRID.num_tokens + 3), VOCAB)
    assert torch.equal(mask[: GRID.num_tokens + 3], expected)
    assert bool(mask[GRID.num_tokens + 3 :].all())  # no grid: unconstrained
    assert layouts.columns(entries, VOCAB, "cpu") is None


def test_penalty_and_uniform_tables_are_the_bool_mask_in_other_forms():
    layouts = LayoutConstraints()
    entries = [(GRID, PROMPT), (None, 0)]  # a request without a grid: the mixed path
    first, counts = torch.tensor([PROMPT, 4]), torch.tensor([GRID.num_tokens + 3, 2])
    allowed = layouts.row_masks(entries, first, counts, VOCAB, "cpu")
    penalty = layouts.row_masks(entries, first, counts, VOCAB, "cpu", kind="penalty")
    uniform = layouts.row_masks(entries, first, counts, VOCAB, "cpu", kind="uniform")
    assert penalty.dtype == uniform.dtype == torch.float32
    assert torch.equal(penalty == 0, allowed) and bool(penalty[~allowed].eq(float("-inf")).all())
    assert torch.equal(uniform > 0, allowed)
    torch.testing.assert_close(uniform.sum(-1), torch.ones(len(allowed)))
    logits = torch.randn(allowed.shape)
    assert torch.equal(logits + penalty, logits.masked_fill(~allowed, float("-inf")))
    with pytest.raises(ValueError, match="mask kind"):
        layouts.row_masks(entries, first, counts, VOCAB, "cpu", kind="additive")


def test_requests_with_equal_grids_share_one_instance_and_masks_hold_for_copies_too():
    import dataclasses

    from vllm_sjd.layouts.constraints import image_extra_args

    layouts = LayoutConstraints()
    extra = {"a": image_extra_args(GRID), "b": image_extra_args(GRID)}
    entries = layouts.lookup(["a", "b"], extra.get, lambda r: PROMPT)
    assert entries[0][0] is entries[1][0] and entries[0][0] == GRID
    # Equal grids that are not one instance (entries built by hand) give the same masks.
    copy = dataclasses.replace(GRID)
    first, counts = torch.tensor([PROMPT, PROMPT + 2]), torch.tensor([3, 4])
    shared = layouts.row_masks(entries, first, counts, VOCAB, "cpu")
    copied = layouts.row_masks([(GRID, PROMPT), (copy, PROMPT)], first, counts, VOCAB, "cpu")
    assert torch.equal(shared, copied)
    assert layouts.columns([(GRID, PROMPT), (copy, PROMPT)], VOCAB, "cpu") is not None
