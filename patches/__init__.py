"""Every touch of vLLM internals, one module per seam (installed as vllm_sjd.patches).

Each module names the vLLM function it wraps, the process it runs in, the
version it was checked on, why SJD needs it, and when to retire it. Modules
wrap the original (kept as `_original_*`) rather than copying its body, stamp a
sentinel so a second install is harmless, and verify that the install took.

| module                  | wraps                                                        | scope      |
|-------------------------|--------------------------------------------------------------|------------|
| speculative_config      | EngineArgs.create_speculative_config                         | all        |
| verified_logits         | rejection_sampler.rejection_sample (captures processed p)    | all        |
| sjd_runner / sjd_worker | GPUModelRunner/CPUModelRunner subclasses, worker subclasses  | all        |
| cfg_scheduler           | Scheduler subclass: guidance pairs, whole-window budgets     | all        |
| cpu_expand_kernel       | CpuPlatform.register_triton_kernel_overrides (expand kernel) | CPU 0.32.x |
| cpu_empty_top_k         | topk_topp_sampler.apply_top_k_only on zero rows              | CPU 0.32.x |
| cpu_generator_rewind    | CPUModelRunner._sample/_bookkeeping_sync (seeded rewind)     | CPU 0.32.x |
| cpu_kv_cache_default    | CpuPlatform.check_and_update_config (default KV-cache size)  | CPU 0.32.x |
"""

import logging

logger = logging.getLogger(__name__)

SUPPORTED_VLLM_MINOR = (0, 32)
SENTINEL = "__vllm_sjd_patched__"
_applied = False


def install_wrapper(owner, name: str, wrapper, *, as_classmethod: bool = False) -> None:
    """Set owner.name = wrapper once (sentinel-stamped), and check that it took."""

    def stamped(value) -> bool:
        return getattr(getattr(value, "__func__", value), SENTINEL, False)

    if stamped(getattr(owner, name)):
        return
    setattr(wrapper, SENTINEL, True)
    setattr(owner, name, classmethod(wrapper) if as_classmethod else wrapper)
    if not stamped(getattr(owner, name)):
        raise RuntimeError(f"vllm-sjd: patching {getattr(owner, '__name__', owner)}.{name} failed")


def vllm_minor() -> tuple[int, int]:
    import vllm

    major, minor = vllm.__version__.split(".")[:2]
    return int(major), int(minor)


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def check_vllm_version() -> None:
    if vllm_minor() != SUPPORTED_VLLM_MINOR:
        import vllm

        raise RuntimeError(
            f"vllm-sjd's patches were checked on vLLM "
            f"{SUPPORTED_VLLM_MINOR[0]}.{SUPPORTED_VLLM_MINOR[1]}.x; this is vLLM "
            f"{vllm.__version__}. Install vllm-sjd[gpu] or vllm-sjd[cpu] to get "
            "a matching vLLM."
        )


def apply_all() -> None:
    """Install every patch once per process (vLLM loads plugins repeatedly)."""
    global _applied
    if _applied:
        return
    check_vllm_version()
    from vllm_sjd.patches import speculative_config, verified_logits

    speculative_config.install()
    verified_logits.install()
    if is_cpu_platform():
        from vllm_sjd.patches import (
            cpu_empty_top_k,
            cpu_expand_kernel,
            cpu_generator_rewind,
            cpu_kv_cache_default,
        )

        cpu_expand_kernel.install()
        cpu_empty_top_k.install()
        cpu_generator_rewind.install()
        cpu_kv_cache_default.install()
    _applied = True
