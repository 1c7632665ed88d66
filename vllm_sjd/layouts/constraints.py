"""Image layouts applied per request inside the engine, keyed by request id.

An image request carries its grid in `SamplingParams.extra_args[IMAGE_GRID_ARG]`
(`image_extra_args(grid)`), so every process (and every tensor-parallel rank)
sees the same layout. The SJD runner asks `LayoutConstraints` for the tokens
each verified row and each window slot may hold, by absolute position; the
image starts right after the prompt. Requests without a grid are unconstrained.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch

from vllm_sjd.contract import IMAGE_GRID_ARG
from vllm_sjd.layouts.grid import ImageGrid


def image_extra_args(grid: ImageGrid) -> dict:
    """The SamplingParams.extra_args that make a request generate `grid`."""
    return {IMAGE_GRID_ARG: dataclasses.asdict(grid)}


def grid_from_extra_args(extra_args: Mapping | None) -> ImageGrid | None:
    spec = (extra_args or {}).get(IMAGE_GRID_ARG)
    if spec is None:
        return None
    spec = dict(spec)
    spec["header"] = tuple(spec["header"])
    spec["trailer"] = tuple(spec["trailer"])
    return ImageGrid(**spec)


class LayoutConstraints:
    """Per-request grids (with the prompt length where each image starts)."""

    def __init__(self) -> None:
        self._grids: dict[str, tuple[ImageGrid | None, int]] = {}

    def lookup(
        self,
        req_ids: Sequence[str],
        extra_args_of: Callable[[str], Mapping | None],
        prompt_len_of: Callable[[str], int],
    ) -> list[tuple[ImageGrid | None, int]]:
        entries = []
        for req_id in req_ids:
            entry = self._grids.get(req_id)
            if entry is None:
                entry = (grid_from_extra_args(extra_args_of(req_id)), prompt_len_of(req_id))
                self._grids[req_id] = entry
            entries.append(entry)
        return entries

    @staticmethod
    def row_masks(
        entries: Sequence[tuple[ImageGrid | None, int]],
        first_positions: torch.Tensor,  # [B] int64: absolute token index of each request's first row
        counts: torch.Tensor,  # [B] int64: rows per request
        vocab_size: int,
        device: torch.device,
    ) -> torch.Tensor | None:
        """[sum(counts), V] bool: tokens each row may hold; None if no request has a grid."""
        grids = [grid for grid, _ in entries]
        if all(grid is None for grid in grids):
            return None
        counts = counts.to(torch.int64).cpu()
        request_of_row = torch.repeat_interleave(torch.arange(len(entries)), counts)
        first_row = torch.cumsum(counts, 0) - counts
        offset = torch.arange(int(counts.sum())) - first_row[request_of_row]
        prompt_lens = torch.tensor([prompt_len for _, prompt_len in entries], dtype=torch.int64)
        relative = (first_positions.cpu().to(torch.int64) - prompt_lens)[request_of_row] + offset
        mask = torch.ones(len(relative), vocab_size, dtype=torch.bool)
        for grid in {g for g in grids if g is not None}:
            members = torch.tensor([g == grid for g in grids])[request_of_row]
            mask[members] = grid.allowed_mask(relative[members], vocab_size)
        return mask.to(device)

    @staticmethod
    def cells_above(
        entries: Sequence[tuple[ImageGrid | None, int]],
        first_positions: torch.Tensor,  # [B] int64: absolute index of each request's first slot
        num_slots: int,
    ) -> tuple[torch.Tensor, list[int]] | None:
        """([B, K] absolute position of each slot's cell one image row up, -1 none;
        each request's row stride, 0 without an image), or None if no request has a grid."""
        if all(grid is None for grid, _ in entries):
            return None
        slots = torch.arange(num_slots, dtype=torch.int64)
        above = torch.full((len(entries), num_slots), -1, dtype=torch.int64)
        strides = []
        for i, (grid, prompt_len) in enumerate(entries):
            strides.append(0 if grid is None else grid.row_stride)
            if grid is not None:
                relative = int(first_positions[i]) - prompt_len + slots
                cell = grid.cell_above(relative)
                above[i] = torch.where(cell >= 0, cell + prompt_len, cell)
        return above, strides

    def evict(self, req_ids) -> None:
        for req_id in req_ids:
            self._grids.pop(req_id, None)

    def tracked_requests(self) -> set[str]:
        return set(self._grids)
