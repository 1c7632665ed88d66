"""POST /v1/images/generations on `vllm serve`: OpenAI's client, errors, the API key.

A tiny Lumina-mGPT-shaped checkpoint with a random 16x VQGAN in its folder is
served with SJD; the official `openai` client asks for images.
"""

import base64
import io

import pytest
import requests
from PIL import Image

from tests.server import vllm_server
from tests.tiny_chameleon import build_tiny_chameleon, write_tiny_vqgan
from vllm_sjd.models.chameleon_layout import ChameleonImageLayout

pytestmark = pytest.mark.engine

API_KEY = "test-key"
LAYOUT = ChameleonImageLayout(target_size=128)
PROMPT = "a red circle on a black background"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = build_tiny_chameleon(tmp_path_factory.mktemp("lumina"), sharpness=3.0)
    write_tiny_vqgan(model)
    args = [
        "--speculative-config", '{"method": "sjd", "num_speculative_tokens": 8}',
        "--additional-config", '{"sjd_image": {"target_size": 128}}',
        "--max-model-len", "512", "--api-key", API_KEY, "--served-model-name", "tiny-lumina",
        # A model default that a request can see: greedy unless it names a temperature.
        "--override-generation-config", '{"temperature": 0}',
    ]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with vllm_server(model, args, log, env={"VLLM_PLUGINS": "sjd,sjd_images"}) as url:
        yield url, log


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key=API_KEY, max_retries=0)


def post(server, body, key=API_KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{server[0]}/v1/images/generations", headers=headers, timeout=120,
                         **({"json": body} if body is not None else kwargs))


def test_openai_client_gets_pngs_of_the_requested_size_with_sjd_figures(client, server):
    size = (160, 96)
    grid = LAYOUT.grid(*size)
    result = client.images.generate(
        model="tiny-lumina", prompt=PROMPT, n=2, size=f"{size[0]}x{size[1]}",
        response_format="b64_json", extra_body={"seed": 7, "guidance_scale": 3.0, "temperature": 1.0},
    )
    assert len(result.data) == 2
    pictures = []
    for item in result.data:
        png = base64.b64decode(item.b64_json)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        image = Image.open(io.BytesIO(png))
        assert image.size == size and image.mode == "RGB"
        pictures.append(image.tobytes())
        stats = item.model_extra["sjd"]
        assert stats["tokens"] == grid.num_tokens
        assert 0 < stats["forward_passes"] <= grid.num_tokens
        assert stats["tokens_per_pass"] == pytest.approx(stats["tokens"] / stats["forward_passes"], abs=1e-3)
    assert pictures[0] != pictures[1]  # seeds 7 and 8
    assert result.model_extra["sjd"]["guidance_scale"] == 3.0
    assert result.model_extra["sjd"]["temperature"] == 1.0
    # The same seed gives the same picture.
    again = client.images.generate(
        model="tiny-lumina", prompt=PROMPT, n=1, size=f"{size[0]}x{size[1]}",
        response_format="b64_json", extra_body={"seed": 7, "guidance_scale": 3.0, "temperature": 1.0},
    )
    assert Image.open(io.BytesIO(base64.b64decode(again.data[0].b64_json))).tobytes() == pictures[0]
    # Progress and figures reach the server log.
    log = server[1].read_text()
    assert "image(s) of 160x96" in log and "tokens/pass" in log


def test_a_request_without_temperature_takes_the_models_default(server):
    # The server's generation config says temperature 0: unseeded requests agree.
    body = {"prompt": PROMPT, "size": "128x128", "guidance_scale": 1}
    first, second = post(server, body), post(server, body)
    assert first.status_code == second.status_code == 200, first.text
    assert first.json()["sjd"]["temperature"] == 0.0
    assert first.json()["sjd"]["top_k"] == LAYOUT.default_top_k
    assert first.json()["data"][0]["b64_json"] == second.json()["data"][0]["b64_json"]
    sampled = [post(server, {**body, "temperature": 1.0, "seed": s}).json() for s in (1, 2)]
    assert sampled[0]["sjd"]["temperature"] == 1.0
    assert sampled[0]["data"][0]["b64_json"] != sampled[1]["data"][0]["b64_json"]


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"prompt": PROMPT, "size": "100x100"}, "size", "supported sizes: 256x64"),
        ({"prompt": PROMPT, "n": 0}, "n", "greater than or equal to 1"),
        ({"prompt": PROMPT, "n": 11}, "n", "less than or equal to 10"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"prompt": "   "}, "prompt", "blank"),
        ({"prompt": "red " * 1001}, "prompt", "at most 4000 characters"),
        ({"prompt": "red " * 600}, "prompt", "exceed the model's context"),
        ({"prompt": PROMPT, "n": "2"}, "n", "valid integer"),
        ({"prompt": 5}, "prompt", "valid string"),
        ({"prompt": PROMPT, "response_format": "url"}, "response_format", "b64_json"),
        ({"prompt": PROMPT, "guidance_scale": 0.5}, "guidance_scale", "greater than or equal to 1"),
        ({"prompt": PROMPT, "model": "dall-e-3"}, "model", "not 'dall-e-3'"),
        ({"prompt": PROMPT, "style": "vivid"}, "style", "Extra inputs"),
        ({}, "prompt", "Field required"),
    ],
)
def test_bad_requests_get_400_in_openais_error_shape(server, body, param, words):
    response = post(server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]


def test_malformed_json_gets_400_and_the_server_keeps_serving(server):
    response = post(server, None, data=b"{not json")
    assert response.status_code == 400
    ok = post(server, {"prompt": PROMPT, "size": "128x128", "guidance_scale": 1})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1


def test_the_api_key_guards_the_route(server):
    assert post(server, {"prompt": PROMPT}, key=None).status_code == 401
    assert post(server, {"prompt": PROMPT}, key="wrong").status_code == 401
