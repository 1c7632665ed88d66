"""The proposer's per-request state, driven without an engine."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_sjd.core.window import StepRows
from vllm_sjd.proposer import SJDProposer

VOCAB, WINDOW = 12, 4


def proposer(max_model_len: int = 100, cls: type[SJDProposer] = SJDProposer) -> SJDProposer:
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=WINDOW),
        additional_config={"sjd": {"num_speculative_tokens": WINDOW}},
        model_config=SimpleNamespace(max_model_len=max_model_len),
    )
    return cls(config)


def first_step_rows(batch: int) -> StepRows:
    probs = torch.softmax(torch.randn(batch, VOCAB), dim=-1)
    return StepRows(
        target_probs=torch.zeros(0, VOCAB),
        bonus_probs=probs,
        num_draft_tokens=torch.zeros(batch, dtype=torch.int64),
        num_accepted=torch.zeros(batch, dtype=torch.int64),
    )


def propose(p: SJDProposer, req_ids, num_tokens, seeds=None):
    return p.propose_window(
        req_ids,
        first_step_rows(len(req_ids)),
        num_tokens=torch.tensor(num_tokens),
        seeds=seeds or [None] * len(req_ids),
        greedy=torch.zeros(len(req_ids), dtype=torch.bool),
        has_output=[True] * len(req_ids),
    )


def test_q_is_found_by_request_id_after_the_batch_reorders():
    p = proposer()
    drafts = propose(p, ["a", "b", "c"], [5, 6, 7])
    # Next step the batch holds c, a (b was left out), with 2 and 3 drafts.
    scheduled = torch.tensor(drafts[2][:2] + drafts[0][:3])
    q = p.draft_probs(["c", "a"], [2, 3], scheduled, VOCAB)
    assert q.shape == (5, VOCAB)
    assert torch.allclose(q.sum(-1), torch.ones(5))
    assert torch.allclose(q[:, :], torch.full((5, VOCAB), 1 / VOCAB))  # uniform drafts
    # b keeps its window after a step without it.
    propose(p, ["c", "a"], [8, 9])
    q_b = p.draft_probs(["b"], [4], torch.tensor(drafts[1]), VOCAB)
    assert torch.allclose(q_b, torch.full((4, VOCAB), 1 / VOCAB))


def test_a_draft_that_is_not_ours_gets_a_one_hot_q():
    p = proposer()
    drafts = propose(p, ["a"], [5])
    other = [(d + 1) % VOCAB for d in drafts[0][:2]]
    q = p.draft_probs(["a", "x"], [2, 1], torch.tensor(other + [3]), VOCAB)
    expected = torch.nn.functional.one_hot(torch.tensor(other + [3]), VOCAB).float()
    assert torch.equal(q, expected)


def test_drafts_known_on_the_host_give_the_same_q_as_the_device_check():
    p = proposer()
    rows = StepRows(torch.zeros(0, VOCAB), torch.softmax(torch.randn(2, VOCAB), -1),
                    torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    drafts = p.propose_window(["a", "b"], rows, num_tokens=torch.tensor([5, 6]), seeds=[1, 2],
                              greedy=torch.zeros(2, dtype=torch.bool), has_output=[True, True],
                              columns=None)
    scheduled = torch.tensor(drafts[0][:3] + drafts[1][:2])
    device_checked = p.scheduled_drafts(["a", "b"], [3, 2], scheduled, None, VOCAB)
    host_checked = p.scheduled_drafts(["a", "b"], [3, 2], scheduled, None, VOCAB,
                                      [drafts[0][:3], drafts[1][:2]])
    assert torch.equal(host_checked[0], device_checked[0])
    assert torch.equal(host_checked[1], device_checked[1])
    assert not torch.equal(device_checked[1], torch.nn.functional.one_hot(scheduled, VOCAB).float())
    # The host's ids differ from the stored window: the device check (one-hot q) decides.
    other = [(d + 1) % VOCAB for d in drafts[0][:3]]
    changed = torch.tensor(other + drafts[1][:2])
    _, q = p.scheduled_drafts(["a", "b"], [3, 2], changed, None, VOCAB, [other, drafts[1][:2]])
    assert torch.equal(q[:3], torch.nn.functional.one_hot(torch.tensor(other), VOCAB).float())
    assert torch.equal(q[3:], device_checked[1][3:])


def test_windows_end_inside_the_context_and_evict_clears_state():
    p = proposer(max_model_len=10)
    drafts = propose(p, ["a", "b", "c"], [5, 8, 10], seeds=[1, None, None])
    assert [len(d) for d in drafts] == [4, 2, 0]
    assert p.tracked_requests() == {"a", "b", "c"}
    p.evict(["a", "b", "c"])
    assert p.tracked_requests() == set()


def test_seeded_requests_draft_the_same_window_in_any_batch():
    alone = propose(proposer(), ["s"], [5], seeds=[42])
    crowd = propose(proposer(), ["x", "s"], [3, 5], seeds=[None, 42])
    assert alone[0] == crowd[1]


class _CountingProposer(SJDProposer):
    def __init__(self, config):
        super().__init__(config)
        self.built_batches = []

    def _next_window(self, rows, **kwargs):
        self.built_batches.append(rows.bonus_probs.shape[0])
        return super()._next_window(rows, **kwargs)


def second_step_rows(per_request: list[torch.Tensor]) -> StepRows:
    """Rows of a step that verified WINDOW drafts of each request and accepted one."""
    batch = len(per_request)
    return StepRows(
        target_probs=torch.cat([r[:WINDOW] for r in per_request]),
        bonus_probs=torch.stack([r[WINDOW] for r in per_request]),
        num_draft_tokens=torch.full((batch,), WINDOW, dtype=torch.int64),
        num_accepted=torch.ones(batch, dtype=torch.int64),
    )


def test_a_guided_twin_takes_its_conditional_window_which_is_built_once():
    def step(p, req_ids, rows, mirror):
        return p.propose_window(
            req_ids, rows, num_tokens=torch.full((len(req_ids),), 5),
            seeds=[{"c": 7, "t": 8, "u": 9}[r] for r in req_ids],
            greedy=torch.zeros(len(req_ids), dtype=torch.bool), has_output=[True] * len(req_ids),
            mirror=mirror,
        )

    torch.manual_seed(0)
    cond, other, twin = (torch.softmax(3 * torch.randn(WINDOW + 1, VOCAB), -1) for _ in range(3))
    paired, alone = proposer(cls=_CountingProposer), proposer()
    # The same requests with and without a twin (its rows deliberately different).
    step(paired, ["c", "t", "u"], first_step_rows(3), [(1, 0)])
    step(alone, ["c", "u"], first_step_rows(2), [])
    with_twin = step(paired, ["c", "t", "u"], second_step_rows([cond, twin, other]), [(1, 0)])
    without = step(alone, ["c", "u"], second_step_rows([cond, other]), [])
    assert paired.built_batches == [2, 2]  # the twin's window is never built
    assert with_twin[1] == with_twin[0]
    assert [with_twin[0], with_twin[2]] == without
    q_twin = paired.draft_probs(["t"], [WINDOW], torch.tensor(with_twin[1]), VOCAB)
    q_cond = alone.draft_probs(["c"], [WINDOW], torch.tensor(without[0]), VOCAB)
    assert torch.equal(q_twin, q_cond)


def test_rows_without_the_twins_give_the_windows_of_the_whole_batchs_rows():
    """The sampling step leaves a guided twin's rows out (StepRows.requests): the
    windows, the twin's included, are those built from every request's rows."""
    def step(p, rows, seeds=(7, 8, 9)):
        return p.propose_window(
            ["c", "t", "u"], rows, num_tokens=torch.full((3,), 5), seeds=list(seeds),
            greedy=torch.zeros(3, dtype=torch.bool), has_output=[True] * 3, mirror=[(1, 0)],
        )

    torch.manual_seed(1)
    cond, twin, other = (torch.softmax(3 * torch.randn(WINDOW + 1, VOCAB), -1) for _ in range(3))
    whole, lead = proposer(), proposer()
    for p in (whole, lead):
        step(p, first_step_rows(3))
    full = step(whole, second_step_rows([cond, twin, other]))
    covered = replace(second_step_rows([cond, other]), requests=np.array([0, 2]))
    assert step(lead, covered) == full
    assert full[0] == full[1]


def test_rows_for_the_batch_give_a_twin_its_sources_rows():
    torch.manual_seed(2)
    cond, other = (torch.softmax(torch.randn(WINDOW + 1, VOCAB), -1) for _ in range(2))
    covered = replace(second_step_rows([cond, other]), requests=np.array([0, 2]),
                      host_counts=(np.full(2, WINDOW), np.ones(2, dtype=np.int64)))
    rows = covered.for_batch(3, [(1, 0)])
    expected = second_step_rows([cond, cond, other])
    assert torch.equal(rows.target_probs, expected.target_probs)
    assert torch.equal(rows.bonus_probs, expected.bonus_probs)
    assert rows.requests is None and rows.counts_on_host()[0].tolist() == [WINDOW] * 3
    with pytest.raises(ValueError, match="no rows for batch rows \\[1\\]"):
        covered.for_batch(3, [])
