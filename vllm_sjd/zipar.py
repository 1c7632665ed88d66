"""The ZipAR proposer: each image request's stream of feeds (core/zipar.py), keyed by request id.

vLLM builds it as a `custom_class` proposer (`ZipARProposer(vllm_config)`) when
the speculative method is "zipar"; the SJD model runner (patches/zipar_runner.py)
asks it, per step, which raster position each fed token takes, what each row
samples, and, once the step's tokens are drawn, which tokens go out and which
are fed next (handed to vLLM as the next step's "drafts", which the runner
then accepts unverified: ZipAR commits what it draws).

A request without an image layout decodes as plain AR. A stream outlives
preemption (the recomputed request feeds the same tokens at the same
positions) and is forgotten when the request finishes.
"""

from collections.abc import Iterable

import torch

from vllm_sjd.config import ZipARConfig
from vllm_sjd.core.rng import key_from_seed
from vllm_sjd.core.zipar import ZipARStream
from vllm_sjd.layouts.grid import ImageGrid


class ZipARProposer:
    """Per-request ZipAR streams."""

    def __init__(self, vllm_config) -> None:
        spec = vllm_config.speculative_config
        assert spec is not None, "ZipARProposer needs a speculative config"
        self.config = ZipARConfig.from_additional_config(vllm_config.additional_config)
        self.num_slots: int = spec.num_speculative_tokens
        self._streams: dict[str, ZipARStream] = {}
        self._keys: dict[str, int] = {}
        # Drafts (the next feeds after the first) of the latest step, by request id.
        self._next_drafts: dict[str, list[int]] = {}

    # vLLM's custom_class interface --------------------------------------
    def load_model(self, *args, **kwargs) -> None:
        """ZipAR has no draft model; vLLM's CPU runner calls this regardless."""

    def propose(self, *args, **kwargs) -> list[list[int]]:
        raise RuntimeError(
            "ZipARProposer runs only under vllm-sjd's model runner; start the engine with "
            'speculative_config={"method": "zipar", ...} and the vllm-sjd plugin installed'
        )

    wants_forward_costs = False

    # Called by the model runner -----------------------------------------
    def stream(self, req_id: str, grid: ImageGrid | None) -> ZipARStream | None:
        """The request's stream (made on first sight), or None for a request without an image."""
        stream = self._streams.get(req_id)
        if stream is None and grid is not None:
            window = self.config.window_for(grid.cols)
            stream = self._streams[req_id] = ZipARStream(grid, window, self.num_slots + 1)
        return stream

    def peek(self, req_id: str) -> ZipARStream | None:
        return self._streams.get(req_id)

    def key(self, req_id: str, seed: int | None) -> int:
        """The request's random key: from its seed, else drawn once from the global
        generator, which vLLM seeds alike on every tensor-parallel rank."""
        key = self._keys.get(req_id)
        if key is None:
            key = self._keys[req_id] = (
                key_from_seed(seed) if seed is not None
                else int(torch.randint(-(2**62), 2**62, ()).item())
            )
        return key

    def set_drafts(self, req_id: str, drafts: list[int]) -> None:
        self._next_drafts[req_id] = drafts

    def take_drafts(self, req_id: str) -> list[int]:
        return self._next_drafts.pop(req_id, [])

    def evict(self, req_ids: Iterable[str], *, finished: bool = True) -> None:
        """Forget finished requests; a preempted one keeps its stream (it resumes with it)."""
        for req_id in req_ids:
            self._next_drafts.pop(req_id, None)
            if finished:
                self._streams.pop(req_id, None)
                self._keys.pop(req_id, None)

    def tracked_requests(self) -> set[str]:
        return set(self._streams) | set(self._keys) | set(self._next_drafts)
