"""The playground page at GET /sjd: a prompt in, the image drawn as it streams.

Plain HTML and JavaScript (index.html, no build step) that calls the server's
own POST /v1/images/generations with `stream: true`. The page itself sits
outside /v1, so it loads without a key; where the server has --api-key (or
VLLM_API_KEY) the page asks for the key and sends it as vLLM's routes want it.
What the page needs to know of the server is written into it here.
"""

import functools
import html
import json
import os
from importlib.resources import files

from fastapi import Request
from fastapi.responses import HTMLResponse

PAGE_ROUTE = "/sjd"
_CONFIG_SLOT = "__SJD_PLAYGROUND_CONFIG__"


def page_config(service, args) -> dict:
    """The served model's settings the page shows: sizes, guidance, whether a key is needed."""
    layout = service.layout
    size = "{}x{}".format
    keys = getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]
    return {
        "model": service.model_name,
        "speculative": service.speculative,
        "sizes": [size(*s) for s in layout.sizes],
        "default_size": size(*layout.default_size),
        "default_guidance_scale": layout.default_guidance_scale,
        "api_key_required": any(keys),
    }


async def playground_page(raw: Request) -> HTMLResponse:
    config = getattr(raw.app.state, "sjd_playground", None)
    if config is None:
        reason = getattr(raw.app.state, "sjd_images_unavailable", "no image model is loaded")
        return HTMLResponse(f"<p>This server cannot make images: {html.escape(reason)}</p>", 404)
    # "</" could close the script element that holds the JSON.
    return HTMLResponse(_page().replace(_CONFIG_SLOT, json.dumps(config).replace("</", "<\\/")))


@functools.cache
def _page() -> str:
    """The page's HTML, read once per server."""
    return files(__package__).joinpath("index.html").read_text(encoding="utf-8")

