"""SJD's step outside the forward pass as numba kernels, for a CPU device.

On a CPU each eager torch call costs 2-8 us with its Python, and SJD's step
outside the forward pass was ~250 such calls over a few dozen rows of a few
hundred columns (benchmarks/RESULTS.md, "The lean step"). These kernels do
the verifier's test (core/verify.py), the window's assembly and draws
(core/window.py, core/drafting.py), the counter hash (core/rng.py), the
cells-above ring (core/cells_above.py) and the layout's row lookups in one
loop each: the same comparisons in the same precision (float32 terms, float64
products and running sums, the first index whose running sum exceeds u times
the total), so they give the torch code's tokens, windows and rows bit for
bit (tests/test_core_cpu_kernels.py). The torch code stays the
implementation on a GPU and the reference; the engine's chi-square suites
on a CPU run through the kernels.

numba ships with vLLM. The loops (core/numba_loops.py) are imported on first
use, not with this module (numba's import costs a process that never steps on
a CPU ~0.3 s, and vLLM's CPU worker scans loaded modules in a way llvmlite
breaks: patches/cpu_kernel_scan.py). The SJD runner calls `warm_up` when the
engine starts, so that no request waits for the compiler (about 2 s, cached
on disk after the first process).
"""

import contextlib
import importlib

import numpy as np
import torch

_enabled = True
_loops = None
_streams: dict[str, np.ndarray] = {}  # core/rng.py's streams as uint64, set on loading


def _kernels():
    """core/numba_loops.py, imported (and its kernels compiled) on first use."""
    global _loops
    if _loops is None:
        from vllm_sjd.core import rng  # imports this module: not at the top

        def bits(*streams):
            return np.array(streams, dtype=np.int64).view(np.uint64)

        _streams["verify"] = bits(rng.ACCEPT_STREAM, rng.TOKEN_STREAM)
        _streams["draft"] = bits(rng.DRAFT_STREAM, rng.COUPLING_STREAM, rng.RESIDUAL_STREAM)
        _loops = importlib.import_module("vllm_sjd.core.numba_loops")
    return _loops


def loaded():
    """core/numba_loops.py once any kernel ran or `warm_up` did in this process, else None.
    Host code that serves every device (core/rng.py's hashing) takes its loops then."""
    return _loops if _enabled else None


def enabled_for(tensor: torch.Tensor) -> bool:
    """Whether work on `tensor` runs through these kernels: a CPU tensor, kernels on.
    (torch.compile graphs, core/compiled.py, run on CUDA devices only.)"""
    return _enabled and tensor.is_cpu


@contextlib.contextmanager
def kernels_disabled():
    """The torch implementation on the CPU too (the reference, for tests and benchmarks)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy view of a CPU tensor (one compiled signature per kernel)."""
    return np.ascontiguousarray(tensor.numpy())


def _bits(values) -> np.ndarray:
    """int64 host numbers as the uint64 bit patterns the hashing takes."""
    return np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)


def verdict(target_probs, bonus_probs, num_draft_tokens: np.ndarray, max_num_drafts: int, drafts,
            draft_q, greedy, keys: np.ndarray, first_positions: np.ndarray,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """core/verify.verify's (tokens, num_accepted) for CPU tensors, its numbers hashed in
    the kernel (the same as core/rng.py's)."""
    tokens, accepted = _kernels().verdict_kernel(
        _array(target_probs), _array(bonus_probs), np.ascontiguousarray(num_draft_tokens, np.int64),
        _array(drafts), _array(draft_q), _array(greedy), _bits(keys), _bits(first_positions),
        _streams["verify"], max_num_drafts,
    )
    return torch.from_numpy(tokens), torch.from_numpy(accepted)


def draw(q, uniforms, previous=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(drafts, kept) as core/drafting.draw_with gives them for CPU tensors.

    uniforms: [B, K] float64 (independent draws); with `previous` = (old drafts,
    old q, keep uniforms, residual uniforms, coupled), the slots in `coupled`
    are coupled with the old draft at their position."""
    if previous is None:
        empty_bool, empty_int = np.zeros((0, 0), np.bool_), np.zeros((0, 0), np.int64)
        empty_q, empty_u = np.zeros((0, 0, 0), np.float32), np.zeros((0, 0), np.float64)
        drafts, kept = _kernels().draw_kernel(_array(q), _array(uniforms), empty_bool, empty_int,
                                              empty_q, empty_u, empty_u)
    else:
        old_drafts, old_q, keep_u, residual_u, coupled = previous
        drafts, kept = _kernels().draw_kernel(_array(q), _array(uniforms), _array(coupled),
                                              _array(old_drafts), _array(old_q), _array(keep_u),
                                              _array(residual_u))
    return torch.from_numpy(drafts), torch.from_numpy(kept)


def handles_window(initial_drafts: str, drafting: str, allowed, predicted) -> bool:
    """Whether `window` builds this kind of window (else core/window.py's torch code does)."""
    float_rows = allowed is None or not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool
    return (initial_drafts in ("uniform", "above") and drafting in ("independent", "coupled")
            and predicted is None and float_rows)


def window(target_probs, bonus_probs, layout: np.ndarray, initial_drafts: str, keys: np.ndarray,
           next_positions: np.ndarray, greedy, allowed, previous, above) -> tuple:
    """core/window._window_tensors's fields for CPU tensors, where `handles_window`, the
    numbers hashed in the kernel (draw_numbers's).

    layout: [5, B, K] from _slot_layout; keys, next_positions: [B] int64; allowed: None,
    uniform rows [V] or [B, K, V], or TableRows of them; previous: (drafts, q, present) or
    None; above: (held, rows) or None."""
    width = bonus_probs.shape[-1]
    batch, slots = layout.shape[1], layout.shape[2]
    if allowed is None:
        table = np.full((1, width), 1.0 / width, dtype=np.float32)
        table_rows = np.zeros((batch, slots), np.int64)
    elif isinstance(allowed, torch.Tensor):
        table = _array(allowed).reshape(-1, width)
        table_rows = (np.zeros((batch, slots), np.int64) if allowed.dim() == 1
                      else np.arange(batch * slots, dtype=np.int64).reshape(batch, slots))
    else:  # TableRows: the table read in place
        table, table_rows = _array(allowed.table), np.ascontiguousarray(allowed.rows, np.int64)
    if above is None:
        held, above_rows = np.zeros((0, 0), np.bool_), np.zeros((0, 0, 0), np.float32)
    else:
        held, above_rows = _array(above[0]), _array(above[1])
    if previous is None:
        previous_drafts, previous_q = np.zeros((0, 0), np.int64), np.zeros((0, 0, 0), np.float32)
        present = np.zeros(0, np.bool_)
    else:
        previous_drafts, previous_q, present = (_array(t) for t in previous)
    loops = _kernels()
    drafts, q, kept, fresh, from_above, old_q = loops.window_kernel(
        _array(target_probs), _array(bonus_probs), np.ascontiguousarray(layout, np.int64),
        initial_drafts == "above", table, table_rows, held, above_rows, previous_drafts, previous_q,
        present, _bits(keys), _bits(next_positions), _streams["draft"], _array(greedy),
    )
    old_q = None if previous is None else torch.from_numpy(old_q)
    return (torch.from_numpy(drafts), torch.from_numpy(q), torch.from_numpy(kept),
            torch.from_numpy(fresh), torch.from_numpy(from_above), old_q, None)


def ring_record(ring_rows, ring_positions: np.ndarray, rings, strides, positions, blocks, sources):
    """core/cells_above.CellsAbove.record's writes into its CPU tensors, in place; `blocks`:
    one or two tensors of rows, `sources` indexing their concatenation."""
    first, second = blocks if len(blocks) == 2 else (blocks[0], blocks[0][:0])
    _kernels().ring_record(ring_rows.numpy(), ring_positions, rings, strides, positions,
                           _array(first), _array(second), np.ascontiguousarray(sources, np.int64))


def ring_lookup(ring_rows, ring_positions: np.ndarray, rings, strides, above):
    """core/cells_above.CellsAbove.lookup's (found, rows) from its CPU tensors."""
    found, rows = _kernels().ring_lookup(ring_rows.numpy(), ring_positions, rings, strides,
                                         np.ascontiguousarray(above, np.int64))
    return torch.from_numpy(found), torch.from_numpy(rows)


def run_positions(starts: np.ndarray, counts: np.ndarray, limit: int) -> np.ndarray:
    """Each request's positions starts[i] .. starts[i] + counts[i] - 1, clipped to [0, limit]."""
    return _kernels().run_positions(np.ascontiguousarray(starts, np.int64),
                                    np.ascontiguousarray(counts, np.int64), limit)


def add_table_rows(values: torch.Tensor, table: torch.Tensor, rows: np.ndarray) -> None:
    """values[r] += table[rows[r]] in place, for CPU tensors (the same float32 adds)."""
    _kernels().add_table_rows(values.numpy(), _array(table), np.ascontiguousarray(rows, np.int64))


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel for the step's dtypes, so that the
    first request does not wait for it."""
    p = torch.full((2, 4), 0.25)
    verdict(p, p[:1], np.array([2]), 2, torch.tensor([1, 2]), p, torch.tensor([False]),
            np.array([7]), np.array([3]))
    q, u = p.view(1, 2, 4), torch.full((1, 2), 0.5, dtype=torch.float64)
    draw(q, u)
    draw(q, u, (torch.tensor([[1, 2]]), q, u, u, torch.tensor([[True, False]])))
    layout = np.array([[[0, 2]], [[1, 0]], [[0, 0]], [[0, 0]], [[0, -1]]])
    for previous in (None, (torch.tensor([[1, 2]]), q, torch.tensor([True]))):
        window(p, p[:1], layout, "above", np.array([7]), np.array([3]), torch.tensor([False]), q,
               previous, (torch.tensor([[False, True]]), q))
    loops = _kernels()
    one = np.ones(1, np.int64)
    loops.slot_layout(one, one, 2, np.zeros((1, 2), np.int64), one)
    loops.slot_layout(one, one, 2, np.zeros((0, 0), np.int64), one)
    ring_positions = np.full((1, 2), -1, np.int64)
    ring_record(q.clone(), ring_positions, one - 1, one + 1, one, (p,), one)
    ring_lookup(q, ring_positions, one - 1, one + 1, np.ones((1, 2), np.int64))
    loops.run_positions(one, one, 2)
    loops.cells_above(one, np.ones((1, 5), np.int64), 2)
    loops.committed_entries(one, one, one, np.ones(1, np.bool_), 1)
    add_table_rows(p.clone(), p, np.zeros(2, np.int64))
