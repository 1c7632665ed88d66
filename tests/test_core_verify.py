"""SJD's own verification step (core/verify.py), without an engine."""

from collections import Counter

import pytest
import torch

from tests.stats import chi_square_pvalue
from vllm_sjd.core.columns import Columns
from vllm_sjd.core.verify import PLACEHOLDER, one_hot_q, verify

ALPHA = 1e-4
WIDTH = 6


def _rows(generator, count: int) -> torch.Tensor:
    return torch.softmax(torch.randn(count, WIDTH, generator=generator) * 1.5, dim=-1)


def _repeat_one_request(p, q, batch: int, generator):
    """`batch` copies of one request (n = 2 drafts drawn from q), distinct keys."""
    n = p.shape[0] - 1
    drafts = torch.stack([torch.multinomial(q[j], batch, True, generator=generator)
                          for j in range(n)], dim=1)  # [batch, n]
    return verify(
        target_probs=p[:n].repeat(batch, 1),
        bonus_probs=p[n:].expand(batch, -1).contiguous(),
        num_draft_tokens=torch.full((batch,), n, dtype=torch.int64),
        max_num_drafts=n,
        drafts=drafts.reshape(-1),
        draft_q=q.repeat(batch, 1),
        greedy=torch.zeros(batch, dtype=torch.bool),
        keys=torch.arange(batch, dtype=torch.int64) * 7919 + 3,
        first_positions=torch.full((batch,), 40, dtype=torch.int64),
    )


def _marginal_pvalues(verdict, p):
    first = [(int(t),) for t in verdict.tokens[:, 0]]
    second = [(int(t),) for t in verdict.tokens[:, 1][verdict.num_accepted >= 1]]
    exact = [{(i,): float(row[i]) for i in range(WIDTH)} for row in p.double()]
    return chi_square_pvalue(first, exact[0]), chi_square_pvalue(second, exact[1]), len(second)


def test_each_position_follows_p_whatever_q_the_drafts_came_from():
    # A context-free model: row j is position j's distribution whatever came before.
    generator = torch.Generator().manual_seed(3)
    p, q = _rows(generator, 3), _rows(generator, 2)
    verdict = _repeat_one_request(p, q, 20_000, generator)
    first, second, count = _marginal_pvalues(verdict, p)
    assert first > ALPHA and second > ALPHA and count > 2_000
    assert bool((verdict.num_accepted < 2).any() and (verdict.num_accepted == 2).any())
    # Every row ends right after its closing token.
    a = verdict.num_accepted
    assert bool((verdict.tokens.gather(1, a[:, None]) >= 0).all())
    after = torch.arange(3)[None, :] > a[:, None]
    assert bool((verdict.tokens[after] == PLACEHOLDER).all())


def test_a_q_that_is_not_the_drafts_fails_the_same_test():
    generator = torch.Generator().manual_seed(4)
    p, q = _rows(generator, 3), _rows(generator, 2)
    wrong = _rows(generator, 2)
    n, batch = 2, 20_000
    drafts = torch.stack([torch.multinomial(q[j], batch, True, generator=generator)
                          for j in range(n)], dim=1)
    verdict = verify(p[:n].repeat(batch, 1), p[n:].expand(batch, -1).contiguous(),
                     torch.full((batch,), n), n, drafts.reshape(-1), wrong.repeat(batch, 1),
                     torch.zeros(batch, dtype=torch.bool), torch.arange(batch) * 7919 + 3,
                     torch.full((batch,), 40))
    assert _marginal_pvalues(verdict, p)[0] < ALPHA


def test_greedy_accepts_the_argmax_and_closes_with_it():
    p = torch.tensor([[0.1, 0.7, 0.2, 0, 0, 0], [0.5, 0.2, 0.3, 0, 0, 0],
                      [0.2, 0.2, 0.6, 0, 0, 0], [0.0, 0.1, 0.1, 0.8, 0, 0]])
    # Request 0: 2 drafts (1 = argmax, then 2 != argmax 0); request 1: 1 draft (2 = argmax).
    verdict = verify(p[[0, 1, 2]], p[[2, 3]], torch.tensor([2, 1]), 2,
                     torch.tensor([1, 2, 2]), one_hot_q(torch.tensor([1, 2, 2]), WIDTH),
                     torch.tensor([True, True]), torch.tensor([1, 2]), torch.tensor([5, 9]))
    assert verdict.tokens.tolist() == [[1, 0, -1], [2, 3, -1]]
    assert verdict.num_accepted.tolist() == [1, 1]


def test_a_request_gets_the_same_tokens_alone_and_in_a_batch():
    generator = torch.Generator().manual_seed(5)
    rows = _rows(generator, 9)
    drafts = torch.tensor([1, 4, 0, 2, 5, 3])
    q = _rows(generator, 6)
    # Batch: requests of 2, 0 and 4 drafts; the last one also runs alone.
    together = verify(rows[[0, 1, 3, 4, 5, 6]], rows[[2, 3, 7]], torch.tensor([2, 0, 4]), 4,
                      drafts, q, torch.zeros(3, dtype=torch.bool), torch.tensor([11, 12, 13]),
                      torch.tensor([7, 30, 21]))
    alone = verify(rows[[3, 4, 5, 6]], rows[[7]], torch.tensor([4]), 4, drafts[2:], q[2:],
                   torch.zeros(1, dtype=torch.bool), torch.tensor([13]), torch.tensor([21]))
    assert together.tokens[2].tolist() == alone.tokens[0].tolist()


def test_a_batch_without_drafts_closes_as_the_full_test_would():
    # A plain step takes a short path; its tokens must be the ones the whole
    # test gives the same requests beside one that verifies drafts (same numbers).
    generator = torch.Generator().manual_seed(8)
    batch = 64
    rows = _rows(generator, batch + 4)
    greedy = torch.arange(batch) % 5 == 1
    keys, first = torch.arange(batch) * 31 + 11, torch.arange(batch) % 13 + 7
    plain = verify(rows[:0], rows[:batch], torch.zeros(batch, dtype=torch.int64), 0,
                   torch.zeros(0, dtype=torch.int64), rows[:0], greedy, keys, first)
    assert plain.tokens.shape == (batch, 1) and not plain.num_accepted.any()
    assert (plain.tokens[greedy, 0] == rows[:batch][greedy].argmax(dim=-1)).all()
    mixed = verify(rows[batch:batch + 2], rows[list(range(batch)) + [batch + 2]],
                   torch.tensor([0] * batch + [2]), 2, torch.tensor([1, 2]),
                   rows[batch + 2:batch + 4], torch.cat([greedy, torch.tensor([False])]),
                   torch.cat([keys, torch.tensor([99])]), torch.cat([first, torch.tensor([50])]))
    assert mixed.tokens[:batch, 0].tolist() == plain.tokens[:, 0].tolist()
    # And over many keys, the short path's tokens follow the bonus row.
    many = 20_000
    spread = verify(rows[:0], rows[[0]].expand(many, -1).contiguous(),
                    torch.zeros(many, dtype=torch.int64), 0, torch.zeros(0, dtype=torch.int64),
                    rows[:0], torch.zeros(many, dtype=torch.bool),
                    torch.arange(many) * 7919 + 5, torch.full((many,), 3))
    tokens = [(int(t),) for t in spread.tokens[:, 0]]
    assert chi_square_pvalue(tokens, {(j,): float(rows[0, j]) for j in range(WIDTH)}) > ALPHA


def test_verifying_on_columns_gives_the_full_vocabulary_tokens():
    generator = torch.Generator().manual_seed(6)
    vocab, batch, n = 40, 64, 3
    columns = Columns.of(torch.tensor([3, 8, 9, 17, 21, 33]), vocab)
    compact_p = _rows(generator, batch * (n + 1)).view(batch, n + 1, WIDTH)
    compact_q = _rows(generator, batch * n).view(batch, n, WIDTH)
    drafts = torch.multinomial(compact_q.view(-1, WIDTH), 1, generator=generator).view(-1)
    common = dict(num_draft_tokens=torch.full((batch,), n), max_num_drafts=n,
                  greedy=torch.arange(batch) % 5 == 0, keys=torch.arange(batch) + 100,
                  first_positions=torch.arange(batch) * 3)
    compact = verify(compact_p[:, :n].reshape(-1, WIDTH), compact_p[:, n], drafts=drafts,
                     draft_q=compact_q.reshape(-1, WIDTH), **common)
    full = verify(columns.expand(compact_p[:, :n].reshape(-1, WIDTH)),
                  columns.expand(compact_p[:, n]), drafts=columns.tokens(drafts),
                  draft_q=columns.expand(compact_q.reshape(-1, WIDTH)), **common)
    mapped = torch.where(compact.tokens >= 0, columns.tokens(compact.tokens.clamp(min=0)), -1)
    assert torch.equal(mapped, full.tokens)
    assert Counter(compact.num_accepted.tolist()).keys() > {0}  # some accepted, some not


@pytest.mark.parametrize("p_row", [[0.0, 0.4, 0.6], [0.0, 0.0, 1.0]])
def test_a_rejection_with_no_residual_samples_p_not_token_zero(p_row):
    # q covers p everywhere (rounding), yet the draft can be rejected: the
    # token then comes from p, never from outside its support.
    p = torch.tensor([p_row])
    q = p * 1.25
    batch = 2_000
    verdict = verify(p.expand(batch, -1).contiguous(), p.expand(batch, -1).contiguous(),
                     torch.ones(batch, dtype=torch.int64), 1, torch.full((batch,), 2),
                     q.expand(batch, -1).contiguous(), torch.zeros(batch, dtype=torch.bool),
                     torch.arange(batch), torch.zeros(batch, dtype=torch.int64))
    assert bool((verdict.num_accepted == 0).any())
    assert bool((torch.tensor(p_row)[verdict.tokens[:, 0]] > 0).all())
