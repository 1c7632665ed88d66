"""A deliberately wrong SJD proposer, to show the losslessness test has teeth.

It drafts exactly like SJDProposer but reports a wrong q to the verifier:
- "neighbour": each slot reports the q of the next slot in the window;
- "before_temperature": q as it was before temperature scaling (p ** T,
  renormalised; top-k kept), i.e. the verifier and q disagree on temperature.
A one-hot q would not be wrong (lossless for any draft), only slow.
"""

import torch

from vllm_sjd.proposer import SJDProposer


class FaultyQProposer(SJDProposer):
    fault: str | None = None
    temperature: float = 1.0

    def set_fault(self, fault: str | None, temperature: float = 1.0) -> None:
        assert fault in (None, "neighbour", "before_temperature")
        self.fault, self.temperature = fault, temperature

    def _next_window(self, rows, **kwargs):
        drafts, q = super()._next_window(rows, **kwargs)
        if self.fault == "neighbour":
            q = torch.cat([q[:, 1:], q[:, -1:]], dim=1).contiguous()
        elif self.fault == "before_temperature":
            q = q.pow(self.temperature)
            q = (q / q.sum(dim=-1, keepdim=True)).contiguous()
        return drafts, q


class CrashingProposer(SJDProposer):
    """Raises inside the engine for a request seeded CRASH_SEED: an engine that dies mid-image."""

    CRASH_SEED = 666

    def propose_window(self, req_ids, rows, *, seeds, **kwargs):
        if self.CRASH_SEED in seeds:
            raise RuntimeError("CrashingProposer: the engine dies here, as the test asked")
        return super().propose_window(req_ids, rows, seeds=seeds, **kwargs)


class VaryingWindowProposer(SJDProposer):
    """Not faulty: schedules a different number of drafts each step (0 included).

    What vLLM's per-batch-size window table does to a request, through the
    same `max_drafts` path, on every step rather than when the batch changes.
    """

    CYCLE = (4, 0, 2, 3, 0, 1)

    def __init__(self, vllm_config) -> None:
        super().__init__(vllm_config)
        self._step = 0

    def propose_window(self, req_ids, rows, **kwargs):
        kwargs["max_drafts"] = self.CYCLE[self._step % len(self.CYCLE)]
        self._step += 1
        return super().propose_window(req_ids, rows, **kwargs)
