#!/usr/bin/env python
"""AR vs SJD under load, through the image endpoint of a real server, in one run.

    .venv/bin/python benchmarks/server_load.py --requests 128 --concurrency 64

For each configuration (plain AR, SJD at each window K, then each
--speculative-config given) it starts
`vllm-sjd serve` on the bundled demo model, keeps `--concurrency` image
requests in flight with the openai client (a closed loop: a new request is
sent as one finishes; every other request seeded), and reports images per
minute, latency per request (median, p90), forward passes and tokens per pass
(the response's sjd figures), and ratios against AR. `--hang-up N` makes N of
the requests clients that disconnect a second after asking, as the load test
does; they are left out of the figures. Writes results.json to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vllm_sjd.demo import evaluation as dq  # noqa: E402


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def start_server(spec: dict | None, port: int, log: Path) -> subprocess.Popen:
    spec = json.dumps(spec)  # None: "null", plain AR
    command = [str(REPO / ".venv" / "bin" / "vllm-sjd"), "serve", "--port", str(port),
               "--host", "127.0.0.1", "--speculative-config", spec]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.time() + 300
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see {log}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except requests.ConnectionError:
            pass
        if time.time() > deadline:
            raise SystemExit(f"the server did not start; see {log}")
        time.sleep(1)


def stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


async def closed_loop(port: int, bodies: list[dict], concurrency: int, hang_up: set[int],
                      speculative: bool) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY",
                         max_retries=0, timeout=1800)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)
    served: dict[int, tuple[float, dict]] = {}

    async def leave_early(body: dict) -> None:
        try:
            await client.images.generate(**body, timeout=1.0)
        except Exception:  # the timeout closes the connection: the client has gone
            pass

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            if i in hang_up:
                await leave_early(bodies[i])
                continue
            started = time.monotonic()
            result = await client.images.generate(**bodies[i])
            served[i] = (time.monotonic() - started, result.data[0].model_extra["sjd"])

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.monotonic() - started
    latencies = [latency for latency, _ in served.values()]
    tokens = [stats["tokens"] for _, stats in served.values()]
    # AR makes one token a pass; its streamed count can only undercount that.
    passes = [stats["forward_passes"] if speculative else stats["tokens"] for _, stats in served.values()]
    return {
        "images": len(served),
        "hung_up": len(hang_up),
        "wall_s": round(wall, 1),
        "images_per_min": round(60 * len(served) / wall, 1),
        "latency_median_s": round(statistics.median(latencies), 2),
        "latency_p90_s": round(percentile(latencies, 90), 2),
        "forward_passes_per_image": round(statistics.mean(passes), 1),
        "tokens_per_pass": round(sum(tokens) / sum(passes), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--windows", type=int, nargs="*", default=[16])
    ap.add_argument("--speculative-config", action="append", default=[], metavar="JSON",
                    help="a further configuration to run, e.g. with num_speculative_tokens_per_batch_size")
    ap.add_argument("--hang-up", type=int, default=0, help="requests whose clients leave after 1 s")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "server_load")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    captions = [scene.caption for scene in dq.captions_for(args.requests)]
    bodies = [{"prompt": caption, "n": 1, "response_format": "b64_json",
               **({"extra_body": {"seed": 1000 + i}} if i % 2 == 0 else {})}
              for i, caption in enumerate(captions)]
    # Spread the clients that leave evenly over the requests.
    hang_up = {1 + i * args.requests // args.hang_up for i in range(args.hang_up)}
    results = {"settings": vars(args) | {"out": str(args.out)}, "configs": {}}
    configs = {"AR": None}
    configs.update({f"SJD K={k}": {"method": "sjd", "num_speculative_tokens": k} for k in args.windows})
    configs.update({json.dumps(json.loads(c)): json.loads(c) for c in args.speculative_config})
    for index, (name, spec) in enumerate(configs.items()):
        process = start_server(spec, args.port, args.out / f"server-{index}.log")
        try:
            row = asyncio.run(closed_loop(args.port, bodies, args.concurrency, hang_up, spec is not None))
        finally:
            stop_server(process)
        ar = results["configs"].get("AR")
        if ar is not None:
            row["throughput_vs_ar"] = round(row["images_per_min"] / ar["images_per_min"], 2)
            row["latency_speedup"] = round(ar["latency_median_s"] / row["latency_median_s"], 2)
            row["step_compression"] = round(ar["forward_passes_per_image"] / row["forward_passes_per_image"], 2)
        results["configs"][name] = row
        print(name, json.dumps(row), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
