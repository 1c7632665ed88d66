#!/usr/bin/env python
"""SJD2's fine-tuning recipe (vllm_sjd/sjd2_finetune.py): `--help` for the flags."""

from vllm_sjd.sjd2_finetune import main

if __name__ == "__main__":
    main()
