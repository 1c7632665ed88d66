#!/usr/bin/env bash
# Serve the bundled demo model with SJD, ask it for one image, write the PNG.
#   scripts/run-demo.sh [PROMPT] [OUTPUT.png]
# Needs the environment scripts/install-cpu.sh builds (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."
prompt=${1:-"a large blue square in the center on a white background"}
output=${2:-demo.png}
port=${PORT:-8000}
log=${LOG:-demo-server.log}
echo "starting vllm-sjd serve (demo model, SJD K=16) on port $port; log in $log"
.venv/bin/vllm-sjd serve --port "$port" >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
.venv/bin/python scripts/request_image.py --url "http://127.0.0.1:$port" \
    --prompt "$prompt" --output "$output"
grep -E "vllm.sjd.images|sjd_images" "$log" | sed 's/^/server: /' | tail -8 || true
