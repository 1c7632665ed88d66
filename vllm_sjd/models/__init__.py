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
