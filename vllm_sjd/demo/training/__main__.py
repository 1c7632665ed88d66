"""python -m vllm_sjd.demo.training: the same as scripts/train_demo_model.py."""

import os

# See scripts/train_demo_model.py: set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from vllm_sjd.demo.training.cli import main  # noqa: E402

main()
