"""Test-only shim: vLLM's Ray executor on vLLM's CPU platform (vLLM 0.32.x).

Not part of the product: GPU platforms run the Ray executor as shipped. On the
CPU build, `distributed_executor_backend="ray"` stops in three places:

1. `CpuPlatform.ray_device_key` is "" (vllm/platforms/interface.py), so
   `initialize_ray_cluster` (vllm/v1/executor/ray_utils.py) raises
   "current platform cpu does not support ray." before it makes the
   placement group.
2. The key names the Ray resource of each worker's placement-group bundle and
   actor (`RayExecutorV2._get_actor_resource_kwargs`). "CPU" cannot be it: Ray
   refuses CPU/GPU inside `resources={...}` ("Use the 'num_cpus' and
   'num_gpus' keyword instead"). So the key is a custom resource,
   RESOURCE below, which the Ray cluster must declare:
   `ray.init(resources={RESOURCE: N})` or `ray start --resources '{"...": N}'`.
3. Inside each Ray worker, `RayWorkerProc.get_node_and_physical_gpu_ids`
   (vllm/v1/executor/ray_executor_v2.py) reads
   `ray.get_runtime_context().get_accelerator_ids()[ray_device_key]`: Ray only
   lists accelerator resources there (GPU, TPU, neuron_cores, ...), so a
   custom resource is a KeyError, and the ids would be parsed as CUDA device
   ids. The CPU worker needs no device id: the subclass below answers with its
   rank. Ray pickles actor classes by reference, so the workers import this
   module (tests/ is on PYTHONPATH, which the Ray cluster started by the test
   hands to its workers) and run the subclass without any patch of their own.

`apply()` runs in the process that builds the executor (the engine core: the
test runs it in-process with VLLM_ENABLE_V1_MULTIPROCESSING=0). It sets the
key and swaps the module global `ray_executor_v2.RayWorkerProc`, which
`RayExecutorV2._init_executor` reads when it creates the actors. `remove()`
undoes both.

The legacy `RayDistributedExecutor` (VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0, Ray
compiled graphs) is not shimmed; RayExecutorV2 is vLLM 0.32's default.
"""

from vllm.platforms import current_platform
from vllm.v1.executor import ray_executor_v2
from vllm.v1.executor.ray_executor_v2 import RayWorkerProc

# A custom Ray resource, one unit per CPU worker (rank).
RESOURCE = "vllm_cpu_worker"

_ORIGINAL_WORKER_PROC = RayWorkerProc
_PLATFORM_CLASS = type(current_platform)
_OWN_KEY = "ray_device_key" in vars(_PLATFORM_CLASS)
_ORIGINAL_KEY = _PLATFORM_CLASS.ray_device_key


class CpuRayWorkerProc(RayWorkerProc):
    """RayWorkerProc whose "physical device id" is its rank (CPU has no device ids)."""

    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        import ray

        return ray.get_runtime_context().get_node_id(), [self._init_kwargs["rank"]]


def apply() -> None:
    if not current_platform.is_cpu():
        raise RuntimeError("the Ray CPU shim is for vLLM's CPU platform only")
    _PLATFORM_CLASS.ray_device_key = RESOURCE
    ray_executor_v2.RayWorkerProc = CpuRayWorkerProc


def remove() -> None:
    if _OWN_KEY:
        _PLATFORM_CLASS.ray_device_key = _ORIGINAL_KEY
    elif "ray_device_key" in vars(_PLATFORM_CLASS):
        delattr(_PLATFORM_CLASS, "ray_device_key")  # back to Platform's ""
    ray_executor_v2.RayWorkerProc = _ORIGINAL_WORKER_PROC


def worker_identity(worker) -> dict:
    """For LLM.collective_rpc: what runs in a worker, and where (a Ray actor or not)."""
    import os

    import ray

    from vllm_sjd import patches

    in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    inner = getattr(worker, "worker", worker)  # the WorkerWrapperBase holds the worker
    return {
        "pid": os.getpid(),
        "ray_actor": in_actor,
        "worker": type(inner).__name__,
        "runner": type(inner.model_runner).__name__,
        "plugin_loaded": patches._applied,
    }
