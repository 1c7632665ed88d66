"""POST /v1/images/generations for `vllm serve`: OpenAI's Images API on an image model.

Request fields are those of OpenAI's `images.generate` (the openai client's
ImageGenerateParams), each either honoured, accepted without effect, or
refused with a 400 naming it (see `ImageGenerationRequest`), plus our
extensions `seed`, `guidance_scale`, `temperature` and `top_k`; absent, the
last two come from the model's generation config as on vLLM's other routes
(temperature 1 and the family's top-k where it names none). The response is
OpenAI's ImagesResponse (created, data[].b64_json, output_format, size,
quality, background, usage) and, per image, the request's SJD figures:
forward passes (engine steps that produced its tokens), tokens and tokens
per pass. With `stream: true` the route sends OpenAI's image events instead
(vllm_sjd/images_stream.py), from the same ImageJob.

The service runs on the API server's EngineClient (public API only): it
builds the prompts (vllm_sjd/image_prompts.py: text, or LlamaGen's T5 caption
embeddings) and sampling parameters from the model's image layout,
generates the n images concurrently, and decodes them with the model's VQ
decoder (vllm_sjd/image_decoders.py). Bad input is answered with HTTP 400 in
OpenAI's error shape by the route (vllm_sjd/images_plugin.py).
"""

import asyncio
import base64
import io
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vllm_sjd.config import ZipARConfig
from vllm_sjd.contract import RESPONSE_FIGURES_FIELD, SJD2_SETTINGS_CONFIG_KEY, ZIPAR_SETTINGS_CONFIG_KEY
from vllm_sjd.core.zipar import raster_tokens
from vllm_sjd.image_generation import image_sampling_params
from vllm_sjd.layouts.grid import ImageGrid, UnsupportedImageSize

# Under the "vllm" logger, so that vLLM's log configuration shows it.
logger = logging.getLogger("vllm.sjd.images")

MAX_IMAGES = 10  # OpenAI's limit for n
MAX_PROMPT_CHARS = 4000


class ImageRequestError(ValueError):
    """A request the model cannot serve (HTTP 400); `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# OpenAI fields that ask for what an autoregressive image model cannot do.
UNSERVED_FIELDS = {
    "complexity": "this model has no planning stage whose effort could be set",
    "frame_count": "this model makes still images, not animations",
    "frame_duration_ms": "this model makes still images, not animations",
    "svg": "this model makes raster images, not SVG",
}
MAX_PARTIAL_IMAGES = 3  # OpenAI's limit
# Formats Pillow writes for us, and those that take a compression level.
OUTPUT_FORMATS = ("png", "jpeg", "webp")
COMPRESSED_FORMATS = ("jpeg", "webp")


class ImageGenerationRequest(BaseModel):
    """OpenAI's ImageGenerateParams plus our extensions; any other field is refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_IMAGES)
    size: str | None = Field(default=None, pattern=r"^(auto|\d+x\d+)$")
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp", "gif", "svg"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    background: Literal["auto", "opaque", "transparent"] | None = None
    # Accepted without effect here (the README says why).
    quality: Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"] | None = None
    style: Literal["vivid", "natural"] | None = None
    moderation: Literal["low", "auto"] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    stream: bool | None = None
    # Refused unless null (UNSERVED_FIELDS).
    complexity: str | None = None
    frame_count: int | None = None
    frame_duration_ms: int | None = None
    svg: dict | None = None
    partial_images: int | None = Field(default=None, ge=0, le=MAX_PARTIAL_IMAGES)
    # Our extensions.
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    guidance_scale: float | None = Field(default=None, ge=1.0, le=100.0)
    temperature: float | None = Field(default=None, ge=0.0, le=10.0)
    top_k: int | None = Field(default=None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must not be blank")
        return prompt

    @field_validator("guidance_scale", "temperature", mode="before")
    @classmethod
    def _numbers_may_be_ints(cls, value):
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    def refusal(self) -> ImageRequestError | None:
        """Why this server cannot serve the request as asked, or None."""
        for name, reason in UNSERVED_FIELDS.items():
            if getattr(self, name) is not None:
                return ImageRequestError(f"{name}: {reason}", name)
        if self.partial_images is not None and not self.stream:
            return ImageRequestError(
                "partial_images: partial images are sent only with stream: true", "partial_images"
            )
        if self.response_format == "url":
            return ImageRequestError(
                "response_format: this server serves no image files; use b64_json", "response_format"
            )
        if self.output_format not in (None, *OUTPUT_FORMATS):
            return ImageRequestError(
                f"output_format: {self.output_format} is not served; use one of "
                f"{', '.join(OUTPUT_FORMATS)}",
                "output_format",
            )
        if self.background == "transparent":
            return ImageRequestError(
                "background: these images have no alpha channel; use auto or opaque", "background"
            )
        return None


def openai_error(
    message: str, param: str | None = None, code: str | None = None,
    error_type: str = "invalid_request_error",
) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def encode_image(image, output_format: str, compression: int | None) -> bytes:
    """The image's bytes in `output_format`; `compression` (0-100, OpenAI's) for jpeg and webp.

    OpenAI's output_compression defaults to 100, its least compressed output,
    which is how Pillow reads quality; png is lossless and ignores it.
    """
    options = {}
    if output_format in COMPRESSED_FORMATS:
        options["quality"] = 100 if compression is None else compression
    buffer = io.BytesIO()
    image.save(buffer, format=output_format.upper(), **options)
    return buffer.getvalue()


@dataclass
class ImageStats:
    tokens: int
    forward_passes: int

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "forward_passes": self.forward_passes,
            "tokens_per_pass": round(self.tokens / max(self.forward_passes, 1), 3),
        }


@dataclass
class ImageJob:
    """A validated request and the inputs of its engine requests (one per image)."""

    request: ImageGenerationRequest
    request_id: str
    prompt: dict  # the engine prompt of the caption
    prompt_tokens: int
    params: list  # SamplingParams, one per image
    grid: ImageGrid
    guidance_scale: float
    temperature: float
    top_k: int

    @property
    def size(self) -> str:
        return f"{self.grid.width}x{self.grid.height}"

    @property
    def output_format(self) -> str:
        return self.request.output_format or "png"

    def engine_request_id(self, index: int) -> str:
        return f"{self.request_id}-{index}"

    def encode(self, image) -> bytes:
        return encode_image(image, self.output_format, self.request.output_compression)

    def image_fields(self) -> dict:
        """The fields OpenAI's response and stream events share."""
        return {"background": "opaque", "output_format": self.output_format,
                "quality": self.request.quality or "auto", "size": self.size}

    def usage(self, output_tokens: int) -> dict:
        inputs = self.prompt_tokens
        return {
            "input_tokens": inputs,
            "input_tokens_details": {"text_tokens": inputs, "image_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"text_tokens": 0, "image_tokens": output_tokens},
            "total_tokens": inputs + output_tokens,
        }

    def figures(self, speculative: bool) -> dict:
        return {"speculative": speculative, "guidance_scale": self.guidance_scale,
                "temperature": self.temperature, "top_k": self.top_k}


class ImageService:
    """Generates images for one served model."""

    def __init__(self, engine_client, layout, decoder, model_name: str, prompts) -> None:
        self.engine_client = engine_client
        self.layout = layout
        self.decoder = decoder
        self.model_name = model_name
        self.prompts = prompts  # vllm_sjd/image_prompts.py
        speculative = engine_client.vllm_config.speculative_config
        self.speculative = speculative is not None
        zipar = (engine_client.vllm_config.additional_config or {}).get(ZIPAR_SETTINGS_CONFIG_KEY)
        # ZipAR's images come out in its stream order (core/zipar.py).
        self.zipar = None if zipar is None else ZipARConfig(**zipar)
        sjd2 = SJD2_SETTINGS_CONFIG_KEY in (engine_client.vllm_config.additional_config or {})
        self.method = ("zipar" if self.zipar else "sjd2" if sjd2 else "sjd" if self.speculative
                       else "autoregressive")
        # The model's sampling defaults as vLLM's other routes see them
        # (generation_config.json, or --generation-config / --override-generation-config).
        model_defaults = engine_client.model_config.get_diff_sampling_param()
        self.default_temperature = float(model_defaults.get("temperature", 1.0))
        self.default_top_k = model_defaults.get("top_k") or layout.default_top_k

    def _size(self, size: str | None) -> tuple[int, int]:
        if size in (None, "auto"):
            return self.layout.default_size
        width, height = (int(v) for v in size.split("x"))
        return width, height

    async def plan(self, request: ImageGenerationRequest) -> ImageJob:
        """Validate a request and make its engine requests' inputs; ImageRequestError if bad."""
        refusal = request.refusal()
        if refusal is not None:
            raise refusal
        if request.model not in (None, self.model_name):
            raise ImageRequestError(
                f"this server serves {self.model_name!r}, not {request.model!r}", "model"
            )
        width, height = self._size(request.size)
        try:
            grid = self.layout.grid(width, height)
        except UnsupportedImageSize as e:
            raise ImageRequestError(str(e), "size") from None
        scale = request.guidance_scale
        if scale is None:
            scale = self.layout.default_guidance_scale
        prompts = await self.prompts.make(request.prompt, width, height, guided=scale != 1.0)
        max_len = self.engine_client.model_config.max_model_len
        image_tokens = self.engine_tokens(grid)
        if prompts.num_tokens + image_tokens > max_len:
            raise ImageRequestError(
                f"prompt of {prompts.num_tokens} tokens plus the {image_tokens} image tokens "
                f"exceed the model's context of {max_len} tokens",
                "prompt",
            )
        base_seed = request.seed
        temperature = self.default_temperature if request.temperature is None else request.temperature
        top_k = request.top_k or self.default_top_k
        params = [
            self._with_length(image_sampling_params(
                grid,
                temperature=temperature,
                top_k=top_k,
                seed=None if base_seed is None else base_seed + i,
                guidance_scale=scale,
                unconditional_prompt_token_ids=prompts.unconditional_token_ids,
            ), grid)
            for i in range(request.n or 1)
        ]
        job = ImageJob(request, f"img-{uuid.uuid4().hex[:16]}", prompts.conditional,
                       prompts.num_tokens, params, grid, scale, temperature, top_k)
        end_user = request.safety_identifier or request.user
        logger.info(
            "%s: %d image(s) of %s (%d tokens each), guidance %.2g, %s%s%s",
            job.request_id, len(params), job.size, grid.num_tokens, scale,
            {"sjd": "SJD", "sjd2": "SJD2", "zipar": "ZipAR"}.get(self.method, self.method),
            ", streamed" if request.stream else "", f", for {end_user}" if end_user else "",
        )
        return job

    async def generate(self, request: ImageGenerationRequest) -> dict:
        job = await self.plan(request)
        started = time.monotonic()
        results = await asyncio.gather(
            *(self.one_image(job.engine_request_id(i), job.prompt, p, job.grid)
              for i, p in enumerate(job.params))
        )
        encoded = await asyncio.to_thread(lambda: [job.encode(image) for image, _ in results])
        data = [
            {"b64_json": base64.b64encode(image).decode(), RESPONSE_FIGURES_FIELD: stats.as_dict()}
            for image, (_, stats) in zip(encoded, results)
        ]
        elapsed = time.monotonic() - started
        passes = sum(s.forward_passes for _, s in results)
        tokens = sum(s.tokens for _, s in results)
        logger.info(
            "%s: done in %.1f s, %d tokens in %d forward passes (%.2f tokens/pass)",
            job.request_id, elapsed, tokens, passes, tokens / max(passes, 1),
        )
        return {
            "created": int(time.time()),
            "data": data,
            **job.image_fields(),
            **({"safety_identifier": request.safety_identifier} if request.safety_identifier else {}),
            "usage": job.usage(tokens),
            RESPONSE_FIGURES_FIELD: {**job.figures(self.speculative), **self.method_figures(job.grid),
                                     "seconds": round(elapsed, 3)},
        }

    def engine_tokens(self, grid: ImageGrid) -> int:
        """Tokens the engine generates for one image (ZipAR's stand-ins included)."""
        return self.zipar.order_for(grid).num_tokens if self.zipar else grid.num_tokens

    def _with_length(self, params, grid: ImageGrid):
        params.max_tokens = self.engine_tokens(grid)
        return params

    def method_figures(self, grid: ImageGrid) -> dict:
        """Which method made the images (and ZipAR's W for this size)."""
        figures = {"method": self.method}
        if self.zipar:
            figures["window"] = self.zipar.window_for(grid.cols)
        return figures

    def raster(self, tokens: list[int], grid: ImageGrid) -> list[int]:
        """The engine's tokens in raster order: ZipAR's stream put back; as they are otherwise.

        A ZipAR prefix gives the raster prefix whose tokens are all drawn."""
        if not self.zipar:
            return tokens
        raster = raster_tokens(tokens, self.zipar.order_for(grid), grid)
        return raster[: raster.index(-1)] if -1 in raster else raster

    async def one_image(self, request_id, prompt, params, grid, partials: int = 0, on_partial=None):
        """(image, stats) of one engine request. With `partials`, `on_partial(index,
        image)` is awaited as the image passes each of `partials` evenly spaced
        fractions (at most that many decodes, off the event loop; a fraction
        passed in the same step as the next is skipped)."""
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.DELTA
        tokens: list[int] = []
        passes = 0
        next_report = 0.25
        # Token counts at which a partial image is due (ascending).
        marks = [(k + 1) * grid.num_tokens // (partials + 1) for k in range(partials)]
        sent = 0
        async for output in self.engine_client.generate(prompt, params, request_id):
            new = output.outputs[0].token_ids
            if new:
                passes += 1
                tokens.extend(new)
            due = sum(mark <= len(tokens) for mark in marks)
            if due and not output.finished and on_partial is not None:
                marks = marks[due:]
                image = await asyncio.to_thread(
                    self.decoder.partial, self.raster(list(tokens), grid), grid
                )
                await on_partial(sent, image)
                sent += 1
            if len(tokens) >= next_report * grid.num_tokens and not output.finished:
                logger.info(
                    "%s: %d%% (%d/%d tokens, %d passes)", request_id,
                    100 * len(tokens) // grid.num_tokens, len(tokens), grid.num_tokens, passes,
                )
                next_report += 0.25
        metrics = output.outputs[0].spec_decode_metrics
        if self.zipar:
            # The stream fixes ZipAR's passes (vLLM's draft histogram counts
            # the last pass's tokens past the image's end).
            passes = self.zipar.order_for(grid).forward_passes
        elif metrics is not None:
            # The prefill, one verify pass per histogram entry (histogram[j]:
            # passes that accepted j drafts), and the passes that had no drafts
            # (K = 0 from the per-batch-size table), one token each; the last
            # pass may accept drafts past the image's end, so that part is
            # counted low by at most K. The count of streamed deltas is only a
            # lower bound, because vLLM merges deltas when the consumer falls behind.
            verify_passes = sum(metrics.histogram)
            verified_tokens = sum((j + 1) * count for j, count in enumerate(metrics.histogram))
            passes = 1 + verify_passes + max(0, len(tokens) - 1 - verified_tokens)
        image = await asyncio.to_thread(self.decoder, self.raster(tokens, grid), grid)
        return image, ImageStats(tokens=len(tokens), forward_passes=passes)
