"""The `vllm.endpoint_plugins` entry that adds POST /v1/images/generations.

vLLM loads endpoint plugins only when named in VLLM_PLUGINS, which is then an
allowlist for every plugin group: serve with

    VLLM_PLUGINS=sjd,sjd_images vllm serve MODEL ...

(`vllm-sjd serve` sets it). Image options come from
`--additional-config '{"sjd_image": {"vq": DIR, "target_size": 768}}'`: the VQ
decoder's folder (default: the checkpoint folder) and, for Lumina-mGPT, the
resolution its checkpoint was trained at. The route sits under /v1, so
--api-key guards it like vLLM's own routes. As on vLLM's own routes, a client
that hangs up has its engine requests aborted, and vLLM's errors reach vLLM's
handlers (500, and a server whose engine died stops). `stream: true` answers
with server-sent events (vllm_sjd/images_stream.py); a failure there ends the
stream with an `error` event. GET /sjd is a playground page that uses the
route (vllm_sjd/playground/).
"""

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from vllm.exceptions import VLLMError

from vllm_sjd.contract import IMAGE_OPTIONS_CONFIG_KEY
from vllm_sjd.images_api import (
    ImageGenerationRequest,
    ImageJob,
    ImageRequestError,
    ImageService,
    openai_error,
)
from vllm_sjd.images_stream import server_sent, stream_events
from vllm_sjd.playground import PAGE_ROUTE, page_config, playground_page

# Under the "vllm" logger, so that vLLM's log configuration shows it.
logger = logging.getLogger("vllm.sjd.images")

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
    if request.stream:
        try:
            job = await service.plan(request)  # bad input: 400 before the stream starts
        except ImageRequestError as e:
            return _bad_request(str(e), e.param)
        return StreamingResponse(_streamed(service, job), media_type="text/event-stream")
    try:
        response = await _unless_client_leaves(raw, service.generate(request))
    except ImageRequestError as e:
        return _bad_request(str(e), e.param)
    except VLLMError:
        raise  # vLLM's handlers answer (500) and stop a server whose engine died
    except Exception:
        logger.exception("vllm-sjd: an image request failed")
        return JSONResponse(
            openai_error("the server failed to make the image; see its log", error_type="server_error"),
            status_code=500,
        )
    if response is None:  # the client hung up; nobody reads this
        return Response(status_code=499)
    return JSONResponse(response)


async def _streamed(service: ImageService, job: ImageJob):
    """The job's events as server-sent events; a failure ends the stream with an error event.

    A client that disconnects makes Starlette cancel this iteration, which
    cancels the images' tasks and so aborts their engine requests.
    """
    try:
        async for event in stream_events(service, job):
            yield server_sent(event)
    except asyncio.CancelledError:
        logger.info("vllm-sjd: the client of a streamed image request hung up; "
                    "its requests were aborted")
        raise
    except VLLMError as e:
        yield server_sent({"type": "error", **openai_error(str(e), error_type="server_error")})
        raise  # vLLM's handlers stop a server whose engine died
    except Exception:
        logger.exception("vllm-sjd: a streamed image request failed")
        message = "the server failed to make the image; see its log"
        yield server_sent({"type": "error", **openai_error(message, error_type="server_error")})


async def _unless_client_leaves(raw: Request, work: Awaitable):
    """`work`'s result, or None once the client disconnects first.

    Then `work` is cancelled, which makes vLLM abort its engine requests (the
    SJD scheduler aborts their unconditional twins with them), as vLLM's own
    routes do. The body has been read, so what is left to receive is the
    disconnect.
    """
    task = asyncio.ensure_future(work)
    departure = asyncio.ensure_future(_disconnected(raw))
    try:
        await asyncio.wait((task, departure), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled (the server stops): so is the work
        task.cancel()
        raise
    finally:
        departure.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    logger.info("vllm-sjd: the client of an image request hung up; its requests were aborted")
    return None


async def _disconnected(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


class ImagesEndpoint:
    """vLLM endpoint plugin (see vllm/plugins/endpoint_plugins/interface.py)."""

    name = "sjd_images"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter()
        router.add_api_route(ROUTE, generate_images, methods=["POST"])
        router.add_api_route(PAGE_ROUTE, playground_page, methods=["GET"], include_in_schema=False)
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
        state.sjd_playground = page_config(state.sjd_images, args)
        logger.info("vllm-sjd: %s serves %s; the playground page is at %s",
                    ROUTE, state.sjd_images.model_name, PAGE_ROUTE)


def build_service(engine_client, args) -> ImageService:
    from vllm_sjd.image_decoders import image_decoder_for
    from vllm_sjd.families import image_layout_for
    from vllm_sjd.image_prompts import prompts_for

    model_config = engine_client.model_config
    options = (engine_client.vllm_config.additional_config or {}).get(IMAGE_OPTIONS_CONFIG_KEY, {})
    layout = image_layout_for(model_config.hf_config, options.get("target_size"))
    logger.info("vllm-sjd: loading the VQ decoder of %s", model_config.model)
    decoder = image_decoder_for(model_config.model, model_config.hf_config, options.get("vq"))
    names = getattr(args, "served_model_name", None) or [model_config.model]
    prompts = prompts_for(engine_client, layout, options)
    return ImageService(engine_client, layout, decoder, names[0], prompts)


def make_plugin() -> ImagesEndpoint:
    return ImagesEndpoint()
