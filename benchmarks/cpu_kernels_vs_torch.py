#!/usr/bin/env python
"""The CPU kernels (vllm_sjd/core/cpu_kernels.py) against the torch code they stand in for.

    .venv/bin/python benchmarks/cpu_kernels_vs_torch.py

Outside the engine, at the demo's one-in-flight shapes (a guided pair: two
requests of 16 drafts, the layout's 513 columns, coupled drafting with cells
above): microseconds a call of `verify` and `next_window` with the kernels
and with `kernels_disabled()` (the torch code a GPU runs), after checking that
both give the same tokens and windows. In the engine each call costs about
twice this (caches cold after the forward pass); benchmarks/step_rest.py
measures the step there.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vllm_sjd.core import cpu_kernels  # noqa: E402
from vllm_sjd.core.verify import verify  # noqa: E402
from vllm_sjd.core.window import CellsAboveRows, PreviousWindow, StepRows, next_window  # noqa: E402

WIDTH, SLOTS = 513, 16


def rows(generator, *shape):
    return torch.softmax(torch.randn(*shape, WIDTH, generator=generator) * 3, dim=-1)


def inputs(generator):
    n = np.array([SLOTS, SLOTS])
    q = rows(generator, 2 * SLOTS)
    drafts = torch.multinomial(q, 1, generator=generator)[:, 0]
    target = 0.7 * q + 0.3 * rows(generator, 2 * SLOTS)
    bonus = rows(generator, 2)
    verify_args = dict(target_probs=target, bonus_probs=bonus, num_draft_tokens=n, max_num_drafts=SLOTS,
                       drafts=drafts, draft_q=q, greedy=torch.zeros(2, dtype=torch.bool),
                       keys=np.array([11, 12]), first_positions=np.array([100, 100]), any_greedy=False)
    a = np.array([3])
    step = StepRows(target[:SLOTS], bonus[:1], torch.from_numpy(n[:1]), torch.from_numpy(a), None, (n[:1], a))
    previous_q = rows(generator, 1, SLOTS)
    previous = PreviousWindow(torch.multinomial(previous_q[0], 1, generator=generator).view(1, SLOTS),
                              previous_q, torch.ones(1, dtype=torch.bool))
    above = CellsAboveRows(np.arange(SLOTS)[None] + 80, torch.rand(1, SLOTS, generator=generator) < 0.5,
                           rows(generator, 1, SLOTS))
    window_args = dict(rows=step, num_slots=SLOTS, keys=np.array([11]), next_positions=np.array([104]),
                       greedy=torch.zeros(1, dtype=torch.bool), any_greedy=False, initial_drafts="above",
                       drafting="coupled", allowed=torch.full((1, SLOTS, WIDTH), 1.0 / WIDTH),
                       previous=previous, above=above)
    return verify_args, window_args


def microseconds(fn, calls: int = 3000) -> float:
    for _ in range(100):
        fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e6 * (time.perf_counter() - started) / calls


def main() -> None:
    cpu_kernels.warm_up()
    verify_args, window_args = inputs(torch.Generator().manual_seed(0))
    kernel_verdict, kernel_window = verify(**verify_args), next_window(**window_args)
    with cpu_kernels.kernels_disabled():
        torch_verdict, torch_window = verify(**verify_args), next_window(**window_args)
    same = (torch.equal(kernel_verdict.tokens, torch_verdict.tokens)
            and torch.equal(kernel_window.drafts, torch_window.drafts)
            and torch.equal(kernel_window.q, torch_window.q))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; same tokens and windows: {same}")
    print("| call | torch us | kernels us | ratio |")
    print("|---|---|---|---|")
    for name, fn in (("verify (2 requests x 16 drafts)", lambda: verify(**verify_args)),
                     ("next_window (1 request, 16 slots)", lambda: next_window(**window_args))):
        with cpu_kernels.kernels_disabled():
            eager = microseconds(fn)
        fused = microseconds(fn)
        print(f"| {name} | {eager:.1f} | {fused:.1f} | {eager / fused:.1f}x |")


if __name__ == "__main__":
    main()
