"""An engine that dies mid-image: the image route answers 500, and /health stops saying 200.

The tiny Lumina-mGPT-shaped model is served with a proposer that raises inside
the engine for one seed (tests/faulty_proposers.py::CrashingProposer).
"""

import time

import pytest
import requests

from tests.faulty_proposers import CrashingProposer
from tests.server import vllm_server
from vllm_sjd.testing.tiny_chameleon import build_tiny_chameleon, write_tiny_vqgan

pytestmark = pytest.mark.engine


def test_an_engine_error_gets_a_500_and_health_stops_answering_200(tmp_path_factory):
    model = build_tiny_chameleon(tmp_path_factory.mktemp("lumina"), sharpness=3.0)
    write_tiny_vqgan(model)
    spec = '{"method": "sjd", "num_speculative_tokens": 4, "proposer": "tests.faulty_proposers.CrashingProposer"}'
    args = ["--speculative-config", spec, "--additional-config", '{"sjd_image": {"target_size": 128}}',
            "--max-model-len", "512"]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with vllm_server(model, args, log, env={"VLLM_PLUGINS": "sjd,sjd_images"}) as url:
        route = f"{url}/v1/images/generations"
        body = {"prompt": "a red circle", "size": "128x128", "temperature": 1.0}
        assert requests.post(route, json={**body, "seed": 1}, timeout=120).status_code == 200
        failed = requests.post(route, json={**body, "seed": CrashingProposer.CRASH_SEED}, timeout=120)
        assert failed.status_code == 500, failed.text
        error = failed.json()["error"]
        assert error["message"] and error["type"]
        deadline = time.monotonic() + 30
        while True:
            try:
                status = requests.get(f"{url}/health", timeout=5).status_code
            except requests.ConnectionError:
                status = None  # vLLM stops a server whose engine died
            if status != 200:
                break
            assert time.monotonic() < deadline, "/health still answers 200 after the engine died"
            time.sleep(0.5)
    assert "CrashingProposer: the engine dies here" in log.read_text()
