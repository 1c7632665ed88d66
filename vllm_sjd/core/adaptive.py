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

Which K a step takes never changes what is sampled (every draft is an exact
sample of its q, a prefix of any length verifies losslessly), only how fast.
"""

import bisect
from collections.abc import Sequence

# Untried slots start optimistic, so that the policy tries them when the
# cost allows; real counts soon outweigh the prior.
PRIOR_ACCEPTANCE = 0.8
PRIOR_WEIGHT = 2.0
# Old observations fade: a window slot's acceptance changes with the prompts.
ACCEPTANCE_DECAY = 0.995
OVERHEAD_FORGETTING = 0.98


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
        reached = [0] * len(self.reached)
        kept = [0] * len(self.reached)
        for n, a in zip(num_drafts, num_accepted):
            for i in range(min(a + 1, n, len(reached))):
                reached[i] += 1
                kept[i] += i < a
        if not any(reached):
            return
        for i, (r, k) in enumerate(zip(reached, kept)):
            if r:
                self.reached[i] = self.reached[i] * ACCEPTANCE_DECAY + r
                self.kept[i] = self.kept[i] * ACCEPTANCE_DECAY + k

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
    """The step's time beyond the forward pass: c0 + c1 B + c2 D, fitted by recursive least squares."""

    def __init__(self) -> None:
        self.coef = [0.0, 0.0, 0.0]
        self._p = [[1e2 if i == j else 0.0 for j in range(3)] for i in range(3)]
        self.samples = 0

    def __call__(self, batch_size: int, num_drafts: int) -> float:
        x = (1.0, float(batch_size), float(num_drafts))
        return max(sum(c * v for c, v in zip(self.coef, x)), 0.0)

    def record(self, batch_size: int, num_drafts: int, seconds: float) -> None:
        x = (1.0, float(batch_size), float(num_drafts))
        lam = OVERHEAD_FORGETTING
        px = [sum(self._p[i][j] * x[j] for j in range(3)) for i in range(3)]
        gain_den = lam + sum(x[i] * px[i] for i in range(3))
        gain = [v / gain_den for v in px]
        error = seconds - sum(c * v for c, v in zip(self.coef, x))
        self.coef = [c + g * error for c, g in zip(self.coef, gain)]
        self._p = [[(self._p[i][j] - gain[i] * px[j]) / lam for j in range(3)] for i in range(3)]
        self.samples += 1


class WindowPolicy:
    """Each step's K for the requests that adapt, the rest keeping theirs."""

    def __init__(self, num_slots: int, forward_cost: ForwardCostCurve) -> None:
        self.num_slots = num_slots
        self.forward_cost = forward_cost
        self.acceptance = SlotAcceptance(num_slots)
        self.overhead = StepOverhead()

    def record_step(
        self, num_drafts: Sequence[int], num_accepted: Sequence[int], seconds: float | None
    ) -> None:
        """A finished step: its drafts, what was accepted, and its measured time (or None)."""
        self.acceptance.record(num_drafts, num_accepted)
        if seconds is None:
            return
        batch_size, drafts = len(num_drafts), sum(num_drafts)
        # Below zero when the curve overestimates this pass: nothing left over.
        rest = max(seconds - self.forward_cost(batch_size + drafts), 0.0)
        predicted = self.overhead(batch_size, drafts)
        # A pause between requests is not step time.
        if self.overhead.samples >= 8 and rest > 4 * predicted + self.forward_cost(batch_size + drafts):
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
        best, best_rate = 0, -1.0
        for k in range(ceiling + 1):
            drafts = fixed_drafts_total + num_adapting * k
            seconds = self.forward_cost(batch_size + drafts) + self.overhead(batch_size, drafts)
            tokens = fixed_tokens + num_adapting * self.acceptance.expected_tokens(k)
            rate = tokens / max(seconds, 1e-9)
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = k, rate
        return best
