"""Image-token models written with vLLM's layers, and their image layouts.

`MODELS` maps each checkpoint architecture name to the class vLLM builds for
it, registered lazily (as "module:Class") by the plugin.
"""

MODELS = {
    # Lumina-mGPT 7B/34B: Chameleon weights under Lumina-mGPT's config class.
    "ChameleonXLLMXForConditionalGeneration": "vllm_sjd.models.chameleon:ChameleonImageGenerator",
    # Anole (and Chameleon) in transformers' layout.
    "ChameleonForConditionalGeneration": "vllm_sjd.models.chameleon:ChameleonImageGenerator",
}


def register_models() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for architecture, target in MODELS.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, target)


def image_layout_for(architecture: str, target_size: int | None = None):
    """The image layout of a registered architecture.

    target_size: the resolution a Lumina-mGPT checkpoint was trained at (512,
    768 or 1024; its name says which); it decides the supported sizes.
    """
    from vllm_sjd.models.chameleon_layout import AnoleImageLayout, ChameleonImageLayout

    if architecture == "ChameleonXLLMXForConditionalGeneration":
        return ChameleonImageLayout(target_size or 768)
    if architecture == "ChameleonForConditionalGeneration":
        return AnoleImageLayout()
    raise ValueError(
        f"{architecture} has no image layout; image models: {', '.join(MODELS)}"
    )
