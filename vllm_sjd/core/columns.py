"""The token ids a batch's window slots can hold: SJD's window math on those columns only.

An image layout lets each position hold its grid's codes or one forced token
(on the demo model 513 of 8960 ids), so every verified row, every fresh q
and every draft of an image request lives on the grid's columns. Building
the window on those columns and putting the result back in place is exact,
not an approximation: the other columns carry zero probability, and
- an inverse-CDF draw adds the same non-zero terms in the same order
  (adding 0.0 changes no float), so it picks the same token;
- argmax(q / E) never picks a zero of q while q has mass elsewhere;
- a maximal coupling's residual max(0, p - q_old) is zero there too.
So the drafts and q are the full-vocabulary ones, bit for bit (a row
renormalised by initial drafts "last_distribution" may differ in the last
bit: its sum runs over fewer zeros), for a fraction of the work
(tests/test_core_columns.py compares them).
"""

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Columns:
    """A sorted set of token ids and its inverse map."""

    ids: torch.Tensor  # [U] int64, ascending
    index_of: torch.Tensor  # [V] int64: position of each token in ids, -1 outside
    key: Hashable = field(default=None, compare=False)  # names the set, for caches
    # ids and index_of with a -1 appended: index -1 (a placeholder) maps to -1
    # in one gather, no clamp and select around it.
    _ids_padded: torch.Tensor | None = field(default=None, compare=False, repr=False)
    _index_of_padded: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self._ids_padded is None:
            minus_one = self.ids.new_full((1,), -1)
            object.__setattr__(self, "_ids_padded", torch.cat([self.ids, minus_one]))
            object.__setattr__(self, "_index_of_padded", torch.cat([self.index_of, minus_one]))

    @classmethod
    def of(cls, token_ids: torch.Tensor, vocab_size: int, key: Hashable = None) -> "Columns":
        ids = torch.unique(token_ids.to(torch.int64))  # sorted
        index_of = torch.full((vocab_size,), -1, dtype=torch.int64, device=ids.device)
        index_of[ids] = torch.arange(ids.numel(), device=ids.device)
        return cls(ids, index_of, key)

    @property
    def vocab_size(self) -> int:
        return self.index_of.shape[0]

    def to(self, device: torch.device) -> "Columns":
        if self.ids.device == device:
            return self
        return Columns(self.ids.to(device), self.index_of.to(device), self.key,
                       self._ids_padded.to(device), self._index_of_padded.to(device))

    def select(self, full: torch.Tensor) -> torch.Tensor:
        """[..., V] -> [..., U]."""
        return full.index_select(-1, self.ids)

    def expand(self, compact: torch.Tensor) -> torch.Tensor:
        """[..., U] -> [..., V], zeros (False) outside the columns."""
        full = compact.new_zeros((*compact.shape[:-1], self.vocab_size))
        return full.index_copy_(-1, self.ids, compact)

    def tokens(self, index: torch.Tensor) -> torch.Tensor:
        """Column indices -> token ids; -1 for -1."""
        return torch.take(self._ids_padded, index)  # (a tensor-indexed read costs ~2x)

    def indices(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> column indices; -1 for -1 and for tokens outside the columns."""
        return torch.take(self._index_of_padded, tokens)


def same_columns(a: "Columns | None", b: "Columns | None") -> bool:
    """Whether two column sets (None: the whole vocabulary) are the same."""
    if a is None or b is None:
        return a is b
    if a is b or (a.key is not None and a.key == b.key):
        return True
    return a.ids.shape == b.ids.shape and bool(torch.equal(a.ids.cpu(), b.ids.cpu()))


def convert(values: torch.Tensor, source: "Columns | None", target: "Columns | None") -> torch.Tensor:
    """[..., columns of source] -> [..., columns of target]; None is the whole vocabulary.

    Exact where the values are zero outside both (distributions of one layout).
    """
    if same_columns(source, target):
        return values
    full = values if source is None else source.to(values.device).expand(values)
    return full if target is None else target.to(values.device).select(full)
