"""The dynamic window's climb: K chosen by the tokens per second each K was measured to make.

The cost model (core/adaptive.py) predicts a step's time and tokens, and
misses two things under load: SJD's acceptance depends on the K it runs at
(at a large K a tail draft is refined over several passes before it is
verified; at a small K nearly every draft is fresh), and the start-up
forward-cost curve, timed over an empty context, leaves out attention over
each request's context. So the K it predicts is only where the climb starts:

- rungs: 0, 1, 2, 4, ... and the ceiling;
- per batch-size bucket (the requests in the step, by powers of two): a home
  rung, first the rung nearest the cost model's K, and the measured rate of
  each rung tried (committed tokens per second, averaged over its episodes);
- an episode is EPISODE steps at one rung; its first SETTLE steps are not
  measured (the windows adapt to the new K);
- after `patience` episodes at home, one episode at the rung measured
  longest ago (never-measured rungs first); home then moves to the best
  measured rung if it beats home by MARGIN. Patience starts at HOME_EPISODES
  and, once every rung has been measured, doubles up to MAX_PATIENCE each
  time a try finds nothing better, so a
  settled load pays for few tries (rates are not unimodal in K: a large K can
  beat a middle one that loses to a small one).

Which K a step takes never changes what is sampled, only how fast. Plain
Python, no torch, no vLLM.
"""

from dataclasses import dataclass, field

EPISODE = 10
SETTLE = 3
HOME_EPISODES = 2
MAX_PATIENCE = 32
MARGIN = 0.03
NEW_EPISODE_WEIGHT = 0.5  # of a rung's rate, against its earlier episodes


@dataclass
class _Bucket:
    home: int  # rung index
    rates: dict[int, float] = field(default_factory=dict)  # rung index -> tokens/s
    measured_at: dict[int, int] = field(default_factory=dict)  # rung index -> episode count
    episodes: int = 0
    episodes_at_home: int = 0
    patience: int = HOME_EPISODES


@dataclass
class _Episode:
    bucket: int
    rung: int
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0


class WindowLadder:
    def __init__(self, ceiling: int) -> None:
        powers = {1 << i for i in range(max(ceiling, 1).bit_length()) if 1 << i < ceiling}
        self.rungs = sorted({0, ceiling} | powers)
        self._buckets: dict[int, _Bucket] = {}
        self._episode: _Episode | None = None

    def next_k(
        self,
        num_requests: int,  # requests in the coming step
        tokens: int,  # tokens the step that just ended committed
        seconds: float | None,  # and how long it took (None: not known)
        suggested: int,  # the cost model's K, where a bucket starts
    ) -> int:
        bucket_key = max(num_requests, 1).bit_length()
        episode = self._episode
        if episode is not None and episode.bucket == bucket_key:
            episode.steps += 1
            if episode.steps > SETTLE and seconds is not None:
                episode.tokens += tokens
                episode.seconds += seconds
            if episode.steps >= EPISODE:
                self._episode = self._start(bucket_key, self._finish(episode))
        else:  # first step, or the load moved to another bucket
            bucket = self._buckets.get(bucket_key)
            if bucket is None:
                nearest = min(range(len(self.rungs)), key=lambda i: abs(self.rungs[i] - suggested))
                bucket = self._buckets[bucket_key] = _Bucket(nearest)
            self._episode = self._start(bucket_key, bucket.home)
        return self.rungs[self._episode.rung]

    def _start(self, bucket_key: int, rung: int) -> _Episode:
        return _Episode(bucket_key, rung)

    def _finish(self, episode: _Episode) -> int:
        """Record an episode; the rung of the next one."""
        bucket = self._buckets[episode.bucket]
        rung = episode.rung
        bucket.episodes += 1
        if episode.seconds > 0:
            rate = episode.tokens / episode.seconds
            old = bucket.rates.get(rung)
            bucket.rates[rung] = rate if old is None else (
                NEW_EPISODE_WEIGHT * rate + (1 - NEW_EPISODE_WEIGHT) * old
            )
            bucket.measured_at[rung] = bucket.episodes
        if rung != bucket.home:  # a try
            best = max(bucket.rates, key=bucket.rates.get)
            home_rate = bucket.rates.get(bucket.home)
            if home_rate is None or bucket.rates[best] > home_rate * (1 + MARGIN):
                bucket.home, bucket.patience = best, HOME_EPISODES
            elif len(bucket.rates) == len(self.rungs):  # every rung measured: settle
                bucket.patience = min(2 * bucket.patience, MAX_PATIENCE)
            bucket.episodes_at_home = 0
            return bucket.home
        bucket.episodes_at_home += 1
        if bucket.episodes_at_home < bucket.patience or len(self.rungs) == 1:
            return bucket.home
        others = [i for i in range(len(self.rungs)) if i != bucket.home]
        return min(others, key=lambda i: (bucket.measured_at.get(i, -1), abs(i - bucket.home)))

    def homes(self) -> dict[int, int]:
        """Each batch-size bucket's current K (diagnostics, tests)."""
        return {key: self.rungs[b.home] for key, b in self._buckets.items()}
