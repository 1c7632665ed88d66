"""Counts what one SJD step asks of torch: calls, and reads of tensors on the host.

A host read (`.item()`, `.tolist()`, `.cpu()`, `bool(t)`, a boolean-mask index,
`nonzero`, ...) makes the host wait for the device on a GPU: each one stalls
the step until every kernel queued before it has run. On a CPU machine there
is no device to wait for, so this counts the calls themselves, as if every
tensor lived on a GPU: host-side data belongs in numpy arrays and lists. An
audited step runs the torch code a GPU runs, without the numba kernels that
serve CPU devices (core/cpu_kernels.py reads its tensors as numpy views).

`StepAudit` is a TorchFunctionMode; the SJD worker wraps the runner's
`_sample` and `propose_draft_token_ids` in it (`sjd_step_audit`), one record
per step. `RunnerTimer` times a runner's step parts with perf_counter
(`sjd_step_timing`), for benchmarks: no profiler inflating Python-heavy
parts. Plain torch, no vLLM.
"""

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from vllm_sjd.core.cpu_kernels import kernels_disabled

# Calls that copy a tensor's values to the host (or need its values there to
# know an output's size).
_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__int__: "int",
    torch.Tensor.__float__: "float",
    torch.Tensor.__index__: "index",
    torch.Tensor.nonzero: "nonzero",
    torch.nonzero: "nonzero",
    torch.Tensor.unique: "unique",
    torch.unique: "unique",
    torch.masked_select: "masked_select",
    torch.Tensor.masked_select: "masked_select",
    torch.equal: "equal",
}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_}
_REPEATS = {torch.repeat_interleave, torch.Tensor.repeat_interleave}


@dataclass
class StepRecord:
    calls: int = 0  # torch functions and tensor methods called
    reads: Counter = field(default_factory=Counter)  # host reads by kind
    where: Counter = field(default_factory=Counter)  # host reads by "file:line kind"
    callers: Counter = field(default_factory=Counter)  # calls by "file:line", if asked

    @property
    def host_reads(self) -> int:
        return sum(self.reads.values())


def _has_bool_mask(index) -> bool:
    items = index if isinstance(index, tuple | list) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class StepAudit(TorchFunctionMode):
    """Accumulates into `record` while active."""

    def __init__(self, by_caller: bool = False) -> None:
        super().__init__()
        self.record = StepRecord()
        self.by_caller = by_caller  # count calls per "file:line" (slow)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.record.calls += 1
        if self.by_caller:
            self.record.callers[_caller()] += 1
        kind = _READS.get(func)
        if kind is None and func in _INDEXING and len(args) > 1 and _has_bool_mask(args[1]):
            kind = "bool_mask_index"
        if kind is None and func in _REPEATS and "output_size" not in kwargs:
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            if isinstance(repeats, torch.Tensor) and repeats.numel() > 1:
                kind = "repeat_interleave"
        if kind is None and func is torch.Tensor.to and _to_host(args, kwargs):
            kind = "to_host"
        if kind is not None:
            self.record.reads[kind] += 1
            self.record.where[f"{_caller()} {kind}"] += 1
        return func(*args, **kwargs)


def _caller() -> str:
    """file:line of the innermost frame outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "/torch/" not in name and not name.endswith("step_audit.py"):
            return f"{Path(name).parent.name}/{Path(name).name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _to_host(args, kwargs) -> bool:
    """`.to(...)` that moves a tensor off a non-CPU device to the CPU."""
    tensor, args = (args[0], args[1:]) if args else (None, ())
    if not isinstance(tensor, torch.Tensor) or tensor.device.type == "cpu":
        return False
    target = kwargs.get("device", args[0] if args else None)
    return isinstance(target, str | torch.device) and torch.device(target).type == "cpu"


class RunnerAudit:
    """Audits each step of an SJD model runner: its `_sample` and `propose_draft_token_ids`.

    Installs instance attributes over the two methods (`remove` takes them
    off); a step's record starts at `_sample` and takes in the proposal that
    follows it.
    """

    AUDITED = ("_sample", "propose_draft_token_ids")

    def __init__(self, runner) -> None:
        self.steps: list[tuple[int, StepRecord]] = []  # (drafts verified, record)
        self._runner = runner
        for name in self.AUDITED:
            setattr(runner, name, self._audited(name, getattr(runner, name)))

    def _audited(self, name: str, method):
        def audited(*args, **kwargs):
            if name == "_sample":
                metadata = args[1] if len(args) > 1 else kwargs.get("spec_decode_metadata")
                drafts = 0 if metadata is None else sum(metadata.num_draft_tokens)
                self.steps.append((drafts, StepRecord()))
            mode = StepAudit()
            with mode, kernels_disabled():
                result = method(*args, **kwargs)
            if self.steps:
                record = self.steps[-1][1]
                record.calls += mode.record.calls
                record.reads.update(mode.record.reads)
                record.where.update(mode.record.where)
            return result

        return audited

    def remove(self) -> list[dict]:
        """Stops auditing; each step as {"drafts", "calls", "host_reads", "reads", "where"}."""
        for name in self.AUDITED:
            self._runner.__dict__.pop(name, None)
        return [
            {"drafts": drafts, "calls": r.calls, "host_reads": r.host_reads, "reads": dict(r.reads),
             "where": dict(r.where)}
            for drafts, r in self.steps
        ]


class RunnerTimer:
    """Wall time of a runner's step parts (perf_counter), without a profiler's inflation.

    Wraps the methods in PARTS with instance attributes; on a GPU the times
    are host times (a part that does not synchronise returns before its
    kernels finish), so use it on CPU or read it as launch time.
    """

    PARTS = ("execute_model", "_model_forward", "sample_tokens", "_sample",
             "propose_draft_token_ids", "_bookkeeping_sync")  # methods of the runner

    def __init__(self, runner) -> None:
        self.seconds = dict.fromkeys((*self.PARTS, "compute_logits"), 0.0)
        self.steps = 0
        self._runner = runner
        for name in self.PARTS:
            setattr(runner, name, self._timed(name, getattr(runner, name)))
        # The language-model head runs outside _model_forward, on every verified row.
        runner.model.compute_logits = self._timed("compute_logits", runner.model.compute_logits)

    def _timed(self, name: str, method):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
                self.steps += name == "execute_model"

        return timed

    def remove(self) -> dict:
        """Stops timing; {"steps": n, part: seconds}."""
        for name in self.PARTS:
            self._runner.__dict__.pop(name, None)
        self._runner.model.__dict__.pop("compute_logits", None)
        return {"steps": self.steps, **{k: round(v, 4) for k, v in self.seconds.items()}}
