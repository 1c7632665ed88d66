"""Verified rows of an image's recent cells, for initial drafts "above".

An image token is much like the token one image row up. A fresh window slot
whose cell above is already committed can draw its initial draft from the
distribution the verifier computed for that cell. This keeps, per request,
the verified rows of its last `row_stride` committed tokens in a ring indexed
by absolute position: exactly the cells above the next `row_stride`
positions. Every request's ring is a row of one tensor, so a step records and
looks up the whole batch with one scatter and one gather; the indices are
worked out on the host (numpy), never read back from the device. Plain
torch, no vLLM.
"""

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from vllm_sjd.core import cpu_kernels
from vllm_sjd.core.columns import Columns, convert, same_columns


class CellsAbove:
    def __init__(self) -> None:
        self._ring_of: dict[str, int] = {}  # req_id -> row of the tensors below
        self._stride_of: dict[str, int] = {}
        self._free: list[int] = []
        self._rows: torch.Tensor | None = None  # [R, S, W] float32
        # [R, S] int64 absolute position of each held row, -1 empty: on the host, where
        # positions are known, so that a lookup's hits need no device compare.
        self._positions: np.ndarray | None = None
        self._columns: Columns | None = None  # of _rows; None: the whole vocabulary

    def record(
        self,
        req_ids: Sequence[str],  # one per entry
        row_strides: Sequence[int],  # per entry: its request's image row stride
        positions: np.ndarray,  # [m] int64: absolute index of each committed token
        # [m, W] float32: the row that verified it (or [*, W], see rows), or a tuple of
        # row blocks read as their concatenation (a step's target and bonus rows)
        probs: torch.Tensor | tuple[torch.Tensor, ...],
        columns: Columns | None = None,  # the columns of probs; None: all
        rows: np.ndarray | None = None,  # [m] int64: each entry's row of probs; None: row m
    ) -> None:
        """Keep each entry's row at its position in its request's ring.

        Entries of one request come in position order; where a request
        commits more than a row at once, only its newest row_stride matter.
        """
        if not len(req_ids):
            return
        blocks = probs if isinstance(probs, tuple) else (probs,)
        self._ensure(req_ids, row_strides, blocks[0], columns)
        rings = np.array([self._ring_of[r] for r in req_ids], dtype=np.int64)
        strides = np.asarray(row_strides, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        if cpu_kernels.enabled_for(self._rows):  # one numba loop over numpy views, same writes
            sources = np.arange(len(positions)) if rows is None else np.asarray(rows, dtype=np.int64)
            cpu_kernels.ring_record(self._rows, self._positions, rings, strides, positions, blocks,
                                    sources)
            return
        probs = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=0)
        newest = np.full(int(rings.max()) + 1, -1, dtype=np.int64)
        np.maximum.at(newest, rings, positions)
        newest = newest[rings]  # each entry's request's newest position
        keep = np.nonzero(positions > newest - strides)[0]
        source = keep if rows is None else np.asarray(rows, dtype=np.int64)[keep]
        ring, slot = rings[keep], positions[keep] % strides[keep]
        self._positions[ring, slot] = positions[keep]
        # Every index in one copy: ring, slot, row of probs.
        index = torch.from_numpy(np.stack([ring, slot, source])).to(self._rows.device)
        ring_index, slot_index, source = index.unbind(0)
        self._rows[ring_index, slot_index] = probs[source.to(probs.device)].to(self._rows.device)

    def lookup(
        self,
        req_ids: Sequence[str],
        above: np.ndarray,  # [B, K] int64: position of each slot's cell above, -1 none
        columns: Columns | None = None,  # the columns wanted; None: all
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(found [B, K] bool, rows [B, K, W]) on the rows' device; None if nothing is held."""
        if self._rows is None:
            return None
        above = np.asarray(above, dtype=np.int64)
        rings = np.array([self._ring_of.get(r, -1) for r in req_ids], dtype=np.int64)
        strides = np.array([self._stride_of.get(r, 1) for r in req_ids], dtype=np.int64)
        if cpu_kernels.enabled_for(self._rows):
            found, rows = cpu_kernels.ring_lookup(self._rows, self._positions, rings, strides, above)
            return found, convert(rows, self._columns, columns)
        wanted = np.where((rings[:, None] >= 0) & (above >= 0), above, -2)  # -2 matches nothing
        ring_index = np.broadcast_to(np.maximum(rings, 0)[:, None], above.shape)
        slot_index = np.maximum(above, 0) % strides[:, None]
        found = self._positions[ring_index, slot_index] == wanted
        index = np.stack([ring_index, slot_index, found])
        ring_index, slot_index, found = torch.from_numpy(index).to(self._rows.device).unbind(0)
        return found.bool(), convert(self._rows[ring_index, slot_index], self._columns, columns)

    def _ensure(self, req_ids, row_strides, probs: torch.Tensor, columns: Columns | None) -> None:
        """A ring for every request, wide enough for its stride, on `columns`."""
        ring_of = self._ring_of
        if self._rows is not None and self._columns is columns and all(r in ring_of for r in req_ids):
            return  # the usual step: every request has its ring
        if self._rows is not None and not same_columns(self._columns, columns):
            self._rows = convert(self._rows, self._columns, columns)
        self._columns = columns
        width, device = probs.shape[-1], probs.device
        new = [(r, s) for r, s in dict(zip(req_ids, row_strides)).items() if r not in self._ring_of]
        stride = max([s for _, s in new] + [0 if self._rows is None else self._rows.shape[1]])
        rings = 0 if self._rows is None else self._rows.shape[0]
        needed = len(new) - len(self._free)
        if self._rows is None or needed > 0 or stride > self._rows.shape[1]:
            grown = max(rings + max(needed, 0), 2 * rings if needed > 0 else rings, 1)
            rows = torch.zeros((grown, stride, width), dtype=probs.dtype, device=device)
            positions = np.full((grown, stride), -1, dtype=np.int64)
            if self._rows is not None:
                old_stride = self._rows.shape[1]
                rows[:rings, :old_stride] = self._rows
                positions[:rings, :old_stride] = self._positions
            self._free += range(rings, grown)
            self._rows, self._positions = rows, positions
        for req_id, row_stride in new:
            self._ring_of[req_id] = self._free.pop(0)
            self._stride_of[req_id] = row_stride

    def evict(self, req_ids: Iterable[str]) -> None:
        req_ids = list(req_ids)
        freed = [self._ring_of.pop(r) for r in req_ids if r in self._ring_of]
        for req_id in req_ids:
            self._stride_of.pop(req_id, None)
        if freed:
            self._positions[freed] = -1
            self._free += freed

    def tracked_requests(self) -> set[str]:
        return set(self._ring_of)
