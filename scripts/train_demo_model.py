#!/usr/bin/env python
"""Train the bundled demo model: runs vllm_sjd.demo.training (its docstring
describes the recipe; --help prints it)."""

import os
import sys
from pathlib import Path

# Other jobs share the two cores: spinning OpenMP threads then wait on each
# other (a 2-thread step measured 4x slower than 1 thread); passive waiting
# avoids that. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vllm_sjd.demo.training.cli import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
