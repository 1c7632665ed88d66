"""Accept `{"method": "sjd" | "sjd2" | "zipar", ...}` in --speculative-config / speculative_config=.

Wraps vllm.engine.arg_utils.EngineArgs.create_speculative_config (front-end
process: the API server or the LLM's process). Checked on vLLM 0.32.0 and 0.33.0.

Why: SpeculativeConfig.method is a closed Literal and extra keys are
forbidden, so "sjd" and its settings never reach a plugin otherwise. The
wrapper validates the SJD settings (vllm_sjd/config.py), hands vLLM a plain
`custom_class` config for our proposer, ships the settings to every process in
additional_config["sjd"], defaults the worker class to the SJD worker, and
refuses configurations SJD cannot serve. "zipar" takes the same path with
its own settings (vllm_sjd/config.py ZipARConfig), checked against the
model's image layout; "sjd2" runs SJD's path with its own proposer, for a
checkpoint fine-tuned for it only (and eager on CUDA: the noisy embeddings
are handed to the model beside the token ids each step, outside any graph).
Other configs go straight to the original. Retire when vLLM lets plugins
register speculative methods.

It also names the SJD scheduler (guidance pairs, patches/cfg_scheduler.py) for
SJD engines, and the SJD worker and scheduler for image models served without
speculation, so plain AR gets the same layouts and guidance (on vLLM's V1
model runner: patches/v1_runner.py).
"""

import logging
import os

from vllm.engine.arg_utils import EngineArgs

from vllm_sjd.config import (
    SJDConfigError,
    split_sjd2_config,
    split_speculative_config,
    split_zipar_config,
)
from vllm_sjd.contract import (
    SJD2_METHOD,
    SJD2_SETTINGS_CONFIG_KEY,
    SJD_SETTINGS_CONFIG_KEY,
    SPECULATIVE_METHOD,
    ZIPAR_METHOD,
    ZIPAR_SETTINGS_CONFIG_KEY,
)
from vllm_sjd.patches.wrapping import install_wrapper

logger = logging.getLogger(__name__)

SJD_WORKER_CLASS = "vllm_sjd.patches.sjd_worker.SJDWorker"
# Checkpoints our Chameleon class serves (vllm_sjd/models/chameleon.py), the one that reads SJD2's inputs.
SJD2_ARCHITECTURES = frozenset({"ChameleonXLLMXForConditionalGeneration", "ChameleonForConditionalGeneration"})
SJD_SCHEDULER_CLASS = "vllm_sjd.patches.cfg_scheduler.SJDScheduler"
_original_create_speculative_config = EngineArgs.create_speculative_config


class SJDUnsupportedError(ValueError):
    """SJD was asked for on a configuration it cannot serve."""


def _refuse_unsupported(engine_args: EngineArgs, parallel_config, method: str = SPECULATIVE_METHOD) -> None:
    from vllm.platforms import current_platform

    problems = []
    if not (current_platform.is_cpu() or current_platform.is_cuda_alike()):
        problems.append(
            f"platform {current_platform.device_name!r} (SJD runs on CUDA/ROCm GPUs and CPU)"
        )
    if parallel_config.pipeline_parallel_size > 1:
        problems.append(
            "pipeline_parallel_size > 1 (use tensor parallelism with SJD)"
        )
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1":
        problems.append(
            "VLLM_USE_V2_MODEL_RUNNER=1 (SJD runs on vLLM's V1 model runner)"
        )
    if parallel_config.worker_cls not in ("auto", SJD_WORKER_CLASS):
        problems.append(
            f"worker_cls={parallel_config.worker_cls!r} (SJD installs its own worker; "
            "drop --worker-cls)"
        )
    if engine_args.scheduler_cls not in (None, SJD_SCHEDULER_CLASS):
        problems.append(
            f"scheduler_cls={engine_args.scheduler_cls!r} (SJD installs its own scheduler "
            "for guidance; drop --scheduler-cls)"
        )
    if problems:
        raise SJDUnsupportedError(
            f"speculative method {method!r} cannot serve this configuration: "
            + "; ".join(problems)
        )


def _create_speculative_config(self: EngineArgs, target_model_config, target_parallel_config):
    spec = self.speculative_config
    if spec and spec.get("method") == ZIPAR_METHOD:
        return _create_zipar_config(self, target_model_config, target_parallel_config)
    if spec and spec.get("method") == SJD2_METHOD:
        return _create_sjd2_config(self, target_model_config, target_parallel_config)
    if not spec or spec.get("method") != SPECULATIVE_METHOD:
        if not spec and _is_image_model(target_model_config):
            _install_image_runner(self, target_parallel_config)
        return _original_create_speculative_config(
            self, target_model_config, target_parallel_config
        )
    vllm_spec, sjd = split_speculative_config(
        {k.replace("-", "_"): v for k, v in spec.items()}
    )
    if sjd.row_lookahead:
        _check_row_lookahead(sjd, target_model_config)
    return _create_with(self, target_model_config, target_parallel_config, SPECULATIVE_METHOD,
                        vllm_spec, SJD_SETTINGS_CONFIG_KEY, sjd)


def _create_zipar_config(self: EngineArgs, target_model_config, target_parallel_config):
    """ZipAR: the SJD worker and scheduler, our ZipAR proposer, its settings checked
    against the model's image layout."""
    spec = self.speculative_config
    vllm_spec, zipar = split_zipar_config({k.replace("-", "_"): v for k, v in spec.items()})
    _check_zipar_window(zipar, target_model_config)
    self.async_scheduling = False  # each step's tokens plan the next step's feeds
    return _create_with(self, target_model_config, target_parallel_config, ZIPAR_METHOD,
                        vllm_spec, ZIPAR_SETTINGS_CONFIG_KEY, zipar)


def _create_sjd2_config(self: EngineArgs, target_model_config, target_parallel_config):
    """SJD2: SJD's worker and scheduler with the SJD2 proposer, on a fine-tuned checkpoint."""
    from vllm.platforms import current_platform

    from vllm_sjd.core.denoising import NoiseSettings

    spec = self.speculative_config
    vllm_spec, sjd, sjd2 = split_sjd2_config({k.replace("-", "_"): v for k, v in spec.items()})
    architectures = set(getattr(target_model_config, "architectures", None) or ())
    if not architectures & SJD2_ARCHITECTURES:
        raise SJDConfigError(
            f"speculative method 'sjd2' serves Chameleon-family checkpoints ({', '.join(sorted(SJD2_ARCHITECTURES))}); "
            f"this model is {', '.join(sorted(architectures)) or 'of no known architecture'}"
        )
    if NoiseSettings.of_config(target_model_config.hf_config) is None:
        raise SJDConfigError(
            "speculative method 'sjd2' needs a checkpoint fine-tuned to read noisy embeddings "
            "(config.json has no 'sjd2' entry); make one with scripts/finetune_sjd2.py, or serve "
            "this one with method 'sjd'"
        )
    if current_platform.is_cuda_alike() and not target_model_config.enforce_eager:
        logger.warning("speculative method 'sjd2' runs the model eagerly (enforce_eager): each step "
                       "hands it the noisy embeddings beside the token ids")
        self.enforce_eager = target_model_config.enforce_eager = True
    self.additional_config = {**(self.additional_config or {}),
                              SJD2_SETTINGS_CONFIG_KEY: sjd2.model_dump()}
    return _create_with(self, target_model_config, target_parallel_config, SJD2_METHOD,
                        vllm_spec, SJD_SETTINGS_CONFIG_KEY, sjd)


def _create_with(self: EngineArgs, target_model_config, target_parallel_config, method: str,
                 vllm_spec: dict, settings_key: str, settings) -> object:
    """Our worker and scheduler, the settings in additional_config, vLLM's config from vllm_spec."""
    _refuse_unsupported(self, target_parallel_config, method)
    target_parallel_config.worker_cls = SJD_WORKER_CLASS
    self.scheduler_cls = SJD_SCHEDULER_CLASS
    self.additional_config = {
        **(self.additional_config or {}),
        settings_key: settings.model_dump(),
    }
    spec, self.speculative_config = self.speculative_config, vllm_spec
    try:
        return _original_create_speculative_config(
            self, target_model_config, target_parallel_config
        )
    finally:
        # Leave the user's dict as it was, so a second engine from the same
        # EngineArgs sees the method again.
        self.speculative_config = spec


def _check_zipar_window(zipar, model_config) -> None:
    """ZipAR needs an image layout; W must fit in the widest row the model makes."""
    from vllm_sjd.families import NotAnImageModel, image_layout_for

    try:
        layout = image_layout_for(model_config.hf_config)
    except NotAnImageModel as err:
        raise SJDConfigError(f"speculative method 'zipar' decodes image rows: {err}") from None
    widest = max(layout.grid(w, h).cols for w, h in layout.sizes)
    if zipar.window is not None and zipar.window > widest:
        raise SJDConfigError(
            f"speculative_config['window'] = {zipar.window} is beyond the row: this model's "
            f"widest image row has {widest} codes (ZipAR's W is at most that; W equal to "
            "the row is plain AR)"
        )


def _check_row_lookahead(sjd, model_config) -> None:
    """A row lookahead needs an image layout, and cannot exceed the widest row."""
    from vllm_sjd.families import NotAnImageModel, image_layout_for

    try:
        layout = image_layout_for(model_config.hf_config)
    except NotAnImageModel as err:
        raise SJDConfigError(
            f"speculative_config['row_lookahead'] feeds the image row below the window: {err}"
        ) from None
    widest = max(layout.grid(w, h).cols for w, h in layout.sizes)
    if sjd.row_lookahead > widest:
        raise SJDConfigError(
            f"speculative_config['row_lookahead'] = {sjd.row_lookahead} is beyond the row: "
            f"this model's widest image row has {widest} codes (the lookahead feeds at most "
            "a row's first codes; on narrower images it takes what the row has)"
        )


def _is_image_model(model_config) -> bool:
    from vllm_sjd.families import is_image_architecture

    return is_image_architecture(getattr(model_config, "architectures", None))


def _install_image_runner(engine_args: EngineArgs, parallel_config) -> None:
    """Plain AR on an image model: the SJD worker and scheduler, if nothing else is named."""
    if parallel_config.worker_cls == "auto" and engine_args.scheduler_cls is None:
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1":
            raise SJDUnsupportedError(
                "VLLM_USE_V2_MODEL_RUNNER=1 asks for vLLM's V2 model runner, but vllm-sjd's "
                "worker (image layouts and guidance) runs on the V1 model runner; unset it, "
                "or pass --worker-cls to serve the image model without the plugin's worker"
            )
        parallel_config.worker_cls = SJD_WORKER_CLASS
        engine_args.scheduler_cls = SJD_SCHEDULER_CLASS
        # Guidance pairs need each step's tokens before the next is scheduled.
        engine_args.async_scheduling = False


def install() -> None:
    install_wrapper(EngineArgs, "create_speculative_config", _create_speculative_config)
