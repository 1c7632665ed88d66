"""Replicated serving: two SJD engine replicas behind one OpenAI-compatible endpoint.

One command, vLLM's own data parallelism: `vllm-sjd serve --data-parallel-size 2`.
For a dense model vLLM runs each data-parallel rank as an independent engine
core (its own scheduler, KV cache and SJD worker) and the API server balances
requests over them. A guided image request is one client request: its
unconditional twin is made by the SJD scheduler of the engine that got it, so
the pair never straddles replicas.
"""

import base64
import io
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from tests.server import vllm_server

pytestmark = pytest.mark.engine

PROMPTS = [
    "a large red square on the left on a white background",
    "a small blue circle on the right on a white background",
    "a large green triangle in the center on a gray background",
    "a small yellow square on the left on a white background",
    "a large blue square on the right on a white background",
    "a small red circle at the top on a black background",
]


def successes_per_engine(url: str) -> dict[str, float]:
    """vLLM's finished-request counters by engine (data-parallel rank)."""
    counts: dict[str, float] = {}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:request_success_total{"):
            engine = re.search(r'engine="(\d+)"', line).group(1)
            counts[engine] = counts.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_two_replicas_behind_one_endpoint_both_serve_images(tmp_path):
    from openai import OpenAI

    log = tmp_path / "server.log"
    # One API server in front of both engines (vLLM's default with
    # --data-parallel-size N is N API servers sharing the port; one is lighter here).
    args = ["--max-model-len", "512", "--data-parallel-size", "2", "--api-server-count", "1"]
    # One core per replica (the engine's OpenMP threads), as for tensor parallel.
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    with vllm_server(None, args, log, env=env, launcher="vllm-sjd") as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=600)
        assert [m.id for m in client.models.list().data] == ["vllm-sjd-demo"]
        assert sum(successes_per_engine(url).values()) == 0

        def generate(i: int):
            return client.images.generate(
                model="vllm-sjd-demo", prompt=PROMPTS[i], n=1, response_format="b64_json",
                extra_body={"seed": 100 + i},
            )

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            results = list(pool.map(generate, range(len(PROMPTS))))
        served = successes_per_engine(url)

    for result in results:
        image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
        assert image.format == "PNG" and image.size == (64, 64)
        stats = result.data[0].model_extra["sjd"]
        assert stats["tokens"] == 16 * 17 + 1
        assert stats["forward_passes"] < stats["tokens"]  # SJD accepted drafts
    # Every request was finished by one of the two replicas, and both took some.
    assert sum(served.values()) == len(PROMPTS), served
    assert served["0"] >= 1 and served["1"] >= 1, served
