"""`vllm-sjd selfcheck`: does SJD work on this machine, in vLLM's real engine?

Builds tiny random checkpoints of every family the plugin serves in a
temporary folder (nothing is downloaded) and checks, on whatever platform vLLM
runs here (a GPU, or the CPU build):

- greedy SJD gives greedy AR's image tokens, for each family;
- a guided pair (classifier-free guidance) gives the same tokens with SJD and
  AR, each the argmax of the guided logits transformers computes;
- SJD's samples follow the exact AR distribution (a short chi-square run);
- guided greedy ZipAR gives the tokens transformers gives fed ZipAR's context;
- the image endpoint of `vllm serve` returns a PNG of the requested size;
- tensor parallel 2 gives tensor parallel 1's tokens, when two devices are
  present (two GPUs, or two CPU cores on the CPU build).

Prints a table (check, result, seconds) and exits non-zero on any failure.
"""

import argparse
import gc
import os
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vllm_sjd.selfcheck_cases import (
    CAPTION,
    CHI_SQUARE,
    FAMILY_CASES,
    GUIDANCE_SCALE,
    TENSOR_PARALLEL,
    FamilyCase,
    lumina_test_layout,
    serve_and_fetch_png,
)

SJD_WINDOW = 8
# The family checks' SJD engines also run the row lookahead (its raster
# positions on this platform's runner); lossless, so greedy SJD is still AR.
SJD_ROW_LOOKAHEAD = 2
ZIPAR_WINDOW = 3  # of the 8 codes a row at 128 px: rows overlap
# Pass criterion of the chi-square run: sampling noise alone falls below it
# once in 10^4 runs; a wrong q falls far below.
ALPHA = 1e-4
# Guided logits: engine vs float64 transformers reference, times the scale.
GUIDED_TOLERANCE = 0.05
# A GPU engine's KV cache: small, so engines start fast beside other work.
GPU_KV_CACHE_BYTES = 512 << 20


@dataclass
class CheckResult:
    name: str
    result: str  # "ok", "FAIL", or "skipped"
    seconds: float
    detail: str = ""


class Options:
    def __init__(self, dtype: str, eager: bool | None, only: list[str]):
        self.on_gpu = _has_gpu()
        self.dtype = dtype
        # CUDA graphs on a GPU (the path users run), eager on the CPU build.
        self.eager = (not self.on_gpu) if eager is None else eager
        self.only = only

    def wanted(self, name: str) -> bool:
        return not self.only or any(word.lower() in name.lower() for word in self.only)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@contextmanager
def engine(model: Path, options: Options, sjd: dict | None = None, **kwargs):
    """A real vLLM engine; shut down (and its memory freed) on exit."""
    from vllm import LLM

    settings = dict(
        model=str(model), dtype=options.dtype, enforce_eager=options.eager, seed=0,
        max_model_len=512, disable_log_stats=False,
    )
    if options.on_gpu:
        settings["kv_cache_memory_bytes"] = GPU_KV_CACHE_BYTES
    if sjd is not None:
        # Every step verifies the whole window: the checks are of SJD's steps on
        # this platform, not of when the dynamic window would skip them.
        settings["speculative_config"] = {
            "method": "sjd", "dynamic_num_speculative_tokens": "off", **sjd}
    llm = LLM(**{**settings, **kwargs})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        if options.on_gpu:
            import torch

            torch.cuda.empty_cache()


def accepted_tokens(llm) -> int:
    return sum(
        int(getattr(m, "value", 0) or 0)
        for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens"
    )


def first_difference(a: list[list[int]], b: list[list[int]]) -> str:
    for image, (x, y) in enumerate(zip(a, b)):
        if x != y:
            at = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            return f"image {image}: first differs at token {at} of {len(x)}"
    return "" if len(a) == len(b) else f"{len(a)} against {len(b)} images"


def check_family(case: FamilyCase, folder: Path, options: Options) -> list[CheckResult]:
    """Greedy (and, where the case has one, guided) images with AR, then SJD."""
    start = time.monotonic()
    model = case.build(folder)
    tokens, guided, guided_seconds = {}, {}, 0.0
    sjd_settings = {"num_speculative_tokens": SJD_WINDOW, "row_lookahead": SJD_ROW_LOOKAHEAD}
    for mode, sjd in (("ar", None), ("sjd", sjd_settings)):
        with engine(model, options, sjd, **case.engine_kwargs) as llm:
            requests = case.requests(llm, model)
            outputs = llm.generate(requests.prompts, requests.params, use_tqdm=False)
            tokens[mode] = [list(o.outputs[0].token_ids) for o in outputs]
            for grid, image in zip(requests.grids, tokens[mode]):
                grid.codes(image)  # raises if a forced token is out of place
            if requests.guided is not None:
                guided_start = time.monotonic()
                outputs = llm.generate(*requests.guided, use_tqdm=False)
                guided[mode] = [(list(o.prompt_token_ids), list(o.outputs[0].token_ids))
                                for o in outputs]
                guided_seconds += time.monotonic() - guided_start
    results = []
    difference = first_difference(tokens["ar"], tokens["sjd"])
    results.append(CheckResult(
        f"greedy SJD == AR: {case.name}", "FAIL" if difference else "ok",
        time.monotonic() - start - guided_seconds,
        difference or f"{len(tokens['ar'])} images, {sum(map(len, tokens['ar']))} tokens",
    ))
    if guided:
        reference_start = time.monotonic()
        detail = first_difference([t for _, t in guided["ar"]], [t for _, t in guided["sjd"]])
        if not detail:
            detail = case.guided_reference_mismatch(model, guided["sjd"], GUIDANCE_SCALE,
                                                    GUIDED_TOLERANCE)
        seconds = guided_seconds + time.monotonic() - reference_start
        results.append(CheckResult(
            f"guided pair (scale {GUIDANCE_SCALE:g}): {case.name}", "FAIL" if detail else "ok",
            seconds, detail or "SJD == AR == transformers' guided argmax",
        ))
    return results


def check_chi_square(folder: Path, options: Options, sjd_settings: dict | None = None,
                     prepare=None) -> CheckResult:
    """`sjd_settings` and `prepare(llm)` let a test swap in a proposer with a known fault."""
    from vllm import SamplingParams

    from vllm_sjd.testing.stats import chi_square_pvalue
    from vllm_sjd.testing.tiny_llama import build_tiny_llama, exact_continuation_probs

    start = time.monotonic()
    c = CHI_SQUARE
    model = build_tiny_llama(folder, **c.model)
    prompt = list(c.prompt)
    exact = exact_continuation_probs(model, prompt, c.length, temperature=c.temperature,
                                     top_k=c.top_k)
    params = SamplingParams(temperature=c.temperature, top_k=c.top_k, max_tokens=c.length,
                            min_tokens=c.length, ignore_eos=True)
    sjd = {"num_speculative_tokens": c.window, "initial_drafts": c.initial_drafts,
           **(sjd_settings or {})}
    with engine(model, options, sjd, max_num_seqs=256) as llm:
        if prepare is not None:
            prepare(llm)
        outputs = llm.generate([{"prompt_token_ids": prompt}] * c.samples, params,
                               use_tqdm=False)
        accepted = accepted_tokens(llm)
    samples = [tuple(o.outputs[0].token_ids) for o in outputs]
    p = chi_square_pvalue(samples, exact)
    detail = f"p = {p:.3g} over {c.samples} samples of {len(exact)} outcomes, {accepted} drafts accepted"
    ok = p > ALPHA and accepted > 0
    return CheckResult("SJD samples the AR distribution (chi-square)", "ok" if ok else "FAIL",
                       time.monotonic() - start, detail)


def check_zipar(folder: Path, options: Options) -> CheckResult:
    """Guided greedy ZipAR (rows overlapping) == transformers fed ZipAR's context: raster
    positions for the fed tokens, on this platform's runner."""
    import torch
    from transformers import ChameleonForConditionalGeneration

    from vllm_sjd.config import ZipARConfig
    from vllm_sjd.core.zipar import raster_tokens
    from vllm_sjd.image_generation import image_sampling_params
    from vllm_sjd.testing.tiny_chameleon import build_tiny_chameleon
    from vllm_sjd.testing.zipar_reference import greedy_zipar

    start = time.monotonic()
    model = build_tiny_chameleon(folder, sharpness=3.0)
    layout = lumina_test_layout()
    grid = layout.grid(128, 128)
    order = ZipARConfig(window=ZIPAR_WINDOW).order_for(grid)
    uncond = layout.unconditional_prompt_token_ids(None, 128, 128)
    params = image_sampling_params(grid, temperature=0, guidance_scale=GUIDANCE_SCALE,
                                   unconditional_prompt_token_ids=uncond)
    params.max_tokens = order.num_tokens
    spec = {"method": "zipar", "window": ZIPAR_WINDOW}
    with engine(model, options, None, speculative_config=spec) as llm:
        out = llm.generate(layout.prompt(CAPTION, 128, 128), params, use_tqdm=False)[0]
    tokens = raster_tokens(out.outputs[0].token_ids, order, grid)
    reference = ChameleonForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
    expected = greedy_zipar(reference, list(out.prompt_token_ids), uncond, grid, ZIPAR_WINDOW,
                            GUIDANCE_SCALE)
    difference = first_difference([expected], [tokens])
    return CheckResult("guided greedy ZipAR == transformers", "FAIL" if difference else "ok",
                       time.monotonic() - start,
                       difference or f"W {ZIPAR_WINDOW}, {order.forward_passes} passes for "
                                     f"{grid.num_tokens} tokens")


def check_endpoint(folder: Path, options: Options) -> CheckResult:
    start = time.monotonic()
    detail = serve_and_fetch_png(folder, options.dtype, options.eager,
                                 GPU_KV_CACHE_BYTES if options.on_gpu else None)
    ok = detail.startswith("PNG")
    return CheckResult("image endpoint returns a PNG", "ok" if ok else "FAIL",
                       time.monotonic() - start, detail)


def two_devices(options: Options) -> bool:
    import torch

    if options.on_gpu:
        return torch.cuda.device_count() >= 2
    return (os.cpu_count() or 1) >= 2


def check_tensor_parallel(folder: Path, options: Options) -> CheckResult:
    from vllm_sjd.testing.tiny_llama import build_tiny_llama

    name = "tensor parallel 2 == tensor parallel 1"
    if not two_devices(options):
        return CheckResult(name, "skipped", 0.0, "one device")
    start = time.monotonic()
    t = TENSOR_PARALLEL
    model = build_tiny_llama(folder, **t.model)
    prompts = [{"prompt_token_ids": list(p)} for p in t.prompts]
    tokens = {}
    for size in (1, 2):
        bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
        if size == 2 and not options.on_gpu:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core set per rank
        try:
            with engine(model, options, {"num_speculative_tokens": SJD_WINDOW},
                        tensor_parallel_size=size) as llm:
                outputs = llm.generate(prompts, t.params(), use_tqdm=False)
        finally:
            if bind is None:
                os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
            else:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        tokens[size] = [list(o.outputs[0].token_ids) for o in outputs]
    difference = first_difference(tokens[1], tokens[2])
    return CheckResult(name, "FAIL" if difference else "ok", time.monotonic() - start,
                       difference or f"{len(prompts)} seeded and greedy requests")


def run_checks(checks, report=print) -> list[CheckResult]:
    """Run (name, function) pairs; a check that raises fails with its error."""
    results = []
    for name, function in checks:
        start = time.monotonic()
        try:
            produced = function()
        except Exception as error:  # noqa: BLE001 - a failed check must not stop the others
            message = " ".join(traceback.format_exception_only(type(error), error)).split()
            produced = [CheckResult(name, "FAIL", time.monotonic() - start,
                                    " ".join(message)[:300])]
        for result in produced if isinstance(produced, list) else [produced]:
            results.append(result)
            report(format_row(result))
    return results


TABLE_HEADER = f"{'check':<48} {'result':<8} {'seconds':>7}  detail"


def format_row(result: CheckResult) -> str:
    return f"{result.name:<48} {result.result:<8} {result.seconds:>7.1f}  {result.detail}"


def planned_checks(workdir: Path, options: Options) -> list[tuple[str, object]]:
    checks = []
    for case in FAMILY_CASES:
        checks.append((f"greedy SJD == AR: {case.name}",
                       lambda case=case: check_family(case, workdir / case.slug, options)))
    checks.append(("SJD samples the AR distribution (chi-square)",
                   lambda: check_chi_square(workdir / "chi_square", options)))
    checks.append(("guided greedy ZipAR == transformers",
                   lambda: check_zipar(workdir / "zipar", options)))
    checks.append(("image endpoint returns a PNG",
                   lambda: check_endpoint(workdir / "endpoint", options)))
    checks.append(("tensor parallel 2 == tensor parallel 1",
                   lambda: check_tensor_parallel(workdir / "tensor_parallel", options)))
    return [(name, check) for name, check in checks if options.wanted(name)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vllm-sjd selfcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=[], metavar="WORD",
                        help="run only the checks whose names contain one of these words")
    parser.add_argument("--dtype", default="float32",
                        help="dtype of the engines (default float32: exact greedy comparisons)")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=None,
                        help="enforce eager mode (default: CUDA graphs on a GPU, eager on CPU)")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    options = Options(args.dtype, args.eager, args.only)
    with tempfile.TemporaryDirectory(prefix="vllm-sjd-selfcheck-") as workdir:
        checks = planned_checks(Path(workdir), options)
        if not checks:
            print(f"vllm-sjd selfcheck: no check matches {args.only}", file=sys.stderr)
            return 2
        print(platform_line(options), TABLE_HEADER, sep="\n", flush=True)
        results = run_checks(checks, report=lambda row: print(row, flush=True))
    failed = [r for r in results if r.result == "FAIL"]
    passed = sum(r.result == "ok" for r in results)
    # Again in one piece: vLLM's logs interleave with the rows above.
    print("", platform_line(options), TABLE_HEADER, sep="\n")
    for result in results:
        print(format_row(result))
    print(f"{passed} passed, {len(failed)} failed, "
          f"{sum(r.result == 'skipped' for r in results)} skipped")
    if failed:
        print("Please report this table and the output of `python -m vllm.collect_env` at "
              "the project's issue tracker.")
    return 1 if failed else 0


def platform_line(options: Options) -> str:
    import torch
    import vllm

    device = torch.cuda.get_device_name(0) if options.on_gpu else "CPU"
    return (f"vllm-sjd selfcheck: vLLM {vllm.__version__}, torch {torch.__version__}, {device}, "
            f"dtype {options.dtype}, {'eager' if options.eager else 'CUDA graphs'}")
