"""Image layouts for plain autoregressive decoding (no speculation).

vLLM refuses custom logits processors when speculative decoding is on, so
under SJD the runner applies layouts itself; without SJD this processor does
the same job through vLLM's public logits-processor interface:

    LLM(model, logits_processors=[LayoutLogitsProcessor])
    vllm serve MODEL --logits-processors vllm_sjd.layouts.logits_processor:LayoutLogitsProcessor

Requests carry their grid in SamplingParams.extra_args (layouts/constraints.py).
"""

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from vllm_sjd.layouts.constraints import grid_from_extra_args
from vllm_sjd.layouts.grid import ImageGrid


class LayoutLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        # batch index -> (grid, the request's live list of output tokens)
        self._rows: dict[int, tuple[ImageGrid, list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # forcing a token changes the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._rows.pop(index, None)
        for index, params, _prompt, output_tokens in batch_update.added:
            grid = grid_from_extra_args(params.extra_args if params else None)
            if grid is None:
                self._rows.pop(index, None)
            else:
                self._rows[index] = (grid, output_tokens)
        for source, target, direction in batch_update.moved:
            moving = self._rows.pop(source, None)
            if direction == MoveDirectionality.SWAP:
                staying = self._rows.pop(target, None)
                if staying is not None:
                    self._rows[source] = staying
            if moving is not None:
                self._rows[target] = moving

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        by_grid: dict[ImageGrid, tuple[list[int], list[int]]] = {}
        for index, (grid, output_tokens) in self._rows.items():
            rows, positions = by_grid.setdefault(grid, ([], []))
            rows.append(index)
            positions.append(len(output_tokens))
        for grid, (rows, positions) in by_grid.items():
            allowed = grid.allowed_mask(torch.tensor(positions), logits.shape[-1])
            index = torch.tensor(rows, device=logits.device)
            logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
        return logits
