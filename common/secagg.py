"""Secure aggregation primitives, SecAgg+ (Bell et al., CCS 2020): what sites and coordinator share.

A site's update is clipped to an L2 norm, weighted by its example count, encoded
as fixed-point integers in the ring Z_{2^32}, and masked twice before it leaves:

- a **pairwise mask** with each neighbour, expanded from a seed that the two
  sites agree on by X25519 key agreement (added by the lower node id,
  subtracted by the higher, so it cancels in the sum);
- a **self mask**, expanded from a random seed ``b``.

Each site gives Shamir shares of ``b`` and of its mask key to its neighbours
(and keeps one), encrypted for each with a key from a second agreement. After
the masked inputs are in, the coordinator asks the surviving sites for shares of
``b`` of every site whose input arrived, and shares of the mask key of every
neighbour that dropped out before sending; with ``threshold`` shares of each it
removes the self masks and the dropped sites' pairwise masks, and learns only the
sum. A site answers one unmasking request per round and never both kinds of
share for one node, and the threshold is a majority of each node's share
holders, so the coordinator cannot collect both secrets of a site.

Reused from Flower (``flwr.common.secure_aggregation``): Shamir sharing over
GF(2^128) (``create_shares``, ``combine_shares``), Fernet encryption of the
shares, and the share plaintext layout. Not reused: its ``pseudo_rand_gen``
folds a seed to 32 bits for NumPy's Mersenne Twister (a coordinator could try
all 2^32 seeds), and its ``quantize`` draws from NumPy's global random state;
masks here are ChaCha20 key streams of a 256-bit seed and the rounding draws from
a generator of its own.

Overflow: the ring holds signed sums up to 2^31 - 1. With ``n`` sites of weight
at most ``W`` and updates clipped to L2 norm ``C`` (so every coordinate is within
``C``), :func:`fixed_point_scale` picks the largest ``scale`` with
``n * (W * C * scale + 1) <= 2^31 - 1``. Stochastic rounding is unbiased and off
by less than one unit per site, so the unmasked mean of the updates is within
``n / (scale * sum of weights)`` of the exact weighted mean, coordinate by
coordinate (:func:`quantisation_bound`).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmri.errors import FedmriError

RING_BITS = 32
MAX_SIGNED = 2 ** (RING_BITS - 1) - 1
SEED_BYTES = 32
WEIGHT_KEY = "secagg.weight"  # the masked vector's extra entry: the site's weight, masked with the rest
_CHUNK = 1 << 22  # key stream bytes per ChaCha20 call (4 MiB)


class SecAggError(FedmriError):
    """A secure aggregation step cannot go on (too few shares, a bad message, an overflow)."""


# --- keys --------------------------------------------------------------------------------------------------


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes: ``(private, public)``, 32 bytes each."""
    private = X25519PrivateKey.generate()
    raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    return raw, public_key(raw)


def public_key(private: bytes) -> bytes:
    """The raw public key of a raw X25519 private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, purpose: str, context: str) -> bytes:
    """A 32-byte secret two nodes share: X25519, then HKDF-SHA256 bound to ``purpose`` and ``context``.

    ``context`` names the run and round, so a seed is never reused across rounds.

    Raises:
        SecAggError: ``peer_public`` is not a valid X25519 public key.
    """
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise SecAggError(f"key agreement failed: {exc}") from None
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None,
                info=f"fedmri-secagg/{purpose}/{context}".encode()).derive(shared)


def fernet_key(secret: bytes) -> bytes:
    """A Fernet key (Flower's ``encrypt``/``decrypt``) from a 32-byte shared secret."""
    return base64.urlsafe_b64encode(secret)


# --- masks -------------------------------------------------------------------------------------------------


def expand(seed: bytes, sizes: Sequence[int]) -> list[np.ndarray]:
    """Uniform uint32 vectors of ``sizes`` from a 32-byte seed: the ChaCha20 key stream, one stream for all.

    Raises:
        SecAggError: The seed is not 32 bytes.
    """
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    out = []
    for size in sizes:
        buf = np.zeros(int(size), dtype=np.uint32)
        view = memoryview(buf).cast("B")
        for start in range(0, len(view), _CHUNK):  # in place: the zeros become the key stream
            chunk = view[start:start + _CHUNK]
            encryptor.update_into(chunk, chunk)
        out.append(buf)
    return out


def add_mask(vectors: Mapping[str, np.ndarray], seed: bytes, sign: int) -> None:
    """``vectors += sign * expand(seed)`` in the ring, in place; keys in sorted order take the stream."""
    keys = sorted(vectors)
    for key, mask in zip(keys, expand(seed, [vectors[k].size for k in keys]), strict=True):
        flat = vectors[key].reshape(-1)
        if sign > 0:
            np.add(flat, mask, out=flat)
        else:
            np.subtract(flat, mask, out=flat)


# --- fixed point -------------------------------------------------------------------------------------------


def fixed_point_scale(sites: int, max_weight: float, clip_norm: float) -> float:
    """The largest scale whose sum of ``sites`` encoded updates cannot overflow the signed ring.

    Raises:
        SecAggError: No scale >= 1 fits (too many sites or too large a weight or clip).
    """
    if sites < 1 or not max_weight > 0 or not clip_norm > 0:
        raise SecAggError(f"sites {sites}, max weight {max_weight} and clip norm {clip_norm} must be > 0")
    scale = (MAX_SIGNED / sites - 1.0) / (max_weight * clip_norm)
    if scale < 1.0:
        raise SecAggError(f"{sites} sites of weight up to {max_weight:g} with updates clipped to {clip_norm:g} "
                          f"overflow a {RING_BITS}-bit ring; lower secure_aggregation.max_weight or clip_norm")
    return float(scale)


def distributed_noise_std(clip_norm: float, noise_multiplier: float, sites: int) -> float:
    """One site's share of distributed DP noise: ``z C / sqrt(m)``, so ``m`` shares sum to ``N(0, (z C)^2)``."""
    return noise_multiplier * clip_norm / math.sqrt(sites)


def distributed_bound(clip_norm: float, noise_multiplier: float, sites: int) -> float:
    """The coordinate range a site's clipped and noised update is encoded in: ``C`` plus 8 noise stds.

    A clipped update's coordinates are within ``C``; Gaussian noise passes 8 of its stds
    with probability below 1.3e-15 per coordinate, and a site clamps the rare coordinate
    that does (the one departure from the Gaussian mechanism, stated in the README).
    """
    return clip_norm + 8.0 * distributed_noise_std(clip_norm, noise_multiplier, sites)


def quantisation_bound(sites: int, scale: float, total_weight: float) -> float:
    """Largest error of one coordinate of the unmasked weighted mean against the exact one."""
    return sites / (scale * total_weight)


def encode(values: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """``values * scale``, stochastically rounded (unbiased), as uint32 two's complement."""
    x = np.asarray(values, dtype=np.float64) * scale
    low = np.floor(x)
    rounded = low + (rng.random(x.shape) < (x - low))
    return np.asarray(rounded, dtype=np.float64).astype(np.int64).astype(np.uint32).reshape(x.shape)


def decode(total: np.ndarray, scale: float) -> np.ndarray:
    """A ring sum back to float64: read as signed 32-bit, divided by ``scale``."""
    return np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float64) / scale


def clip_l2(deltas: Mapping[str, np.ndarray], max_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """``deltas`` scaled to L2 norm at most ``max_norm`` (all arrays as one vector); and the norm before."""
    norm = math.sqrt(sum(float(np.square(d, dtype=np.float64).sum()) for d in deltas.values()))
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: np.asarray(d, dtype=np.float64) * factor for k, d in deltas.items()}, norm


# --- graph and threshold -----------------------------------------------------------------------------------


def neighbour_graph(nodes: Iterable[int], degree: int, seed: int) -> dict[int, tuple[int, ...]]:
    """SecAgg+'s sparse graph: nodes on a random ring, each joined to ``degree // 2`` on either side.

    ``degree`` 0, or at least ``len(nodes) - 1``, joins every pair (SecAgg).
    """
    order = sorted(int(n) for n in nodes)
    n = len(order)
    if degree <= 0 or degree >= n - 1:
        return {u: tuple(v for v in order if v != u) for u in order}
    perm = [order[i] for i in np.random.default_rng(seed).permutation(n)]
    half = max(1, degree // 2)
    graph: dict[int, set[int]] = {u: set() for u in order}
    for i, u in enumerate(perm):
        for d in range(1, half + 1):
            v = perm[(i + d) % n]
            graph[u].add(v)
            graph[v].add(u)
    return {u: tuple(sorted(vs)) for u, vs in graph.items()}


def share_threshold(holders: int, fraction: float) -> int:
    """Shares that rebuild a secret held by ``holders`` nodes: ``fraction`` of them, and a majority at least."""
    majority = holders // 2 + 1
    return min(holders, max(majority, math.ceil(fraction * holders)))
