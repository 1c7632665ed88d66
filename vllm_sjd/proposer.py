"""The SJD proposer: per-request Jacobi windows, keyed by request id.

vLLM builds it as a `custom_class` proposer (`SJDProposer(vllm_config)`); the
SJD model runner (patches/sjd_runner.py) calls `propose_window` after each step
with that step's verified rows, and `draft_probs` before the next step's
verification to hand q to vLLM's rejection sampler.

State per request id: its drafting key (see core/rng.py), its pending
window (drafts and their q), for initial drafts "above" the verified rows
of its newest image row (core/cells_above.py), and with a row lookahead the
rows it predicted for cells ahead and the cells the next step feeds
(core/row_lookahead.py). Batch rows are never
used as keys: the persistent batch reorders rows when requests come and go.
The window of the requests in the latest step is held as two batch tensors
(one gather serves the whole next batch; a guided twin shares its conditional
request's row); a request left out of a step keeps its window as slices.
"""

import logging
import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from vllm_sjd.config import SJDConfig
from vllm_sjd.core import cpu_kernels
from vllm_sjd.core.adaptive import ForwardCostCurve, WindowPolicy
from vllm_sjd.core.cells_above import CellsAbove
from vllm_sjd.core.columns import Columns, convert, same_columns
from vllm_sjd.core.rng import key_from_seed
from vllm_sjd.core.row_lookahead import band_cells, fed_tokens
from vllm_sjd.core.window import (
    CellsAboveRows,
    PreviousWindow,
    StepRows,
    TableRows,
    Window,
    committed_row_sources,
    next_window,
    take_rows,
)
from vllm_sjd.guidance import leading_rows, row_among_leading

logger = logging.getLogger(__name__)


class SJDProposer:
    """Speculative Jacobi Decoding drafts for a batch of requests.

    A window is K drafts after a request's last committed token. Each step
    re-drafts the unverified tail of the window from the rows the verifier
    computed this step, and fills the remaining slots with initial drafts
    (core/window.py); how each draft is drawn is the `drafting` setting
    (core/drafting.py).
    """

    def __init__(self, vllm_config) -> None:
        spec = vllm_config.speculative_config
        assert spec is not None, "SJDProposer needs a speculative config"
        self.config = SJDConfig.from_additional_config(vllm_config.additional_config)
        # vLLM schedules the window's K drafts and the row lookahead's L tokens.
        self.lookahead: int = self.config.row_lookahead
        self.num_slots: int = spec.num_speculative_tokens - self.lookahead
        self.max_model_len: int = vllm_config.model_config.max_model_len

        self._keys: dict[str, int] = {}
        # Latest step's windows: row of each request in the tensors below.
        self._window_row: dict[str, int] = {}
        self._drafts: torch.Tensor | None = None  # [B, K] int64 token ids
        self._q: torch.Tensor | None = None  # [B, K, W] float32
        self._drafts_host: list[list[int]] | None = None  # _drafts as read to the host, by row
        self._column_drafts: torch.Tensor | None = None  # _drafts as indices of _columns, where known
        # The vocabulary columns of _q (the batch's layout ids); None: all V.
        self._columns: Columns | None = None
        # Windows of requests that were left out of the latest step, with their columns.
        self._carried: dict[str, tuple[torch.Tensor, torch.Tensor, Columns | None]] = {}
        self._cells_above = CellsAbove()
        # Row lookahead: rows predicted for cells ahead, by absolute position;
        # per request, (window drafts, cells predicted, tokens fed) of the step scheduled next.
        self._predictions = CellsAbove()
        self._lookahead_plan: dict[str, tuple[int, np.ndarray, list[int]]] = {}
        # The dynamic window: on once the runner hands over the forward-cost
        # curve, unless vLLM's per-batch-size table decides K.
        self._dynamic = self.config.dynamic_num_speculative_tokens
        if getattr(spec, "num_speculative_tokens_per_batch_size", None) is not None:
            self._dynamic = "off"
        self.policy: WindowPolicy | None = None
        self._last_plan: float | None = None

    @property
    def feeds_unverified(self) -> bool:
        """Steps feed tokens after the window's drafts that are never verified (the row
        lookahead's; SJD2's noisy slots): the runner splits them off (patches/row_lookahead_runner.py)."""
        return bool(self.lookahead)

    @property
    def wants_forward_costs(self) -> bool:
        """The runner measures the forward-cost curve at start-up for the dynamic window."""
        return self._dynamic != "off"

    def set_forward_costs(self, points: Sequence[tuple[int, float]]) -> None:
        """(tokens, seconds) of forward passes measured at start-up."""
        self.policy = WindowPolicy(self.num_slots, ForwardCostCurve(points))

    def timed_choices(self) -> list[tuple[int, bool]]:
        """(batch-size bucket, drafting) pairs the dynamic window has timed (diagnostics)."""
        if self.policy is None:
            return []
        return sorted(key for key in self.policy.measured.samples
                      if self.policy.measured.seconds_per_request(*key) is not None)

    def plan_drafts(
        self,
        num_draft_tokens: Sequence[int],  # this step's drafts per request
        num_accepted: Sequence[int],  # of which accepted
        seeds: Sequence[int | None],
        max_drafts: int | None,  # vLLM's K for the next step
        mirror: Sequence[tuple[int, int]] = (),  # (twin, conditional): same K
        steady: bool = True,  # no request started (prefilled) in the step just run
        committed: Sequence[int] | None = None,  # tokens each request got in that step
    ) -> list[int]:
        """How many drafts each request schedules for the next step.

        Fixed at vLLM's K, except under the dynamic window, where the requests
        that adapt share the K with the most tokens per second for this batch.
        """
        now = time.perf_counter()
        ceiling = self.num_slots if max_drafts is None else min(max_drafts, self.num_slots)
        caps = [ceiling] * len(seeds)
        if self.policy is None:
            return caps
        seconds = None if self._last_plan is None else now - self._last_plan
        self._last_plan = now
        self.policy.record_step(num_draft_tokens, num_accepted, seconds, steady, committed)
        adapts = [self._dynamic == "all" or seed is None for seed in seeds]
        for twin, cond in mirror:
            adapts[twin] = adapts[cond]
        fixed = [ceiling for a in adapts if not a]
        k = self.policy.choose(sum(adapts), fixed, ceiling)
        return [k if a else ceiling for a in adapts]

    @property
    def wants_cells_above(self) -> bool:
        """The runner passes each slot's cell one image row up (initial drafts "above")."""
        return self.config.initial_drafts == "above"

    # vLLM's custom_class interface --------------------------------------
    def load_model(self, *args, **kwargs) -> None:
        """SJD has no draft model; vLLM's CPU runner calls this regardless."""

    def propose(self, *args, **kwargs) -> list[list[int]]:
        raise RuntimeError(
            "SJDProposer runs only under the SJD model runner; start the engine "
            'with speculative_config={"method": "sjd", ...} and the vllm-sjd '
            "plugin installed, without a custom --worker-cls"
        )

    # Called by the SJD model runner ---------------------------------------
    def propose_window(
        self,
        req_ids: Sequence[str],
        rows: StepRows,
        *,
        num_tokens: np.ndarray,  # [B] int64: tokens so far (prompt + output)
        seeds: Sequence[int | None],
        greedy: np.ndarray,  # [B] bool
        has_output: Sequence[bool],
        allowed: torch.Tensor | TableRows | None = None,  # [B, K, V]: a fresh slot's q (next_window's)
        above: np.ndarray | None = None,  # [B, K] int64: absolute position of the cell above, -1 none
        row_strides: Sequence[int] = (),  # per request: image row stride, 0 without an image
        mirror: Sequence[tuple[int, int]] = (),  # (row, source row): same window as source
        max_drafts: int | Sequence[int] | None = None,  # drafts to schedule, per request or for all
        columns: Columns | None = None,  # every id a slot may hold; `allowed` has only these
        grids: Sequence[tuple] = (),  # per request: (ImageGrid | None, prompt length), row lookahead
        committed_tokens: np.ndarray | None = None,  # [>= B, >= max len]: tokens so far, by row
    ) -> list[list[int]]:
        """Build every request's next window; returns the drafts to schedule.

        A request that produced nothing this step (a prefill chunk, or a
        guided pair member held back) keeps the window it had, if any.
        `mirror` gives a guided pair's unconditional twin the conditional
        request's window, so both verify the same drafts. Windows keep all
        K slots; at most `max_drafts` of them are scheduled (a prefix of exact
        samples is as lossless as the whole). With `columns` the window is
        built and kept on those vocabulary columns only (exact:
        core/columns.py); `rows` may already hold only those (rows.columns), and
        only the built requests' rows (rows.requests: the twins left out).
        With a row lookahead, each request's drafts are followed by the tokens
        the lookahead feeds (core/row_lookahead.py; `grids` and
        `committed_tokens` needed), and fresh slots take its predictions.
        """
        if max_drafts is not None and not isinstance(max_drafts, int):
            max_drafts = list(max_drafts)
            if not any(max_drafts):
                return [[] for _ in req_ids]
        if self.builds_nothing_for(max_drafts):
            return [[] for _ in req_ids]
        device = rows.bonus_probs.device
        num_tokens = np.asarray(num_tokens, dtype=np.int64)
        greedy = np.asarray(greedy, dtype=bool)
        view = None if columns is None else columns.to(device)
        keys = self.request_keys(req_ids, seeds)
        if not same_columns(rows.columns, view):
            rows = StepRows(
                convert(rows.target_probs, rows.columns, view),
                convert(rows.bonus_probs, rows.columns, view),
                rows.num_draft_tokens,
                rows.num_accepted,
                view,
                rows.host_counts,
                rows.requests,
            )
        # A guided pair's twin takes its conditional request's window (`mirror`):
        # windows are built for the other requests only.
        build = leading_rows(len(req_ids), mirror)
        if rows.requests is not None and (build is None or not np.array_equal(rows.requests, build)):
            rows = rows.for_batch(len(req_ids), mirror)  # rows of other requests than those built
        pick = (lambda x: x) if build is None else (lambda x: x[build])
        build_ids = req_ids if build is None else [req_ids[i] for i in build]
        if rows.requests is not None or build is None:  # (the sampling step left the twins out)
            build_rows = rows
        else:
            build_rows = rows.select(build)
        build_tokens, build_greedy = pick(num_tokens), pick(greedy)
        cells_above = None
        if self.wants_cells_above and above is not None:
            # A guided twin's windows come from its conditional request: its rows are never
            # the cells above of a window it builds.
            self._record_cells(build_ids, build_rows, build_tokens,
                               pick(np.asarray(has_output, dtype=bool)), pick(np.asarray(row_strides)))
            cells_above = self._lookup_cells(
                build_ids, pick(np.asarray(above)), build_rows.bonus_probs, rows.columns
            )
        predicted = None
        if self.lookahead:
            slots = build_tokens[:, None] + np.arange(self.num_slots, dtype=np.int64)
            predicted = self._predictions.lookup(build_ids, slots, view)
        previous = self._previous_windows(build_ids, build_rows.bonus_probs, view)
        if allowed is not None and build is not None:
            allowed = allowed.select(build) if isinstance(allowed, TableRows) else take_rows(allowed, build)
        built = self._next_window(
            build_rows,
            keys=pick(keys),
            next_positions=build_tokens,
            greedy=torch.from_numpy(build_greedy).to(device),
            any_greedy=bool(build_greedy.any()),
            allowed=allowed,
            previous=previous,
            above=cells_above,
            token_ids=None if view is None else view.ids,
            predicted=predicted,
        )
        drafts, q = built.drafts, built.q
        column_drafts = None
        if view is not None:
            drafts, column_drafts = view.tokens(drafts), drafts
        # Each request's row of the built windows: a twin shares its source's row.
        row_of = list(range(len(req_ids))) if build is None else row_among_leading(len(req_ids), build, mirror)
        twins = {twin for twin, _ in mirror}
        kept = [False] * len(req_ids)
        for i, produced in enumerate(has_output):
            window = None if produced else self._window(req_ids[i], view)
            if window is not None:
                kept[i] = True
                if i not in twins:  # (a twin takes its source's window)
                    drafts[row_of[i]], q[row_of[i]] = window[0].to(device), window[1].to(device)
                    column_drafts = None
        self._store(req_ids, drafts, q, view, row_of, column_drafts)
        # A window must end inside the model's context; a request with no window schedules none.
        limits = (max_drafts if isinstance(max_drafts, list)
                  else [self.num_slots if max_drafts is None else max_drafts] * len(req_ids))
        scheduled = [
            max(min(self.max_model_len - tokens, limit, self.num_slots), 0) if out or keep else 0
            for tokens, limit, out, keep in zip(num_tokens.tolist(), limits, has_output, kept)
        ]
        if not self.lookahead or not grids:
            self._drafts_host = drafts.tolist()  # the step's one read from the device
            return [self._drafts_host[row][:n] for row, n in zip(row_of, scheduled)]
        cells, guesses = self._lookahead_cells(req_ids, grids, num_tokens, scheduled, view)
        if build is not None:
            drafts = drafts.index_select(0, torch.tensor(row_of, device=drafts.device))
        read = drafts if guesses is None else torch.cat([drafts, guesses.to(drafts.device)], dim=1)
        lists = read.tolist()  # the step's one read from the device
        self._drafts_host = [row[: self.num_slots] for row in lists]
        if build is not None:  # by stored row, as _as_stored reads them
            self._drafts_host = [self._drafts_host[int(i)] for i in build]
        draft_lists = [d[: int(n)] for d, n in zip(lists, scheduled)]
        fed = [
            fed_tokens(c, np.asarray(row[self.num_slots : self.num_slots + len(c)]),
                       committed_tokens[i, : num_tokens[i]], draft_lists[i], grid.row_stride)
            if len(c) else []
            for i, (c, row, (grid, _)) in enumerate(zip(cells, lists, grids))
        ]
        for i, keep in enumerate(kept):
            # A held pair member feeds again what it fed with its partner.
            old = self._lookahead_plan.get(req_ids[i]) if keep else None
            if old is not None and old[0] == scheduled[i]:
                cells[i], fed[i] = old[1], old[2]
        for twin, cond in mirror:  # a guided pair feeds the same tokens
            cells[twin], fed[twin] = cells[cond], fed[cond]
        for req_id, n, c, tokens in zip(req_ids, scheduled, cells, fed):
            if tokens:
                self._lookahead_plan[req_id] = (int(n), c, tokens)
            else:
                self._lookahead_plan.pop(req_id, None)
        return [d + tokens for d, tokens in zip(draft_lists, fed)]

    def _lookahead_cells(self, req_ids, grids, num_tokens, scheduled, view):
        """Per request, the cells its row lookahead predicts next step, and [B, L] the
        newest prediction's most likely token at each fed position (-1: none), on the
        device (None where no request has a cell)."""
        cells = []
        for i, (grid, prompt_len) in enumerate(grids):
            end = int(num_tokens[i] + scheduled[i])
            band = band_cells(grid, prompt_len, end, self.lookahead) if scheduled[i] else []
            cells.append(np.asarray(band, dtype=np.int64)[: max(self.max_model_len - end, 0)])
        if not any(len(c) for c in cells):
            return cells, None
        fed_at = np.full((len(cells), self.lookahead), -1, dtype=np.int64)
        for i, c in enumerate(cells):
            fed_at[i, : len(c)] = c - 1
        hit = self._predictions.lookup(req_ids, fed_at, view)
        if hit is None:
            return cells, torch.full(fed_at.shape, -1, dtype=torch.int64)
        found, rows = hit
        best = rows.argmax(dim=-1)
        best = best if view is None else view.tokens(best)
        return cells, torch.where(found, best, -1)

    def lookahead_plan(self, req_id: str) -> tuple[int, np.ndarray, list[int]] | None:
        """(window drafts, cells the lookahead predicts, tokens it feeds) of the drafts
        last proposed for this request; None without a lookahead."""
        return self._lookahead_plan.get(req_id)

    def record_predictions(
        self, req_ids: Sequence[str], cells: np.ndarray, probs: torch.Tensor,
        row_strides: Sequence[int], columns: Columns | None,
    ) -> None:
        """Keep a row lookahead's rows: probs[m] predicts absolute position cells[m]."""
        # Kept until the window reaches the cell: at most a window and a row ahead.
        strides = [2 * (self.num_slots + s) for s in row_strides]
        self._predictions.record(req_ids, strides, cells, probs, columns)

    @staticmethod
    def builds_nothing_for(max_drafts: int | None) -> bool:
        """No drafts to schedule: a plain AR step follows, so no window is built.

        A request keeps the window it had; whenever it is scheduled again, any
        stored draft is still an exact sample of its stored q.
        """
        return max_drafts == 0

    def _next_window(self, rows: StepRows, **kwargs) -> Window:
        return next_window(
            rows,
            num_slots=self.num_slots,
            initial_drafts=self.config.initial_drafts,
            drafting=self.config.drafting,
            **kwargs,
        )

    def _previous_windows(
        self, req_ids: Sequence[str], like: torch.Tensor, columns: Columns | None
    ) -> PreviousWindow | None:
        """The stored windows in batch order, on `columns`: drafts as column indices, q on
        them (coupled drafting re-drafts against them)."""
        if self.config.drafting != "coupled" or (self._drafts is None and not self._carried):
            return None
        previous = self._stored_windows(req_ids, like, columns)
        if columns is None or previous.drafts is self._column_drafts:
            return previous
        return PreviousWindow(columns.indices(previous.drafts), previous.q, previous.present)

    def _stored_windows(self, req_ids, like: torch.Tensor, columns: Columns | None) -> PreviousWindow:
        batch_size, device = len(req_ids), like.device
        rows = [self._window_row.get(r, -1) for r in req_ids]
        if self._drafts is not None and rows == list(range(self._drafts.shape[0])):
            present = torch.ones(batch_size, dtype=torch.bool, device=device)
            # The step's windows as built, where they were built on these columns.
            drafts = (self._column_drafts if self._column_drafts is not None
                      and same_columns(self._columns, columns) else self._drafts)
            return PreviousWindow(drafts, convert(self._q, self._columns, columns), present)
        if self._drafts is not None and rows and min(rows) >= 0:  # all have stored windows
            source = np.asarray(rows, dtype=np.int64)
            present = torch.ones(batch_size, dtype=torch.bool, device=device)
            q = convert(take_rows(self._q, source), self._columns, columns)
            return PreviousWindow(take_rows(self._drafts, source).to(device), q.to(device), present)
        drafts = torch.full((batch_size, self.num_slots), -1, dtype=torch.int64, device=device)
        q = like.new_zeros((batch_size, self.num_slots, like.shape[-1]))
        present = np.array([row >= 0 for row in rows], dtype=bool)
        if present.any():  # one gather for the requests of the latest step
            target = np.nonzero(present)[0]
            source = torch.from_numpy(np.asarray(rows)[target]).to(self._drafts.device)
            target = torch.from_numpy(target).to(device)
            drafts[target] = self._drafts[source].to(device)
            q[target] = convert(self._q[source], self._columns, columns).to(device)
        for i, req_id in enumerate(req_ids):
            window = None if rows[i] >= 0 else self._window(req_id, columns)
            if window is not None:
                drafts[i], q[i] = window[0].to(device), window[1].to(device)
                present[i] = True
        return PreviousWindow(drafts, q, torch.from_numpy(present).to(device))

    def _record_cells(
        self, req_ids, rows: StepRows, num_tokens: np.ndarray, has_output, row_strides
    ) -> None:
        """Keep the verified rows of the image tokens this step committed."""
        num_draft, num_accepted = rows.counts_on_host()
        loops = cpu_kernels.loaded()
        if loops is not None:  # the same entries from one call
            include = np.asarray(has_output, dtype=bool) & (np.asarray(row_strides) != 0)
            request, positions, sources = loops.committed_entries(
                num_draft, num_accepted, np.asarray(num_tokens, np.int64), include,
                rows.target_probs.shape[0])
            if len(request):
                self._cells_above.record([req_ids[i] for i in request], [row_strides[i] for i in request],
                                         positions, (rows.target_probs, rows.bonus_probs), rows.columns,
                                         rows=sources)
            return
        sources = committed_row_sources(num_draft.tolist(), num_accepted.tolist(),
                                        rows.target_probs.shape[0])
        entries, strides, positions, row_index = [], [], [], []
        for i, rows_i in enumerate(sources):
            if not has_output[i] or not row_strides[i]:
                continue
            end = int(num_tokens[i])
            entries += [req_ids[i]] * len(rows_i)
            strides += [row_strides[i]] * len(rows_i)
            positions.append(np.arange(end - len(rows_i), end, dtype=np.int64))
            row_index.append(rows_i)
        if not entries:
            return
        self._cells_above.record(entries, strides, np.concatenate(positions),
                                 (rows.target_probs, rows.bonus_probs), rows.columns,
                                 rows=np.concatenate(row_index))

    def _lookup_cells(
        self, req_ids, above: np.ndarray, like: torch.Tensor, columns: Columns | None
    ) -> CellsAboveRows:
        """Each slot's cell above, and the verified rows of those already committed
        (on `columns`, those of `like`)."""
        positions = np.asarray(above, dtype=np.int64)
        hit = self._cells_above.lookup(req_ids, above, columns)
        if hit is None:
            held = torch.zeros(positions.shape, dtype=torch.bool, device=like.device)
            return CellsAboveRows(positions, held, like.new_zeros((*above.shape, like.shape[-1])))
        return CellsAboveRows(positions, hit[0].to(like.device), hit[1].to(like.device))

    def draft_probs(
        self,
        req_ids: Sequence[str],
        num_draft_tokens: Sequence[int],
        draft_token_ids: torch.Tensor,  # [sum(n)] the drafts vLLM scheduled
        vocab_size: int,
    ) -> torch.Tensor | None:
        """q for vLLM's rejection sampler: [sum(n), V] float32, in batch order."""
        if int(draft_token_ids.shape[0]) == 0:
            return None
        return self.scheduled_drafts(req_ids, num_draft_tokens, draft_token_ids, None, vocab_size)[1]

    def scheduled_drafts(
        self,
        req_ids: Sequence[str],
        num_draft_tokens: Sequence[int],
        draft_token_ids: torch.Tensor,  # [sum(n)] the drafts vLLM scheduled
        columns: Columns | None,  # the columns wanted; None: the whole vocabulary
        vocab_size: int,
        scheduled_on_host: Sequence[Sequence[int]] | None = None,  # per request, as the host has them
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(drafts as column indices [sum(n)], -1 outside; their q [sum(n), W] float32).

        A draft without a stored q (or a different token than the one stored)
        gets a one-hot q: still lossless, only less likely to be accepted.
        With the scheduled drafts on the host, a step whose drafts are all the
        stored ones (the usual case) skips that check on the device.
        """
        device = draft_token_ids.device
        # Requests with no drafts this step need no stored window.
        drafting = [(self._window_row.get(r, -1), n) for r, n in zip(req_ids, num_draft_tokens) if n]
        if self._q is not None and all(row >= 0 for row, _ in drafting):
            if len(drafting) == 1:  # one request: the first n slots of its window, as views
                row, n = drafting[0]

                def stored(windows: torch.Tensor) -> torch.Tensor:
                    return windows[row, :n]
            else:  # rows of the flattened windows (row * K + slot): one row copy each
                flat = torch.from_numpy(self._flat_slots(drafting)).to(self._q.device)

                def stored(windows: torch.Tensor) -> torch.Tensor:
                    return windows.flatten(0, 1).index_select(0, flat)
            q = convert(stored(self._q), self._columns, columns)
            if self._as_stored(req_ids, num_draft_tokens, scheduled_on_host):
                if (columns is not None and self._column_drafts is not None
                        and same_columns(self._columns, columns)):  # the column indices as built
                    drafts = stored(self._column_drafts)
                else:
                    drafts = self._on_columns(draft_token_ids.to(torch.int64), columns)
                return drafts.to(device), q.to(device).contiguous()
            stored_drafts = stored(self._drafts)
        else:
            stored_drafts, q = self._gather_slow(req_ids, num_draft_tokens, columns, vocab_size)
        draft_token_ids = draft_token_ids.to(torch.int64)
        stored_drafts, q = stored_drafts.to(device), q.to(device)
        drafts = self._on_columns(draft_token_ids, columns)
        one_hot = torch.zeros_like(q).scatter_(-1, drafts.clamp(min=0)[:, None], 1.0)
        q = torch.where((stored_drafts != draft_token_ids)[:, None], one_hot, q)
        return drafts, q.contiguous()

    def _flat_slots(self, drafting: list[tuple[int, int]]) -> np.ndarray:
        """Rows of the flattened windows [B * K] of each (row, n): slots 0..n-1 of row."""
        counts = np.array([n for _, n in drafting], dtype=np.int64)
        starts = np.array([row for row, _ in drafting], dtype=np.int64) * self._q.shape[1]
        loops = cpu_kernels.loaded()
        if loops is not None:
            return loops.run_positions(starts, counts, self._q.shape[0] * self._q.shape[1])
        return np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())

    @staticmethod
    def _on_columns(token_ids: torch.Tensor, columns: Columns | None) -> torch.Tensor:
        return token_ids if columns is None else columns.to(token_ids.device).indices(token_ids)

    def _as_stored(self, req_ids, num_draft_tokens, scheduled_on_host) -> bool:
        """Whether every request's scheduled drafts are the first n of its stored window."""
        if scheduled_on_host is None or self._drafts_host is None:
            return False
        stored = self._drafts_host  # lists: comparing 16 ints costs less than making an array
        for req_id, n, scheduled in zip(req_ids, num_draft_tokens, scheduled_on_host):
            if n and stored[self._window_row[req_id]][:n] != list(scheduled[:n]):
                return False
        return True

    def _gather_slow(self, req_ids, num_draft_tokens, columns, vocab_size):
        width = vocab_size if columns is None else columns.ids.numel()
        drafts, qs = [], []
        for req_id, n in zip(req_ids, num_draft_tokens):
            if n == 0:
                continue
            window = self._window(req_id, columns)
            if window is None:
                drafts.append(torch.full((n,), -1, dtype=torch.int64))
                qs.append(torch.zeros(n, width))
            else:
                drafts.append(window[0][:n].cpu())
                qs.append(window[1][:n].cpu())
        return torch.cat(drafts), torch.cat(qs)

    def _window(
        self, req_id: str, columns: Columns | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A request's stored (drafts, q), q on `columns`."""
        row = self._window_row.get(req_id)
        if row is not None:
            return self._drafts[row], convert(self._q[row], self._columns, columns)
        carried = self._carried.get(req_id)
        if carried is None:
            return None
        return carried[0], convert(carried[1], carried[2], columns)

    # State ----------------------------------------------------------------
    def request_keys(self, req_ids: Sequence[str], seeds: Sequence[int | None]) -> np.ndarray:
        """[B] int64 numpy: each request's random key (drafting and verification),
        made on first sight."""
        keys = [self._keys.get(r) for r in req_ids]
        for i, key in enumerate(keys):
            if key is None:  # first step of this request
                seed = seeds[i]
                # Unseeded: from the global generator, which vLLM seeds alike
                # on every rank, so all ranks draw the same key.
                key = (
                    key_from_seed(seed)
                    if seed is not None
                    else int(torch.randint(-(2**62), 2**62, ()).item())
                )
                self._keys[req_ids[i]] = keys[i] = key
        return np.array(keys, dtype=np.int64)

    def _store(self, req_ids: Sequence[str], drafts, q, columns: Columns | None,
               row_of: Sequence[int] | None = None, column_drafts: torch.Tensor | None = None) -> None:
        """Keep the step's windows: request i's is row row_of[i] (default i) of drafts and q;
        column_drafts: the drafts as indices of `columns`, where known."""
        batch = set(req_ids)
        for req_id, row in self._window_row.items():
            if req_id not in batch:
                self._carried[req_id] = (
                    self._drafts[row].clone(), self._q[row].clone(), self._columns
                )
        for req_id in batch.intersection(self._carried):
            del self._carried[req_id]
        self._window_row = dict(zip(req_ids, range(len(req_ids)) if row_of is None else row_of))
        self._drafts, self._q, self._columns = drafts, q, columns
        self._column_drafts = column_drafts
        self._drafts_host = None  # set once the drafts are read

    def evict(self, req_ids: Iterable[str]) -> None:
        """Forget finished, aborted or preempted requests."""
        req_ids = list(req_ids)
        for req_id in req_ids:
            self._keys.pop(req_id, None)
            self._carried.pop(req_id, None)
            self._window_row.pop(req_id, None)
        self._cells_above.evict(req_ids)
        self._predictions.evict(req_ids)
        for req_id in req_ids:
            self._lookahead_plan.pop(req_id, None)
        if not self._window_row:
            self._drafts = self._q = self._columns = self._drafts_host = self._column_drafts = None

    def window_digest(self) -> dict[str, tuple[list[int], float]]:
        """Each pending window's drafts and a checksum of its q (rank comparisons)."""
        digest = {}
        for req_id in set(self._window_row) | set(self._carried):
            drafts, q = self._window(req_id, None)
            weights = torch.arange(1, q.numel() + 1, dtype=torch.float64).view_as(q)
            digest[req_id] = (drafts.tolist(), float((q.double() * weights).sum()))
        return digest

    def tracked_requests(self) -> set[str]:
        """Request ids the proposer holds any state for."""
        return (
            set(self._keys)
            | set(self._window_row)
            | set(self._carried)
            | self._cells_above.tracked_requests()
            | self._predictions.tracked_requests()
            | set(self._lookahead_plan)
        )
