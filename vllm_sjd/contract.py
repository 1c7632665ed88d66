"""The names the plugin's pieces agree on, each in one place.

A request crosses several processes (API server, engine core, workers) and
carries what SJD needs in vLLM's own open fields; these are the keys.
"""

# --speculative-config '{"method": "sjd", ...}'
SPECULATIVE_METHOD = "sjd"
ZIPAR_METHOD = "zipar"  # ZipAR's row-parallel decoding (vllm_sjd/zipar.py)
SJD2_METHOD = "sjd2"  # Jacobi-denoising drafts for a fine-tuned checkpoint (vllm_sjd/sjd2.py)

# VllmConfig.additional_config: engine-wide, the same in every process.
SJD_SETTINGS_CONFIG_KEY = "sjd"  # validated SJD settings, written by patches/speculative_config.py
ZIPAR_SETTINGS_CONFIG_KEY = "zipar"  # validated ZipAR settings, likewise
SJD2_SETTINGS_CONFIG_KEY = "sjd2"  # SJD2's own settings (beside the SJD settings it runs on)
IMAGE_OPTIONS_CONFIG_KEY = "sjd_image"  # the user's image options (--additional-config)

# SamplingParams.extra_args: per request.
IMAGE_GRID_ARG = "sjd_image_grid"  # the image's token layout (layouts/constraints.py)
GUIDANCE_ARG = "sjd_guidance"  # guidance scale and unconditional prompt (guidance.py)
UNCONDITIONAL_REQUEST_SUFFIX = "::sjd-uncond"  # request id of a guided request's twin

# A checkpoint's config.json: the layout of a Lumina-format checkpoint that is
# not one of Lumina-mGPT's (the bundled demo model's 64 px, 4 px per code).
LAYOUT_CONFIG_FIELD = "sjd_image_layout"

# The image endpoint's response: each image's SJD figures.
RESPONSE_FIGURES_FIELD = "sjd"
