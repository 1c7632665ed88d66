"""`vllm-sjd selfcheck`: passes on this CPU in the real engine, and fails loudly when a check fails."""

import subprocess
import sys
from pathlib import Path

import pytest

from vllm_sjd import selfcheck
from vllm_sjd.selfcheck_cases import FAMILY_CASES


def test_a_check_that_raises_fails_without_stopping_the_others():
    def broken():
        raise RuntimeError("engine did not start\nsecond line")

    def fine():
        return selfcheck.CheckResult("fine", "ok", 0.1, "done")

    rows = []
    results = selfcheck.run_checks([("broken", broken), ("fine", fine)], report=rows.append)
    assert [(r.name, r.result) for r in results] == [("broken", "FAIL"), ("fine", "ok")]
    assert "RuntimeError: engine did not start second line" in results[0].detail
    assert len(rows) == 2 and "FAIL" in rows[0]


def test_a_failed_check_makes_the_exit_status_non_zero(monkeypatch, capsys):
    failing = selfcheck.CheckResult("greedy SJD == AR: X", "FAIL", 1.0, "image 0: first differs")
    monkeypatch.setattr(selfcheck, "planned_checks", lambda workdir, options: [("x", lambda: failing)])
    assert selfcheck.main([]) == 1
    out = capsys.readouterr().out
    assert "0 passed, 1 failed, 0 skipped" in out and "collect_env" in out


def test_no_matching_check_is_a_usage_error():
    assert selfcheck.main(["--only", "no-such-check"]) == 2


@pytest.mark.engine
def test_the_chi_square_check_fails_a_proposer_that_reports_a_wrong_q(tmp_path):
    from vllm_sjd.selfcheck_cases import CHI_SQUARE

    def wrong_q(llm):  # each slot reports the next slot's q
        llm.collective_rpc("sjd_proposer_call",
                           args=("set_fault", "neighbour", CHI_SQUARE.temperature))

    options = selfcheck.Options("float32", eager=None, only=[])
    result = selfcheck.check_chi_square(
        tmp_path, options, {"proposer": "tests.faulty_proposers.FaultyQProposer"}, wrong_q)
    assert result.result == "FAIL", result.detail


@pytest.mark.engine
def test_selfcheck_passes_on_this_machine(tmp_path):
    command = [str(Path(sys.executable).parent / "vllm-sjd"), "selfcheck"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    table = result.stdout[result.stdout.rindex("vllm-sjd selfcheck:"):]
    assert result.returncode == 0, table + result.stderr[-2000:]
    for case in FAMILY_CASES:
        assert f"greedy SJD == AR: {case.name}" in table
    rows = [line.split() for line in table.splitlines()]
    named = {"guided pair", "SJD samples", "guided greedy ZipAR", "image endpoint", "tensor parallel 2"}
    assert all(any(" ".join(row).startswith(name) for row in rows) for name in named)
    # Every family, the guided pair, chi-square, ZipAR, endpoint, and (two CPU
    # cores here) tensor parallel 2 rather than a skip.
    assert f"{len(FAMILY_CASES) + 5} passed, 0 failed, 0 skipped" in table
