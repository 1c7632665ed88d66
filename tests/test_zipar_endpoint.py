"""ZipAR through the image endpoint: `vllm-sjd serve` on the demo model with
`{"method": "zipar", "window": 4}`, asked with the openai client."""

import base64
import io

import pytest
from PIL import Image

from tests.server import vllm_server
from vllm_sjd import demo

pytestmark = pytest.mark.engine

WINDOW = 4
CAPTION = "a large red circle on the left on a white background"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from openai import OpenAI

    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["--speculative-config", f'{{"method": "zipar", "window": {WINDOW}}}']
    with vllm_server(None, args, log, launcher="vllm-sjd") as url:
        yield OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def test_a_guided_greedy_image_is_transformers_greedy_zipar(client):
    """The endpoint reads the stream back into raster order: the image is the
    decode of a greedy ZipAR run with transformers, pixel for pixel."""
    from transformers import AutoTokenizer, ChameleonForConditionalGeneration
    import torch

    from vllm_sjd.image_generation import decode_image
    from vllm_sjd.testing.zipar_reference import greedy_zipar

    layout, size = demo.layout(), demo.IMAGE_SIZE
    grid = layout.grid(size, size)
    tokenizer = AutoTokenizer.from_pretrained(demo.MODEL_PATH)
    prompt = tokenizer(layout.prompt(CAPTION, size, size))["input_ids"]
    uncond = layout.unconditional_prompt_token_ids(tokenizer, size, size)
    model = ChameleonForConditionalGeneration.from_pretrained(
        demo.MODEL_PATH, dtype=torch.float32).eval()
    tokens = greedy_zipar(model, prompt, uncond, grid, WINDOW, layout.default_guidance_scale)
    expected = decode_image(tokens, grid, demo.to_codebook(), demo.load_decoder())

    result = client.images.generate(prompt=CAPTION, extra_body={"temperature": 0})
    assert png(result.data[0].b64_json).tobytes() == expected.tobytes()
    figures = {**result.model_extra["sjd"], **result.data[0].model_extra["sjd"]}
    assert figures["method"] == "zipar" and figures["window"] == WINDOW
    assert figures["tokens"] == grid.num_tokens and figures["forward_passes"] == 77


def test_streamed_zipar_images_grow_row_by_row(client):
    body = dict(prompt="a small blue square on the right", extra_body={"seed": 5})
    events = list(client.images.generate(stream=True, partial_images=2, **body))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"]
    final = events[-1].b64_json
    assert final == client.images.generate(**body).data[0].b64_json
    first = png(events[0].b64_json)
    # The first partial image shows the rows drawn so far; the rows below are grey.
    assert first.getpixel((first.width // 2, first.height - 1)) == (128, 128, 128)
    assert first.tobytes() != png(final).tobytes()
