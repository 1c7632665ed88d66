"""LlamaGen-T2I on the image endpoint: the API server holds the T5 encoder.

`vllm-sjd serve` on a tiny LlamaGen checkpoint (LlamaGen's .pt format) with a
tiny FLAN-T5-shaped encoder and a tiny VQ-16 in its folder; captions become
prompt embeddings in the API server, the null caption the unconditional prompt.
"""

import base64
import io
import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from tests.server import vllm_server
from vllm_sjd.image_prompts import prompts_for
from vllm_sjd.layouts.llamagen import LlamaGenImageLayout
from vllm_sjd.testing.tiny_llamagen import (
    IMAGE_SIZE,
    build_tiny_llamagen,
    build_tiny_t5,
    load_state,
    reference_logits,
    tiny_config,
    write_tiny_vq16,
)

CAPTION = "a red circle on black background"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    model = build_tiny_llamagen(tmp_path_factory.mktemp("llamagen"), seed=2)
    # Its own folder: vLLM would read a .safetensors beside the model as model weights.
    vq_folder = tmp_path_factory.mktemp("vq16")
    return model, build_tiny_t5(tmp_path_factory.mktemp("t5")), write_tiny_vq16(vq_folder), vq_folder


@pytest.fixture(scope="module")
def server(folders, tmp_path_factory):
    model, t5, _, vq_folder = folders
    options = {"sjd_image": {"text_encoder": str(t5), "vq": str(vq_folder)}}
    args = ["--max-model-len", "256", "--served-model-name", "tiny-llamagen",
            "--speculative-config", '{"method": "sjd", "num_speculative_tokens": 8}',
            "--additional-config", json.dumps(options)]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with vllm_server(model, args, log, launcher="vllm-sjd") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="EMPTY", max_retries=0)


@pytest.mark.engine
def test_a_guided_greedy_caption_is_llamagens_guided_greedy_image(client, folders):
    model, t5, vq, _ = folders
    from vllm_sjd.llamagen_text import LlamaGenTextEncoder

    features = LlamaGenTextEncoder(t5, model).caption_features([CAPTION])[0]
    config, state = tiny_config(), load_state(model)
    layout = LlamaGenImageLayout.from_config(config)
    scale = layout.default_guidance_scale
    tokens: list[int] = []
    for _ in range(layout.grid(IMAGE_SIZE, IMAGE_SIZE).num_tokens):
        cond = reference_logits(config, state, features, tokens)[-1]
        uncond = reference_logits(config, state, None, tokens, len(features))[-1]
        tokens.append(int((uncond + scale * (cond - uncond)).argmax()))
    side = IMAGE_SIZE // 16
    expected = vq.to_pil(vq.decode(torch.tensor(tokens).view(1, side, side)))[0]

    result = client.images.generate(prompt=CAPTION, extra_body={"temperature": 0})
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and result.size == "128x128"
    assert image.convert("RGB").tobytes() == expected.tobytes()
    assert result.model_extra["sjd"]["guidance_scale"] == scale == 7.5
    figures = result.data[0].model_extra["sjd"]
    assert figures["tokens"] == len(tokens) and figures["forward_passes"] < len(tokens)
    # The caption's tokens: its words and </s>, as T5 tokenized them.
    assert result.usage.input_tokens == len(features) == len(CAPTION.split()) + 1


@pytest.mark.engine
def test_llamagen_streams_and_is_seeded_like_the_other_families(client):
    body = dict(prompt="a blue square", extra_body={"seed": 4})
    events = list(client.images.generate(stream=True, partial_images=2, **body))
    kinds = [e.type for e in events]
    assert kinds[-1] == "image_generation.completed"
    assert 1 <= kinds.count("image_generation.partial_image") <= 2
    plain = client.images.generate(**body)
    assert events[-1].b64_json == plain.data[0].b64_json
    other_seed = client.images.generate(prompt="a blue square", extra_body={"seed": 5})
    assert other_seed.data[0].b64_json != plain.data[0].b64_json


@pytest.mark.engine
def test_the_playground_offers_the_checkpoints_one_size(server):
    import requests

    page = requests.get(f"{server}/sjd", timeout=10).text
    assert '"sizes": ["128x128"]' in page and '"default_guidance_scale": 7.5' in page


def test_without_the_text_encoder_the_endpoint_says_what_to_add(folders, tmp_path):
    model, t5, _, _ = folders
    engine = SimpleNamespace(model_config=SimpleNamespace(
        hf_config=tiny_config(), enable_prompt_embeds=True, model=str(model)))
    layout = LlamaGenImageLayout.from_config(tiny_config())
    with pytest.raises(ValueError, match="text_encoder"):
        prompts_for(engine, layout, {})
    with pytest.raises(ValueError, match="sjd_image.text_encoder: .*no such folder"):
        prompts_for(engine, layout, {"text_encoder": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="text_encoder_dtype: 'float33'"):
        prompts_for(engine, layout, {"text_encoder": str(t5), "text_encoder_dtype": "float33"})
    engine.model_config.enable_prompt_embeds = False
    with pytest.raises(ValueError, match="--enable-prompt-embeds"):
        prompts_for(engine, layout, {"text_encoder": str(t5)})
