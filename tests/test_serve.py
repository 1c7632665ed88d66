"""`vllm serve MODEL --speculative-config '{"method": "sjd", ...}'` decodes with SJD."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO_ROOT
from tests.tiny_model import greedy_continuation, token_text

pytestmark = pytest.mark.engine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(peaked_model, tmp_path_factory):
    port = free_port()
    env = dict(os.environ)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the plugin's default must do
    log = (tmp_path_factory.mktemp("serve") / "server.log").open("w")
    command = [
        str(Path(sys.executable).parent / "vllm"), "serve", str(peaked_model),
        "--speculative-config", '{"method": "sjd", "num_speculative_tokens": 8}',
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
    ]
    process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}; see {log.name}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve did not become healthy; see {log.name}")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


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
