#!/usr/bin/env python
"""Markdown tables for RESULTS.md from the benchmark JSON files.

    python benchmarks/results_tables.py demo benchmarks/results/demo/results.json
    python benchmarks/results_tables.py drafting benchmarks/results/drafting/results.json
    python benchmarks/results_tables.py gpu benchmarks/results/forward_cost_7b_h100.json \\
        --compression benchmarks/results/demo/results.json
    python benchmarks/results_tables.py methods benchmarks/results/row_lookahead/results.json
    python benchmarks/results_tables.py overhead benchmarks/results/step_overhead_7b/step_overhead_7b_h200.json \
        --forward benchmarks/results/step_overhead_7b/forward_cost_7b_h200*.json \
        --compression benchmarks/results/drafting/results.json

Printing from the JSON keeps the published figures identical to the run's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ATTRIBUTES = ["background", "colour", "shape", "size", "position", "count", "caption", "checks_passed"]


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def demo_tables(results: dict) -> str:
    configs = results["vllm"]
    out = []
    rows = []
    for name, cfg in configs.items():
        for c, row in cfg["by_concurrency"].items():
            ratio = cfg["vs_AR"][c]
            rows.append([name, c, row["images"], fmt(row["passes_per_image"], 1), fmt(row["tokens_per_pass"]),
                         fmt(row["latency_median_s"]), fmt(row["latency_p90_s"]), fmt(row["images_per_min"], 1),
                         f"{ratio['pass_ratio']:.2f}x", f"{ratio['latency_speedup']:.2f}x",
                         f"{ratio['throughput_ratio']:.2f}x"])
    out.append(table(["config", "in flight", "images", "passes/image", "tokens/pass", "latency median s",
                      "latency p90 s", "images/min", "passes vs AR", "latency speed-up", "throughput vs AR"],
                     rows))

    parts = [k for k in next(iter(configs.values()))["profile"] if k != "total"]
    rows = []
    for name, cfg in configs.items():
        prof = cfg["profile"]
        passes = cfg["by_concurrency"]["1"]["passes_per_image"]
        other = prof["total"] - sum(prof[k] for k in parts)
        rows.append([name, fmt(passes, 1)] + [fmt(1000 * prof[k] / passes, 1) for k in parts]
                    + [fmt(1000 * other / passes, 1), fmt(1000 * prof["total"] / passes, 1)])
    out.append(table(["config", "passes/image"] + [f"{k} ms/pass" for k in parts] + ["rest ms/pass", "total ms/pass"],
                     rows))

    if "AR" in configs and all("step_parts_ms" in cfg for cfg in configs.values()):
        out.append(step_parts_table(configs))

    gt = results.get("ground_truth", {})
    base = results.get("torch_baseline")
    sources = [("renderer (ground truth)", gt.get("renders"), None),
               ("VQ round trip of the renders", gt.get("vq_roundtrip"), None),
               ("PyTorch loop", base and base["accuracy"], None)]
    sources += [(f"vLLM {k}", v["accuracy"], v.get("checks_z_vs_AR")) for k, v in configs.items()]
    rows = [[label, acc["n"]] + [fmt(acc.get(a)) for a in ATTRIBUTES] + ["" if z is None else fmt(z)]
            for label, acc, z in sources if acc is not None]
    out.append(table(["images from", "n"] + ATTRIBUTES + ["z (checks passed) vs AR"], rows))
    if base is None:
        return "\n\n".join(out)

    ar1 = configs["AR"]["by_concurrency"]["1"]
    rows = [["PyTorch/transformers loop, batch 1 (AR)", base["passes_per_image"], fmt(base["latency_median_s"]),
             fmt(base["latency_p90_s"]), fmt(base["images_per_min"], 1), "1.00x"]]
    for name, cfg in configs.items():
        for c in ("1", max(cfg["by_concurrency"], key=int)):
            row = cfg["by_concurrency"][c]
            rows.append([f"vLLM {name}, {c} in flight", fmt(row["passes_per_image"], 1), fmt(row["latency_median_s"]),
                         fmt(row["latency_p90_s"]), fmt(row["images_per_min"], 1),
                         f"{row['images_per_min'] / base['images_per_min']:.2f}x"])
    out.append(table(["how", "passes/image", "latency median s", "latency p90 s", "images/min",
                      "images/min vs PyTorch loop"], rows))
    e = base["entropy"]
    out.append(f"Per-token entropy of the guided distribution (PyTorch loop, {e['n']} tokens): "
               f"mean {e['mean']:.2f} nats, median {e['median']:.2f}, p90 {e['p90']:.2f}; "
               f"AR at 1 in flight: {ar1['latency_median_s']:.2f} s per image.")
    return "\n\n".join(out)


def step_parts_table(configs: dict) -> str:
    """One in flight, ms per forward pass by perf_counter, and the lean-step ratios:
    the rest of the step against AR's, and the speed-up against its limit
    (tokens per pass x AR's forward ms / this forward ms)."""
    ar = configs["AR"]["step_parts_ms"]
    ar_image = ar["wall"] * configs["AR"]["by_concurrency"]["1"]["passes_per_image"]
    parts = ["forward", "sampling + verification", "proposer", "runner other",
             "engine outside the runner", "rest"]
    rows = []
    for name, cfg in configs.items():
        timed, one = cfg["step_parts_ms"], cfg["by_concurrency"]["1"]
        limit = one["tokens_per_pass"] * ar["forward"] / timed["forward"]
        speed_up = ar_image / (timed["wall"] * one["passes_per_image"])
        rows.append([name, fmt(one["tokens_per_pass"]), fmt(timed["wall"])]
                    + [fmt(timed[k]) for k in parts]
                    + [f"{timed['rest'] / ar['rest']:.2f}x", f"{limit:.2f}x", f"{speed_up:.2f}x",
                       fmt(speed_up / limit)])
    return table(["config", "tokens/pass", "wall ms/pass"] + [f"{k} ms/pass" for k in parts]
                 + ["rest vs AR", "limit", "speed-up", "of the limit"], rows)


def drafting_table(results: dict) -> str:
    """Drafting and initial-draft modes at one request in flight, against vanilla SJD's best."""
    configs = results["vllm"]
    vanilla = max(cfg["by_concurrency"]["1"]["tokens_per_pass"] for name, cfg in configs.items()
                  if name.split(" ")[-1].startswith("independent/uniform"))
    rows = []
    for name, cfg in configs.items():
        row, ratio = cfg["by_concurrency"]["1"], cfg["vs_AR"]["1"]
        rows.append([name, fmt(row["passes_per_image"], 1), fmt(row["tokens_per_pass"]),
                     f"{row['tokens_per_pass'] / vanilla:.2f}x", fmt(row["latency_median_s"]),
                     f"{ratio['latency_speedup']:.2f}x", fmt(row.get("ms_per_pass"), 1),
                     fmt(cfg.get("window_state_mb_per_request"), 1),
                     fmt(cfg["accuracy"]["checks_passed"]), fmt(cfg.get("checks_z_vs_AR"))])
    return table(["config", "passes/image", "tokens/pass", "vs vanilla SJD's best", "latency median s",
                  "latency vs AR", "ms/pass", "window state MB/request", "checks passed", "z vs AR"],
                 rows)


def gpu_tables(cost: dict, demo: dict | None) -> str:
    out = [table(["attention", "batch", "context", "1-token pass ms", "K=8", "K=16", "K=32"],
                 [[r["attention"], r["batch"], r["context"], fmt(r["ms_q1"])]
                  + [fmt(r.get(f"ratio_K{k}")) for k in (8, 16, 32)]
                  for r in sorted(cost["rows"], key=lambda r: (r["attention"], r["batch"], r["context"]))])]
    if demo is None:
        return out[0]
    # Guided requests in flight c use batch 2c; c=1 -> B=2, c=4 -> B=8, c=16 -> B=32.
    rows = []
    for c, batch in (("1", 2), ("4", 8), ("16", 32)):
        for r in cost["rows"]:
            if r["attention"] != "flex" or r["batch"] != batch:
                continue
            cells = []
            for k in (8, 16, 32):
                compression = demo["vllm"][f"K{k}"]["by_concurrency"][c]["tokens_per_pass"]
                cells.append(f"{compression:.2f} / {r[f'ratio_K{k}']:.2f} = {compression / r[f'ratio_K{k}']:.2f}x")
            rows.append([c, batch, r["context"]] + cells)
    out.append(table(["guided requests in flight", "batch", "context", "K=8", "K=16", "K=32"], rows))
    return "\n\n".join(out)


def overhead_tables(overhead: dict, forwards: list[dict], drafting: dict) -> str:
    """The SJD step's non-forward ms beside the forward pass (GPU), and the projected latency
    speed-up: tokens per pass x (AR forward + AR's rest) / (SJD forward + SJD's rest)."""
    forward = {}  # (batch, q) -> fastest measured attention's ms
    for result in forwards:
        for r in result["rows"]:
            for key, ms in r.items():
                if key == "ms_q1" or key.startswith("ms_K"):
                    q = 1 if key == "ms_q1" else int(key[4:]) + 1
                    forward[r["batch"], q] = min(ms, forward.get((r["batch"], q), float("inf")))
    rows = {(r["pairs"], r["window"]): r for r in overhead["rows"]}
    parts, projected = [], []
    for (pairs, window), r in sorted(rows.items()):
        ar = rows[pairs, 0]
        fwd, fwd_ar = forward.get((2 * pairs, window + 1)), forward.get((2 * pairs, 1))
        parts.append([pairs, window or "AR", fmt(r["ms"]), fmt(r.get("sampling_ms")),
                      fmt(r.get("gpu_kernel_ms")), r.get("kernels", "-"), fmt(fwd)])
        if not window or fwd is None or fwd_ar is None:
            continue
        tokens = drafting["vllm"][f"K{window} coupled/above"]["by_concurrency"]["1"]["tokens_per_pass"]
        bare = tokens * fwd_ar / fwd
        with_rest = tokens * (fwd_ar + ar["ms"]) / (fwd + r["ms"])
        kernels_only = tokens * (fwd_ar + ar["gpu_kernel_ms"]) / (fwd + r["gpu_kernel_ms"])
        projected.append([pairs, window, fmt(tokens), f"{fmt(fwd_ar)} / {fmt(fwd)}",
                          f"{bare:.2f}x", f"{with_rest:.2f}x", f"{kernels_only:.2f}x"])
    return "\n\n".join([
        table(["guided requests", "K", "rest of step ms", "of which sampling ms", "GPU kernel ms",
               "kernels", "forward ms"], parts),
        table(["guided requests", "K", "tokens / pass (demo)", "forward ms AR / SJD",
               "speed-up, forward only", "with the rest of the step", "rest at GPU kernel time"],
              projected),
    ])


def methods_table(results: dict) -> str:
    """One row a configuration: passes, latency with one in flight, throughput under the
    most load, adherence with z against AR (the table of "ZipAR" and "Row lookahead")."""
    from vllm_sjd.demo.evaluation import z_two_proportions

    configs = results["vllm"]
    ar = configs["AR"]
    loads = sorted(ar["by_concurrency"], key=int)
    low, high = loads[0], loads[-1]
    header = ["configuration", f"passes / image, {high} in flight", "pass ratio",
              f"latency, {low} in flight (s)",
              "speed-up", f"images/min, {high} in flight", "vs AR", "captions right (z)",
              "checks passed (z)", "background right (z)", f"ms / pass, {low} in flight"]
    rows = []
    for name, cfg in configs.items():
        acc, ref = cfg["accuracy"], ar["accuracy"]
        busy, calm = cfg["by_concurrency"][high], cfg["by_concurrency"][low]

        def with_z(key, z):
            return f"{acc[key]:.3f}" if name == "AR" else f"{acc[key]:.3f} ({z:+.2f})"

        rows.append([
            name, fmt(busy["passes_per_image"], 1), fmt(cfg["vs_AR"][high]["pass_ratio"]),
            fmt(calm["latency_median_s"], 3), fmt(cfg["vs_AR"][low]["latency_speedup"]),
            fmt(busy["images_per_min"], 1), fmt(cfg["vs_AR"][high]["throughput_ratio"]),
            with_z("caption", cfg["caption_z_vs_AR"]),
            with_z("checks_passed", cfg["checks_z_vs_AR"]),
            with_z("background", z_two_proportions(acc["background"], ref["background"], acc["n"])),
            fmt(calm["ms_per_pass"]),
        ])
    return table(header, rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["demo", "drafting", "gpu", "methods", "overhead"])
    ap.add_argument("path", type=Path)
    ap.add_argument("--compression", type=Path, help="demo results.json whose step compression to project")
    ap.add_argument("--forward", type=Path, nargs="+", help="forward_cost_7b.py outputs (overhead)")
    args = ap.parse_args()
    data = json.loads(args.path.read_text())
    if args.kind == "demo":
        print(demo_tables(data))
    elif args.kind == "drafting":
        print(drafting_table(data))
    elif args.kind == "methods":
        print(methods_table(data))
    elif args.kind == "overhead":
        forwards = [json.loads(p.read_text()) for p in args.forward]
        print(overhead_tables(data, forwards, json.loads(args.compression.read_text())))
    else:
        demo = json.loads(args.compression.read_text()) if args.compression else None
        print(gpu_tables(data, demo))


if __name__ == "__main__":
    main()
