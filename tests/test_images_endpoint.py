"""POST /v1/images/generations on `vllm serve`: OpenAI's client, errors, the API key.

A tiny Lumina-mGPT-shaped checkpoint with a random 16x VQGAN in its folder is
served with SJD; the official `openai` client asks for images.
"""

import base64
import http.client
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest
import requests
from PIL import Image

from tests.server import vllm_server
from vllm_sjd.testing.tiny_chameleon import build_tiny_chameleon, write_tiny_vqgan
from vllm_sjd.layouts.chameleon import ChameleonImageLayout

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
    # Dev mode: /collective_rpc, to read every worker's SJD state.
    env = {"VLLM_PLUGINS": "sjd,sjd_images", "VLLM_SERVER_DEV_MODE": "1"}
    with vllm_server(model, args, log, env=env) as url:
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
        ({"prompt": PROMPT, "response_format": "url"}, "response_format", "serves no image files"),
        ({"prompt": PROMPT, "output_format": "gif"}, "output_format", "png, jpeg, webp"),
        ({"prompt": PROMPT, "output_format": "svg"}, "output_format", "not served"),
        ({"prompt": PROMPT, "output_compression": 101}, "output_compression", "less than or equal to 100"),
        ({"prompt": PROMPT, "background": "transparent"}, "background", "no alpha channel"),
        ({"prompt": PROMPT, "frame_count": 4}, "frame_count", "still images"),
        ({"prompt": PROMPT, "svg": {"model": "x"}}, "svg", "not SVG"),
        ({"prompt": PROMPT, "complexity": "low"}, "complexity", "planning"),
        ({"prompt": PROMPT, "partial_images": 2}, "partial_images", "stream: true"),
        ({"prompt": PROMPT, "stream": True, "partial_images": 4}, "partial_images",
         "less than or equal to 3"),
        ({"prompt": PROMPT, "stream": True, "partial_images": -1}, "partial_images",
         "greater than or equal to 0"),
        ({"prompt": PROMPT, "stream": True, "size": "100x100"}, "size", "supported sizes"),
        ({"prompt": PROMPT, "quality": "ultra"}, "quality", "Input should be"),
        ({"prompt": PROMPT, "guidance_scale": 0.5}, "guidance_scale", "greater than or equal to 1"),
        ({"prompt": PROMPT, "model": "dall-e-3"}, "model", "not 'dall-e-3'"),
        ({"prompt": PROMPT, "negative_prompt": "blue"}, "negative_prompt", "Extra inputs"),
        ({}, "prompt", "Field required"),
    ],
)
def test_bad_requests_get_400_in_openais_error_shape(server, body, param, words):
    response = post(server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]


def test_every_field_of_openais_client_is_taken(client):
    size = (128, 128)
    pictures = {}
    for output_format, compression in (("jpeg", 90), ("jpeg", 5), ("webp", 50), ("png", None)):
        result = client.images.generate(
            model="tiny-lumina", prompt=PROMPT, n=1, size="auto", response_format="b64_json",
            output_format=output_format, output_compression=compression, background="opaque",
            quality="standard", style="natural", moderation="low", user="u-1",
            safety_identifier="hashed-user", stream=False, extra_body={"seed": 3},
        )
        data = base64.b64decode(result.data[0].b64_json)
        image = Image.open(io.BytesIO(data))
        assert image.format == output_format.upper() and image.size == size
        assert result.output_format == output_format and result.size == "128x128"
        assert result.background == "opaque" and result.quality == "standard"
        assert result.safety_identifier == "hashed-user"
        tokens = LAYOUT.grid(*size).num_tokens
        assert result.usage.output_tokens == tokens == result.usage.output_tokens_details.image_tokens
        assert result.usage.input_tokens > 0
        assert result.usage.total_tokens == result.usage.input_tokens + tokens
        pictures[output_format, compression] = data
    # The compression level is honoured: the same picture, fewer bytes.
    assert len(pictures["jpeg", 5]) < len(pictures["jpeg", 90]) / 2


def test_malformed_json_gets_400_and_the_server_keeps_serving(server):
    response = post(server, None, data=b"{not json")
    assert response.status_code == 400
    ok = post(server, {"prompt": PROMPT, "size": "128x128", "guidance_scale": 1})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1


def test_the_api_key_guards_the_route(server):
    assert post(server, {"prompt": PROMPT}, key=None).status_code == 401
    assert post(server, {"prompt": PROMPT}, key="wrong").status_code == 401


def engine_counts(server) -> tuple[float, float]:
    """(running, waiting) engine requests, twins included, from /metrics."""
    totals = {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0}
    for line in requests.get(f"{server[0]}/metrics", timeout=10).text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["vllm:num_requests_running"], totals["vllm:num_requests_waiting"]


def tracked_requests(server) -> list[list[str]]:
    """Request ids the SJD runner and proposer of every worker hold state for."""
    response = requests.post(f"{server[0]}/collective_rpc", json={"method": "sjd_tracked_requests"},
                             headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def wait_until_idle(server, timeout: float = 60.0) -> float:
    """Seconds until the engine runs nothing and no worker holds SJD state."""
    started = time.monotonic()
    while engine_counts(server) != (0.0, 0.0) or any(tracked_requests(server)):
        assert time.monotonic() - started < timeout, (engine_counts(server), tracked_requests(server))
        time.sleep(0.1)
    return time.monotonic() - started


def send_unread(server, body) -> http.client.HTTPConnection:
    """Send an image request without reading the answer; closing the connection hangs up."""
    address = urlparse(server[0])
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    connection.request("POST", "/v1/images/generations", body=json.dumps(body),
                       headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    return connection


def test_clients_that_hang_up_mid_image_stop_costing_the_engine(server):
    hung_up_before = server[1].read_text().count("hung up")
    body = {"prompt": PROMPT, "n": 4, "size": "256x64", "temperature": 1.0}
    connections = [send_unread(server, body) for _ in range(4)]
    # Hang up once all 16 images and their 16 twins are in the engine.
    deadline = time.monotonic() + 30
    while sum(engine_counts(server)) < 32:
        assert time.monotonic() < deadline, engine_counts(server)
        time.sleep(0.05)
    for connection in connections:
        connection.close()
    seconds = wait_until_idle(server)
    print(f"engine idle {seconds:.2f} s after 4 clients (32 engine requests) hung up")
    assert seconds < 10
    assert server[1].read_text().count("hung up") - hung_up_before == 4
    ok = post(server, {"prompt": PROMPT, "size": "128x128", "guidance_scale": 1})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1


def test_sixty_four_clients_at_once_some_hanging_up_and_some_malformed(server):
    sizes = [(128, 128), (160, 96), (96, 160), (256, 64)]
    bodies = [
        {"prompt": PROMPT, "size": "{}x{}".format(*sizes[i % 4]), "temperature": 1.0,
         **({"seed": 1000 + i} if i % 2 == 0 else {})}
        for i in range(64)
    ]
    leaving = set(range(0, 64, 8)) | set(range(1, 64, 8))  # 16 clients, 8 seeded, hang up
    malformed = [{"prompt": PROMPT, "size": "100x100"}, {"prompt": PROMPT, "n": 0},
                 {"prompt": PROMPT, "frame_count": 3}, {"prompt": PROMPT, "colour": "red"}]
    hung_up_before = server[1].read_text().count("hung up")
    with ThreadPoolExecutor(64) as pool:
        staying = {i: pool.submit(post, server, bodies[i]) for i in range(64) if i not in leaving}
        connections = [send_unread(server, bodies[i]) for i in sorted(leaving)]
        refused = [pool.submit(post, server, body) for body in malformed]
        refused.append(pool.submit(post, server, None, data=b'{"prompt": '))
        deadline = time.monotonic() + 60
        while engine_counts(server)[0] < 64:
            assert time.monotonic() < deadline, engine_counts(server)
            time.sleep(0.05)
        for connection in connections:
            connection.close()
        answers = {i: future.result() for i, future in staying.items()}
        refusals = [future.result() for future in refused]
    for i, response in answers.items():
        assert response.status_code == 200, response.text
        png = base64.b64decode(response.json()["data"][0]["b64_json"])
        assert Image.open(io.BytesIO(png)).size == sizes[i % 4]
    for response in refusals:
        assert response.status_code == 400 and response.json()["error"]["message"]
    wait_until_idle(server)
    assert server[1].read_text().count("hung up") - hung_up_before == len(leaving)
    # A seeded image made among 64 is the image it makes alone.
    seeded = [i for i in answers if "seed" in bodies[i]][:2]
    for i in seeded:
        alone = post(server, bodies[i])
        assert alone.json()["data"][0]["b64_json"] == answers[i].json()["data"][0]["b64_json"]


def sse_events(response) -> list[dict]:
    """The JSON of each server-sent event of a streamed response, checked against its name."""
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        event = json.loads(fields["data"])
        assert fields["event"] == event["type"]
        events.append(event)
    return events


def picture(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def test_streamed_images_grow_row_by_row_through_the_openai_client(client):
    body = dict(model="tiny-lumina", prompt=PROMPT, size="128x128",
                extra_body={"seed": 5, "temperature": 1.0})
    events = list(client.images.generate(stream=True, partial_images=2, **body))
    *partials, completed = events
    assert [e.type for e in partials] == ["image_generation.partial_image"] * len(partials)
    assert completed.type == "image_generation.completed"
    # Two marks (a third and two thirds of the tokens); a step that passes both sends one.
    assert 1 <= len(partials) <= 2
    assert [e.partial_image_index for e in partials] == list(range(len(partials)))
    grid = LAYOUT.grid(128, 128)
    assert completed.usage.output_tokens == grid.num_tokens and completed.size == "128x128"
    assert completed.sjd["index"] == 0 and completed.sjd["forward_passes"] > 0
    first = picture(partials[0].b64_json)
    assert first.size == (128, 128)
    # Rows not drawn yet are neutral grey; the finished image has none left.
    assert first.getpixel((64, 127)) == (128, 128, 128)
    final = picture(completed.b64_json)
    assert final.size == (128, 128)
    # The stream's image is the image: the same seed without streaming.
    plain = client.images.generate(**body)
    assert plain.data[0].b64_json == completed.b64_json
    # partial_images 0: the image in one event.
    only = list(client.images.generate(stream=True, partial_images=0, **body))
    assert [e.type for e in only] == ["image_generation.completed"]


def test_n_streamed_images_each_send_their_events(server):
    response = post(server, {"prompt": PROMPT, "size": "256x64", "n": 3, "stream": True,
                             "partial_images": 1, "temperature": 1.0})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    completed = [e for e in events if e["type"] == "image_generation.completed"]
    assert sorted(e["sjd"]["index"] for e in completed) == [0, 1, 2]
    for index in range(3):
        mine = [e["type"] for e in events if e["sjd"]["index"] == index]
        assert mine[-1] == "image_generation.completed" and len(mine) <= 2
    assert all(picture(e["b64_json"]).size == (256, 64) for e in events)


def test_a_streaming_client_that_hangs_up_stops_costing_the_engine(server):
    hung_up_before = server[1].read_text().count("streamed image request hung up")
    body = {"prompt": PROMPT, "n": 10, "size": "256x64", "temperature": 1.0, "stream": True,
            "partial_images": 3}
    connection = send_unread(server, body)
    deadline = time.monotonic() + 30
    while sum(engine_counts(server)) < 20:  # 10 images and their 10 twins
        assert time.monotonic() < deadline, engine_counts(server)
        time.sleep(0.05)
    connection.close()
    assert wait_until_idle(server) < 10
    assert server[1].read_text().count("streamed image request hung up") - hung_up_before == 1
