"""Engines with the SJD worker run on vLLM's V1 model runner.

Wraps the property vllm.config.vllm.VllmConfig.use_v2_model_runner (every
process: front end, engine core, workers). Checked on vLLM 0.32.0 and 0.33.0.

Why: on CUDA with Triton, vLLM picks the V2 model runner for any model and
feature it supports, so plain AR on an image model (no --speculative-config,
where the plugin still installs its worker for layouts and guidance) would get
V2 while the SJD runner subclasses V1. vLLM's own opt-out is the environment
variable; this makes the choice follow the config instead, so the front end,
the engine core and every worker agree. A user who forces V2 gets an error
naming the conflict. Retire when the SJD runner works on the V2 runner.
"""

from vllm import envs
from vllm.config.vllm import VllmConfig

from vllm_sjd.patches.speculative_config import SJD_WORKER_CLASS
from vllm_sjd.patches.wrapping import install_wrapper

_original_use_v2_model_runner = VllmConfig.use_v2_model_runner.fget


class V2RunnerConflictError(ValueError):
    """Something forces vLLM's V2 model runner on an engine with the SJD worker."""


def v2_runner_conflict(vllm_config) -> str | None:
    """What forces V2 on this config, or None."""
    if envs.VLLM_USE_V2_MODEL_RUNNER:
        return "VLLM_USE_V2_MODEL_RUNNER=1"
    if getattr(vllm_config.attention_config, "hisparse_config", None) is not None:
        return "HiSparse attention (V2-only)"
    if getattr(vllm_config, "watermark_config", None) is not None:
        return "watermarking (V2-only)"
    return None


def _use_v2_model_runner(self) -> bool:
    if self.parallel_config.worker_cls != SJD_WORKER_CLASS:
        return _original_use_v2_model_runner(self)
    conflict = v2_runner_conflict(self)
    if conflict is not None:
        raise V2RunnerConflictError(
            f"{conflict} asks for vLLM's V2 model runner, but vllm-sjd's worker (image "
            "layouts, guidance, SJD) runs on the V1 model runner; unset it, or pass "
            "--worker-cls to serve the model without the plugin's worker"
        )
    return False


def install() -> None:
    install_wrapper(VllmConfig, "use_v2_model_runner", _use_v2_model_runner, as_property=True)
