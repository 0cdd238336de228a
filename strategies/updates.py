"""A round's site updates between arrival and aggregate: checked one by one, held in bounded memory.

The coordinator's memory must not grow with the number of sites: at ``base`` one
pretrain update is 446 MB, and 50 sites would need 22 GB if a round's replies
were held until the last one came in. :class:`RoundUpdates` takes each reply as it
arrives (the pipeline pulls them one by one from Flower's Grid), runs every check
that needs only that reply (:mod:`fedmri.strategies.validation`: layout, metrics,
names, shapes, dtypes, finite values), computes its delta norm and its content
digest, and keeps its arrays: in memory while the round's updates fit
``memory_bytes``, in a raw file in ``spill_dir`` beyond it. The reply itself is
then released.

Two things wait for the last reply. The norm bound compares each delta norm with
the round's median (:func:`~fedmri.strategies.validation.norm_outliers`), which
is known only at the end; a rejected update is dropped then and never touches the
aggregate. And the aggregate is folded in content order (sorted by digest), not
in arrival order: float sums depend on their order, and arrival order depends on
which site trains fastest, so folding as replies arrive would make two runs of the
same federation differ in their last bits. Folding in content order afterwards
reads one update at a time (:func:`weighted_mean`), or one block of coordinates of
every update at a time for the coordinate-wise strategies (:func:`coordinatewise`);
either way memory holds the result plus one update or one block, never N updates.

The arithmetic is Flower's, step for step, so a streamed round is bit-identical to
Flower's ``aggregate_train`` on the list of replies (tests/strategies/test_updates.py).
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from fedmri.strategies.validation import (
    ARRAYS_KEY,
    DEFAULT_NORM_FACTOR,
    METRICS_KEY,
    NUM_EXAMPLES,
    check_norm_bounds,
    delta_norm,
    outliers_by_norm,
    read_reply,
)

# Updates a round keeps in memory before it spills to disk.
DEFAULT_MEMORY_BYTES = 1 << 30
# Coordinates of every update read at once by the coordinate-wise strategies.
DEFAULT_BLOCK_BYTES = 64 << 20


@dataclass
class Update:
    """One site's accepted-so-far update: what aggregation needs besides the arrays."""

    node: int
    # The site's num-examples (FedAvg's weight).
    weight: float
    metrics: MetricRecord
    # sha256 over the keys and bytes: the aggregation order.
    digest: str
    # ||update - current||_2 over every key, in float64.
    norm: float
    nbytes: int
    # The arrays while in memory; None once spilled.
    arrays: dict[str, np.ndarray] | None = None
    # The raw file holding the arrays back to back in the round's key order; None in memory.
    path: Path | None = None


class RoundUpdates:
    """The updates of one round, offered as they arrive and read back for aggregation.

    Args:
        current: The parameters shipped this round (what every update is checked against).
        memory_bytes: Updates held in memory before the next ones go to disk.
        spill_dir: Where spilled updates go (a fresh folder inside it, removed by :meth:`close`);
            default the system's temporary folder.
        bf16_deltas: The round asked for a bfloat16 uplink: a reply's uint16 arrays are
            bfloat16 differences from ``current`` (:func:`~fedmri.strategies.validation.read_reply`).

    Use as a context manager, or call :meth:`close`: the spilled files go with it.
    """

    def __init__(self, current: ArrayRecord | Mapping[str, np.ndarray], *, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 spill_dir: str | Path | None = None, bf16_deltas: bool = False) -> None:
        if memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
        self.current = ({key: array.numpy() for key, array in current.items()} if isinstance(current, ArrayRecord)
                        else {key: np.asarray(value) for key, value in current.items()})
        self.keys = list(self.current)
        self.bf16_deltas = bf16_deltas
        # Where each key starts in a spilled update's file.
        self._offsets, offset = {}, 0
        for key in self.keys:
            self._offsets[key] = offset
            offset += int(self.current[key].nbytes)
        self.memory_bytes = int(memory_bytes)
        self._spill_root = Path(spill_dir) if spill_dir is not None else None
        self._folder: Path | None = None
        self._updates: dict[int, Update] = {}
        self.rejected: dict[int, str] = {}
        # Bytes and count of the updates in memory now, their peaks, and how many went to disk.
        self.in_memory = 0
        self.peak_in_memory = 0
        self.count_in_memory = 0
        self.peak_count = 0
        self.spilled = 0

    # ------------------------------------------------------------------ intake
    def offer(self, msg: Message) -> str | None:
        """Check one reply and keep its update; ``None`` if kept, else why it is rejected.

        Raises:
            ValueError: A second reply from the same node (the pipeline sends one message per site).
        """
        node = int(msg.metadata.src_node_id)
        if node in self._updates or node in self.rejected:
            raise ValueError(f"two replies from node {node}: the pipeline sends one message per site and round")
        arrays, reason = read_reply(self.current, msg, bf16_deltas=self.bf16_deltas)
        if reason is not None:
            self.rejected[node] = reason
            return reason
        metrics = msg.content[METRICS_KEY]
        self.add(node, arrays, MetricRecord(dict(metrics.items())))
        return None

    def add(self, node: int, arrays: dict[str, np.ndarray], metrics: MetricRecord) -> Update:
        """Keep an update that has passed the per-reply checks (:meth:`offer` does both)."""
        digest = hashlib.sha256()
        for key in sorted(arrays):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(arrays[key]).data)  # the bytes, without a copy
        nbytes = sum(int(arrays[key].nbytes) for key in self.keys)
        update = Update(node, float(metrics[NUM_EXAMPLES]), metrics, digest.hexdigest(),
                        delta_norm(self.current, arrays), nbytes)
        if self.in_memory + nbytes <= self.memory_bytes:
            update.arrays = {key: arrays[key] for key in self.keys}
            self.in_memory += nbytes
            self.count_in_memory += 1
            self.peak_in_memory = max(self.peak_in_memory, self.in_memory)
            self.peak_count = max(self.peak_count, self.count_in_memory)
        else:
            update.path = self._spill(node, arrays)
            self.spilled += 1
        self._updates[node] = update
        return update

    def _spill(self, node: int, arrays: Mapping[str, np.ndarray]) -> Path:
        if self._folder is None:
            if self._spill_root is not None:
                self._spill_root.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="updates-", dir=self._spill_root))
        path = self._folder / f"node-{node}.raw"
        with open(path, "wb") as fh:
            for key in self.keys:
                fh.write(np.ascontiguousarray(arrays[key]).data)
        return path

    # --------------------------------------------------------------- decisions
    def reject_outliers(self, factor: float = DEFAULT_NORM_FACTOR, *, max_norm: float | None = None) -> dict[int, str]:
        """Apply the round's norm bound (:func:`~fedmri.strategies.validation.norm_outliers`) and drop
        the updates it rejects; returns node -> reason for those."""
        check_norm_bounds(factor, max_norm)
        out = outliers_by_norm({node: u.norm for node, u in self._updates.items()}, factor, max_norm)
        for node, reason in out.items():
            self._drop(node)
            self.rejected[node] = reason
        return out

    def _drop(self, node: int) -> None:
        update = self._updates.pop(node)
        if update.arrays is not None:
            self.in_memory -= update.nbytes
            self.count_in_memory -= 1
        if update.path is not None:
            update.path.unlink(missing_ok=True)

    @property
    def accepted(self) -> list[Update]:
        """The kept updates in content order (by digest): the order every aggregate folds them in."""
        return sorted(self._updates.values(), key=lambda u: u.digest)

    def __len__(self) -> int:
        return len(self._updates)

    # ----------------------------------------------------------------- reading
    def arrays(self, update: Update) -> dict[str, np.ndarray]:
        """The update's arrays; a spilled update comes back as read-only views of its file."""
        if update.arrays is not None:
            return update.arrays
        assert update.path is not None
        out, offset = {}, 0
        for key in self.keys:
            like = self.current[key]
            out[key] = np.memmap(update.path, dtype=like.dtype, mode="r", offset=offset, shape=like.shape)
            offset += like.nbytes
        return out

    def read(self, update: Update, key: str, start: int, stop: int) -> np.ndarray:
        """Coordinates ``start:stop`` of the flattened ``key`` of ``update``, as a new array.

        A spilled update is read from its file and nothing stays open: a round of 200 spilled
        updates of 150 arrays each would otherwise hold 30,000 memory maps (each one a file
        descriptor) at once.
        """
        if update.arrays is not None:
            return np.asarray(update.arrays[key]).reshape(-1)[start:stop]
        assert update.path is not None
        like = self.current[key]
        return np.fromfile(update.path, dtype=like.dtype, count=stop - start,
                           offset=self._offsets[key] + start * like.itemsize)

    def close(self) -> None:
        """Forget every update and remove the spilled files."""
        self._updates.clear()
        self.in_memory = self.count_in_memory = 0
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> RoundUpdates:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def from_replies(cls, current: ArrayRecord, replies: list[Message], **kwargs: object) -> RoundUpdates:
        """Every reply offered at once (tests, and callers that already hold the list).

        Args:
            current: The parameters shipped; the updates are checked against the keys they carry.
            replies: Replies that passed ``validate_replies``; empty ones are skipped.

        Raises:
            ValueError: The replies carry different keys, a key that was not shipped, or fail
                the per-reply checks: pass replies through ``validate_replies`` first.
        """
        replies = [msg for msg in replies if msg.has_content()]
        names = set(replies[0].content[ARRAYS_KEY].keys()) if replies else set()
        for msg in replies[1:]:
            if set(msg.content[ARRAYS_KEY].keys()) != names:
                raise ValueError(f"site {msg.metadata.src_node_id} sent other parameter names than site "
                                 f"{replies[0].metadata.src_node_id}: pass replies through validate_replies first")
        unknown = sorted(names - set(current.keys()))
        if unknown:
            raise ValueError(f"replies carry {unknown[0]!r}, which was not shipped: "
                             "pass replies through validate_replies first")
        updates = cls({key: current[key].numpy() for key in current.keys() if key in names}, **kwargs)  # type: ignore[arg-type]
        for msg in replies:
            reason = updates.offer(msg)
            if reason is not None:
                updates.close()
                raise ValueError(f"the update of site {msg.metadata.src_node_id} fails its checks ({reason}): "
                                 "pass replies through validate_replies first")
        return updates


# ---------------------------------------------------------------- aggregation
def weighted_mean(updates: RoundUpdates, weights: list[float] | None = None,
                  transform: Callable[[Update, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
                  ) -> dict[str, np.ndarray]:
    """Flower's FedAvg (``aggregate_arrayrecords``), one update at a time, in content order.

    ``sum_i x_i * (w_i / sum_j w_j)``, folded in place in the updates' dtypes: the same
    operations in the same order as Flower, so the result is bit-identical.

    Args:
        updates: The round's kept updates (at least one).
        weights: One weight per update in :attr:`RoundUpdates.accepted` order; default num-examples.
        transform: Applied to each update's arrays before they are weighted (central DP's clip).
    """
    accepted = updates.accepted
    if not accepted:
        raise ValueError("no update to aggregate")
    weights = [u.weight for u in accepted] if weights is None else list(weights)
    total = sum(weights)
    out: dict[str, np.ndarray] = {}
    for update, weight in zip(accepted, weights, strict=True):
        factor = weight / total
        arrays = updates.arrays(update)
        if transform is not None:
            arrays = transform(update, arrays)
        for key in updates.keys:
            if key not in out:
                out[key] = np.asarray(arrays[key]) * factor
            else:
                out[key] += np.asarray(arrays[key]) * factor
    # A 0-d parameter (logit_scale) comes out of the arithmetic as a NumPy scalar.
    return {key: np.asarray(value) for key, value in out.items()}


def coordinatewise(updates: RoundUpdates, reduce: Callable[[np.ndarray], np.ndarray], *,
                   block_bytes: int = DEFAULT_BLOCK_BYTES) -> dict[str, np.ndarray]:
    """A per-coordinate statistic of the updates (median, trimmed mean), a block of coordinates at a time.

    Args:
        updates: The round's kept updates (at least one).
        reduce: Takes an ``(n_updates, n_coordinates)`` stack and returns one value per
            coordinate, as Flower's FedMedian and FedTrimmedAvg do along axis 0.
        block_bytes: About how many bytes of the stack are in memory at once.
    """
    accepted = updates.accepted
    if not accepted:
        raise ValueError("no update to aggregate")
    out: dict[str, np.ndarray] = {}
    for key in updates.keys:
        like = updates.current[key]
        size = int(like.size)
        step = max(1, block_bytes // max(1, like.itemsize * len(accepted)))
        flat_out: np.ndarray | None = None
        for start in range(0, max(size, 1), step):
            stop = min(size, start + step)
            stack = np.stack([updates.read(u, key, start, stop) for u in accepted])
            part = np.asarray(reduce(stack))
            if flat_out is None:
                flat_out = np.empty(size, dtype=part.dtype)
            flat_out[start:stop] = part
        assert flat_out is not None
        out[key] = flat_out.reshape(like.shape)
    return out


def memory_bytes_from_mb(mb: float) -> int:
    """A config's megabytes as bytes (``math.inf`` keeps everything in memory)."""
    return int(mb * 1e6) if math.isfinite(mb) else 1 << 62
