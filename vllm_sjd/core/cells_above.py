"""Verified rows of an image's recent cells, for initial drafts "above".

An image token is much like the token one image row up. A fresh window slot
whose cell above is already committed can draw its initial draft from the
distribution the verifier computed for that cell. This keeps, per request,
the verified rows of its last `row_stride` committed tokens in a ring indexed
by absolute position: exactly the cells above the next `row_stride`
positions. Plain torch, no vLLM.
"""

from collections.abc import Iterable

import torch

from vllm_sjd.core.columns import Columns, convert, same_columns


class CellsAbove:
    def __init__(self) -> None:
        # req_id -> (rows [S, W] float32, absolute position of each row [S], -1 empty,
        # the vocabulary columns of the rows, None for all)
        self._rings: dict[str, tuple[torch.Tensor, torch.Tensor, Columns | None]] = {}

    def record(
        self,
        req_id: str,
        row_stride: int,
        positions: torch.Tensor,  # [m] int64: absolute index of each committed token
        probs: torch.Tensor,  # [m, W] float32: the row that verified it
        columns: Columns | None = None,  # the columns of probs; None: all
    ) -> None:
        ring = self._rings.get(req_id)
        if ring is not None and not same_columns(ring[2], columns):
            ring = (convert(ring[0], ring[2], columns), ring[1], columns)
            self._rings[req_id] = ring
        if ring is None or ring[0].shape != (row_stride, probs.shape[-1]):
            ring = (
                probs.new_zeros((row_stride, probs.shape[-1])),
                torch.full((row_stride,), -1, dtype=torch.int64, device=probs.device),
                columns,
            )
            self._rings[req_id] = ring
        positions = positions.to(probs.device)
        # More than a row committed at once: only the newest row_stride matter.
        positions, probs = positions[-row_stride:], probs[-row_stride:]
        index = positions % row_stride
        ring[0][index] = probs
        ring[1][index] = positions

    def lookup(
        self,
        req_id: str,
        above: torch.Tensor,  # [K] int64: position of each slot's cell above, -1 none
        columns: Columns | None = None,  # the columns wanted; None: all
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(found [K] bool, rows [K, W]) for the slots whose cell above is held."""
        ring = self._rings.get(req_id)
        if ring is None:
            return None
        rows, positions, held_columns = ring
        above = above.to(rows.device)
        index = above.clamp(min=0) % rows.shape[0]
        found = (above >= 0) & (positions[index] == above)
        return found, convert(rows[index], held_columns, columns)

    def evict(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            self._rings.pop(req_id, None)

    def tracked_requests(self) -> set[str]:
        return set(self._rings)
