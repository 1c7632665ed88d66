"""Image-token models written with vLLM's layers.

The plugin registers them lazily (as "module:Class") for the architectures of
vllm_sjd/families.py.
"""


def register_models() -> None:
    """Register (or take over) the image-generating architectures."""
    from vllm import ModelRegistry

    from vllm_sjd.families import FAMILIES
    from vllm_sjd.models.llamagen_config import register_config

    register_config()  # LlamaGen's config.json has its own model_type
    for architecture, family in FAMILIES.items():
        ModelRegistry.register_model(architecture, family.model_class)
