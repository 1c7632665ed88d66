"""The SJD worker: vLLM's worker for this platform, building the SJD runner.

Named by `parallel_config.worker_cls` when the speculative method is "sjd"
(patches/speculative_config.py sets it), so every worker process, local or
Ray, builds the SJD runner. Subclasses vllm.v1.worker.gpu_worker.Worker
(overriding `_make_model_runner`) or vllm.v1.worker.cpu_worker.CPUWorker
(whose `init_device` builds CPUModelRunner inline: the module global is
swapped for the SJD runner around that call). Checked on vLLM 0.32.0.
Retire when vLLM can build a plugin's runner without a worker subclass.
"""

from contextlib import contextmanager

from vllm.platforms import current_platform


class _SJDWorkerMethods:
    """Extra worker methods, reachable with LLM.collective_rpc(name)."""

    def _refuse_v2_runner(self) -> None:
        if self.vllm_config.use_v2_model_runner:
            raise RuntimeError(
                "speculative method 'sjd' runs on vLLM's V1 model runner; "
                "unset VLLM_USE_V2_MODEL_RUNNER"
            )

    def sjd_tracked_requests(self) -> list[str]:
        """Request ids the SJD runner and proposer hold state for (empty when idle)."""
        return sorted(self.model_runner.sjd_tracked_requests())

    def sjd_held_steps(self) -> int:
        """How often a guided pair member was held back for want of its partner."""
        return self.model_runner.num_held_steps

    def sjd_proposer_call(self, method: str, *args):
        """Call a method of this worker's proposer (tests, diagnostics)."""
        return getattr(self.model_runner.drafter, method)(*args)


@contextmanager
def _module_global(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def _cpu_worker_class():
    from vllm.v1.worker import cpu_worker

    from vllm_sjd.patches.sjd_runner import SJDCPUModelRunner

    class SJDCPUWorker(_SJDWorkerMethods, cpu_worker.CPUWorker):
        def init_device(self):
            self._refuse_v2_runner()
            with _module_global(cpu_worker, "CPUModelRunner", SJDCPUModelRunner):
                super().init_device()

    return SJDCPUWorker


def _gpu_worker_class():
    from vllm.v1.worker.gpu_worker import Worker

    from vllm_sjd.patches.sjd_runner import SJDGPUModelRunner

    class SJDGPUWorker(_SJDWorkerMethods, Worker):
        def _make_model_runner(self):
            self._refuse_v2_runner()
            return SJDGPUModelRunner(self.vllm_config, self.device)

    return SJDGPUWorker


SJDWorker = _cpu_worker_class() if current_platform.is_cpu() else _gpu_worker_class()
