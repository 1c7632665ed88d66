"""Classifier-free guidance (CFG) as request pairs: what a guided request carries.

A request with guidance scale s > 1 is served as two engine requests: the
client's (conditional) one and an unconditional twin that the SJD scheduler
(patches/cfg_scheduler.py) creates from the token ids the request carries.
Both generate the same image tokens; the runner (patches/sjd_runner.py)
verifies and samples from the guided logits

    uncond + s * (cond - uncond)

inside the image span, copies the conditional request's tokens to the twin, and
the scheduler keeps the twin out of every client-visible output.

This module holds the request-level contract (SamplingParams.extra_args) and
the blend applied to a step's rows; plain torch, no vLLM internals.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vllm_sjd.contract import GUIDANCE_ARG, UNCONDITIONAL_REQUEST_SUFFIX

MAX_GUIDANCE_SCALE = 100.0


@dataclass(frozen=True)
class Guidance:
    """The guidance of a conditional request."""

    scale: float
    unconditional_prompt_token_ids: tuple[int, ...]


def guidance_extra_args(scale: float, unconditional_prompt_token_ids: Sequence[int] | None) -> dict:
    """SamplingParams.extra_args entries for guidance `scale` (none when scale == 1)."""
    scale = float(scale)
    if not 1.0 <= scale <= MAX_GUIDANCE_SCALE:
        raise ValueError(f"guidance_scale must be in [1, {MAX_GUIDANCE_SCALE:g}], got {scale:g}")
    if scale == 1.0:
        return {}
    ids = [int(t) for t in unconditional_prompt_token_ids or ()]
    if not ids:
        raise ValueError("guidance_scale > 1 needs the unconditional prompt's token ids")
    return {GUIDANCE_ARG: {"scale": scale, "unconditional_prompt_token_ids": ids}}


def guidance_of(extra_args: Mapping | None) -> Guidance | None:
    """The guidance a conditional request asks for, or None."""
    spec = (extra_args or {}).get(GUIDANCE_ARG)
    if not spec or "scale" not in spec:
        return None
    return Guidance(float(spec["scale"]), tuple(spec["unconditional_prompt_token_ids"]))


def unconditional_extra_args(extra_args: Mapping, conditional_request_id: str) -> dict:
    """The twin's extra_args: the same image layout, marked with its partner's id."""
    twin = {k: v for k, v in extra_args.items() if k != GUIDANCE_ARG}
    twin[GUIDANCE_ARG] = {"conditional_request_id": conditional_request_id}
    return twin


def conditional_partner_of(extra_args: Mapping | None) -> str | None:
    """For an unconditional twin, its conditional request's id; else None."""
    spec = (extra_args or {}).get(GUIDANCE_ARG)
    return spec.get("conditional_request_id") if spec else None


def unconditional_request_id(conditional_request_id: str) -> str:
    return conditional_request_id + UNCONDITIONAL_REQUEST_SUFFIX


def blend(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uncond + s * (cond - uncond), row-wise; `scale` broadcasts as [rows, 1]."""
    return torch.lerp(uncond, cond, scale)


def guide_pairs(
    logits: torch.Tensor,  # [sum(counts), W]: every request's rows, in batch order
    pairs: Sequence[tuple[int, int, float]],  # (conditional, twin, scale) batch indices
    counts: np.ndarray,  # [B] rows per request
    first_positions: np.ndarray,  # [B] absolute index of the token each request's row 0 decides
    entries: Sequence[tuple],  # per request: (ImageGrid | None, prompt length)
) -> None:
    """Both members' rows of each pair become uncond + s * (cond - uncond), in place.

    Rows of an image's header (and text before an image) keep the conditional logits.
    """
    first_row = np.cumsum(counts) - counts
    spans = []  # per pair: first cond row, first twin row, rows, header rows among them, scale
    for c, t, scale in pairs:
        n = int(counts[c])
        grid, prompt_len = entries[c]
        header = len(grid.header) if grid is not None else 0
        position = int(first_positions[c]) - prompt_len
        spans.append((int(first_row[c]), int(first_row[t]), n, min(max(header - position, 0), n), scale))
    if len(spans) <= SLICED_PAIRS:
        for span in spans:
            _guide_span(logits, *span)
        return
    cond_rows, twin_rows, scales = [], [], []
    for cond, twin, n, header_rows, scale in spans:
        scales += [1.0] * header_rows + [scale] * (n - header_rows)
        cond_rows += range(cond, cond + n)
        twin_rows += range(twin, twin + n)
    device = logits.device
    cond_rows = torch.tensor(cond_rows, device=device)
    twin_rows = torch.tensor(twin_rows, device=device)
    scale = torch.tensor(scales, dtype=logits.dtype, device=device)[:, None]
    guided = blend(logits[cond_rows], logits[twin_rows], scale)
    logits[cond_rows] = guided
    logits[twin_rows] = guided


# Up to this many pairs, each is blended on row slices (no index tensors): a few calls
# a pair, against one gather and two scatters for the whole batch beyond.
SLICED_PAIRS = 2


def _guide_span(logits: torch.Tensor, cond: int, twin: int, n: int, header_rows: int, scale: float):
    """One pair's rows, as slices: header rows keep the conditional logits."""
    cond_rows, twin_rows = logits[cond:cond + n], logits[twin:twin + n]
    if header_rows:
        twin_rows[:header_rows] = cond_rows[:header_rows]
    if header_rows < n:
        guided = blend(cond_rows[header_rows:], twin_rows[header_rows:], scale)
        cond_rows[header_rows:] = guided
        twin_rows[header_rows:] = guided


def leading_rows(num_requests: int, mirror: Sequence[tuple[int, int]]) -> np.ndarray | None:
    """[B'] int64: the batch rows that are not twins in `mirror` ((twin, source) batch
    rows), ascending; None without twins. A twin's rows, window and tokens are its source's."""
    if not mirror:
        return None
    twins = {twin for twin, _ in mirror}  # (Python: a step's few requests, no numpy calls)
    return np.array([i for i in range(num_requests) if i not in twins], dtype=np.int64)


def row_among_leading(num_requests: int, leading: np.ndarray, mirror: Sequence[tuple[int, int]]) -> list[int]:
    """Each request's row among `leading`'s; a twin's is its source's."""
    row = [-1] * num_requests
    for position, request in enumerate(leading.tolist()):
        row[request] = position
    for twin, source in mirror:
        row[twin] = row[source]
    return row
