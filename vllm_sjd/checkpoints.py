"""Reading weight files without running their pickles: every decoder and converter uses this.

A .safetensors file holds tensors only. A .pt/.ckpt file is a pickle, which
can run arbitrary code when loaded; it is read with
torch.load(weights_only=True), which builds tensors and plain containers and
refuses anything else, plus argparse.Namespace (LlamaGen's training
checkpoints keep their "args" in one).
"""

import argparse
import pickle
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

ALLOWED_GLOBALS = (argparse.Namespace,)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model; the message says why."""


def listing(items: Sequence[str], limit: int = 8) -> str:
    """The first few items, comma-separated, with a count when cut short."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def torch_load(path: str | Path, *, mmap: bool = False):
    """torch.load(weights_only=True) on CPU; a file with other pickled objects is refused."""
    with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"{path}: refused -- it holds pickled objects other than tensors and plain "
                "containers, which weights_only loading does not execute. If the file is "
                "trusted, save its state dict to .safetensors and load that."
            ) from err


def read_weights(path: str | Path, wrapper_keys: Iterable[str] = ("state_dict",)) -> Mapping:
    """The state dict of a .safetensors or .pt/.ckpt file.

    A .pt's state dict is the first of `wrapper_keys` that holds a mapping
    (Lightning's "state_dict", LlamaGen's "model"), else its top level.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    loaded = torch_load(path)
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(loaded).__name__}")
    return next((loaded[k] for k in wrapper_keys if isinstance(loaded.get(k), Mapping)), loaded)


def keep_prefixed(
    state: Mapping, prefixes: tuple[str, ...], path: str | Path, what: str
) -> dict[str, torch.Tensor]:
    """The entries whose names start with one of `prefixes`; they must exist and be tensors."""
    kept = {k: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefixes)}
    if not kept:
        sample = ", ".join(sorted(map(str, state))[:8])
        raise CheckpointError(
            f"{path}: no {what} (keys starting with {', '.join(prefixes)}); "
            f"its keys begin: {sample or '(none)'}"
        )
    if not_tensors := sorted(k for k, v in kept.items() if not isinstance(v, torch.Tensor)):
        raise CheckpointError(f"{path}: entries that are not tensors: {listing(not_tensors)}")
    return kept


def fit_problems(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], limit: int = 8
) -> list[str]:
    """What keeps `state` from loading strictly into weights of `expected` shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(shape)}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != tuple(shape)
    ]
    return [
        f"{title}: {listing(items, limit)}"
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch", mismatched))
        if items
    ]


def load_strictly(module: torch.nn.Module, state: Mapping[str, torch.Tensor], path, hint: str) -> None:
    """module.load_state_dict(state, strict=True), with a message that lists every misfit."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if problems := fit_problems(state, expected):
        raise CheckpointError(f"{path} does not fit this decoder ({hint}) -- " + "; ".join(problems))
    module.load_state_dict(state, strict=True)
