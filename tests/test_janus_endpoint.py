"""Janus-Pro on the image endpoint: `vllm-sjd serve` on a tiny transformers-format checkpoint."""

import base64
import io

import pytest
import torch
from PIL import Image

from tests.server import vllm_server
from vllm_sjd.layouts.janus import JanusImageLayout
from vllm_sjd.testing.tiny_janus import IMAGE_SIZE, build_tiny_janus, load_reference, reference_guided_greedy

pytestmark = pytest.mark.engine

CAPTION = "a red circle on black background"


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    return build_tiny_janus(tmp_path_factory.mktemp("janus"), seed=3)


@pytest.fixture(scope="module")
def client(janus_dir, tmp_path_factory):
    from openai import OpenAI

    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["--max-model-len", "256", "--served-model-name", "tiny-janus",
            "--speculative-config", '{"method": "sjd", "num_speculative_tokens": 8}']
    with vllm_server(janus_dir, args, log, launcher="vllm-sjd") as url:
        yield OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)


def test_a_guided_greedy_caption_is_transformers_guided_greedy_image(client, janus_dir):
    from transformers import AutoConfig, AutoTokenizer

    config, tokenizer = AutoConfig.from_pretrained(janus_dir), AutoTokenizer.from_pretrained(janus_dir)
    layout = JanusImageLayout.from_config(config)
    ids = tokenizer(layout.prompt(CAPTION, IMAGE_SIZE, IMAGE_SIZE))["input_ids"]
    reference = load_reference(janus_dir)
    side = IMAGE_SIZE // 16
    codes = reference_guided_greedy(reference, ids, layout.unconditional_of(ids, tokenizer),
                                    5.0, side * side)
    with torch.no_grad():
        pixels = reference.decode_image_tokens(torch.tensor([codes]))  # [1, H, W, 3] in [-1, 1]
    expected = ((pixels[0].clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).numpy()

    result = client.images.generate(prompt=CAPTION, extra_body={"temperature": 0})
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB")
    assert result.size == f"{IMAGE_SIZE}x{IMAGE_SIZE}" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert image.tobytes() == expected.tobytes()
    assert result.model_extra["sjd"]["guidance_scale"] == 5.0  # Janus's recipe
    figures = result.data[0].model_extra["sjd"]
    assert figures["tokens"] == side * side and figures["forward_passes"] < side * side
    assert result.usage.input_tokens == len(ids)


def test_janus_streams_seeded_images_like_the_other_families(client):
    body = dict(prompt="a blue square", extra_body={"seed": 9})
    events = list(client.images.generate(stream=True, partial_images=1, **body))
    assert [e.type for e in events][-1] == "image_generation.completed"
    assert events[-1].b64_json == client.images.generate(**body).data[0].b64_json
    with pytest.raises(Exception, match="supported sizes: 128x128"):
        client.images.generate(prompt="a cat", size="256x256")
