"""Every touch of vLLM internals, one module per seam (installed as vllm_sjd.patches).

Each module names the vLLM function it wraps, the process it runs in, the
version it was checked on, why SJD needs it, and when to retire it. Modules
wrap the original (kept as `_original_*`) rather than copying its body, stamp a
sentinel so a second install is harmless, and verify that the install took
(wrapping.py); where a patch cannot wrap, its header says why.

| module                  | wraps                                                        | scope      |
|-------------------------|--------------------------------------------------------------|------------|
| speculative_config      | EngineArgs.create_speculative_config                         | all        |
| v1_runner               | VllmConfig.use_v2_model_runner (V1 with the SJD worker)      | all        |
| janus_vocab             | EngineArgs.create_model_config (Janus's codes get their ids) | all        |
| verified_logits         | rejection_sampler.rejection_sample (captures processed p)    | all        |
| recovered_tokens        | rejection_sampler.sample_recovered_tokens (empty residual)   | all        |
| sjd_runner / sjd_worker | GPUModelRunner/CPUModelRunner subclasses, worker subclasses  | all        |
| sjd_sampling            | GPUModelRunner._sample under SJD (part of the SJD runner)    | all        |
| zipar_runner            | GPUModelRunner._prepare_inputs and _sample under ZipAR       | all        |
| row_lookahead_runner    | GPUModelRunner._prepare_inputs under SJD's row lookahead     | all        |
| cfg_scheduler           | Scheduler subclass: guidance pairs, whole-window budgets     | all        |
| cpu_expand_kernel       | CpuPlatform.register_triton_kernel_overrides (expand kernel) | CPU 0.32.x |
| cpu_kernel_scan         | triton_utils.dispatcher._rebind_kernels (skips numba's)      | CPU 0.32.x |
| cpu_empty_top_k         | topk_topp_sampler.apply_top_k_only on zero rows              | CPU 0.32.x |
| cpu_generator_rewind    | CPUModelRunner._sample/_bookkeeping_sync (seeded rewind)     | CPU 0.32.x |
| cpu_kv_cache_default    | CpuPlatform.check_and_update_config (default KV-cache size)  | CPU 0.32.x |
| wrapping                | (none: install_wrapper and the vLLM version check)           | -          |
"""

from vllm_sjd.patches.wrapping import check_vllm_version, is_cpu_platform

_applied = False


def apply_all() -> None:
    """Install every patch once per process (vLLM loads plugins repeatedly)."""
    global _applied
    if _applied:
        return
    check_vllm_version()
    from vllm_sjd.patches import (
        janus_vocab,
        recovered_tokens,
        speculative_config,
        v1_runner,
        verified_logits,
    )

    speculative_config.install()
    v1_runner.install()
    janus_vocab.install()
    verified_logits.install()
    recovered_tokens.install()
    if is_cpu_platform():
        from vllm_sjd.patches import (
            cpu_empty_top_k,
            cpu_expand_kernel,
            cpu_generator_rewind,
            cpu_kernel_scan,
            cpu_kv_cache_default,
        )

        cpu_expand_kernel.install()
        cpu_kernel_scan.install()
        cpu_empty_top_k.install()
        cpu_generator_rewind.install()
        cpu_kv_cache_default.install()
    _applied = True
