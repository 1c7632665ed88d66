"""Image layouts applied per request inside the engine, keyed by request id.

An image request carries its grid in `SamplingParams.extra_args[IMAGE_GRID_ARG]`
(`image_extra_args(grid)`), so every process (and every tensor-parallel rank)
sees the same layout. The SJD runner asks `LayoutConstraints` for the tokens
each verified row and each window slot may hold, by absolute position; the
image starts right after the prompt. Requests without a grid are unconstrained.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from vllm_sjd.contract import IMAGE_GRID_ARG
from vllm_sjd.core import cpu_kernels
from vllm_sjd.core.columns import Columns
from vllm_sjd.core.window import TableRows
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


MaskKind = Literal["allowed", "penalty", "uniform"]
# allowed: bool; penalty: float32 0 where allowed, -inf elsewhere (added to logits,
# cheaper than a masked fill); uniform: float32, the uniform distribution over the
# allowed tokens (a fresh window slot's q).
MASK_KINDS = ("allowed", "penalty", "uniform")


def _as_kind(allowed: torch.Tensor, kind: MaskKind) -> torch.Tensor:
    if kind == "allowed":
        return allowed
    if kind == "penalty":
        return torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    weights = allowed.to(torch.float32)
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(1.0)


class LayoutConstraints:
    """Per-request grids (with the prompt length where each image starts)."""

    def __init__(self) -> None:
        self._grids: dict[str, tuple[ImageGrid | None, int]] = {}
        # One instance per distinct grid, so that a step tells its requests' grids
        # apart by identity: comparing frozen dataclasses field by field, 32
        # requests a step, cost more than the masks themselves.
        self._interned: dict[ImageGrid, ImageGrid] = {}
        self._tables: dict[tuple, torch.Tensor] = {}
        self._columns: dict[tuple, Columns] = {}

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
                grid = grid_from_extra_args(extra_args_of(req_id))
                if grid is not None:
                    if len(self._interned) > 64:  # requests keep theirs: identity is a shortcut
                        self._interned.clear()
                    grid = self._interned.setdefault(grid, grid)
                entry = self._grids[req_id] = (grid, prompt_len_of(req_id))
            entries.append(entry)
        return entries

    def columns(
        self, entries: Sequence[tuple[ImageGrid | None, int]], vocab_size: int, device
    ) -> Columns | None:
        """The ids any slot of these requests may hold; None if one has no grid."""
        grids = _distinct(grid for grid, _ in entries)
        if not grids or any(grid is None for grid in grids):
            return None
        grids = frozenset(grids)
        key = (grids, vocab_size, str(device))
        columns = self._columns.get(key)
        if columns is None:
            self._forget_tables_if_many()
            ids = torch.cat([grid.token_ids() for grid in grids])
            columns = self._columns[key] = Columns.of(ids, vocab_size, key).to(device)
        return columns

    def row_masks(
        self,
        entries: Sequence[tuple[ImageGrid | None, int]],
        first_positions: np.ndarray,  # [B] int64: absolute token index of each request's first row
        counts: np.ndarray,  # [B] int64: rows per request
        vocab_size: int,
        device: torch.device,
        columns: Columns | None = None,  # only these ids: [sum(counts), U]
        kind: MaskKind = "allowed",
    ) -> torch.Tensor | None:
        """[sum(counts), V]: tokens each row may hold, as `kind` says (MASK_KINDS);
        None if no request has a grid.

        Rows are looked up in a per-grid table of every position's mask, built
        once: a gather instead of comparisons over the vocabulary per step.
        Positions are worked out on the host (numpy), then sent once.
        """
        if all(grid is None for grid, _ in entries):
            return None
        counts = np.asarray(counts, dtype=np.int64)
        one_grid = _one_grid_rows(entries, first_positions, counts)
        if one_grid is not None:  # one grid: its table's rows
            grid, rows = one_grid
            table = self._mask_table(grid, vocab_size, device, columns, kind)
            return table.index_select(0, torch.from_numpy(rows).to(device))
        request_of_row = np.repeat(np.arange(len(entries)), counts)
        first_row = np.cumsum(counts) - counts
        offset = np.arange(int(counts.sum())) - first_row[request_of_row]
        prompt_lens = np.array([prompt_len for _, prompt_len in entries], dtype=np.int64)
        first = np.asarray(first_positions, dtype=np.int64)
        relative = (first - prompt_lens)[request_of_row] + offset
        return self.masks_at(entries, request_of_row, relative, vocab_size, device, columns, kind)

    def add_row_masks(
        self,
        values: torch.Tensor,  # [sum(counts), V or U] float32, changed in place
        entries: Sequence[tuple[ImageGrid | None, int]],
        first_positions: np.ndarray,
        counts: np.ndarray,
        vocab_size: int,
        columns: Columns | None = None,
        kind: MaskKind = "penalty",
    ) -> None:
        """values += row_masks(...) of a float kind; on a CPU, with one grid, its table's
        rows added in one call (no [rows, V] gather)."""
        one_grid = _one_grid_rows(entries, first_positions, counts)
        if cpu_kernels.enabled_for(values) and one_grid is not None:
            grid, rows = one_grid
            table = self._mask_table(grid, vocab_size, values.device, columns, kind)
            cpu_kernels.add_table_rows(values, table, rows)
            return
        masks = self.row_masks(entries, first_positions, counts, vocab_size, values.device, columns, kind)
        if masks is not None:
            values.add_(masks)

    def slot_rows(
        self,
        entries: Sequence[tuple[ImageGrid | None, int]],
        first_positions: np.ndarray,  # [B] int64: absolute token index of each request's slot 0
        num_slots: int,
        vocab_size: int,
        device: torch.device,
        columns: Columns | None = None,
        kind: MaskKind = "uniform",
    ) -> "TableRows | torch.Tensor | None":
        """[B, K, V] of `kind` for the K window slots of each request (row_masks' rows):
        with one grid, its table and each slot's row in it, not gathered (TableRows);
        else a tensor; None if no request has a grid."""
        counts = np.full(len(entries), num_slots, dtype=np.int64)
        one_grid = _one_grid_rows(entries, first_positions, counts)
        if one_grid is not None:
            grid, rows = one_grid
            table = self._mask_table(grid, vocab_size, device, columns, kind)
            return TableRows(table, rows.reshape(len(entries), num_slots))
        masks = self.row_masks(entries, first_positions, counts, vocab_size, device, columns, kind)
        return None if masks is None else masks.view(len(entries), num_slots, -1)

    def masks_at(
        self,
        entries: Sequence[tuple[ImageGrid | None, int]],
        request_of_row: np.ndarray,  # [R] int64: the request of each row
        relative: np.ndarray,  # [R] int64: position from the request's first generated token
        vocab_size: int,
        device: torch.device,
        columns: Columns | None = None,
        kind: MaskKind = "allowed",
    ) -> torch.Tensor | None:
        """[R, V] (or [R, U] on `columns`): tokens each row's position may hold, as
        `kind` says (MASK_KINDS); None if no request has a grid."""
        grids = [grid for grid, _ in entries]
        distinct = _distinct(grids)
        if all(grid is None for grid in distinct):
            return None
        if len(distinct) == 1:
            (grid,) = distinct
            table = self._mask_table(grid, vocab_size, device, columns, kind)
            # index_select: a row copy each (indexing a tensor by a tensor costs ~3x here).
            rows = np.minimum(np.maximum(relative, 0), grid.num_tokens)
            return table.index_select(0, torch.from_numpy(rows).to(device))
        width = vocab_size if columns is None else columns.ids.numel()
        free = self._mask_table(None, width, device, None, kind)  # a row without a grid
        mask = free.expand(len(relative), width).clone()
        for grid in distinct:
            if grid is None:
                continue
            members = np.nonzero(np.array([g is grid for g in grids])[request_of_row])[0]
            table = self._mask_table(grid, vocab_size, device, columns, kind)
            rows = torch.from_numpy(relative[members].clip(0, grid.num_tokens)).to(device)
            mask[torch.from_numpy(members).to(device)] = table.index_select(0, rows)
        return mask

    def _mask_table(
        self, grid: ImageGrid | None, vocab_size: int, device, columns, kind: MaskKind
    ) -> torch.Tensor:
        """[num_tokens + 1, V or U] of `kind`: row t is position t's mask; the last row
        also holds for every position past the image. Without a grid, one row allowing all."""
        if kind not in MASK_KINDS:
            raise ValueError(f"unknown mask kind {kind!r}: one of {MASK_KINDS}")
        key = (grid, vocab_size, str(device), None if columns is None else ("ids", columns.key), kind)
        table = self._tables.get(key)
        if table is None or (columns is not None and columns.key is None):
            self._forget_tables_if_many()
            if grid is None:
                allowed = torch.ones(1, vocab_size, dtype=torch.bool)
            else:
                ids = None if columns is None else columns.ids.cpu()
                allowed = grid.allowed_mask(torch.arange(grid.num_tokens + 1), vocab_size, ids)
            table = self._tables[key] = _as_kind(allowed, kind).to(device)
        return table

    def _forget_tables_if_many(self) -> None:
        # Keyed by grid (image size): a handful in practice; bounded regardless.
        if len(self._tables) + len(self._columns) > 64:
            self._tables.clear()
            self._columns.clear()

    @staticmethod
    def cells_above(
        entries: Sequence[tuple[ImageGrid | None, int]],
        first_positions: np.ndarray,  # [B] int64: absolute index of each request's first slot
        num_slots: int,
    ) -> tuple[np.ndarray, list[int]] | None:
        """([B, K] absolute position of each slot's cell one image row up, -1 none;
        each request's row stride, 0 without an image), or None if no request has a grid.
        Host-side (numpy): positions are known there."""
        if all(grid is None for grid, _ in entries):
            return None
        first = np.asarray(first_positions, dtype=np.int64)
        strides = [0 if grid is None else grid.row_stride for grid, _ in entries]
        loops = cpu_kernels.loaded()
        if loops is not None:  # the same positions in one call
            grids = np.array([(p, 0, 0, 0, 0) if g is None
                              else (p, len(g.header), g.row_stride, g.rows, g.cols) for g, p in entries],
                             dtype=np.int64)
            return loops.cells_above(first, grids, num_slots), strides
        slots = np.arange(num_slots, dtype=np.int64)
        above = np.full((len(entries), num_slots), -1, dtype=np.int64)
        for i, (grid, prompt_len) in enumerate(entries):
            if grid is not None:
                cell = grid.cell_above(int(first[i]) - prompt_len + slots)
                above[i] = np.where(cell >= 0, cell + prompt_len, cell)
        return above, strides

    def evict(self, req_ids) -> None:
        for req_id in req_ids:
            self._grids.pop(req_id, None)

    def tracked_requests(self) -> set[str]:
        return set(self._grids)


def _one_grid_rows(entries, first_positions, counts: np.ndarray) -> tuple[ImageGrid, np.ndarray] | None:
    """(grid, [sum(counts)] rows of its mask table) where every request has the same grid:
    counts[i] rows from request i's first position, relative to its image; else None."""
    distinct = _distinct(grid for grid, _ in entries)
    if len(distinct) != 1 or distinct[0] is None:
        return None
    (grid,) = distinct
    starts = np.asarray(first_positions, dtype=np.int64) - np.array(
        [prompt_len for _, prompt_len in entries], dtype=np.int64)
    loops = cpu_kernels.loaded()
    if loops is not None:  # one call (numpy's handful: ~10 us)
        return grid, loops.run_positions(starts, counts, grid.num_tokens)
    first_row = np.cumsum(counts) - counts
    rows = np.repeat(starts - first_row, counts) + np.arange(int(counts.sum()))
    return grid, np.minimum(np.maximum(rows, 0), grid.num_tokens)


def _distinct(grids) -> list:
    """The distinct grids (None included), by identity: LayoutConstraints interns them."""
    return list({id(grid): grid for grid in grids}.values())
