#!/usr/bin/env python
"""A lead for the lean step on the CPU: SJD's verification as one numba kernel, against core/verify.py.

    .venv/bin/python benchmarks/numba_verify_cpu.py

A prototype, not wired into the engine. The kernel runs the same test as
core/verify.py (accept draft j while p_j(d) >= u_j q_j(d); at the first
rejection draw from max(0, p - q), or from p where q covers p; else the bonus
token from the bonus row; inverse CDF in float64 over float32 terms, the
first index whose running sum exceeds u times the total), on the same
counter-based numbers. It checks that both give the same tokens on random
batches, then times both at the demo's one-in-flight shapes (16 drafts, the
layout's 513 columns). numba ships with vLLM.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vllm_sjd.core import verify as torch_verify  # noqa: E402
from vllm_sjd.core.rng import ACCEPT_STREAM, TOKEN_STREAM, counter_uniforms  # noqa: E402


@numba.njit(cache=False)
def verdict_kernel(p, bonus, n, drafts, q, accept_u, token_u, max_n):
    """(tokens [B, max_n + 1], -1 after the last; num_accepted [B]) for float32 rows."""
    batch, width, total_rows = n.shape[0], p.shape[1], p.shape[0]
    tokens = np.full((batch, max_n + 1), -1, np.int64)
    accepted = np.zeros(batch, np.int64)
    first = 0
    for b in range(batch):
        a = 0
        while a < n[b]:
            r, d = first + a, drafts[first + a]
            if d < 0 or q[r, d] <= 0 or np.float64(p[r, d]) < accept_u[r] * np.float64(q[r, d]):
                break
            tokens[b, a] = d
            a += 1
        accepted[b] = a
        if a < n[b]:  # rejected at row r: the residual, or p where q covers p
            r = first + a
            mass = 0.0
            for w in range(width):
                x = p[r, w] - q[r, w]
                if x > 0:
                    mass += x
            target, running, token = token_u[r] * (mass if mass > 0 else 1.0), 0.0, width - 1
            for w in range(width):
                x = (p[r, w] - q[r, w]) if mass > 0 else p[r, w]
                if x > 0:
                    running += x
                if running > target:
                    token = w
                    break
        else:  # every draft passed: the bonus row
            mass = 0.0
            for w in range(width):
                mass += bonus[b, w]
            target, running, token = token_u[total_rows + b] * mass, 0.0, width - 1
            for w in range(width):
                running += bonus[b, w]
                if running > target:
                    token = w
                    break
        tokens[b, a] = token
        first += n[b]
    return tokens, accepted


def numbers_of(keys, first, n):
    """The verifier's acceptance and token uniforms, as core/verify.py hashes them."""
    request = np.repeat(np.arange(len(n)), n)
    slot = np.arange(int(n.sum())) - (np.cumsum(n) - n)[request]
    return counter_uniforms(np.concatenate([keys[request], keys]),
                            np.concatenate([first[request] + slot, first + n]), 0,
                            np.array([[ACCEPT_STREAM], [TOKEN_STREAM]]))


def same_tokens(trials: int, width: int) -> int:
    """Random guided-like batches (3 requests, 5 / 0 / 7 drafts); how many differ."""
    gen = torch.Generator().manual_seed(0)
    n = np.array([5, 0, 7])
    total, batch = int(n.sum()), len(n)
    differ = 0
    for trial in range(trials):
        logits = torch.randn(total + batch, width, generator=gen) * 2
        p, bonus = logits.softmax(-1)[:total], logits.softmax(-1)[total:]
        q = (logits[:total] + 0.3 * torch.randn(total, width, generator=gen)).softmax(-1)
        drafts = torch.multinomial(q, 1, generator=gen)[:, 0]
        keys, first = np.array([11, 12, 13]) + trial, np.array([40, 50, 60])
        ref = torch_verify.verify(p, bonus, n, int(n.max()), drafts, q,
                                  torch.zeros(batch, dtype=torch.bool), keys, first, any_greedy=False)
        numbers = numbers_of(keys, first, n)
        tokens, accepted = verdict_kernel(p.numpy(), bonus.numpy(), n, drafts.numpy(), q.numpy(),
                                          numbers[0, :total].copy(), numbers[1].copy(), int(n.max()))
        differ += not (np.array_equal(tokens, ref.tokens.numpy())
                       and np.array_equal(accepted, ref.num_accepted.numpy()))
    return differ


def microseconds(fn, calls: int = 5000) -> float:
    for _ in range(100):
        fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e6 * (time.perf_counter() - started) / calls


def main() -> None:
    width, drafts_n = 513, 16
    print(f"numba {numba.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"batches whose tokens differ from core/verify.py: {same_tokens(300, width)} of 300")
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(drafts_n, width, generator=gen).softmax(-1)
    bonus = torch.randn(1, width, generator=gen).softmax(-1)
    q = torch.randn(drafts_n, width, generator=gen).softmax(-1)
    drafts = torch.multinomial(q, 1, generator=gen)[:, 0]
    n, keys, first = np.array([drafts_n]), np.array([123]), np.array([100])
    greedy = torch.zeros(1, dtype=torch.bool)
    eager = microseconds(lambda: torch_verify.verify(p, bonus, n, drafts_n, drafts, q, greedy, keys, first,
                                                     any_greedy=False))

    def kernel_step():
        numbers = numbers_of(keys, first, n)
        tokens, accepted = verdict_kernel(p.numpy(), bonus.numpy(), n, drafts.numpy(), q.numpy(),
                                          numbers[0, :drafts_n].copy(), numbers[1].copy(), drafts_n)
        return torch.from_numpy(tokens), torch.from_numpy(accepted)

    kernel = microseconds(kernel_step)
    numbers = numbers_of(keys, first, n)
    accept_u, token_u = numbers[0, :drafts_n].copy(), numbers[1].copy()
    alone = microseconds(lambda: verdict_kernel(p.numpy(), bonus.numpy(), n, drafts.numpy(), q.numpy(),
                                                accept_u, token_u, drafts_n))
    print(f"one request, {drafts_n} drafts, {width} columns: core/verify.py {eager:.1f} us a call; "
          f"numba kernel with the numpy hashing {kernel:.1f} us ({eager / kernel:.0f}x), "
          f"the kernel alone {alone:.1f} us")


if __name__ == "__main__":
    main()
