"""SJD settings are validated at start-up with messages that name the setting."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, make_llm
from vllm_sjd.config import SJDConfig, SJDConfigError, split_speculative_config


def test_defaults_and_split():
    vllm_spec, sjd = split_speculative_config({"method": "sjd"})
    assert sjd == SJDConfig(num_speculative_tokens=16, drafting="coupled", initial_drafts="above",
                            dynamic_num_speculative_tokens="unseeded")
    assert vllm_spec == {
        "method": "custom_class",
        "model": "vllm_sjd.proposer.SJDProposer",
        "num_speculative_tokens": 16,
    }


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"num_speculative_tokens": 0}, "'num_speculative_tokens'] = 0 is invalid: allowed: an integer from 1 to 64"),
        ({"num_speculative_tokens": 65}, "an integer from 1 to 64"),
        ({"initial_drafts": "zeros"}, "'initial_drafts'] = 'zeros' is invalid: allowed: one of 'uniform', 'last_distribution', 'above'"),
        ({"drafting": "tree"}, "'drafting'] = 'tree' is invalid: allowed: one of 'independent', 'coupled', 'gumbel'"),
        ({"window": 4}, "'window'] = 4 is invalid: allowed: not a setting; SJD accepts"),
        ({"dynamic_num_speculative_tokens": True},
         "allowed: one of 'unseeded', 'all', 'off'"),
    ],
)
def test_bad_settings_name_the_setting_and_allowed_values(settings, expected):
    with pytest.raises(SJDConfigError, match="Invalid SJD setting") as err:
        split_speculative_config({"method": "sjd", **settings})
    assert expected in str(err.value)


def test_llm_refuses_bad_window_before_starting_an_engine(peaked_model):
    with pytest.raises(SJDConfigError, match="num_speculative_tokens"):
        make_llm(peaked_model, sjd={"num_speculative_tokens": 100})


def test_llm_refuses_configurations_sjd_cannot_serve(peaked_model):
    from vllm_sjd.patches.speculative_config import SJDUnsupportedError

    with pytest.raises(SJDUnsupportedError, match="worker_cls"):
        make_llm(peaked_model, sjd={"num_speculative_tokens": 4},
                 worker_cls="vllm.v1.worker.cpu_worker.CPUWorker")
    with pytest.raises(SJDUnsupportedError, match="pipeline_parallel_size"):
        make_llm(peaked_model, sjd={"num_speculative_tokens": 4}, pipeline_parallel_size=2)


def test_vllm_serve_stops_on_a_bad_setting(peaked_model):
    vllm_command = str(Path(sys.executable).parent / "vllm")
    result = subprocess.run(
        [vllm_command, "serve", str(peaked_model), "--speculative-config",
         '{"method": "sjd", "num_speculative_tokens": 4, "initial_drafts": "zeros"}'],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )
    assert result.returncode != 0
    assert "'initial_drafts'] = 'zeros' is invalid" in result.stderr + result.stdout
