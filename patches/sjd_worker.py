"""The SJD worker: vLLM's worker for this platform, building the SJD runner.

Named by `parallel_config.worker_cls` when the speculative method is "sjd"
(patches/speculative_config.py sets it), so every worker process, local or
Ray, builds the SJD runner. Subclasses vllm.v1.worker.gpu_worker.Worker
(overriding `_make_model_runner`) or vllm.v1.worker.cpu_worker.CPUWorker
(whose `init_device` builds CPUModelRunner inline: the module global is
swapped for the SJD runner around that call), and extending
`compile_or_warm_up_model`: once the model is warm, the runner times forward
passes for SJD's dynamic window. Checked on vLLM 0.32.0 and 0.33.0.
Retire when vLLM can build a plugin's runner without a worker subclass.
"""

from contextlib import contextmanager

from vllm.platforms import current_platform

# The forward-cost curve is measured up to this many tokens a pass (beyond,
# the policy extrapolates its last segment).
MAX_MEASURED_TOKENS = 2048


class _SJDWorkerMethods:
    """Extra worker methods, reachable with LLM.collective_rpc(name)."""

    def _refuse_v2_runner(self) -> None:
        if self.vllm_config.use_v2_model_runner:
            # patches/v1_runner.py keeps V1 for this worker; reaching here means
            # that patch did not load in this process.
            raise RuntimeError(
                "vllm-sjd's worker runs on vLLM's V1 model runner, but this process "
                "chose V2 (is the vllm_sjd plugin loaded here?); unset "
                "VLLM_USE_V2_MODEL_RUNNER"
            )

    def compile_or_warm_up_model(self):
        result = super().compile_or_warm_up_model()
        drafter = getattr(self.model_runner, "drafter", None)
        if getattr(drafter, "wants_forward_costs", False):
            scheduler = self.vllm_config.scheduler_config
            max_tokens = min(
                scheduler.max_num_batched_tokens,
                scheduler.max_num_seqs * (drafter.num_slots + 1),
                MAX_MEASURED_TOKENS,
            )
            drafter.set_forward_costs(self.model_runner.measure_forward_costs(max_tokens))
        return result

    def sjd_forward_costs(self) -> list[tuple[int, float]] | None:
        """The forward-cost curve the dynamic window reads, or None when it is off."""
        policy = getattr(getattr(self.model_runner, "drafter", None), "policy", None)
        return None if policy is None else policy.forward_cost.as_points()

    def sjd_tracked_requests(self) -> list[str]:
        """Request ids the SJD runner and proposer hold state for (empty when idle)."""
        return sorted(self.model_runner.sjd_tracked_requests())

    def sjd_held_steps(self) -> int:
        """How often a guided pair member was held back for want of its partner."""
        return self.model_runner.num_held_steps

    def sjd_sampling_steps(self) -> dict[str, int]:
        """Steps sampled on layout columns, on the whole vocabulary, and by vLLM's samplers."""
        return dict(self.model_runner.sampling_steps)

    def sjd_step_audit(self, action: str) -> list[dict] | None:
        """"start" counts torch calls and host reads of each SJD step; "stop" returns them."""
        from vllm_sjd.testing.step_audit import RunnerAudit

        audit = getattr(self, "_step_audit", None)
        if action == "start":
            if audit is not None:
                audit.remove()
            self._step_audit = RunnerAudit(self.model_runner)
            return None
        if action != "stop":
            raise ValueError(f"sjd_step_audit: unknown action {action!r}")
        self._step_audit = None
        return [] if audit is None else audit.remove()

    def sjd_step_timing(self, action: str) -> dict | None:
        """"start" times the runner's step parts; "stop" returns {"steps", part: seconds}."""
        from vllm_sjd.testing.step_audit import RunnerTimer

        timer, self._step_timer = getattr(self, "_step_timer", None), None
        timed = None if timer is None else timer.remove()
        if action == "start":
            self._step_timer = RunnerTimer(self.model_runner)
            return None
        if action != "stop":
            raise ValueError(f"sjd_step_timing: unknown action {action!r}")
        return timed

    def sjd2_feed_log(self, action: str) -> dict | None:
        """"start" records SJD2's noisy inputs, as the proposer planned them and as the
        model received them; "stop" returns {"planned": [...], "received": [...]}."""
        model = self.model_runner.get_model()
        body = getattr(model, "model", model)
        drafter = self.model_runner.drafter
        if action == "start":
            body.noisy_feed_log, drafter.planned_log = [], []
            return None
        if action != "stop":
            raise ValueError(f"sjd2_feed_log: unknown action {action!r}")
        logs = {"planned": drafter.planned_log, "received": body.noisy_feed_log}
        body.noisy_feed_log = drafter.planned_log = None
        return {name: [{k: v.tolist() if hasattr(v, "tolist") else v for k, v in entry.items()}
                       for entry in entries] for name, entries in logs.items()}

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
