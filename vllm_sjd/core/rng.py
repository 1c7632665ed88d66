"""Counter-based random numbers for drafting.

Drafts must be exact samples from the q handed to the verifier, identical on
every tensor-parallel rank, and reproducible for a seeded request whatever batch
it shares. A stateful generator gives only the first. Here every random number
is a hash of (request key, window position, slot): no state to keep in sync,
the same on every rank, independent of batch composition.

A request's window position strictly increases from step to step (each step
commits at least one token), so no (key, position, slot) triple is used twice
and the numbers of one step are independent of everything seen before it.
Separate uses draw from separate streams (the stream is XORed into the key).

The Gumbel-style noise is the exception on purpose: it is keyed by absolute
position and token, so a position sees the same noise on every pass until it
is verified (core/drafting.py says why that stays exact).
"""

import math

import numpy as np
import torch

from vllm_sjd.core import cpu_kernels

_MASK64 = (1 << 64) - 1


def _as_signed64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


# splitmix64 constants (Steele, Lea, Flood 2014), as signed int64 for torch.
_GOLDEN = _as_signed64(0x9E3779B97F4A7C15)
_MUL1 = _as_signed64(0xBF58476D1CE4E5B9)
_MUL2 = _as_signed64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on an int64 tensor (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MUL1
    x = (x ^ _shr(x, 27)) * _MUL2
    return x ^ _shr(x, 31)


def splitmix64_reference(x: int) -> int:
    """Pure-Python splitmix64, the specification `splitmix64` is tested against."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def key_from_seed(seed: int) -> int:
    """A request's drafting key from its sampling seed."""
    return _as_signed64(splitmix64_reference(splitmix64_reference(seed & _MASK64)))


# Streams: independent numbers for independent uses of one request's key.
DRAFT_STREAM = 0
COUPLING_STREAM = _as_signed64(0x5851F42D4C957F2D)
RESIDUAL_STREAM = _as_signed64(0x2545F4914F6CDD1D)
GUMBEL_STREAM = _as_signed64(0xD1B54A32D192ED03)
# Verification (core/verify.py): the acceptance test, and the token drawn at a position.
ACCEPT_STREAM = _as_signed64(0xAF251AF3B0F025B5)
TOKEN_STREAM = _as_signed64(0xE220A8397B1DCDAF)
# SJD2 (vllm_sjd/sjd2.py): the token each slot samples, and the noise a new slot starts from.
DENOISING_TOKEN_STREAM = _as_signed64(0x94D049BB133111EB)
DENOISING_NOISE_STREAM = _as_signed64(0xBF58476D1CE4E5B9)


_GOLDEN_U64, _MUL1_U64, _MUL2_U64 = (np.uint64(c & _MASK64) for c in (_GOLDEN, _MUL1, _MUL2))
_SHIFTS_U64 = (np.uint64(30), np.uint64(27), np.uint64(31))


def _splitmix64_host(x: np.ndarray) -> np.ndarray:
    """splitmix64 on uint64 numpy (wrapping arithmetic): the same bits as `splitmix64`.
    In place after the first add: a step hashes a few dozen numbers, so numpy's
    per-call cost, not the arithmetic, is what counts."""
    first, second, third = _SHIFTS_U64
    x = x + _GOLDEN_U64
    x ^= x >> first
    x *= _MUL1_U64
    x ^= x >> second
    x *= _MUL2_U64
    x ^= x >> third
    return x


def _host_uint64(values) -> np.ndarray:
    """int64 numbers (numpy, lists, CPU tensors or ints) as their uint64 bit patterns."""
    if isinstance(values, torch.Tensor):
        values = values.numpy()
    return np.asarray(values, dtype=np.int64).view(np.uint64)


def counter_uniforms(keys, positions, slots, streams) -> np.ndarray:
    """Uniforms in [0, 1), float64 numpy, one per element of the broadcast int64 inputs.

    keys: per-request keys; positions: absolute token indices; slots: the
    slot within a window (0 for one number per position); streams: the use
    (XORed into the key). Every uniform of this module comes from here, on
    the host: keys and positions are known there, so a step computes its
    numbers without waiting for the device and sends them in one copy.
    Broadcasting lets one call hash several streams or a step's positions.
    """
    keys, positions = _host_uint64(keys), _host_uint64(positions)
    slots, streams = _host_uint64(slots), _host_uint64(streams)
    loops = cpu_kernels.loaded()
    if loops is not None:  # the same bits in one call (numpy's ~25 small calls: ~20 us)
        return loops.counter_uniform(keys, positions, slots, streams)
    x = _splitmix64_host((keys ^ streams) ^ _splitmix64_host(positions))
    x = _splitmix64_host(x + slots)
    # Top 53 bits -> a double in [0, 1).
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def window_uniforms(
    keys,  # [B] int64: one key per request (numpy, or a CPU tensor)
    positions,  # [B] int64: token index of the window's first draft
    num_slots: int,
    stream: int | tuple[int, ...] = DRAFT_STREAM,
):
    """Uniform numbers in [0, 1), [B, num_slots] float64, one per draft slot.

    With a tuple of streams: [len(streams), B, num_slots], the same numbers
    as one call per stream. numpy in, numpy out; tensors in, a CPU tensor out.
    """
    as_tensor = isinstance(keys, torch.Tensor)
    keys, positions = _host_uint64(keys), _host_uint64(positions)
    slots = np.arange(num_slots, dtype=np.int64)
    if isinstance(stream, tuple):
        streams = np.asarray(stream, dtype=np.int64)[:, None, None]
        u = counter_uniforms(keys[None, :, None], positions[None, :, None], slots, streams)
    else:
        u = counter_uniforms(keys[:, None], positions[:, None], slots, stream)
    return torch.from_numpy(u) if as_tensor else u


def token_exponentials(
    keys: torch.Tensor,  # [B] int64
    positions: torch.Tensor,  # [B, K] int64: absolute token index of each slot
    vocab_size: int,
    token_ids: torch.Tensor | None = None,  # [U]: noise for these ids only, [B, K, U]
) -> torch.Tensor:
    """Exp(1) noise per (request, absolute position, token), [B, K, V] float32.

    The same for a position on every pass. argmax(q / E) is an exact sample
    of q (the exponential form of the Gumbel-max trick). 24-bit uniforms,
    strictly inside (0, 1): float32 resolution, far below what a test sees.
    """
    tokens = (
        torch.arange(vocab_size, dtype=torch.int64, device=keys.device)
        if token_ids is None
        else token_ids.to(keys.device)
    )
    base = splitmix64((keys ^ GUMBEL_STREAM).unsqueeze(1) ^ splitmix64(positions))
    x = splitmix64(base.unsqueeze(-1) + tokens)
    u = (_shr(x, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(u)


def position_normals(
    keys: torch.Tensor,  # [B] int64
    positions: torch.Tensor,  # [B, K] int64: absolute token index of each slot
    dim: int,
) -> torch.Tensor:
    """Standard normal noise [B, K, dim] float32, fixed per (request, absolute position):
    a seeded request draws the same noise in any batch. Box-Muller on 24-bit uniforms."""
    base = splitmix64((keys ^ DENOISING_NOISE_STREAM).unsqueeze(1) ^ splitmix64(positions))
    x = splitmix64(base.unsqueeze(-1) + torch.arange(2 * dim, dtype=torch.int64, device=keys.device))
    u = (_shr(x, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    radius = torch.sqrt(-2.0 * torch.log(u[..., :dim]))
    return radius * torch.cos(2 * math.pi * u[..., dim:])
