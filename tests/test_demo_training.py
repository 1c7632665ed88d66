"""scripts/train_demo_model.py: the same seed and step counts give the same checkpoint.

A few steps of every phase, twice, as the shipped model was trained (the
language model's loss under torch.compile, which without deterministic
kernels and a cold compile differed in the last bits between runs); another
seed, eager to save the compile time, must give other weights.
"""

import hashlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMALL_RUN = [
    "--budget-min", "0", "--scenes", "256", "--val-scenes", "16",
    "--vq-warmup-steps", "2", "--vq-crop-steps", "2", "--vq-full-steps", "2",
    "--lm-steps", "3", "--lm-eval-every", "3", "--polish-steps", "2",
]
FILES = ["model.safetensors", "vq/decoder.safetensors", "config.json", "tokenizer.json"]


def train(out: Path, seed: int = 3, *extra: str) -> dict[str, str]:
    subprocess.run([sys.executable, str(REPO / "scripts" / "train_demo_model.py"), *SMALL_RUN,
                    "--seed", str(seed), "--out", str(out), *extra],
                   check=True, cwd=REPO, capture_output=True)
    return {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in FILES}


def test_same_seed_same_checkpoint_other_seed_other_weights(tmp_path):
    first = train(tmp_path / "a")
    assert train(tmp_path / "b") == first
    other = train(tmp_path / "c", 4, "--no-compile")
    assert other["model.safetensors"] != first["model.safetensors"]
    assert other["vq/decoder.safetensors"] != first["vq/decoder.safetensors"]
