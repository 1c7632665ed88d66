"""The step's tensor work as compiled graphs on a GPU: a few fused kernels instead of ~200 calls.

On a GPU each eager torch call costs the host 15-20 us, and SJD's step outside
the forward pass is mostly such calls (benchmarks/RESULTS.md, "The SJD step
outside the forward pass, on a GPU"). The verifier's and the window's tensor
work (no host reads, no numpy) are written as functions of tensors alone and
wrapped here: with compilation on, each runs as one `torch.compile` graph
with dynamic shapes (a new window size does not recompile; a batch of one
and the first step without drafts do). Off by default; the SJD runner turns
it on with the setting `compile_step` on a CUDA device, unless vLLM runs
eager (`enforce_eager`). On a CPU compiling costs about 15 s and saves
little. The same tokens either way (tests/test_core_compiled.py).
"""

import functools

import torch

_enabled = False


def set_compiled(enabled: bool) -> None:
    """Run the wrapped functions compiled (True) or eager (False), process-wide."""
    global _enabled
    _enabled = enabled


def compiled_enabled() -> bool:
    return _enabled


def compiled_when_enabled(fn):
    """`fn` eager, or through torch.compile(dynamic=True) while compilation is on."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal compiled
        if not _enabled:
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(*args, **kwargs)

    wrapper.eager = fn
    return wrapper
