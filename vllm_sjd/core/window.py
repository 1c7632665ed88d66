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

from vllm_sjd.core import cpu_kernels
from vllm_sjd.core.columns import Columns
from vllm_sjd.core.compiled import compiled_when_enabled
from vllm_sjd.core.drafting import Drafting, draw_numbers, draw_with, sample_inverse_cdf

InitialDrafts = Literal["uniform", "last_distribution", "above"]

# sample_inverse_cdf lives in core/drafting.py; re-exported for callers of this module.
__all__ = ["CellsAboveRows", "InitialDrafts", "PreviousWindow", "StepRows", "TableRows", "Window",
           "committed_row_sources", "next_window", "sample_inverse_cdf", "take_rows"]


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
    # The batch rows of the B requests these rows are of ([B] int64, host), where
    # they leave some out (guided twins: their rows are their conditional
    # request's); None: every request of the batch, in order.
    requests: np.ndarray | None = None

    def counts_on_host(self) -> tuple[np.ndarray, np.ndarray]:
        """(n, a) per request, [B] int64 numpy."""
        if self.host_counts is not None:
            return self.host_counts
        return self.num_draft_tokens.cpu().numpy(), self.num_accepted.cpu().numpy()

    def for_batch(self, num_requests: int, mirror: Sequence[tuple[int, int]]) -> "StepRows":
        """Rows for every request of the batch: a request left out takes the rows of
        its source in `mirror` ((twin, source) batch rows)."""
        if self.requests is None:
            return self
        row_of = np.full(num_requests, -1, dtype=np.int64)
        row_of[self.requests] = np.arange(len(self.requests))
        for twin, source in mirror:
            row_of[twin] = row_of[source]
        if (row_of < 0).any():
            raise ValueError(f"no rows for batch rows {np.nonzero(row_of < 0)[0].tolist()}")
        covered = StepRows(self.target_probs, self.bonus_probs, self.num_draft_tokens,
                           self.num_accepted, self.columns, self.host_counts)
        return covered.select(row_of)

    def select(self, requests: np.ndarray) -> "StepRows":
        """These requests' rows only, in this order (`requests`: [B'] int64, host)."""
        n, a = self.counts_on_host()
        if len(requests) == 1:  # one request (a guided pair's conditional one): slices
            i = int(requests[0])
            start = int(n[:i].sum())
            return StepRows(self.target_probs[start:start + int(n[i])], self.bonus_probs[i:i + 1],
                            self.num_draft_tokens[i:i + 1], self.num_accepted[i:i + 1], self.columns,
                            (n[i:i + 1], a[i:i + 1]))
        first = np.cumsum(n) - n
        target = np.concatenate(
            [np.arange(first[i], first[i] + n[i]) for i in requests] + [np.zeros(0, np.int64)]
        )
        return StepRows(
            take_rows(self.target_probs, target),
            take_rows(self.bonus_probs, requests),
            take_rows(self.num_draft_tokens, requests),
            take_rows(self.num_accepted, requests),
            self.columns,
            (n[requests], a[requests]),
        )


def take_rows(values: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """values[rows] for host indices: a view where they are a run (i, i+1, ...; a guided
    pair's conditional rows, say), else one index_select."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 1 or (rows.size and rows[-1] - rows[0] == rows.size - 1
                          and (rows.size == 2 or (np.diff(rows) == 1).all())):
        return values.narrow(0, int(rows[0]), rows.size)
    return values.index_select(0, torch.from_numpy(rows).to(values.device))


@dataclass
class TableRows:
    """Rows of a table as [B, K, V], not yet gathered: a layout's per-position "uniform"
    table and each slot's row in it. The CPU kernel reads the table in place."""

    table: torch.Tensor  # [T, V]
    rows: np.ndarray  # [B, K] int64, on the host

    def gathered(self) -> torch.Tensor:
        index = torch.from_numpy(np.ascontiguousarray(self.rows).reshape(-1)).to(self.table.device)
        return self.table.index_select(0, index).view(*self.rows.shape, self.table.shape[-1])

    def select(self, requests: np.ndarray) -> "TableRows":
        return TableRows(self.table, self.rows[requests])


@dataclass
class PreviousWindow:
    """Each request's stored window, in batch order, as the verifier saw it."""

    drafts: torch.Tensor  # [B, K] int64
    q: torch.Tensor  # [B, K, V] float32
    present: torch.Tensor  # [B] bool: the request had a window


@dataclass
class CellsAboveRows:
    """For initial drafts "above": each slot's cell one image row up."""

    positions: np.ndarray  # [B, K] int64 on the host: its absolute position, -1 for none
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


def _slot_layout(
    n: np.ndarray,  # [B] int64: drafts scheduled this step
    a: np.ndarray,  # [B] int64: of which accepted
    num_slots: int,
    above_positions: np.ndarray | None,  # [B, K] int64: each slot's cell above, -1 none
    first_slot: np.ndarray,  # [B] int64: absolute position of slot 0
) -> np.ndarray:
    """The window's index bookkeeping, on the host where n and a are known: [5, B, K] int64.

    0: index into cat(target_probs, bonus_probs) of each slot's row (request
       rows a+1..; rows past n point at the bonus row, the newest distribution);
    1: recycled, whether the pass computed that row (a+1+s <= n);
    2: the slot of the cell above where it lies in this window (clamped);
    3: whether that cell is a recycled slot of this window;
    4: the previous window's slot at the same position (a+1+s) for a recycled
       slot, -1 for a fresh one (no previous draft to couple with).
    """
    loops = cpu_kernels.loaded()
    if loops is not None:  # the same numbers in one call (numpy's ~15 small calls: ~25 us)
        return loops.slot_layout(np.asarray(n, np.int64), np.asarray(a, np.int64), num_slots,
                                 np.zeros((0, 0), np.int64) if above_positions is None
                                 else np.ascontiguousarray(above_positions, np.int64),
                                 np.asarray(first_slot, np.int64))
    batch_size = n.shape[0]
    num_target_rows = int(n.sum())
    slots = np.arange(num_slots, dtype=np.int64)
    row = a[:, None] + 1 + slots
    recycled = row <= n[:, None]
    bonus_row = (num_target_rows + np.arange(batch_size, dtype=np.int64))[:, None]
    first_target_row = (np.cumsum(n) - n)[:, None]
    source = np.where(row < n[:, None], first_target_row + row, bonus_row)
    layout = np.zeros((5, batch_size, num_slots), dtype=np.int64)
    layout[0] = np.where(recycled, source, bonus_row)
    layout[1] = recycled
    if above_positions is not None:
        slot_above = above_positions - first_slot[:, None]
        index = slot_above.clip(0, num_slots - 1)
        layout[2] = index
        layout[3] = (above_positions >= 0) & (slot_above >= 0) & np.take_along_axis(recycled, index, 1)
    layout[4] = np.where(recycled & (row < num_slots), row, -1)
    return layout


def _on_host(values) -> np.ndarray:
    """int64 numpy of host data given as numpy, lists or CPU tensors."""
    if isinstance(values, torch.Tensor):
        values = values.cpu().numpy()
    return np.asarray(values, dtype=np.int64)


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
    # [V] or [B, K, V] bool, or float uniform rows (a tensor or TableRows); None: all
    allowed: "torch.Tensor | TableRows | None" = None,
    previous: PreviousWindow | None = None,  # needed by coupled drafting
    above: CellsAboveRows | None = None,
    token_ids: torch.Tensor | None = None,  # [V'] the id of each column; None: all V
    any_greedy: bool | None = None,  # whether greedy has a True, known on the host
    # ([B, K] bool, [B, K, V]): a row lookahead's prediction of each slot's cell, where held.
    predicted: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Window:
    """The next window of every request.

    `allowed` restricts initial drafts per slot (an image layout's forced and
    code-only positions): a bool mask, or float rows already uniform over the
    allowed tokens (the layout's "uniform" table: no conversion per step).
    Recycled slots need no restriction: their rows were masked at the same
    absolute positions before verification. With
    initial_drafts "above", a fresh slot draws from the row of its cell one
    image row up: the verified row in `above` if that cell is committed, this
    pass's row for it if the cell is a recycled slot of the window; other
    fresh slots go uniform.
    For greedy requests the drafts are the argmax of the model's rows (plain
    Jacobi decoding) and q is one-hot, which the greedy verifier ignores.
    Every [..., V] input may hold only some vocabulary columns, named by
    `token_ids` (core/columns.py); drafts then index those columns. On a CPU
    device the common kinds run as one numba kernel (core/cpu_kernels.py).
    """
    if initial_drafts not in ("uniform", "last_distribution", "above"):
        raise ValueError(f"unknown initial_drafts {initial_drafts!r}")
    device = rows.bonus_probs.device
    n, a = rows.counts_on_host()
    next_positions = _on_host(next_positions)
    with_above = initial_drafts == "above" and above is not None
    layout = _slot_layout(n, a, num_slots, _on_host(above.positions) if with_above else None,
                          next_positions)
    coupled = drafting == "coupled" and previous is not None
    if cpu_kernels.enabled_for(rows.bonus_probs) and cpu_kernels.handles_window(
            initial_drafts, drafting, allowed, predicted):
        return Window(*cpu_kernels.window(
            rows.target_probs, rows.bonus_probs, layout, initial_drafts, keys, next_positions, greedy,
            allowed, None if not coupled else (previous.drafts, previous.q, previous.present),
            (above.held, above.rows) if with_above else None,
        ))
    numbers = draw_numbers(drafting, keys, next_positions, num_slots, device, coupled)
    if isinstance(allowed, TableRows):
        allowed = allowed.gathered()
    drafts, q, kept, fresh, from_above, previous_q, from_prediction = _window_tensors(
        rows.target_probs, rows.bonus_probs, torch.from_numpy(layout).to(device),
        initial_drafts, drafting, numbers, greedy,
        bool(greedy.any()) if any_greedy is None else any_greedy,
        allowed,
        None if not coupled else (previous.drafts, previous.q, previous.present),
        (above.held, above.rows) if with_above else None,
        token_ids, predicted,
    )
    return Window(drafts, q, kept, fresh, from_above, previous_q, from_prediction)


@compiled_when_enabled
def _window_tensors(
    target_probs, bonus_probs, layout,  # [5, B, K] int64 from _slot_layout
    initial_drafts: str, drafting: str, numbers, greedy, any_greedy: bool, allowed,
    previous,  # (drafts, q, present) or None: coupled drafting's previous window
    above,  # (held, rows) or None
    token_ids, predicted,
):
    """next_window's tensor work, no host reads: Window's fields as a tuple."""
    vocab_size = bonus_probs.shape[-1]
    device = bonus_probs.device
    all_rows = torch.cat([target_probs, bonus_probs], dim=0)
    source, recycled, above_slot, above_in_window, old_slot = layout.unbind(0)
    recycled = recycled.bool()
    q = all_rows[source]  # [B, K, V]

    if allowed is None:
        uniform = torch.full((vocab_size,), 1.0 / vocab_size, device=device)
    elif allowed.dtype != torch.bool:
        uniform = allowed  # the layout's uniform rows, already normalised
    else:
        weights = allowed.to(torch.float32)
        uniform = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1.0)
    fresh_from_model = torch.zeros_like(recycled)
    if initial_drafts == "last_distribution":
        fresh = q if allowed is None else q * (allowed > 0)
        total = fresh.sum(dim=-1, keepdim=True)
        # Where the newest row puts no mass on the allowed tokens, go uniform.
        fresh = torch.where(total > 0, fresh / total.clamp_min(1e-30), uniform)
        fresh_from_model = ~recycled
    elif initial_drafts == "above":
        fresh = uniform
        if above is not None:
            # The cell above as a slot of the next window, where it is one.
            held, above_rows = above
            in_window = above_in_window.bool()
            window_rows = q.gather(1, above_slot[:, :, None].expand(-1, -1, vocab_size))
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

    old = None if previous is None else _previous_at_slots(*previous, old_slot)
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
    old_slot: torch.Tensor,  # [B, K] int64: the previous slot at each next slot's position, -1 none
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The previous window's draft and q at each next slot's position, and where it exists.

    Next slot s sits where previous slot a+1+s did. Only recycled slots take
    part (old_slot is -1 elsewhere): a fresh slot's position had no draft, or
    one drafted against an older context the new q knows nothing of.
    """
    vocab_size = previous_q.shape[-1]
    index = old_slot.clamp(min=0)
    drafts = previous_drafts.gather(1, index)
    # A draft outside q's columns (-1) cannot be coupled with.
    exists = present[:, None] & (old_slot >= 0) & (drafts >= 0)
    q = previous_q.gather(1, index[:, :, None].expand(-1, -1, vocab_size))
    return drafts, q, exists
