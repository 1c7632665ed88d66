"""Ask a running `vllm-sjd serve` for one image with the openai client; write it to a PNG.

    python scripts/request_image.py --url http://127.0.0.1:8000 --prompt "..." --output demo.png

Waits (up to --wait seconds) for the server to become healthy first, then
prints the request, the response's SJD figures and where the PNG went.
"""

import argparse
import base64
import json
import time
import urllib.request


def wait_until_healthy(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"no healthy server at {url} after {seconds:.0f} s")
        time.sleep(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--size", default=None, help="WxH; the model's default if omitted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--output", default="demo.png")
    parser.add_argument("--wait", type=float, default=600)
    args = parser.parse_args()

    from openai import OpenAI

    wait_until_healthy(args.url, args.wait)
    client = OpenAI(base_url=f"{args.url}/v1", api_key="EMPTY")
    extra = {"seed": args.seed}
    if args.guidance_scale is not None:
        extra["guidance_scale"] = args.guidance_scale
    request = {"prompt": args.prompt, "n": 1, "response_format": "b64_json", **extra}
    if args.size:
        request["size"] = args.size
    print("request:", json.dumps(request))
    started = time.monotonic()
    result = client.images.generate(
        prompt=args.prompt, n=1, response_format="b64_json",
        **({"size": args.size} if args.size else {}), extra_body=extra,
    )
    elapsed = time.monotonic() - started
    with open(args.output, "wb") as f:
        f.write(base64.b64decode(result.data[0].b64_json))
    print("response: sjd =", json.dumps(result.data[0].model_extra["sjd"]),
          "| request:", json.dumps(result.model_extra["sjd"]))
    print(f"wrote {args.output} in {elapsed:.1f} s")


if __name__ == "__main__":
    main()
