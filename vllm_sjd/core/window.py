"""The Jacobi window update of SJD, batched, in plain torch.

Terms, for one request in one step:
- window: the committed last token c and K drafts d_1..d_K after it, verified
  in one forward pass. The pass yields K+1 rows: row j (0 <= j < K) is the
  verified distribution p of the token after d_1..d_j; row K, the bonus row,
  follows d_K.
- accepted prefix: the a drafts the verifier kept (0 <= a <= n, with n <= K
  the drafts scheduled); one more token (resampled at row a, or the bonus
  token at row n when a = n) closes the step.
- re-draft (Jacobi update): the unverified tail's rows a+1..n of this pass are
  sampled to give the next window's first n-a drafts, with q = those rows.
- fresh slots: the remaining K-(n-a) slots get initial drafts: uniform over
  the tokens the slot may hold, the newest row (last_distribution), or, in an
  image, the row of the cell one image row up (above): its verified row if
  committed, the row this pass computed for it if it is still in the window;
  a cell the row lookahead predicted (core/row_lookahead.py) takes that
  prediction instead, whatever the mode.
- how a slot's draft is drawn from its q (independent, coupled with the
  previous draft at that position, or Gumbel noise per position): see
  core/drafting.py.

Every draft is an exact sample from the q returned beside it, so the verifier's
min(1, p/q) test keeps the output distribution equal to the AR distribution
(SJD is lossless) whatever q is; a good q only makes acceptance likelier.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from vllm_sjd.core.columns import Columns
from vllm_sjd.core.compiled import compiled_when_enabled
from vllm_sjd.core.drafting import Drafting, draw_numbers, draw_with, sample_inverse_cdf

InitialDrafts = Literal["uniform", "last_distribution", "above"]

# sample_inverse_cdf lives in core/drafting.py; re-exported for callers of this module.
__all__ = ["CellsAboveRows", "InitialDrafts", "PreviousWindow", "StepRows", "Window",
           "committed_row_sources", "next_window", "sample_inverse_cdf"]


@dataclass
class StepRows:
    """One step's verified distributions for a batch of B requests."""

    # [sum(n), V] float32: rows 0..n-1 of every request, concatenated in batch
    # order, exactly as the verifier saw them (after logits processors,
    # temperature, top-k, top-p).
    target_probs: torch.Tensor
    # [B, V] float32: each request's bonus row (row n), processed the same way.
    bonus_probs: torch.Tensor
    # [B] int64: drafts scheduled this step (n).
    num_draft_tokens: torch.Tensor
    # [B] int64: drafts accepted this step (a); a = n where nothing was sampled.
    num_accepted: torch.Tensor
    # The vocabulary columns the rows hold (core/columns.py); None: all of them.
    columns: Columns | None = None
    # n and a as the host knows them ([B] int64 numpy), so that nothing reads
    # them back from the device; None: read num_draft_tokens / num_accepted.
    host_counts: tuple[np.ndarray, np.ndarray] | None = None

    def counts_on_host(self) -> tuple[np.ndarray, np.ndarray]:
        """(n, a) per request, [B] int64 numpy."""
        if self.host_counts is not None:
            return self.host_counts
        return self.num_draft_tokens.cpu().numpy(), self.num_accepted.cpu().numpy()

    def select(self, requests: np.ndarray) -> "StepRows":
        """These requests' rows only, in this order (`requests`: [B'] int64, host)."""
        n, a = self.counts_on_host()
        first = np.cumsum(n) - n
        target = np.concatenate(
            [np.arange(first[i], first[i] + n[i]) for i in requests] + [np.zeros(0, np.int64)]
        )
        device = self.bonus_probs.device
        pick = torch.from_numpy(requests).to(device)
        return StepRows(
            self.target_probs.index_select(0, torch.from_numpy(target).to(device)),
            self.bonus_probs.index_select(0, pick),
            self.num_draft_tokens.index_select(0, pick),
            self.num_accepted.index_select(0, pick),
            self.columns,
            (n[requests], a[requests]),
        )


@dataclass
class PreviousWindow:
    """Each request's stored window, in batch order, as the verifier saw it."""

    drafts: torch.Tensor  # [B, K] int64
    q: torch.Tensor  # [B, K, V] float32
    present: torch.Tensor  # [B] bool: the request had a window


@dataclass
class CellsAboveRows:
    """For initial drafts "above": each slot's cell one image row up."""

    positions: torch.Tensor  # [B, K] int64: its absolute position, -1 for none
    held: torch.Tensor  # [B, K] bool: committed, and its verified row is in `rows`
    rows: torch.Tensor  # [B, K, V] float32: that verified row


@dataclass
class Window:
    """The next window of every request."""

    drafts: torch.Tensor  # [B, K] int64
    q: torch.Tensor  # [B, K, V] float32: each draft is an exact sample of its row
    kept: torch.Tensor  # [B, K] bool: the coupling kept the previous draft there
    fresh: torch.Tensor  # [B, K] bool: initial drafts (no row of this pass at that slot)
    from_above: torch.Tensor  # [B, K] bool: initial drafts drawn from the cell above
    # [B, K, V]: the q the previous draft at each slot was drawn from (coupled only).
    previous_q: torch.Tensor | None = None
    # [B, K] bool: initial drafts drawn from a row lookahead's prediction.
    from_prediction: torch.Tensor | None = None


def _row_sources(
    n: torch.Tensor, a: torch.Tensor, num_target_rows: int, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index into cat(target_probs, bonus_probs) of each request's rows a+1.., [B, num_rows].

    Also whether the pass computed that row (index <= n); rows past n point at
    the bonus row, the most recent distribution.
    """
    batch_size = n.shape[0]
    device = n.device
    bonus_row = (torch.arange(batch_size, device=device) + num_target_rows)[:, None]
    first_target_row = (torch.cumsum(n, 0) - n)[:, None]
    row = a[:, None] + 1 + torch.arange(num_rows, device=device)[None, :]
    computed = row <= n[:, None]
    source = torch.where(row < n[:, None], first_target_row + row, bonus_row)
    return torch.where(computed, source, bonus_row), computed


def committed_row_sources(
    num_draft_tokens: Sequence[int], num_accepted: Sequence[int], num_target_rows: int
) -> list[np.ndarray]:
    """Per request, the index of the verified row of each token committed this step.

    Index into cat(target_probs, bonus_probs), from n and a on the host. Row j
    (j <= a) verified the token at offset j of the window; row a is the
    resampled or bonus token's. Meaningless for a request that produced
    nothing (the caller knows which).
    """
    sources, first = [], 0
    for i, (n_i, a_i) in enumerate(zip(num_draft_tokens, num_accepted)):
        rows_i = list(range(first, first + min(a_i + 1, n_i)))
        if a_i == n_i:
            rows_i.append(num_target_rows + i)
        sources.append(np.array(rows_i, dtype=np.int64))
        first += n_i
    return sources


def next_window(
    rows: StepRows,
    *,
    num_slots: int,
    keys: np.ndarray,  # [B] int64: per-request drafting keys, on the host
    next_positions: np.ndarray,  # [B] int64: token index of the first new draft, on the host
    greedy: torch.Tensor,  # [B] bool: temperature-0 requests
    initial_drafts: InitialDrafts,
    drafting: Drafting = "independent",
    allowed: torch.Tensor | None = None,  # bool, [V] or [B, K, V]; None: all tokens
    previous: PreviousWindow | None = None,  # needed by coupled drafting
    above: CellsAboveRows | None = None,
    token_ids: torch.Tensor | None = None,  # [V'] the id of each column; None: all V
    any_greedy: bool | None = None,  # whether greedy has a True, known on the host
    # ([B, K] bool, [B, K, V]): a row lookahead's prediction of each slot's cell, where held.
    predicted: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Window:
    """The next window of every request.

    `allowed` restricts initial drafts per slot (an image layout's forced and
    code-only positions). Recycled slots need no restriction: their rows were
    masked at the same absolute positions before verification. With
    initial_drafts "above", a fresh slot draws from the row of its cell one
    image row up: the verified row in `above` if that cell is committed, this
    pass's row for it if the cell is a recycled slot of the window; other
    fresh slots go uniform.
    For greedy requests the drafts are the argmax of the model's rows (plain
    Jacobi decoding) and q is one-hot, which the greedy verifier ignores.
    Every [..., V] input may hold only some vocabulary columns, named by
    `token_ids` (core/columns.py); drafts then index those columns.
    """
    if initial_drafts not in ("uniform", "last_distribution", "above"):
        raise ValueError(f"unknown initial_drafts {initial_drafts!r}")
    device = rows.bonus_probs.device
    first_slot = None
    if initial_drafts == "above" and above is not None:
        first_slot = torch.from_numpy(np.asarray(next_positions, dtype=np.int64)).to(device)
    coupled = drafting == "coupled" and previous is not None
    numbers = draw_numbers(drafting, keys, next_positions, num_slots, device, coupled)
    drafts, q, kept, fresh, from_above, previous_q, from_prediction = _window_tensors(
        rows.target_probs, rows.bonus_probs, rows.num_draft_tokens, rows.num_accepted,
        num_slots, initial_drafts, drafting, numbers, greedy,
        bool(greedy.any()) if any_greedy is None else any_greedy,
        allowed,
        None if not coupled else (previous.drafts, previous.q, previous.present),
        None if first_slot is None else (above.positions, above.held, above.rows, first_slot),
        token_ids, predicted,
    )
    return Window(drafts, q, kept, fresh, from_above, previous_q, from_prediction)


@compiled_when_enabled
def _window_tensors(
    target_probs, bonus_probs, num_draft_tokens, num_accepted, num_slots: int,
    initial_drafts: str, drafting: str, numbers, greedy, any_greedy: bool, allowed,
    previous,  # (drafts, q, present) or None: coupled drafting's previous window
    above,  # (positions, held, rows, first_slot) or None
    token_ids, predicted,
):
    """next_window's tensor work, no host reads: Window's fields as a tuple."""
    vocab_size = bonus_probs.shape[-1]
    device = bonus_probs.device
    all_rows = torch.cat([target_probs, bonus_probs], dim=0)
    source, recycled = _row_sources(num_draft_tokens, num_accepted, target_probs.shape[0], num_slots)
    q = all_rows[source]  # [B, K, V]

    if allowed is None:
        uniform = torch.full((vocab_size,), 1.0 / vocab_size, device=device)
    else:
        weights = allowed.to(torch.float32)
        uniform = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1.0)
    fresh_from_model = torch.zeros_like(recycled)
    if initial_drafts == "last_distribution":
        fresh = q if allowed is None else q * allowed
        total = fresh.sum(dim=-1, keepdim=True)
        # Where the newest row puts no mass on the allowed tokens, go uniform.
        fresh = torch.where(total > 0, fresh / total.clamp_min(1e-30), uniform)
        fresh_from_model = ~recycled
    elif initial_drafts == "above":
        fresh = uniform
        if above is not None:
            # The cell above as a slot of the next window, where it is one.
            positions, held, above_rows, first_slot = above
            slot_above = positions - first_slot[:, None]
            index = slot_above.clamp(0, num_slots - 1)
            in_window = (positions >= 0) & (slot_above >= 0) & recycled.gather(1, index)
            window_rows = q.gather(1, index[:, :, None].expand(-1, -1, vocab_size))
            fresh = torch.where(held[:, :, None], above_rows, uniform)
            fresh = torch.where(in_window[:, :, None], window_rows, fresh)
            fresh_from_model = (held | in_window) & ~recycled
    else:  # uniform
        fresh = uniform
    from_above = fresh_from_model if initial_drafts == "above" else torch.zeros_like(recycled)
    from_prediction = None
    if predicted is not None:
        # The model's own prediction of the cell (rows in parallel) beats any stand-in.
        from_prediction = predicted[0] & ~recycled
        fresh = torch.where(predicted[0][:, :, None], predicted[1], fresh)
        fresh_from_model = fresh_from_model | from_prediction
        from_above = from_above & ~from_prediction
    q = torch.where(recycled[:, :, None], q, fresh)

    old = None if previous is None else _previous_at_slots(*previous, num_accepted, recycled)
    drafts, kept = draw_with(
        drafting, q, numbers,
        previous_drafts=None if old is None else old[0],
        previous_q=None if old is None else old[1],
        has_previous=None if old is None else old[2],
        token_ids=token_ids,
    )
    if any_greedy:
        jacobi = greedy[:, None] & (recycled | fresh_from_model)
        drafts = torch.where(jacobi, q.argmax(dim=-1), drafts)
        one_hot = torch.zeros_like(q).scatter_(-1, drafts[:, :, None], 1.0)
        q = torch.where(greedy[:, None, None], one_hot, q)
        kept = kept & ~greedy[:, None]
    return (drafts, q.contiguous(), kept, ~recycled, from_above,
            None if old is None else old[1], from_prediction)


def _previous_at_slots(
    previous_drafts: torch.Tensor,  # [B, K]
    previous_q: torch.Tensor,  # [B, K, V]
    present: torch.Tensor,  # [B] bool
    num_accepted: torch.Tensor,  # [B]
    recycled: torch.Tensor,  # [B, K] bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The previous window's draft and q at each next slot's position, and where it exists.

    Next slot s sits where previous slot a+1+s did. Only recycled slots take
    part: a fresh slot's position had no draft, or one drafted against an
    older context the new q knows nothing of.
    """
    num_slots = previous_drafts.shape[1]
    vocab_size = previous_q.shape[-1]
    old_slot = num_accepted[:, None] + 1 + torch.arange(num_slots, device=recycled.device)
    exists = present[:, None] & recycled & (old_slot < num_slots)
    old_slot = old_slot.clamp(max=num_slots - 1)
    drafts = previous_drafts.gather(1, old_slot)
    exists = exists & (drafts >= 0)  # a draft outside q's columns cannot be coupled with
    q = previous_q.gather(1, old_slot[:, :, None].expand(-1, -1, vocab_size))
    return drafts, q, exists
