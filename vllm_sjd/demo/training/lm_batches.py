"""The language model's training data: per-token loss weights, probe labels
and padded batches, all in the image-token order."""

from __future__ import annotations

import numpy as np
import torch

from vllm_sjd.demo import scenes as sc
from vllm_sjd.demo.scorer import CHROMA_THRESHOLD
from vllm_sjd.demo.training.design import (
    DOWNSAMPLE,
    FULL_SOFTMAX_POSITIONS,
    GRID,
    IMAGE_TOKENS,
    UNCOND_PROB,
    in_image_token_order,
)


def object_cells(images: np.ndarray) -> np.ndarray:
    """[N, GRID, GRID] bool: the code cells holding any object pixel, by the
    scorer's test (chroma at least CHROMA_THRESHOLD; backgrounds are achromatic)."""
    rgb = images.astype(np.float32) / 255.0
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)  # [N, H, W]
    n = images.shape[0]
    cells = chroma.reshape(n, GRID, DOWNSAMPLE, GRID, DOWNSAMPLE).max(axis=(2, 4))
    return cells >= CHROMA_THRESHOLD


def image_token_weights(cells: np.ndarray, object_weight: float) -> np.ndarray:
    """[N, GRID * (GRID + 1) + 1] loss weights in image-token order: object_weight
    on object cells, 1 elsewhere (end-of-line and end of image included)."""
    return in_image_token_order(np.where(cells, object_weight, 1.0).astype(np.float32), 1.0, 1.0)


# --lm-aux-weight: classes of the auxiliary probe, read at every position that
# predicts a code, for the cell it predicts. Shape and colour of the object
# that covers the cell teach the image positions to read the caption's words
# for that object; row and column teach them where in the 2-D grid they are
# (the model sees a 1-D stream with end-of-line tokens).
AUX_CLASSES = {"shape": len(sc.SHAPES), "colour": len(sc.COLOURS), "row": GRID, "column": GRID}
AUX_FROM_CAPTION = [list(AUX_CLASSES).index(k) for k in ("shape", "colour")]
AUX_MIN_COVER = 0.1  # share of a cell an object must cover to name its shape and colour


def auxiliary_labels(scenes) -> np.ndarray:
    """[N, len(AUX_CLASSES), image tokens] class ids in image-token order; -100
    where there is none (end-of-line, end of image; shape and colour of cells no
    object covers)."""
    rows, columns = np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij")
    colours = list(sc.COLOURS)
    labels = []
    for scene in scenes:
        cover = sc.object_coverage(scene, GRID)  # [objects, GRID, GRID]
        owner, covered = cover.argmax(0), cover.max(0) >= AUX_MIN_COVER
        shape = np.array([sc.SHAPES.index(o.shape) for o in scene.objects])[owner]
        colour = np.array([colours.index(o.colour) for o in scene.objects])[owner]
        cells = np.stack([np.where(covered, shape, -100), np.where(covered, colour, -100),
                          rows, columns])
        labels.append(in_image_token_order(cells, -100, -100))
    return np.stack(labels).astype(np.int64)


def image_targets(seq) -> slice:
    """Where a sequence's image tokens sit among the targets [T-1] (shifted by one)."""
    return slice(len(seq) - IMAGE_TOKENS - 1, len(seq) - 1)


def auxiliary_batch(seqs, length: int, labels: np.ndarray) -> torch.Tensor:
    """[B, len(AUX_CLASSES), T-1] labels aligned with make_batch's targets."""
    aux = torch.full((len(seqs), labels.shape[1], length - 1), -100, dtype=torch.long)
    for r, s in enumerate(seqs):
        aux[r, :, image_targets(s)] = torch.from_numpy(labels[r])
    return aux


def make_batch(seqs, length: int, gen: torch.Generator, image_weights=None):
    """Right-padded ids [B, T], targets [B, T-1] (-100 outside the image part),
    FULL_SOFTMAX_POSITIONS sampled target positions per row, and per-target loss
    weights [B, T-1] (0 outside the image part; `image_weights[r]` or 1 inside)."""
    b = len(seqs)
    ids = torch.full((b, length), 3, dtype=torch.long)
    targets = torch.full((b, length - 1), -100, dtype=torch.long)
    weights = torch.zeros((b, length - 1), dtype=torch.float32)
    sample = torch.empty((b, FULL_SOFTMAX_POSITIONS), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        span = image_targets(s)
        targets[r, span] = ids[r, span.start + 1:span.stop + 1]
        weights[r, span] = 1.0 if image_weights is None else torch.from_numpy(image_weights[r])
        sample[r] = span.start + torch.randint(IMAGE_TOKENS, (FULL_SOFTMAX_POSITIONS,), generator=gen)
    return ids, targets, sample, weights


class TrainingBatches:
    """Batches of the training sequences, epoch after epoch in a fresh shuffled
    order; UNCOND_PROB of them without their caption (for guidance)."""

    def __init__(self, cond, uncond, image_weights: np.ndarray, aux_labels: np.ndarray | None,
                 size: int, length: int, gen: torch.Generator):
        self.cond, self.uncond = cond, uncond
        self.image_weights, self.aux_labels = image_weights, aux_labels
        self.size, self.length, self.gen = size, length, gen
        self.order = torch.randperm(len(cond), generator=gen)
        self.cursor = 0

    def next(self):
        """make_batch's ids, targets, sample, weights and the probe's labels (None without)."""
        if self.cursor + self.size > len(self.cond):
            self.order, self.cursor = torch.randperm(len(self.cond), generator=self.gen), 0
        picks = self.order[self.cursor:self.cursor + self.size].tolist()
        self.cursor += self.size
        drop = torch.rand(len(picks), generator=self.gen) < UNCOND_PROB
        seqs = [self.uncond[i] if d else self.cond[i] for i, d in zip(picks, drop.tolist())]
        ids, targets, sample, weights = make_batch(seqs, self.length, self.gen,
                                                   self.image_weights[picks])
        aux = None
        if self.aux_labels is not None:
            labels = self.aux_labels[picks].copy()
            labels[np.ix_(drop.numpy(), AUX_FROM_CAPTION)] = -100  # no caption to read them from
            aux = auxiliary_batch(seqs, self.length, labels)
        return ids, targets, sample, weights, aux
