"""Start `vllm serve` as a subprocess for a test module and wait until it is healthy."""

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO_ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def vllm_server(model: Path | None, args: list[str], log_path: Path, env: dict | None = None,
                launcher: str = "vllm"):
    """Yields the server's base URL; stops the server afterwards.

    `launcher`: the console script that serves ("vllm", or "vllm-sjd", which
    serves the bundled demo model when given no model)."""
    port = free_port()
    environment = dict(os.environ)
    environment.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the plugin's default must do
    environment.update(env or {})
    command = [
        str(Path(sys.executable).parent / launcher), "serve", *([str(model)] if model else []),
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", *args,
    ]
    log = log_path.open("w")
    process = subprocess.Popen(
        command, env=environment, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}; see {log_path}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve did not become healthy; see {log_path}")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
