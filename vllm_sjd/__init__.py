"""vllm-sjd: Speculative Jacobi Decoding for image-token models, as a vLLM plugin.

Importing this package changes nothing in vLLM; vLLM calls `register()` (the
`vllm.general_plugins` entry point) in each of its processes.
"""

import logging
import os

__version__ = "0.1.0"

logger = logging.getLogger(__name__)

# GiB of KV cache on the CPU platform when the user sets none: vLLM's CPU build
# refuses to start without VLLM_CPU_KVCACHE_SPACE (or --kv-cache-memory-bytes).
DEFAULT_CPU_KVCACHE_GIB = "4"


def register() -> None:
    """vLLM general plugin: install the SJD patches. Idempotent."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = DEFAULT_CPU_KVCACHE_GIB
        logger.info(
            "vllm-sjd: VLLM_CPU_KVCACHE_SPACE unset; using %s GiB of KV cache",
            DEFAULT_CPU_KVCACHE_GIB,
        )
    from vllm_sjd.patches import apply_all

    apply_all()
