"""The training scenes and their pixels: sampling, rendering, tensors, PSNR."""

from __future__ import annotations

import math
from dataclasses import replace
from multiprocessing import get_context

import numpy as np
import torch

from vllm_sjd.demo import scenes as sc


def training_scenes(args, seed: int, count: int) -> list[sc.Scene]:
    """The scene grammar's scenes; with `--object-fills flat` every object is
    drawn in one flat shade, so fewer codes stand for each colour and shape."""
    scenes = sc.sample_dataset(seed, count)
    if args.object_fills == "varied":
        return scenes
    return [replace(s, objects=tuple(replace(o, fill="flat") for o in s.objects)) for s in scenes]


def _render_chunk(scenes):
    return np.stack([sc.render(s) for s in scenes])


def render_all(scenes, workers: int = 2) -> np.ndarray:
    chunks = [scenes[i:i + 256] for i in range(0, len(scenes), 256)]
    with get_context("fork").Pool(workers) as pool:
        parts = pool.map(_render_chunk, chunks)
    return np.concatenate(parts)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1], on the uint8 scale."""
    a8 = ((a.clamp(-1, 1) + 1) * 127.5).round()
    b8 = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = ((a8 - b8) ** 2).mean().item()
    return 10 * math.log10(255.0**2 / max(mse, 1e-10))
