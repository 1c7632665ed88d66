"""The bundled demo model: shipped complete, and `vllm-sjd serve` with no model serves it.

The server test is the README's main path: the demo checkpoint from the
package, SJD on, the image endpoint, the openai client; the picture is scored
against its caption only loosely (one image is a single sample), the
accuracies are measured in benchmarks/.
"""

import base64
import io
import json
import re

import pytest
import requests
from PIL import Image

from tests.server import vllm_server
from vllm_sjd import demo
from vllm_sjd.demo import scenes

MAX_CHECKPOINT_BYTES = 40 * 1024 * 1024


def test_the_checkpoint_ships_complete_and_small():
    files = {p.relative_to(demo.MODEL_PATH).as_posix(): p.stat().st_size
             for p in demo.MODEL_PATH.rglob("*") if p.is_file()}
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", demo.DECODER_FILE, "train_report.json"):
        assert name in files, name
    assert sum(files.values()) <= MAX_CHECKPOINT_BYTES
    report = json.loads((demo.MODEL_PATH / "train_report.json").read_text())
    assert report["reproduce"].startswith("python scripts/train_demo_model.py --seed ")
    grid = demo.layout().grid(scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)
    assert (grid.rows, grid.cols) == (16, 16)


def test_every_caption_word_is_in_the_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo.MODEL_PATH)
    layout = demo.layout()
    for scene in scenes.sample_dataset(7, 50):
        ids = tokenizer(layout.prompt(scene.caption, 64, 64))["input_ids"]
        assert tokenizer.unk_token_id not in ids, scene.caption
        assert ids[-3:] == list(layout.header(64, 64))


@pytest.mark.engine
def test_vllm_sjd_serve_without_a_model_serves_the_demo(tmp_path):
    from openai import OpenAI

    log = tmp_path / "server.log"
    with vllm_server(None, ["--max-model-len", "512"], log, launcher="vllm-sjd") as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["vllm-sjd-demo"]
        steps_before = verify_steps(url)
        result = client.images.generate(
            model="vllm-sjd-demo", prompt="a large red square on the left on a white background",
            n=2, response_format="b64_json", extra_body={"seed": 3},
        )
        steps = verify_steps(url) - steps_before
    stats = [image.model_extra["sjd"] for image in result.data]
    for image, image_stats in zip(result.data, stats):
        png = Image.open(io.BytesIO(base64.b64decode(image.b64_json)))
        assert png.format == "PNG" and png.size == (64, 64)
        assert image_stats["tokens"] == 16 * 17 + 1
        assert image_stats["forward_passes"] < image_stats["tokens"]  # SJD accepted drafts
    # Each image's passes are its prefill plus its verify steps, exactly as the
    # engine counted them, even with both images in flight at once.
    assert sum(s["forward_passes"] - 1 for s in stats) == steps
    text = log.read_text()
    assert "speculative" in text and "sjd" in text


def verify_steps(url: str) -> float:
    """vLLM's count of SJD verify steps so far (one per request per step)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^vllm:spec_decode_num_drafts_total\{[^}]*\} (\S+)$", text, re.M))
