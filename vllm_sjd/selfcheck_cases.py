"""What `vllm-sjd selfcheck` runs: the tiny checkpoints, their requests, the served PNG.

Each family case builds a tiny random checkpoint of the family's real format
(vllm_sjd/testing) and makes greedy image requests at sizes that keep a CPU run
short; the Lumina-mGPT case adds a guided pair checked against transformers.
"""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CAPTION = "a red circle on a black background"
GUIDANCE_SCALE = 3.0


@dataclass
class Requests:
    prompts: list
    params: list
    grids: list
    guided: tuple[list, list] | None = None  # (prompts, params) of guided pairs


@dataclass
class FamilyCase:
    name: str
    slug: str
    build: Callable[[Path], Path]
    requests: Callable[[object, Path], Requests]
    engine_kwargs: dict = field(default_factory=dict)
    # (model, [(prompt ids, tokens)], scale, tolerance) -> "" or what is wrong
    guided_reference_mismatch: Callable | None = None


def _greedy(grid, **kwargs):
    from vllm_sjd.image_generation import image_sampling_params

    return image_sampling_params(grid, temperature=0, **kwargs)


def lumina_test_layout():
    from vllm_sjd.layouts.chameleon import ChameleonImageLayout

    return ChameleonImageLayout(target_size=128)  # 8x8 codes a square image


def _build_lumina(folder: Path) -> Path:
    from vllm_sjd.testing.tiny_chameleon import build_tiny_chameleon

    return build_tiny_chameleon(folder, sharpness=3.0)


def _lumina_requests(llm, model: Path) -> Requests:
    layout = lumina_test_layout()
    sizes = [(128, 128), next((w, h) for w, h in layout.sizes if w != h and w * h <= 128 * 128)]
    grids = [layout.grid(*size) for size in sizes]
    square = grids[0]
    guided_params = _greedy(
        square, guidance_scale=GUIDANCE_SCALE,
        unconditional_prompt_token_ids=layout.unconditional_prompt_token_ids(None, 128, 128),
    )
    return Requests(
        prompts=[layout.prompt(CAPTION, *size) for size in sizes],
        params=[_greedy(grid) for grid in grids],
        grids=grids,
        guided=([layout.prompt(CAPTION, 128, 128)], [guided_params]),
    )


def _lumina_guided_mismatch(model: Path, guided, scale: float, tolerance: float) -> str:
    import torch

    from vllm_sjd.testing.tiny_chameleon import GuidedReference

    layout = lumina_test_layout()
    grid = layout.grid(128, 128)
    reference = GuidedReference(model)
    for prompt_ids, tokens in guided:
        logits = reference.guided_logits(
            prompt_ids, layout.unconditional_prompt_token_ids(None, 128, 128), tokens, scale, grid
        )
        chosen = logits.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
        off = torch.nonzero(chosen < logits.max(dim=1).values - tolerance * scale).flatten()
        if len(off):
            return f"tokens at {off[:5].tolist()} are not the guided argmax"
    return ""


def _build_anole(folder: Path) -> Path:
    from vllm_sjd.testing.tiny_chameleon import build_tiny_chameleon

    # Anole draws 512x512 only: 32x32 codes and their row ends need 1.1k positions.
    return build_tiny_chameleon(folder, lumina=False, sharpness=3.0, max_position_embeddings=2048)


def _anole_requests(llm, model: Path) -> Requests:
    from vllm_sjd.layouts.chameleon import AnoleImageLayout

    layout = AnoleImageLayout()
    grid = layout.grid(*layout.default_size)
    return Requests([layout.prompt(CAPTION, *layout.default_size)], [_greedy(grid)], [grid])


def _emu3_layout():
    from vllm_sjd.layouts.emu3 import Emu3ImageLayout
    from vllm_sjd.testing.tiny_emu3 import vocabulary_map

    return Emu3ImageLayout(vocabulary_map(), image_area=96 * 96)  # 12x12 codes


def _build_emu3(folder: Path) -> Path:
    from vllm_sjd.testing.tiny_emu3 import build_tiny_emu3

    return build_tiny_emu3(folder)


def _emu3_requests(llm, model: Path) -> Requests:
    from vllm_sjd.layouts.emu3 import generate_size

    layout = _emu3_layout()
    sizes = [generate_size("1:1", 96 * 96), generate_size("4:3", 96 * 96)]
    grids = [layout.grid(*size) for size in sizes]
    return Requests([layout.prompt(CAPTION, *s) for s in sizes], [_greedy(g) for g in grids], grids)


def _build_llamagen(folder: Path) -> Path:
    from vllm_sjd.testing.tiny_llamagen import build_tiny_llamagen, build_tiny_t5

    build_tiny_t5(folder / "t5")
    return build_tiny_llamagen(folder / "model", seed=1)


def _llamagen_requests(llm, model: Path) -> Requests:
    from vllm_sjd.families import image_layout_for
    from vllm_sjd.llamagen_text import LlamaGenTextEncoder

    encoder = LlamaGenTextEncoder(model.parent / "t5", model)
    layout = image_layout_for(llm.llm_engine.model_config.hf_config)
    grid = layout.grid(*layout.default_size)
    return Requests(encoder.prompts([CAPTION]), [_greedy(grid)], [grid])


def _build_janus(folder: Path) -> Path:
    from vllm_sjd.testing.tiny_janus import build_tiny_janus

    return build_tiny_janus(folder, sharpness=3.0)


def _janus_requests(llm, model: Path) -> Requests:
    from vllm_sjd.families import image_layout_for

    layout = image_layout_for(llm.llm_engine.model_config.hf_config)  # 8x8 codes, 128 px
    grid = layout.grid(*layout.default_size)
    return Requests([layout.prompt(CAPTION, *layout.default_size)], [_greedy(grid)], [grid])


FAMILY_CASES = [
    FamilyCase("Lumina-mGPT", "lumina", _build_lumina, _lumina_requests,
               engine_kwargs={"max_model_len": 1024},
               guided_reference_mismatch=_lumina_guided_mismatch),
    FamilyCase("Anole", "anole", _build_anole, _anole_requests,
               engine_kwargs={"max_model_len": 2048}),
    FamilyCase("Emu3-Gen", "emu3", _build_emu3, _emu3_requests),
    FamilyCase("LlamaGen-T2I", "llamagen", _build_llamagen, _llamagen_requests,
               engine_kwargs={"skip_tokenizer_init": True, "enable_prompt_embeds": True}),
    FamilyCase("Janus-Pro", "janus", _build_janus, _janus_requests),
]


@dataclass(frozen=True)
class ChiSquareRun:
    """A context-dependent toy model: a q from the wrong slot would be visibly wrong."""

    model: dict = field(default_factory=lambda: dict(preference=0.0, sharpness=2.0, seed=1))
    prompt: tuple = (7, 12, 30)
    length: int = 4
    temperature: float = 0.6
    top_k: int = 2  # 2**4 = 16 outcomes
    samples: int = 4000
    window: int = 3  # shorter than the continuation: drafts are recycled
    # The default (coupled) drafting; fresh slots drawn from the newest verified
    # row, so every slot's q is a real distribution (a wrong one shows).
    initial_drafts: str = "last_distribution"


CHI_SQUARE = ChiSquareRun()


@dataclass(frozen=True)
class TensorParallelRun:
    model: dict = field(default_factory=lambda: dict(preference=2.0, sharpness=1.0, seed=0))
    prompts: tuple = ((5, 6, 7), (9, 10, 11, 12), (40, 41))

    def params(self):
        from vllm import SamplingParams

        return [
            SamplingParams(temperature=1.0, seed=11, max_tokens=40, min_tokens=40, ignore_eos=True),
            SamplingParams(temperature=0.7, top_k=8, seed=12, max_tokens=33, min_tokens=33,
                           ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=25, min_tokens=25, ignore_eos=True),
        ]


TENSOR_PARALLEL = TensorParallelRun()

SERVED_NAME = "sjd-selfcheck"
SERVER_START_SECONDS = 600


def serve_and_fetch_png(folder: Path, dtype: str, eager: bool, kv_cache_bytes: int | None) -> str:
    """Serve a tiny Lumina-mGPT with SJD, POST one image request: "PNG ..." or what failed."""
    from PIL import Image

    from vllm_sjd.testing.tiny_chameleon import build_tiny_chameleon, write_tiny_vqgan

    model = build_tiny_chameleon(folder / "model", sharpness=3.0)
    write_tiny_vqgan(model)  # the VQ decoder the endpoint turns tokens into pixels with
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        str(Path(sys.executable).parent / "vllm"), "serve", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
        "--served-model-name", SERVED_NAME, "--max-model-len", "1024",
        "--speculative-config",
        '{"method": "sjd", "num_speculative_tokens": 8, "dynamic_num_speculative_tokens": "off"}',
        "--additional-config", '{"sjd_image": {"target_size": 128}}',
        *(["--enforce-eager"] if eager else []),
        *(["--kv-cache-memory-bytes", str(kv_cache_bytes)] if kv_cache_bytes else []),
    ]
    env = {**os.environ, "VLLM_PLUGINS": "sjd,sjd_images"}
    log_path = folder / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            if not _wait_healthy(url, server):
                return f"server did not start: {_tail(log_path)}"
            body = json.dumps({"model": SERVED_NAME, "prompt": CAPTION, "size": "160x96",
                               "response_format": "b64_json"}).encode()
            request = urllib.request.Request(f"{url}/v1/images/generations", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=300) as response:
                    reply = json.load(response)
            except urllib.error.HTTPError as error:
                return f"HTTP {error.code}: {error.read()[:300]!r}"
            image = Image.open(io.BytesIO(base64.b64decode(reply["data"][0]["b64_json"])))
            if image.format != "PNG" or image.size != (160, 96):
                return f"got {image.format} {image.size}, asked for PNG (160, 96)"
            return f"PNG {image.size[0]}x{image.size[1]}"
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def _wait_healthy(url: str, server: subprocess.Popen) -> bool:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    return False


def _tail(path: Path, lines: int = 3) -> str:
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])[-400:]
