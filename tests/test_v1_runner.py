"""Image models run on vLLM's V1 model runner even where vLLM would pick V2.

On CUDA with Triton, vLLM 0.32 picks the V2 model runner for a plain model;
these tests give the config that choice on CPU (Triton "present") and check
that engines with the plugin's worker still get V1, and that forcing V2 fails
with a message naming the conflict.
"""

import pytest

from vllm_sjd.demo import MODEL_PATH as DEMO_MODEL
from vllm_sjd.patches.speculative_config import SJD_WORKER_CLASS, SJDUnsupportedError
from vllm_sjd.patches.v1_runner import V2RunnerConflictError


@pytest.fixture(autouse=True)
def v2_by_default(monkeypatch):
    """vLLM's runner choice as on CUDA: Triton present, V2 unless something is unsupported."""
    import vllm.config.vllm as vllm_config_module
    from vllm import envs
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    envs.disable_envs_cache()
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)


def engine_config(model, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(
        model=str(model), enforce_eager=True, dtype="float32", max_model_len=512, **kwargs
    ).create_engine_config()


def test_a_text_model_gets_vllms_v2_default(peaked_model):
    """The emulation works: without the plugin's worker, vLLM picks V2."""
    config = engine_config(peaked_model)
    assert config.parallel_config.worker_cls != SJD_WORKER_CLASS
    assert config.use_v2_model_runner is True


@pytest.mark.parametrize("speculative_config", [None, {"method": "sjd", "num_speculative_tokens": 4}])
def test_an_image_model_gets_the_v1_runner(speculative_config):
    config = engine_config(DEMO_MODEL, speculative_config=speculative_config)
    assert config.parallel_config.worker_cls == SJD_WORKER_CLASS
    assert config.use_v2_model_runner is False


@pytest.mark.parametrize("speculative_config", [None, {"method": "sjd", "num_speculative_tokens": 4}])
def test_forcing_v2_on_an_image_model_names_the_conflict(monkeypatch, speculative_config):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(SJDUnsupportedError, match="VLLM_USE_V2_MODEL_RUNNER=1"):
        engine_config(DEMO_MODEL, speculative_config=speculative_config)


def test_v2_forced_after_start_up_is_refused_in_every_process(monkeypatch):
    """The engine core and workers read the property too: a V2 forced there fails loudly."""
    config = engine_config(DEMO_MODEL)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(V2RunnerConflictError, match="V1 model runner"):
        config.use_v2_model_runner


def test_an_image_model_with_another_worker_keeps_vllms_choice():
    config = engine_config(DEMO_MODEL, worker_cls="vllm.v1.worker.cpu_worker.CPUWorker")
    assert config.use_v2_model_runner is True
