"""The proposer's per-request state, driven without an engine."""

from types import SimpleNamespace

import torch

from vllm_sjd.core.window import StepRows
from vllm_sjd.proposer import SJDProposer

VOCAB, WINDOW = 12, 4


def proposer(max_model_len: int = 100) -> SJDProposer:
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=WINDOW),
        additional_config={"sjd": {"num_speculative_tokens": WINDOW}},
        model_config=SimpleNamespace(max_model_len=max_model_len),
    )
    return SJDProposer(config)


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
