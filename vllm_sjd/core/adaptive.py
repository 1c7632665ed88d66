"""Choosing each step's window K from the load: plain Python, no vLLM.

A step that verifies K drafts for each of B requests forwards T = B(K+1)
tokens and commits, per request, the accepted prefix plus one token. K pays
off while the tokens it adds per request outgrow what it adds to the step's
time. The policy estimates both and takes the K with the most tokens per
second:

- the forward cost f(T), a curve measured when the engine starts (forward
  passes of T tokens, interpolated in between);
- the rest of the step (scheduling, sampling, verification, drafting), fitted
  online to the measured step times as c0 + c1 B + c2 D, D the drafts verified;
- E(K) = 1 + sum_{j<=K} prod_{i<=j} alpha_i, the expected tokens a request
  commits, from the running acceptance alpha_i of window slot i (the share of
  steps that reached slot i and kept its draft).

It chooses between the whole window and none (a plain AR step), not the K in
between: SJD accepts less at a small K (its windows are fresher), so slot
rates measured at the whole window overrate a small K, and a small K, once
taken, measures rates that keep it small (benchmarks/RESULTS.md, "The lean
step"). The model above makes the first choice for a batch size (its cost
ratio corrected by the nearest batch size timed); then both choices are timed
there (seconds per request of a step, per batch-size bucket, each tried for a
few steps and timed afresh by every try; the tokens of a window step measured
on settled window steps) and the measured rates decide: the curve, timed over
an empty context, misses attention over long contexts under load. The window is taken only where it
is SWITCH_MARGIN better than plain AR, and the other choice is timed again
after the current one has run EXPLORE_EVERY times as long as a try takes.

Which K a step takes never changes what is sampled (every draft is an exact
sample of its q, a prefix of any length verifies losslessly), only how fast.
"""

import bisect
import math
from collections.abc import Sequence

# Untried slots start optimistic, so that the policy tries them when the
# cost allows; real counts soon outweigh the prior.
PRIOR_ACCEPTANCE = 0.8
PRIOR_WEIGHT = 2.0
# Old observations fade: a window slot's acceptance changes with the prompts.
ACCEPTANCE_DECAY = 0.995
OVERHEAD_FORGETTING = 0.98
SWITCH_MARGIN = 1.1
ACCEPTANCE_WARMUP = 4  # steps after a switch whose acceptance is not recorded
MEASURE_STEPS = 3  # steps a choice runs before its time is trusted (and an exploration ends)
# The other choice is timed again once the current one has run this many times
# as long as the try takes: at most a few percent of the time goes to trying.
EXPLORE_EVERY = 50
MEMORY = 0.95
# A window step's tokens swing with the place in the image (1 a request on an
# image's first rows, 9 on plain background), so their average spans several
# images: at MEMORY it followed the rows and read 4.7 where the run made 3.8.
TOKENS_MEMORY = 0.995


def batch_bucket(batch_size: int) -> int:
    """Batch sizes within a factor of two share their measurements; a power of two
    sits mid-bucket, so a full batch and one with a request finishing share one."""
    return round(math.log2(max(batch_size, 1)))


class MeasuredSteps:
    """Seconds per request of a step by (batch-size bucket, drafting or not), and the
    tokens a request commits in a settled window step (any batch size: SJD's
    acceptance barely depends on it, and a small bucket may never settle)."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[int, bool], float] = {}
        self.samples: dict[tuple[int, bool], int] = {}
        self.window_tokens: float | None = None
        self.window_samples = 0

    def seconds_per_request(self, bucket: int, drafting: bool) -> float | None:
        key = (bucket, drafting)
        return self.seconds[key] if self.samples.get(key, 0) >= MEASURE_STEPS else None

    def buckets(self) -> set[int]:
        return {bucket for bucket, _ in self.seconds}

    def tokens_per_window_request(self) -> float | None:
        return self.window_tokens if self.window_samples >= MEASURE_STEPS else None

    def record_time(self, bucket: int, drafting: bool, seconds_per_request: float) -> None:
        key = (bucket, drafting)
        old, n = self.seconds.get(key), self.samples.get(key, 0)
        # A step far slower than usual is a pause between requests, not step time.
        if old is not None and n >= MEASURE_STEPS and seconds_per_request > 4 * old:
            return
        self.seconds[key] = _running(old, n, seconds_per_request)
        self.samples[key] = n + 1

    def restart(self, bucket: int, drafting: bool) -> None:
        """Time this choice afresh: a new try replaces what it measured long ago
        (a running average would let the try move a stale time only a little)."""
        self.samples[(bucket, drafting)] = 0

    def record_window_tokens(self, tokens_per_request: float) -> None:
        self.window_tokens = _running(self.window_tokens, self.window_samples, tokens_per_request,
                                      TOKENS_MEMORY)
        self.window_samples += 1


def _running(old: float | None, samples: int, value: float, memory: float = MEMORY) -> float:
    """The mean of the first samples, then an exponential average."""
    if old is None:
        return value
    weight = max(1.0 / (samples + 1), 1.0 - memory)
    return old + weight * (value - old)


class ForwardCostCurve:
    """Seconds a forward pass of T tokens takes, from measured points."""

    def __init__(self, points: Sequence[tuple[int, float]]) -> None:
        points = sorted((int(t), float(s)) for t, s in points)
        if not points:
            raise ValueError("a cost curve needs at least one measured point")
        self.tokens = [t for t, _ in points]
        self.seconds = [s for _, s in points]

    def __call__(self, num_tokens: int) -> float:
        t, s = self.tokens, self.seconds
        if len(t) == 1 or num_tokens <= t[0]:
            return s[0]
        i = min(bisect.bisect_left(t, num_tokens), len(t) - 1)
        # Linear between neighbours; past the last point, the last segment's slope.
        slope = (s[i] - s[i - 1]) / (t[i] - t[i - 1])
        return max(s[i - 1] + slope * (num_tokens - t[i - 1]), 0.0)

    def as_points(self) -> list[tuple[int, float]]:
        return list(zip(self.tokens, self.seconds))


class SlotAcceptance:
    """Running acceptance of each window slot."""

    def __init__(self, num_slots: int) -> None:
        self.reached = [0.0] * num_slots
        self.kept = [0.0] * num_slots

    def record(self, num_drafts: Sequence[int], num_accepted: Sequence[int]) -> None:
        """One step: request r verified num_drafts[r] drafts and kept num_accepted[r]."""
        # Request r reached slots [0, min(a+1, n)) and kept [0, min(a, n)): count
        # where each prefix ends, then walk the slots once (a step runs per pass).
        num_slots = len(self.reached)
        reach_ends = [0] * (num_slots + 1)
        keep_ends = [0] * (num_slots + 1)
        requests = top = 0
        for n, a in zip(num_drafts, num_accepted):
            reach = min(a + 1, n, num_slots)
            if reach > 0:
                reach_ends[reach] += 1
                keep_ends[min(a, reach)] += 1
                requests += 1
                top = max(top, reach)
        reached, kept = self.reached, self.kept
        r, k = requests, requests - keep_ends[0]
        for i in range(top):  # r, k: requests that reached / kept slot i (r > 0 here)
            reached[i] = reached[i] * ACCEPTANCE_DECAY + r
            kept[i] = kept[i] * ACCEPTANCE_DECAY + k
            r -= reach_ends[i + 1]
            k -= keep_ends[i + 1]

    def rate(self, slot: int) -> float:
        return (self.kept[slot] + PRIOR_WEIGHT * PRIOR_ACCEPTANCE) / (self.reached[slot] + PRIOR_WEIGHT)

    def expected_tokens(self, num_drafts: int) -> float:
        """Tokens a request commits in a step verifying num_drafts drafts."""
        total, survive = 1.0, 1.0
        for slot in range(min(num_drafts, len(self.reached))):
            survive *= self.rate(slot)
            total += survive
        return total


class StepOverhead:
    """The step's time beyond the forward pass: c0 + c1 B + c2 D, fitted by recursive least squares.

    Written out for three terms: it runs every step, and loops over 3x3 lists cost
    more there than the rest of the policy.
    """

    def __init__(self) -> None:
        self.coef = [0.0, 0.0, 0.0]
        self._p = [1e2, 0.0, 0.0, 0.0, 1e2, 0.0, 0.0, 0.0, 1e2]  # the 3x3 inverse covariance, row-major
        self.samples = 0

    def __call__(self, batch_size: int, num_drafts: int) -> float:
        c0, c1, c2 = self.coef
        return max(c0 + c1 * batch_size + c2 * num_drafts, 0.0)

    def record(self, batch_size: int, num_drafts: int, seconds: float) -> None:
        x1, x2 = float(batch_size), float(num_drafts)  # x0 = 1
        lam = OVERHEAD_FORGETTING
        p00, p01, p02, p10, p11, p12, p20, p21, p22 = self._p
        px0 = p00 + p01 * x1 + p02 * x2
        px1 = p10 + p11 * x1 + p12 * x2
        px2 = p20 + p21 * x1 + p22 * x2
        gain_den = lam + (px0 + x1 * px1 + x2 * px2)
        g0, g1, g2 = px0 / gain_den, px1 / gain_den, px2 / gain_den
        c0, c1, c2 = self.coef
        error = seconds - (c0 + c1 * x1 + c2 * x2)
        self.coef = [c0 + g0 * error, c1 + g1 * error, c2 + g2 * error]
        self._p = [
            (p00 - g0 * px0) / lam, (p01 - g0 * px1) / lam, (p02 - g0 * px2) / lam,
            (p10 - g1 * px0) / lam, (p11 - g1 * px1) / lam, (p12 - g1 * px2) / lam,
            (p20 - g2 * px0) / lam, (p21 - g2 * px1) / lam, (p22 - g2 * px2) / lam,
        ]
        self.samples += 1


class WindowPolicy:
    """Each step's K for the requests that adapt, the rest keeping theirs."""

    def __init__(self, num_slots: int, forward_cost: ForwardCostCurve) -> None:
        self.num_slots = num_slots
        self.forward_cost = forward_cost
        self.acceptance = SlotAcceptance(num_slots)
        self.overhead = StepOverhead()
        self.measured = MeasuredSteps()
        self.drafting = True  # the latest choice: the whole window (True) or none
        self.exploring = False  # the latest switch tries a choice not yet timed (or timed long ago)
        self.episode_steps = 0  # steps since the latest switch
        self.seconds_since_switch = 0.0
        self.decided_bucket: int | None = None

    def record_step(
        self,
        num_drafts: Sequence[int],
        num_accepted: Sequence[int],
        seconds: float | None,
        steady: bool = True,
        committed: Sequence[int] | None = None,
    ) -> None:
        """A finished step: its drafts, what was accepted, its measured time (or None), and
        whether every request was decoding (a prefill in the step makes it no sample), and
        the tokens each request got (a held guided-pair member gets none)."""
        settled = self.episode_steps >= ACCEPTANCE_WARMUP
        if settled:
            # Right after a switch every window is fresh: its acceptance is
            # not the window's (and would keep the policy away from it).
            self.acceptance.record(num_drafts, num_accepted)
        if seconds is None or not num_drafts or not steady:
            return
        self.seconds_since_switch += seconds
        batch_size, drafts = len(num_drafts), sum(num_drafts)
        bucket = batch_bucket(batch_size)
        # A drafting step in which a request had no window yet is not a window step.
        if not self.drafting or min(num_drafts) > 0:
            self.measured.record_time(bucket, self.drafting, seconds / batch_size)
            if settled and self.drafting:
                # Each request commits its accepted drafts and one more token.
                tokens = (sum(committed) if committed is not None else
                          sum(min(a, n) for a, n in zip(num_accepted, num_drafts)) + batch_size)
                self.measured.record_window_tokens(tokens / batch_size)
        # Below zero when the curve overestimates this pass: nothing left over.
        forward = self.forward_cost(batch_size + drafts)
        rest = max(seconds - forward, 0.0)
        # A pause between requests is not step time.
        if self.overhead.samples >= 8 and rest > 4 * self.overhead(batch_size, drafts) + forward:
            return
        self.overhead.record(batch_size, drafts, rest)

    def choose(self, num_adapting: int, fixed_drafts: Sequence[int], ceiling: int) -> int:
        """K for `num_adapting` requests, beside requests verifying `fixed_drafts` each."""
        ceiling = min(ceiling, self.num_slots)
        if num_adapting == 0 or ceiling <= 0:
            return 0
        batch_size = num_adapting + len(fixed_drafts)
        fixed_tokens = sum(self.acceptance.expected_tokens(n) for n in fixed_drafts)
        fixed_drafts_total = sum(fixed_drafts)

        def tokens_per_second(k: int) -> float:
            drafts = fixed_drafts_total + num_adapting * k
            seconds = self.forward_cost(batch_size + drafts) + self.overhead(batch_size, drafts)
            tokens = fixed_tokens + num_adapting * self.acceptance.expected_tokens(k)
            return tokens / max(seconds, 1e-9)

        bucket = batch_bucket(batch_size)
        self.episode_steps += 1
        timed = {d: self.measured.seconds_per_request(bucket, d) for d in (True, False)}
        if timed[True] is None and timed[False] is None:
            # Nothing timed at this batch size yet: the model decides, at once,
            # its cost ratio corrected by what the nearest timed batch size showed.
            window = tokens_per_second(ceiling) / self._model_correction(bucket, ceiling)
            plain = tokens_per_second(0)
            if (window > plain * SWITCH_MARGIN) != self.drafting:
                self._switch(exploring=False)
            # Decided for this batch size: back at the one decided before, the
            # choice is compared afresh (it kept a small batch's window for
            # seconds of a large batch's steps otherwise).
            self.decided_bucket = bucket
        elif self.episode_steps >= MEASURE_STEPS and timed[self.drafting] is not None:
            if timed[not self.drafting] is None:
                self._explore(bucket)  # time the other choice for a few steps
            else:
                # Tokens per request of a window step as measured, else modelled.
                window_tokens = self.measured.tokens_per_window_request() or (
                    (fixed_tokens + num_adapting * self.acceptance.expected_tokens(ceiling))
                    / batch_size)
                plain_tokens = (fixed_tokens + num_adapting) / batch_size
                rate = {True: window_tokens / timed[True], False: plain_tokens / timed[False]}
                # Drafting must beat plain AR by the margin: when the two are
                # close, plain AR's steps are the safer bet.
                wanted = rate[True] > rate[False] * SWITCH_MARGIN
                # Step time grows with the context (an image's last rows cost more
                # than its first), so choices are compared when timed close
                # together: at the end of a try (the tried one timed afresh).
                # A batch size that changes compares what was timed before:
                # the other choice is tried before it is taken.
                if self.exploring:
                    if wanted != self.drafting:
                        self._switch(exploring=False)
                    self.exploring = False
                    self.decided_bucket = bucket
                elif bucket != self.decided_bucket:
                    self.decided_bucket = bucket
                    if wanted != self.drafting:
                        self._explore(bucket)
                elif self.seconds_since_switch > EXPLORE_EVERY * MEASURE_STEPS * (
                    timed[not self.drafting] * batch_size
                ):
                    self._explore(bucket)  # time the other choice again
        return ceiling if self.drafting else 0

    def _model_correction(self, bucket: int, ceiling: int) -> float:
        """Measured over modelled (window step / plain step) time at the nearest bucket
        with both timed; 1 where none is. The curve is timed over an empty context."""
        timed = [b for b in self.measured.buckets() if all(
            self.measured.seconds_per_request(b, d) is not None for d in (True, False))]
        if not timed:
            return 1.0
        nearest = min(timed, key=lambda b: (abs(b - bucket), -b))
        batch = 2**nearest
        measured = (self.measured.seconds_per_request(nearest, True)
                    / self.measured.seconds_per_request(nearest, False))
        window = self.forward_cost(batch * (ceiling + 1)) + self.overhead(batch, batch * ceiling)
        plain = self.forward_cost(batch) + self.overhead(batch, 0)
        return max(measured / max(window / max(plain, 1e-9), 1e-9), 1e-3)

    def _explore(self, bucket: int) -> None:
        """Try the other choice, timed from scratch at this batch size."""
        self.measured.restart(bucket, not self.drafting)
        self._switch(exploring=True)

    def _switch(self, exploring: bool) -> None:
        self.drafting, self.exploring = not self.drafting, exploring
        self.episode_steps, self.seconds_since_switch = 0, 0.0
