#!/usr/bin/env python
"""Latency of an image with and without streamed partial images, one server, one run.

    .venv/bin/python benchmarks/streaming_latency.py --images 16 --in-flight 1 4

Starts `vllm-sjd serve` on the bundled demo model (SJD, its defaults) and
sends the same seeded requests both ways, alternating request by request so
that both see the same machine: plain (one JSON answer) and streamed with
`partial_images` 3 (the latency is until the completed event). With more than
one in flight, each slot alternates. Reports median and p90 latency per way
and their ratio, the partial images received and when the first arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from server_load import percentile, start_server, stop_server  # noqa: E402

CAPTIONS = ["a red circle on a blue background", "two green squares", "a yellow triangle",
            "three small stars"]


async def one(client, i: int, streamed: bool) -> tuple[float, int, float | None]:
    body = dict(prompt=CAPTIONS[i // 2 % len(CAPTIONS)], extra_body={"seed": 100 + i // 2})
    started = time.perf_counter()
    if not streamed:
        await client.images.generate(**body)
        return time.perf_counter() - started, 0, None
    partials, first = 0, None
    async for event in await client.images.generate(stream=True, partial_images=3, **body):
        if event.type == "image_generation.partial_image":
            partials += 1
            first = first or time.perf_counter() - started
    return time.perf_counter() - started, partials, first


async def run(port: int, images: int, in_flight: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    results = {False: [], True: []}
    partials: list[int] = []
    first_partials: list[float] = []
    queue = list(range(2 * images))  # even: plain, odd: streamed (same seed as its pair)

    async def worker() -> None:
        while queue:
            i = queue.pop(0)
            seconds, got, first = await one(client, i, streamed=bool(i % 2))
            results[bool(i % 2)].append(seconds)
            if i % 2:
                partials.append(got)
                first_partials.append(first)

    async with client:
        await asyncio.gather(*(worker() for _ in range(in_flight)))
    plain, streamed = results[False], results[True]
    return {
        "in_flight": in_flight, "images_each_way": images,
        "plain_median_s": round(statistics.median(plain), 3),
        "plain_p90_s": round(percentile(plain, 90), 3),
        "streamed_median_s": round(statistics.median(streamed), 3),
        "streamed_p90_s": round(percentile(streamed, 90), 3),
        "streamed_over_plain": round(statistics.median(streamed) / statistics.median(plain), 3),
        "partial_images_per_image": round(statistics.mean(partials), 2),
        "first_partial_median_s": round(statistics.median(first_partials), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="images each way, per in-flight level")
    ap.add_argument("--in-flight", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--port", type=int, default=8124)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "streaming")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    server = start_server({"method": "sjd"}, args.port, args.out / "server.log")
    try:
        asyncio.run(run(args.port, 2, 1))  # warm-up
        rows = [asyncio.run(run(args.port, args.images, c)) for c in args.in_flight]
    finally:
        stop_server(server)
    for row in rows:
        print(json.dumps(row), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
