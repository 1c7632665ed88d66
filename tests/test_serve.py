"""`vllm serve MODEL --speculative-config '{"method": "sjd", ...}'` decodes with SJD."""

import re

import pytest
import requests

from tests.server import vllm_server
from vllm_sjd.testing.tiny_llama import greedy_continuation, token_text

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def server(peaked_model, tmp_path_factory):
    args = ["--speculative-config", '{"method": "sjd", "num_speculative_tokens": 8}',
            "--max-model-len", "512"]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # The image endpoint is on too: a text model must get a clean refusal there.
    with vllm_server(peaked_model, args, log, env={"VLLM_PLUGINS": "sjd,sjd_images"}) as url:
        yield url


def test_completion_is_greedy_exact_and_speculative(server, peaked_model):
    prompt = [5, 6, 7]
    response = requests.post(
        f"{server}/v1/completions",
        json={"model": str(peaked_model), "prompt": prompt, "max_tokens": 40,
              "min_tokens": 40, "ignore_eos": True, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["text"]
    expected = greedy_continuation(peaked_model, prompt, 40)
    assert text.split() == [token_text(t) for t in expected]

    metrics = requests.get(f"{server}/metrics", timeout=10).text
    def counter(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", metrics, re.M))
    drafts = counter("vllm:spec_decode_num_drafts_total")
    accepted = counter("vllm:spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and accepted > drafts  # more than one accepted draft per pass


def test_a_text_model_gets_a_400_from_the_image_endpoint(server, peaked_model):
    response = requests.post(f"{server}/v1/images/generations", json={"prompt": "a cat"}, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "cannot make images" in error["message"] and "LlamaForCausalLM" in error["message"]
    # ... and the server keeps serving.
    assert requests.get(f"{server}/health", timeout=5).status_code == 200
