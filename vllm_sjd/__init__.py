"""vllm-sjd: Speculative Jacobi Decoding for image-token models, as a vLLM plugin.

Importing this package changes nothing in vLLM; vLLM calls `register()` (the
`vllm.general_plugins` entry point) in each of its processes.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general plugin: install the SJD patches, register the models. Idempotent."""
    from vllm_sjd.models import register_models
    from vllm_sjd.patches import apply_all

    apply_all()
    register_models()
