"""A deliberately wrong SJD proposer, to show the losslessness test has teeth.

It drafts exactly like SJDProposer but reports a wrong q to the verifier:
- "neighbour": each slot reports the q of the next slot in the window;
- "before_temperature": q as it was before temperature scaling (p ** T,
  renormalised; top-k kept), i.e. the verifier and q disagree on temperature;
- "old_q_for_kept": under coupled drafting, a draft the coupling kept reports
  the q it was first drawn from, not the new row (the public SCD code's bug);
- "prediction_argmax": with a row lookahead, a fresh slot drafted from the
  lookahead's prediction takes its most likely token (what the lookahead
  fed there) while reporting the prediction as q.
FaultySJD2Proposer reports, when its fault is on, each clean draft's q as the
next slot's (an off-by-one between a slot and the row that predicts it).
A one-hot q would not be wrong (lossless for any draft), only slow.
Its drafting settings and a cycle of per-step window lengths can also be
switched while the engine runs (`set_drafting`, `set_window_cycle`), so one
engine serves every mode's test.
"""

import dataclasses

import torch

from vllm_sjd.core.columns import convert
from vllm_sjd.proposer import SJDProposer
from vllm_sjd.sjd2 import SJD2Proposer


class FaultyQProposer(SJDProposer):
    fault: str | None = None
    temperature: float = 1.0

    def __init__(self, vllm_config) -> None:
        super().__init__(vllm_config)
        self.counts = {"kept": 0, "from_above": 0, "from_prediction": 0}
        self.window_cycle: tuple[int, ...] = ()
        self._step = 0
        # Row lookahead feeds of the first request, with the rows kept for them.
        self._record_feeds, self._feeds, self._pending_feed = False, [], None

    def set_window_cycle(self, cycle) -> None:
        """Schedule cycle[i % len] drafts at step i (0: a plain AR step); () for every slot."""
        self.window_cycle, self._step = tuple(cycle), 0

    def propose_window(self, req_ids, rows, **kwargs):
        if self.window_cycle:
            kwargs["max_drafts"] = self.window_cycle[self._step % len(self.window_cycle)]
            self._step += 1
        drafts = super().propose_window(req_ids, rows, **kwargs)
        plan = self.lookahead_plan(req_ids[0]) if self._record_feeds else None
        if plan is not None and drafts[0]:
            n, cells = plan[:2]
            committed = kwargs["committed_tokens"][0, : int(kwargs["num_tokens"][0])].tolist()
            self._pending_feed = (req_ids[0], committed, drafts[0][:n], cells.tolist(), drafts[0][n:])
        return drafts

    def record_predictions(self, req_ids, cells, probs, row_strides, columns):
        pending, self._pending_feed = self._pending_feed, None
        if pending is not None:
            req_id, committed, drafts, planned, fed = pending
            mine = [m for m, r in enumerate(req_ids) if r == req_id]
            kept = [int(cells[m]) for m in mine]
            if mine and kept == planned[: len(mine)]:
                rows = convert(probs[mine], columns, None).tolist()
                self._feeds.append((committed, drafts, kept, fed[: len(mine)], rows))
        return super().record_predictions(req_ids, cells, probs, row_strides, columns)

    def record_feeds(self, on: bool) -> None:
        """Keep (committed, window drafts, cells, fed tokens, kept rows) of each step."""
        self._record_feeds, self._feeds, self._pending_feed = on, [], None

    def get_feeds(self) -> list:
        return list(self._feeds)

    def set_fault(self, fault: str | None, temperature: float = 1.0) -> None:
        assert fault in (None, "neighbour", "before_temperature", "old_q_for_kept",
                         "prediction_argmax")
        self.fault, self.temperature = fault, temperature

    def set_drafting(self, drafting: str, initial_drafts: str, num_slots: int) -> None:
        """Switch modes and window length (at most the engine's K) while the engine is idle.

        Forgets every window (those of finished requests, which vLLM evicts
        only at its next step), so no window of the old mode is reused.
        """
        self.evict(self.tracked_requests())
        self.config = self.config.model_copy(
            update={"drafting": drafting, "initial_drafts": initial_drafts}
        )
        self.num_slots = num_slots
        self.counts = dict.fromkeys(self.counts, 0)

    def get_counts(self) -> dict[str, int]:
        """Slots the coupling kept, and fresh slots drafted from the cell above."""
        return dict(self.counts)

    def _next_window(self, rows, **kwargs):
        window = super()._next_window(rows, **kwargs)
        self.counts["kept"] += int(window.kept.sum())
        self.counts["from_above"] += int(window.from_above.sum())
        if window.from_prediction is not None:
            self.counts["from_prediction"] += int(window.from_prediction.sum())
        q = window.q
        if self.fault == "neighbour":
            q = torch.cat([q[:, 1:], q[:, -1:]], dim=1).contiguous()
        elif self.fault == "before_temperature":
            q = q.pow(self.temperature)
            q = (q / q.sum(dim=-1, keepdim=True)).contiguous()
        elif self.fault == "old_q_for_kept" and window.previous_q is not None:
            q = torch.where(window.kept[:, :, None], window.previous_q, q).contiguous()
        elif self.fault == "prediction_argmax" and window.from_prediction is not None:
            drafts = torch.where(window.from_prediction, q.argmax(dim=-1), window.drafts)
            return dataclasses.replace(window, drafts=drafts)
        return dataclasses.replace(window, q=q)


class CrashingProposer(SJDProposer):
    """Raises inside the engine for a request seeded CRASH_SEED: an engine that dies mid-image."""

    CRASH_SEED = 666

    def propose_window(self, req_ids, rows, *, seeds, **kwargs):
        if self.CRASH_SEED in seeds:
            raise RuntimeError("CrashingProposer: the engine dies here, as the test asked")
        return super().propose_window(req_ids, rows, seeds=seeds, **kwargs)


class VaryingWindowProposer(FaultyQProposer):
    """Not faulty: schedules a different number of drafts each step (0 included).

    What vLLM's per-batch-size window table and SJD's dynamic window do to a
    request, through the same `max_drafts` path, on every step rather than
    when the load changes.
    """

    CYCLE = (4, 0, 2, 3, 0, 1)

    def __init__(self, vllm_config) -> None:
        super().__init__(vllm_config)
        self.set_window_cycle(self.CYCLE)


class FaultySJD2Proposer(SJD2Proposer):
    fault: bool = False

    def set_fault(self, fault: bool) -> None:
        self.fault = fault

    def _store(self, req_ids, drafts, q, columns) -> None:
        if self.fault:
            q = torch.cat([q[:, 1:], q[:, -1:]], dim=1)
        super()._store(req_ids, drafts, q, columns)
