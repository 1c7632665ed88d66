"""The `vllm.endpoint_plugins` entry that adds POST /v1/images/generations.

vLLM loads endpoint plugins only when named in VLLM_PLUGINS, which is then an
allowlist for every plugin group: serve with

    VLLM_PLUGINS=sjd,sjd_images vllm serve MODEL ...

(`vllm-sjd serve` sets it). Image options come from
`--additional-config '{"sjd_image": {"vq": DIR, "target_size": 768}}'`: the VQ
decoder's folder (default: the checkpoint folder) and, for Lumina-mGPT, the
resolution its checkpoint was trained at. The route sits under /v1, so
--api-key guards it like vLLM's own routes.
"""

import json
import logging

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from vllm_sjd.images_api import ImageGenerationRequest, ImageRequestError, ImageService, openai_error

# Under the "vllm" logger, so that vLLM's log configuration shows it.
logger = logging.getLogger("vllm.sjd.images")

IMAGE_OPTIONS_KEY = "sjd_image"
ROUTE = "/v1/images/generations"


def _bad_request(message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(openai_error(message, param), status_code=400)


async def generate_images(raw: Request) -> JSONResponse:
    service: ImageService | None = getattr(raw.app.state, "sjd_images", None)
    if service is None:
        reason = getattr(raw.app.state, "sjd_images_unavailable", "no image model is loaded")
        return _bad_request(f"this model cannot make images: {reason}", "model")
    try:
        body = await raw.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _bad_request("the request body is not valid JSON")
    if not isinstance(body, dict):
        return _bad_request("the request body must be a JSON object")
    try:
        request = ImageGenerationRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        return _bad_request(f"{param}: {first['msg']}" if param else first["msg"], param)
    try:
        return JSONResponse(await service.generate(request))
    except ImageRequestError as e:
        return _bad_request(str(e), e.param)


class ImagesEndpoint:
    """vLLM endpoint plugin (see vllm/plugins/endpoint_plugins/interface.py)."""

    name = "sjd_images"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter()
        router.add_api_route(ROUTE, generate_images, methods=["POST"])
        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:
            state.sjd_images_unavailable = "this server has no engine"
            return
        try:
            state.sjd_images = build_service(engine_client, args)
        except ValueError as e:  # not an image model, or no VQ decoder found
            state.sjd_images_unavailable = str(e)
            logger.warning("vllm-sjd: %s disabled: %s", ROUTE, e)
            return
        logger.info("vllm-sjd: %s serves %s", ROUTE, state.sjd_images.model_name)


def build_service(engine_client, args) -> ImageService:
    from vllm_sjd.image_decoders import image_decoder_for
    from vllm_sjd.models import image_layout_for

    model_config = engine_client.model_config
    options = (engine_client.vllm_config.additional_config or {}).get(IMAGE_OPTIONS_KEY, {})
    layout = image_layout_for(model_config.hf_config, options.get("target_size"))
    logger.info("vllm-sjd: loading the VQ decoder of %s", model_config.model)
    decoder = image_decoder_for(model_config.model, model_config.hf_config, options.get("vq"))
    names = getattr(args, "served_model_name", None) or [model_config.model]
    tokenizer = engine_client.renderer.get_tokenizer()
    return ImageService(engine_client, layout, decoder, names[0], tokenizer)


def make_plugin() -> ImagesEndpoint:
    return ImagesEndpoint()
