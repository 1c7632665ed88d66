"""ZipAR's next-set order of an image, engine-free.

ZipAR (arXiv 2412.04062) decodes image rows in parallel: row r+1 starts once
row r has W codes, and every forward pass then feeds one token per active
row and samples the next code of each, committed without verification. It is
lossy: a code does not see the end of the row above.

Here an image's tokens enter the model as one stream in generation order
(the KV cache holds them in that order, attention is causal over it), each
at its raster position in the rotary embedding, as ZipAR's Lumina-mGPT
version does. A fed token at raster position p samples position p + 1 if
that is still unknown. A row starts by feeding its driver: the end-of-line
token of the row above (known in advance), or, in a grid without one, a
stand-in at the position of the above row's last code carrying that row's
newest code (ZipAR's LlamaGen version); the real last code is fed later, when
it is drawn. Forced tokens (end-of-line, header, trailer) are known from the
start. Every token of the image is fed once, stand-ins add one token each.

Because attention is causal over the stream, what each token is sampled from
depends only on the stream before it; the stream is planned one whole step
at a time, and a plan that ran only in part finishes before the next is
made, so how the stream is cut into forward passes (a scheduler that feeds
fewer tokens this step, a preempted request recomputed in one prefill)
changes nothing. `ZipARStream` plans each step's feeds from the tokens drawn
so far; `stream_order` replays the whole order for a grid (the endpoint puts
tokens back in raster order with it).
With W equal to the row width no two rows overlap and the stream is the
raster order: plain AR.
"""

from dataclasses import dataclass
from functools import lru_cache

import torch

from vllm_sjd.layouts.grid import ImageGrid

NO_TARGET = -1


@dataclass(frozen=True)
class Feed:
    """One token of the stream."""

    position: int  # raster index the token takes (rotary position), from the first generated token
    source: int  # raster index of the token fed: `position`, or for a stand-in the code it copies
    target: int  # raster index this feed's logits sample, or NO_TARGET


class ZipARStream:
    """One request's ZipAR state: the tokens drawn, the stream fed and planned.

    `stream[k]` is the feed of output token k (vLLM's output tokens are the
    stream in order). Each step the runner reads the targets of the feeds it
    ran (`target_of`), records what it drew (`record`), and says how many
    feeds have run (`advance`), which plans the next ones when none is pending.
    Positions at and past `grid.num_tokens` (a request that asked for more
    tokens than the image has) go on as plain AR.
    """

    def __init__(self, grid: ImageGrid, window: int, max_feeds: int) -> None:
        if window < 1 or max_feeds < 1:
            raise ValueError(f"window ({window}) and max_feeds ({max_feeds}) must be >= 1")
        self.grid = grid
        self.window = min(window, grid.cols)
        self.max_feeds = max_feeds
        self._body = len(grid.header)
        self._tokens: dict[int, int] = {}  # raster index -> token, forced ones from the start
        forced, _, _ = grid.constraints(torch.arange(grid.num_tokens))
        for position in torch.nonzero(forced >= 0).flatten().tolist():
            self._tokens[position] = int(forced[position])
        self.stream: list[Feed] = []
        self._fed: set[int] = set()  # positions with a real (not stand-in) feed in the stream
        self._started = {0}  # rows whose first code has its driver in the stream
        self._row_known = [0] * grid.rows  # codes drawn per row (left to right)
        self.stand_ins = 0

    def cell(self, row: int, col: int) -> int:
        return self._body + row * self.grid.row_stride + col

    def known(self, position: int) -> bool:
        return position in self._tokens

    def token(self, position: int) -> int:
        return self._tokens[position]

    def target_of(self, output_index: int) -> int:
        """What the feed of output token `output_index` samples; -1 is the prompt's last token."""
        if output_index < 0:
            return NO_TARGET if self.known(0) else 0
        return self.stream[output_index].target

    def record(self, position: int, token: int) -> None:
        """The token drawn for raster index `position`."""
        if position in self._tokens:
            return
        self._tokens[position] = int(token)
        row = self._row_of(position)
        if row is not None:
            while self._row_known[row] < self.grid.cols and self.known(
                self.cell(row, self._row_known[row])
            ):
                self._row_known[row] += 1

    def advance(self, ran: int) -> None:
        """The first `ran` feeds have run: plan the next step's once none is pending.

        A step that ran only part of a plan (vLLM scheduled fewer drafts, or a
        preempted request resumed) leaves the rest pending, and the next step
        runs them first: the stream stays the same whatever the cuts."""
        if ran >= len(self.stream):
            self.plan()

    def plan(self) -> list[Feed]:
        """Append the next step's feeds (at most max_feeds, in raster order) to the stream."""
        grid = self.grid
        candidates: list[tuple[int, int]] = []  # (position, source)
        planned = set(self._fed)

        def in_order(start: int, end: int | None) -> None:
            q = start
            while (end is None or q < end) and self.known(q) and q not in self._fed:
                candidates.append((q, q))
                planned.add(q)
                q += 1

        # The header, in order.
        in_order(self._first_unfed(0, self._body), self._body)
        for row in range(grid.rows):
            if row not in self._started:
                break
            known = self._known_cells(row)
            newest = self.cell(row, known - 1)
            if known and newest not in planned:
                candidates.append((newest, newest))
                planned.add(newest)
            # The next row's driver once this row has W codes.
            if row + 1 < grid.rows and row + 1 not in self._started and known >= self.window:
                if grid.row_end is not None:
                    candidates.append((self.cell(row, grid.cols), self.cell(row, grid.cols)))
                elif known < grid.cols:
                    candidates.append((self.cell(row, grid.cols - 1), newest))
        last_code = self.cell(grid.rows - 1, grid.cols - 1)
        if last_code in planned:
            # Every code is drawn: the last end-of-line, the trailer, then plain AR.
            in_order(self._first_unfed(last_code + 1, None), None)
        if not candidates:
            raise RuntimeError("ZipAR planned no feed for a request that is not finished")
        feeds = self._with_targets(sorted(candidates)[: self.max_feeds])
        self.stream += feeds
        for feed in feeds:
            self._note(feed)
        return feeds

    def tokens_of(self, feeds: list[Feed]) -> list[int]:
        return [self._tokens[feed.source] for feed in feeds]

    def _known_cells(self, row: int) -> int:
        """How many codes of the row are drawn (they are drawn left to right)."""
        return self._row_known[row]

    def _first_unfed(self, start: int, end: int | None) -> int:
        q = start
        while (end is None or q < end) and q in self._fed:
            q += 1
        return q if end is None or q < end else end

    def _with_targets(self, candidates: list[tuple[int, int]]) -> list[Feed]:
        feeds, targeted = [], set()
        for position, source in candidates:
            target = position + 1
            if self.known(target) or target in targeted:
                target = NO_TARGET
            else:
                targeted.add(target)
            feeds.append(Feed(position, source, target))
        return feeds

    def _note(self, feed: Feed) -> None:
        if feed.source == feed.position:
            self._fed.add(feed.position)
        else:
            self.stand_ins += 1
        row = self._row_of(feed.target)
        if row is not None and feed.target == self.cell(row, 0):
            self._started.add(row)

    def _row_of(self, position: int) -> int | None:
        body = position - self._body
        stride = self.grid.row_stride
        if position < 0 or not 0 <= body < self.grid.rows * stride or body % stride >= self.grid.cols:
            return None
        return body // stride


@dataclass(frozen=True)
class StreamOrder:
    """A grid's whole ZipAR stream: what the endpoint needs to read an image back."""

    positions: tuple[int, ...]  # raster index of each output token, up to the image's last
    targets: tuple[int, ...]  # raster index each output token's logits sample, or NO_TARGET
    first_target: int  # what the prompt's last token samples (0, or NO_TARGET when forced)
    forward_passes: int  # of one image, the prefill included

    @property
    def num_tokens(self) -> int:
        """Output tokens of one image (the image's tokens plus the stand-ins)."""
        return len(self.positions)


@lru_cache(maxsize=64)
def stream_order(grid: ImageGrid, window: int, max_feeds: int) -> StreamOrder:
    """Replay a grid's ZipAR stream (the order does not depend on the tokens drawn)."""
    stream = ZipARStream(grid, window, max_feeds)
    last = grid.num_tokens - 1
    target = stream.target_of(-1)
    if target != NO_TARGET:
        stream.record(target, grid.code_low)
    passes = 1
    while True:
        feeds = stream.plan()
        if any(feed.position == last and feed.source == last for feed in feeds):
            if not (feeds[0].position == last and feeds[0].source == last):
                passes += 1  # the last token is a draft of a pass that runs
            break
        passes += 1
        for feed in feeds:
            if feed.target != NO_TARGET:
                stream.record(feed.target, grid.code_low)
    end = next(k for k, f in enumerate(stream.stream) if f.position == last and f.source == last)
    feeds = stream.stream[: end + 1]
    return StreamOrder(
        tuple(f.position for f in feeds),
        tuple(f.target if f.target < grid.num_tokens else NO_TARGET for f in feeds),
        NO_TARGET if grid.constraints(torch.tensor([0]))[0].item() >= 0 else 0,
        passes,
    )


def raster_tokens(output_tokens, order: StreamOrder, grid: ImageGrid) -> list[int]:
    """Output tokens of a ZipAR image back in raster order, -1 where none is out yet.

    A position fed twice holds a stand-in first and its real token last: only
    the last is read, so a prefix of the stream never shows a stand-in."""
    last = {position: k for k, position in enumerate(order.positions)}
    raster = [-1] * grid.num_tokens
    for k, (token, position) in enumerate(zip(output_tokens, order.positions)):
        if last[position] == k:
            raster[position] = int(token)
    return raster
