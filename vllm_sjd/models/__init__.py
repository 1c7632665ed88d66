"""Image-token models written with vLLM's layers, and their image layouts.

`MODELS` maps each checkpoint architecture name to the class vLLM builds for
it, registered lazily (as "module:Class") by the plugin.
"""

MODELS = {
    # Lumina-mGPT 7B/34B: Chameleon weights under Lumina-mGPT's config class.
    "ChameleonXLLMXForConditionalGeneration": "vllm_sjd.models.chameleon:ChameleonImageGenerator",
    # Anole (and Chameleon) in transformers' layout.
    "ChameleonForConditionalGeneration": "vllm_sjd.models.chameleon:ChameleonImageGenerator",
    # Emu3-Gen in transformers' layout (vLLM serves it for understanding only).
    "Emu3ForConditionalGeneration": "vllm_sjd.models.emu3:Emu3ImageGenerator",
    # LlamaGen-T2I (t2i_XL_stage1_256 / stage2_512): a folder with our config.json.
    "LlamaGenT2IForCausalLM": "vllm_sjd.models.llamagen:LlamaGenT2IForCausalLM",
}


def register_models() -> None:
    """Register (or take over) the image-generating architectures."""
    from vllm import ModelRegistry

    from vllm_sjd.models.llamagen_layout import register_config

    register_config()  # LlamaGen's config.json has its own model_type
    for architecture, target in MODELS.items():
        ModelRegistry.register_model(architecture, target)


def image_layout_for(hf_config, target_size: int | None = None):
    """The image layout of a checkpoint, from its (transformers) config.

    target_size: the resolution a Lumina-mGPT checkpoint was trained at (512,
    768 or 1024; its name says which); it decides the supported sizes.
    A Lumina-format config may name its own in an optional key,
    "sjd_image_layout": {"target_size": 64, "downsample": 4, "num_codes": 512}
    (px per code, 16 if absent; codebook size, 8192 if absent), as the bundled
    demo model does; an explicit target_size argument wins over the config's.
    """
    from vllm_sjd.models.chameleon_layout import AnoleImageLayout, ChameleonImageLayout
    from vllm_sjd.models.emu3_layout import Emu3ImageLayout

    architecture = (getattr(hf_config, "architectures", None) or ["?"])[0]
    if architecture == "ChameleonXLLMXForConditionalGeneration":
        own = getattr(hf_config, "sjd_image_layout", None) or {}
        return ChameleonImageLayout(
            target_size or own.get("target_size") or 768,
            own.get("downsample", 16),
            own.get("num_codes", 8192),
        )
    if architecture == "ChameleonForConditionalGeneration":
        return AnoleImageLayout()
    if architecture == "Emu3ForConditionalGeneration":
        return Emu3ImageLayout(hf_config.vocabulary_map)
    if architecture == "LlamaGenT2IForCausalLM":
        from vllm_sjd.models.llamagen_layout import LlamaGenImageLayout

        return LlamaGenImageLayout.from_config(hf_config)
    raise ValueError(
        f"{architecture} has no image layout; image models: {', '.join(MODELS)}"
    )
