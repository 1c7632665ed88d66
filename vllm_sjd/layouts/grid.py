"""Image token layouts: which token each generated position must or may hold.

Every supported family generates an image as
    header (forced tokens) + h rows of (w codes [+ end-of-line]) + trailer (forced)
with codes drawn from one contiguous id range. Chameleon/Lumina-mGPT: header
image-start, height, width; rows closed by end-of-line; trailer end-of-image.
Emu3 has the same rows with its own tokens; LlamaGen has a bare grid.

`ImageGrid.constraints` answers, for a batch of positions at once, the forced
token (or -1) and the free range [low, high): SJD applies it per window slot,
to the verified distribution p and to fresh drafts. Plain torch, no vLLM.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

FREE = -1


class UnsupportedImageSize(ValueError):
    """A size the model cannot generate; the message lists the supported ones."""


@dataclass(frozen=True)
class ImageGrid:
    """One image's token layout."""

    width: int  # pixels
    height: int
    rows: int  # latent rows (h)
    cols: int  # codes per row (w)
    header: tuple[int, ...]
    row_end: int | None  # end-of-line token, None for a bare grid
    trailer: tuple[int, ...]
    code_low: int  # codes are ids in [code_low, code_high)
    code_high: int

    @property
    def row_stride(self) -> int:
        return self.cols + (self.row_end is not None)

    @property
    def num_tokens(self) -> int:
        """Generated tokens from the first header token to the last trailer token."""
        return len(self.header) + self.rows * self.row_stride + len(self.trailer)

    def constraints(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(forced, low, high) for positions relative to the first generated token.

        forced is the token a position must hold, or FREE (-1); a free position
        may hold ids in [low, high). Positions past the image are forced to the
        last trailer token (or are free codes for a bare grid without trailer).
        """
        device = positions.device
        p = positions.to(torch.int64)
        header = torch.tensor(self.header or (FREE,), dtype=torch.int64, device=device)
        trailer = torch.tensor(self.trailer or (FREE,), dtype=torch.int64, device=device)
        body_start = len(self.header)
        body_end = body_start + self.rows * self.row_stride

        forced = torch.full_like(p, FREE)
        in_header = p < body_start
        forced = torch.where(in_header, header[p.clamp(0, max(body_start - 1, 0))], forced)
        if self.row_end is not None:
            col = (p - body_start) % self.row_stride
            at_row_end = (p >= body_start) & (p < body_end) & (col == self.cols)
            forced = torch.where(at_row_end, torch.full_like(p, self.row_end), forced)
        after = p >= body_end
        trailer_index = (p - body_end).clamp(0, max(len(self.trailer) - 1, 0))
        forced = torch.where(after, trailer[trailer_index], forced)
        low = torch.full_like(p, self.code_low)
        high = torch.full_like(p, self.code_high)
        return forced, low, high

    def cell_above(self, positions) -> np.ndarray:
        """The position of the code one image row up, or -1 (relative positions, like constraints).

        Only code cells from the second image row on have one. Host-side: numpy
        in, numpy out.
        """
        p = np.asarray(positions, dtype=np.int64)
        body = p - len(self.header)
        is_code = (body >= self.row_stride) & (body < self.rows * self.row_stride)
        is_code &= body % self.row_stride < self.cols
        return np.where(is_code, p - self.row_stride, -1)

    def allowed_mask(
        self, positions: torch.Tensor, vocab_size: int, token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[..., V] bool: the tokens each position may hold.

        With `token_ids` ([U]), only those columns: [..., U].
        """
        forced, low, high = self.constraints(positions)
        ids = torch.arange(vocab_size, device=positions.device) if token_ids is None else token_ids
        free = (ids >= low[..., None]) & (ids < high[..., None])
        return torch.where(forced[..., None] >= 0, ids == forced[..., None], free)

    def token_ids(self) -> torch.Tensor:
        """Every id some position of this layout may hold: codes and forced tokens."""
        forced = [*self.header, *self.trailer] + ([self.row_end] if self.row_end is not None else [])
        codes = torch.arange(self.code_low, self.code_high, dtype=torch.int64)
        return torch.unique(torch.cat([codes, torch.tensor(forced, dtype=torch.int64)]))

    def codes(self, tokens: Sequence[int]) -> torch.Tensor:
        """The [rows, cols] code grid of a generated token sequence.

        Raises ValueError if the sequence does not follow this layout.
        """
        tokens = torch.as_tensor(list(tokens), dtype=torch.int64)
        if tokens.numel() < self.num_tokens:
            raise ValueError(
                f"image needs {self.num_tokens} tokens, the sequence has {tokens.numel()}"
            )
        tokens = tokens[: self.num_tokens]
        forced, low, high = self.constraints(torch.arange(self.num_tokens))
        ok = torch.where(forced >= 0, tokens == forced, (tokens >= low) & (tokens < high))
        if not bool(ok.all()):
            bad = int(torch.nonzero(~ok)[0])
            raise ValueError(f"token {int(tokens[bad])} at position {bad} breaks the layout")
        body = tokens[len(self.header) : len(self.header) + self.rows * self.row_stride]
        return body.view(self.rows, self.row_stride)[:, : self.cols]


def require_supported(sizes: Sequence[tuple[int, int]], width: int, height: int) -> None:
    """Raise UnsupportedImageSize, listing `sizes`, unless width x height is one."""
    if (width, height) not in sizes:
        listed = ", ".join(f"{w}x{h}" for w, h in sizes)
        raise UnsupportedImageSize(
            f"size {width}x{height} is not supported by this model; supported sizes: {listed}"
        )
