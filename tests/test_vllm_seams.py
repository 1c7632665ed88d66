"""scripts/check_vllm_seams.py against the installed vLLM, and the version gate.

The script reads a vLLM source tree with `ast` (docs/vllm-0.33-audit.md): on the
vLLM CI installs it must pass, and a tree where a seam changed must fail it.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "check_vllm_seams.py"


def installed_vllm_source() -> Path:
    import vllm

    return Path(vllm.__file__).resolve().parent.parent


def check(source: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(source)], capture_output=True,
                          text=True, timeout=120)


def test_every_seam_holds_in_the_installed_vllm():
    result = check(installed_vllm_source())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "# 0 failure(s)" in result.stdout
    assert "seam   OK                vllm.v1.sample.rejection_sampler.rejection_sample" in result.stdout


def test_a_seam_that_lost_a_parameter_fails_the_check(tmp_path):
    source = installed_vllm_source() / "vllm"
    copy = tmp_path / "vllm"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.pyc"))
    sampler = copy / "v1" / "sample" / "rejection_sampler.py"
    head, _, tail = sampler.read_text().partition("def sample_recovered_tokens(")
    assert tail, "sample_recovered_tokens moved"
    # Renamed, as a refactor upstream might: our wrapper reads draft_probs by name.
    tail = tail.replace("    draft_probs:", "    draft_distribution:", 1)
    sampler.write_text(head + "def sample_recovered_tokens(" + tail)
    result = check(tmp_path)
    assert result.returncode == 1
    assert "sample_recovered_tokens" in result.stdout


@pytest.mark.parametrize("version, accepted", [("0.32.0", True), ("0.33.0", True), ("0.34.0", False)])
def test_the_version_gate_follows_the_audit(monkeypatch, version, accepted):
    import vllm

    from vllm_sjd.patches.wrapping import check_vllm_version

    monkeypatch.setattr(vllm, "__version__", version)
    if accepted:
        check_vllm_version()
    else:
        with pytest.raises(RuntimeError, match="checked on vLLM 0.32.x and 0.33.x"):
            check_vllm_version()
