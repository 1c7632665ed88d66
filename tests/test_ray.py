"""SJD under vLLM's Ray executor: tensor parallel 2 over Ray gives the tokens of TP 1.

vLLM's CPU platform refuses the Ray executor as shipped; tests/ray_cpu_shim.py
(test-only) lets it run RayExecutorV2, vLLM 0.32's default Ray executor. The
test starts a local Ray cluster with two units of the shim's custom resource,
runs the engine core in this process (where the shim is applied) and the two
workers as Ray actors, which load the vllm-sjd plugin themselves (Ray gives
each actor OMP_NUM_THREADS=1, so the two ranks share the 2 cores as under
VLLM_CPU_OMP_THREADS_BIND='0|1' in test_tensor_parallel.py).
"""

import os

import pytest

from tests.conftest import make_llm, shutdown
# tp1_tokens is that module's fixture; module-scoped, it runs again here.
from tests.test_tensor_parallel import (  # noqa: F401
    PARAMS,
    SJD,
    rank_windows_mid_flight,
    run,
    tp1_tokens,
)

pytestmark = pytest.mark.engine


def _reset_vllm_env_cache():
    # An in-process engine core freezes vllm.envs (enable_envs_cache); the
    # settings below must be read afresh, and later modules must see theirs.
    from vllm import envs

    envs.disable_envs_cache()


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster on the loopback address, with the shim's resource twice."""
    import ray
    from ray._private import ray_constants

    from tests import ray_cpu_shim

    with pytest.MonkeyPatch.context() as env:
        # Before ray.init: its processes (and so the workers) inherit these.
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        env.setenv("VLLM_HOST_IP", "127.0.0.1")
        # Ray's single-machine mode (its default on macOS/Windows): the node
        # address, which the workers' TCP store and gloo use, is 127.0.0.1
        # rather than the host's interface address. Read when ray.init runs.
        env.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        ray.init(
            num_cpus=2,
            resources={ray_cpu_shim.RESOURCE: 2},
            include_dashboard=False,
            object_store_memory=256 * 1024**2,
        )
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def ray_tp2(peaked_model, tp1_tokens, ray_cluster):
    # tp1_tokens first: the reference engine runs before Ray starts.
    from tests import ray_cpu_shim

    _reset_vllm_env_cache()
    ray_cpu_shim.apply()
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core here, with the shim
            llm = make_llm(
                peaked_model, sjd=SJD, tensor_parallel_size=2, distributed_executor_backend="ray"
            )
            try:
                executor = type(llm.llm_engine.engine_core.engine_core.model_executor).__name__
                workers = llm.collective_rpc(ray_cpu_shim.worker_identity)
                tokens = run(llm)
                digests = rank_windows_mid_flight(llm)
            finally:
                shutdown(llm)
    finally:
        ray_cpu_shim.remove()
        _reset_vllm_env_cache()
    return dict(executor=executor, workers=workers, tokens=tokens, digests=digests)


def test_ray_workers_run_the_sjd_worker_in_ray_actors(ray_tp2):
    assert ray_tp2["executor"] == "RayExecutorV2"
    workers = ray_tp2["workers"]
    assert len(workers) == 2
    for worker in workers:
        assert worker["ray_actor"], worker
        assert worker["pid"] != os.getpid()
        assert worker["plugin_loaded"], "the vllm-sjd general plugin must load in Ray workers"
        assert worker["worker"] == "SJDCPUWorker"
        assert worker["runner"] == "SJDCPUModelRunner"
    assert workers[0]["pid"] != workers[1]["pid"]


def test_ray_tp2_ranks_hold_identical_windows(ray_tp2):
    digests = ray_tp2["digests"]
    assert len(digests) == 2
    assert digests[0], "requests were in flight, so windows must exist"
    assert digests[0] == digests[1]


def test_ray_tp2_tokens_equal_tp1_tokens(ray_tp2, tp1_tokens):
    tokens = ray_tp2["tokens"]
    assert [len(t) for t in tokens] == [p.max_tokens for p in PARAMS]
    assert tokens == tp1_tokens
