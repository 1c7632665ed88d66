"""The dynamic window's policy (vllm_sjd/core/adaptive.py) and the proposer's use of it, engine-free."""

import pytest

from tests.test_proposer import WINDOW, proposer
from vllm_sjd.core.adaptive import (
    MEASURE_STEPS,
    ForwardCostCurve,
    MeasuredSteps,
    SlotAcceptance,
    StepOverhead,
    WindowPolicy,
    batch_bucket,
)


def test_forward_cost_curve_interpolates_and_extrapolates_its_last_segment():
    curve = ForwardCostCurve([(4, 3.0), (1, 1.0), (2, 1.0)])
    assert curve(1) == curve(0) == 1.0
    assert curve(3) == pytest.approx(2.0)
    assert curve(8) == pytest.approx(7.0)  # slope 1 per token past the last point
    assert ForwardCostCurve([(16, 0.5)])(1000) == 0.5


def test_slot_acceptance_counts_reached_and_kept_slots():
    acceptance = SlotAcceptance(4)
    for _ in range(200):
        # 4 drafts, 2 accepted: slots 1-2 kept, slot 3 reached and rejected, slot 4 never reached.
        acceptance.record([4], [2])
    assert acceptance.rate(0) > 0.95 and acceptance.rate(1) > 0.95
    assert acceptance.rate(2) < 0.05
    assert acceptance.rate(3) == pytest.approx(0.8)  # untried: the prior
    assert acceptance.expected_tokens(0) == 1.0
    assert 2.9 < acceptance.expected_tokens(4) < 3.1


def test_step_overhead_fit_recovers_a_linear_cost():
    overhead = StepOverhead()
    for batch in (1, 2, 4, 8, 16, 32):
        for drafts in (0, batch, 4 * batch, 16 * batch):
            overhead.record(batch, drafts, 0.002 + 0.0005 * batch + 0.0001 * drafts)
    assert overhead(10, 50) == pytest.approx(0.002 + 0.005 + 0.005, rel=1e-3)


def well_accepted_policy(curve) -> WindowPolicy:
    policy = WindowPolicy(16, curve)
    for _ in range(50):
        policy.record_step([16, 16], [16, 8], None)
    return policy


def test_a_flat_forward_cost_takes_the_whole_window():
    # A GPU-like pass: 17 tokens cost about what 1 does.
    policy = well_accepted_policy(ForwardCostCurve([(1, 0.010), (32, 0.0105), (1024, 0.012)]))
    assert policy.choose(1, [], 16) == 16


def test_a_compute_bound_batch_shrinks_the_window_to_zero():
    # Cost proportional to tokens (a busy CPU): one more token per request never pays.
    policy = well_accepted_policy(ForwardCostCurve([(1, 0.001), (2048, 2.048)]))
    assert policy.choose(64, [], 16) == 0
    # A small batch on a curve with a fixed part still drafts.
    policy = well_accepted_policy(ForwardCostCurve([(1, 0.010), (64, 0.012), (2048, 2.048)]))
    assert policy.choose(1, [], 16) > 0
    assert policy.choose(1, [], 16) >= policy.choose(64, [], 16)


def test_the_policy_takes_the_whole_window_or_none_and_drafts_only_for_a_clear_gain():
    # Cost per token grows with the batch: somewhere between 1 and 64
    # requests the whole window stops paying.
    policy = well_accepted_policy(ForwardCostCurve([(1, 0.010), (64, 0.012), (4096, 4.0)]))
    choices = {batch: policy.choose(batch, [], 16) for batch in (1, 2, 4, 8, 16, 32, 64)}
    assert set(choices.values()) == {0, 16}
    assert choices[1] == 16 and choices[64] == 0

    def window_over_plain(batch):  # modelled tokens per second, whole window / none
        rates = [policy.acceptance.expected_tokens(k) * batch
                 / (policy.forward_cost(batch * (k + 1)) + policy.overhead(batch, batch * k))
                 for k in (16, 0)]
        return rates[0] / rates[1]

    # Where drafting is better by less than the margin, plain AR's step is taken.
    near = next(b for b in range(1, 65) if 1.0 < window_over_plain(b) < 1.1)
    policy.choose(1, [], 16)
    assert policy.choose(near, [], 16) == 0


def run_policy(policy, batch, window_seconds, plain_seconds, accepted, steps=300):
    """Steps whose real cost the policy's curve does not know; returns each step's K."""
    choices = []
    for _ in range(steps):
        k = policy.choose(batch, [], 16)
        choices.append(k)
        seconds = window_seconds if k else plain_seconds
        policy.record_step([k] * batch, [accepted if k else 0] * batch, seconds)
    return choices


def test_measured_rates_overrule_a_curve_that_misses_the_cost_under_load():
    # The curve says drafting is nearly free; measured, a window step costs
    # 4.6x a plain one for 4 tokens a request: plain AR commits more per second.
    flat = ForwardCostCurve([(1, 0.010), (4096, 0.012)])
    choices = run_policy(well_accepted_policy(flat), 32, 0.160, 0.035, accepted=3)
    assert choices[0] == 16  # the model's first choice
    assert 0 in choices[: MEASURE_STEPS + 2]  # plain AR timed once the window was
    assert choices[-100:].count(0) >= 95
    # Where drafting pays (2.3x the cost for 4x the tokens), the window stays.
    choices = run_policy(well_accepted_policy(flat), 2, 0.0146, 0.0074, accepted=3)
    assert choices[-100:].count(16) >= 95 and choices.count(0) < 0.1 * len(choices)


def test_a_try_times_its_choice_afresh_when_the_cost_has_changed_since():
    # A hundred window steps timed at 5 ms a request long ago; plain AR (1 ms)
    # has run since. Now window steps cost 1 ms a request (for 4 tokens): the
    # window's next try must measure that, not move a running average of the
    # old steps a little (which would keep plain AR).
    policy = well_accepted_policy(ForwardCostCurve([(1, 0.010), (4096, 0.012)]))
    bucket = batch_bucket(32)
    for drafting, seconds, count in ((True, 0.005, 100), (False, 0.001, 10)):
        for _ in range(count):
            policy.measured.record_time(bucket, drafting, seconds)
    policy.drafting, policy.decided_bucket, policy.episode_steps = False, bucket, 10
    policy.seconds_since_switch = 1e9  # plain AR has run long enough: try the window again
    for _ in range(MEASURE_STEPS):
        assert policy.choose(32, [], 16) == 16
        policy.record_step([16] * 32, [3] * 32, 32 * 0.001)
    assert policy.measured.seconds_per_request(bucket, True) == pytest.approx(0.001)
    assert policy.choose(32, [], 16) == 16  # the try decided: the window stays


def test_a_new_batch_size_starts_from_the_model_corrected_by_the_nearest_timed_one():
    flat = ForwardCostCurve([(1, 0.010), (4096, 0.012)])  # drafting looks free
    policy = well_accepted_policy(flat)
    assert policy.choose(8, [], 16) == 16  # the model alone
    # At 4 requests a window step measured 5x a plain one (the model said ~1.2x).
    for drafting, seconds in ((True, 0.005), (False, 0.001)):
        for _ in range(MEASURE_STEPS):
            policy.measured.record_time(2, drafting, seconds)
    assert policy.choose(8, [], 16) == 0  # 8 requests: not timed, the corrected model


def test_a_batch_back_at_its_size_leaves_the_window_a_smaller_batch_took():
    # 32 requests settle on plain AR (the window costs 4.6x for 4 tokens). The
    # batch drains to 12 (not timed: the curve takes the window) and then is
    # back at 32, where plain AR must return within a try, not after the
    # window has run EXPLORE_EVERY tries' worth of steps.
    flat = ForwardCostCurve([(1, 0.010), (4096, 0.012)])
    policy = well_accepted_policy(flat)
    assert run_policy(policy, 32, 0.160, 0.035, accepted=3)[-10:] == [0] * 10
    assert policy.choose(12, [], 16) == 16
    policy.record_step([16] * 12, [3] * 12, 0.1)
    choices = run_policy(policy, 32, 0.160, 0.035, accepted=3, steps=20)
    assert choices[2 * MEASURE_STEPS + 1:] == [0] * (20 - 2 * MEASURE_STEPS - 1)


def test_a_pause_between_requests_is_not_a_slow_step():
    steps = MeasuredSteps()
    for _ in range(MEASURE_STEPS - 1):
        steps.record_time(3, True, 0.010)
    assert steps.seconds_per_request(3, True) is None  # not trusted before MEASURE_STEPS steps
    steps.record_time(3, True, 0.010)
    steps.record_time(3, True, 0.5)  # an idle engine between two requests
    assert steps.seconds_per_request(3, True) == pytest.approx(0.010)
    assert steps.seconds_per_request(3, False) is None
    assert steps.seconds_per_request(4, True) is None


def test_window_tokens_average_over_images_not_the_latest_rows():
    # An image's window steps commit 1 token a request on its first rows and 9
    # on its last: the estimate at the end of the third image is the run's mean
    # (5), not the last rows' 9 (a window that looks twice as good as it is).
    steps = MeasuredSteps()
    for _ in range(3):
        for tokens in [1.0] * 30 + [9.0] * 30:
            steps.record_window_tokens(tokens)
    assert steps.tokens_per_window_request() == pytest.approx(5.0, abs=0.5)


def test_fixed_requests_count_in_the_cost():
    policy = well_accepted_policy(ForwardCostCurve([(1, 0.010), (64, 0.012), (4096, 4.0)]))
    alone = policy.choose(2, [], 16)
    beside_fixed = policy.choose(2, [16] * 60, 16)
    assert beside_fixed <= alone
    assert policy.choose(0, [16], 16) == 0


def test_proposer_plans_the_chosen_window_for_unseeded_requests_only():
    p = proposer()
    # Without a measured curve every request schedules the whole window.
    assert p.plan_drafts([0, 0], [0, 0], [None, 7], None) == [WINDOW, WINDOW]
    p.set_forward_costs([(1, 0.001), (4096, 4.096)])  # cost proportional to tokens, drafts rejected
    for _ in range(2):  # before a step is timed: the model decides
        caps = p.plan_drafts([WINDOW] * 64, [0] * 64, [None] * 63 + [7], None)
    assert caps[:63] == [0] * 63 and caps[63] == WINDOW  # the seeded request keeps K
    # A guided pair's twin follows its conditional request.
    caps = p.plan_drafts([0, 0], [0, 0], [7, None], None, mirror=[(1, 0)])
    assert caps[0] == caps[1] == WINDOW
    # vLLM's K for the step stays the ceiling.
    assert p.plan_drafts([0], [0], [7], 2) == [2]
