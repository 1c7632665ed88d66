"""scripts/train_demo_model.py: the same seed and step counts give the same checkpoint.

A few steps of every phase, twice, with --no-compile: torch.compile's kernels
can differ in the last bits between a cold and a warm compile cache, so only
the eager run is bit-identical (the script's docstring says so).
"""

import hashlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMALL_RUN = [
    "--budget-min", "0", "--scenes", "256", "--val-scenes", "16",
    "--vq-warmup-steps", "2", "--vq-crop-steps", "2", "--vq-full-steps", "2",
    "--lm-steps", "2", "--lm-eval-every", "2", "--polish-steps", "2", "--no-compile",
]
FILES = ["model.safetensors", "vq/decoder.safetensors", "config.json", "tokenizer.json"]


def train(out: Path, seed: int = 3) -> dict[str, str]:
    subprocess.run([sys.executable, str(REPO / "scripts" / "train_demo_model.py"), *SMALL_RUN,
                    "--seed", str(seed), "--out", str(out)], check=True, cwd=REPO, capture_output=True)
    return {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in FILES}


def test_same_seed_same_checkpoint_other_seed_other_weights(tmp_path):
    first = train(tmp_path / "a")
    assert train(tmp_path / "b") == first
    other = train(tmp_path / "c", seed=4)
    assert other["model.safetensors"] != first["model.safetensors"]
    assert other["vq/decoder.safetensors"] != first["vq/decoder.safetensors"]
