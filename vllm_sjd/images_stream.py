"""Streamed images for POST /v1/images/generations with `stream: true`, as OpenAI's API.

An autoregressive model draws its image row by row, so the server can send it
as it grows: with `partial_images` P (0-3), each image sends up to P events
`image_generation.partial_image` (the rows drawn so far, the rest neutral
grey, at evenly spaced fractions of its tokens; numbered from 0), then one
`image_generation.completed` (the image and its usage). With n > 1 the images'
events interleave; our field `sjd.index` says which image an event belongs
to, and the completed event's `sjd` carries that image's SJD figures. The
events are server-sent events (`event:` the type, `data:` the JSON), which
the openai client's `images.generate(..., stream=True)` iterates.

Partial images are decoded off the event loop, at most P per image; a client
that disconnects has its engine requests aborted (the route's response stops
iterating, which cancels the images' tasks).
"""

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator

from vllm_sjd.contract import RESPONSE_FIGURES_FIELD
from vllm_sjd.images_api import ImageJob, ImageService

PARTIAL = "image_generation.partial_image"
COMPLETED = "image_generation.completed"


async def stream_events(service: ImageService, job: ImageJob) -> AsyncIterator[dict]:
    """Every event of the job's images, as they come; raises what an image raised."""
    events: asyncio.Queue = asyncio.Queue()
    partials = job.request.partial_images or 0

    async def one_image(index: int, params) -> None:
        async def on_partial(partial_index: int, image) -> None:
            data = await asyncio.to_thread(job.encode, image)
            events.put_nowait(_event(PARTIAL, job, data, index, partial_image_index=partial_index))

        started = time.monotonic()
        image, stats = await service.one_image(
            job.engine_request_id(index), job.prompt, params, job.grid, partials, on_partial
        )
        data = await asyncio.to_thread(job.encode, image)
        figures = {**job.figures(service.speculative), **service.method_figures(job.grid),
                   **stats.as_dict(),
                   "seconds": round(time.monotonic() - started, 3)}
        events.put_nowait(_event(COMPLETED, job, data, index, usage=job.usage(stats.tokens),
                                 figures=figures))

    async def guarded(index: int, params) -> None:
        try:
            await one_image(index, params)
        except Exception as e:  # handed to the stream, which raises it
            events.put_nowait(e)

    tasks = [asyncio.ensure_future(guarded(i, p)) for i, p in enumerate(job.params)]
    try:
        remaining = len(tasks)
        while remaining:
            event = await events.get()
            if isinstance(event, Exception):
                raise event
            remaining -= event["type"] == COMPLETED
            yield event
    finally:
        # A client that left (or a failed image) stops the others: cancelling
        # a task closes its engine request's stream, which aborts it.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _event(kind: str, job: ImageJob, data: bytes, index: int, *, partial_image_index=None,
           usage=None, figures=None) -> dict:
    event = {"type": kind, "b64_json": base64.b64encode(data).decode(),
             "created_at": int(time.time()), **job.image_fields()}
    if partial_image_index is not None:
        event["partial_image_index"] = partial_image_index
    if usage is not None:
        event["usage"] = usage
    if job.request.safety_identifier and kind == COMPLETED:
        event["safety_identifier"] = job.request.safety_identifier
    event[RESPONSE_FIGURES_FIELD] = {"index": index, **(figures or {})}
    return event


def server_sent(event: dict) -> bytes:
    """One server-sent event: its type as the event name, the JSON as data."""
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
