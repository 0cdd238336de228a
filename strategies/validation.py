"""Checks on every site's reply before it is aggregated (docs/architecture.md, "Validation and aggregation").

A bad reply is rejected, never fatal: the round goes on with the others. The
checks, in order: Flower error or empty reply, record layout, ``num-examples`` and
finite metrics, parameter names, shapes, dtypes, finite values, and last the L2
norm of the update's delta against the other updates of the round.

Norm bound. With three or more updates the reference is the median delta norm,
which one or even several (fewer than half) outliers cannot drag up. With one or
two a median says nothing (with two it is their mean, and a 1000x update drags it
500x), so the reference is the smallest delta norm: of two sites one may be
rejected, never both, and a lone update is only held to ``max_norm``. A zero
reference (nobody moved, or half the sites sent no change) gives no scale, so the
relative test is skipped that round and only ``max_norm`` applies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from fedmri.errors import ConfigError
from fedmri.protocol import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES  # noqa: F401 -- re-exported to strategies
from fedmri.wire import bf16_to_float32
DEFAULT_NORM_FACTOR = 10.0


@dataclass
class ValidationReport:
    """Who got into a round's aggregate and who did not, and why.

    Args:
        accepted: Node ids of the replies that passed every check.
        rejected: Node id -> one-line reason.
    """

    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)

    @classmethod
    def from_result(cls, accepted: list[Message], rejected: Mapping[int, str]) -> ValidationReport:
        """The report for what :func:`validate_replies` returned."""
        return cls([msg.metadata.src_node_id for msg in accepted], dict(rejected))

    def summary(self) -> str:
        """One line for the round's log."""
        line = f"{len(self.accepted)} accepted, {len(self.rejected)} rejected"
        reasons = "; ".join(f"site {node}: {why}" for node, why in sorted(self.rejected.items()))
        return f"{line} ({reasons})" if reasons else line

    def as_metrics(self) -> MetricRecord:
        """Counts to store with the round's metrics."""
        return MetricRecord({"sites-accepted": len(self.accepted), "sites-rejected": len(self.rejected)})


def validate_metrics(metrics: MetricRecord) -> str | None:
    """None if the metrics carry a usable ``num-examples`` and only finite values, else why not."""
    if NUM_EXAMPLES not in metrics:
        return f"metrics lack {NUM_EXAMPLES!r}"
    weight = metrics[NUM_EXAMPLES]
    if isinstance(weight, (list, bool)) or not isinstance(weight, (int, float)):
        return f"{NUM_EXAMPLES!r} must be one number, got {weight!r}"
    if not math.isfinite(weight) or weight <= 0:
        return f"{NUM_EXAMPLES!r} must be a finite number > 0, got {weight!r}"
    for key, value in metrics.items():
        if not all(math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            return f"metric {key!r} is not finite: {value!r}"
    return None


def validate_update(expected: ArrayRecord | Mapping[str, np.ndarray], update: ArrayRecord) -> str | None:
    """None if ``update`` has exactly the names, shapes and dtypes of ``expected`` and finite values.

    Args:
        expected: What the server shipped (an ArrayRecord, or its arrays already read).
        update: The site's updated parameters.

    Returns:
        None, or a one-line reason that names the first offending key.
    """
    _, reason = _read_update(expected, update)
    return reason


def norm_outliers(current: ArrayRecord | Mapping[str, np.ndarray], updates: Mapping[int, ArrayRecord],
                  factor: float = DEFAULT_NORM_FACTOR, *, max_norm: float | None = None) -> dict[int, str]:
    """Updates whose delta ``||update - current||_2`` is out of line with the round's.

    The delta is taken over all keys of each update, which must already have passed
    :func:`validate_update`. The reference is the median delta norm with three or
    more updates, the smallest with one or two; see the module docstring.

    Args:
        current: The parameters the sites started from.
        updates: Node id -> the site's updated parameters.
        factor: An update is rejected when its delta norm exceeds ``factor`` x the reference.
        max_norm: Optional absolute bound on every delta norm, whatever the round's scale.

    Returns:
        Node id -> one-line reason, for the rejected updates only.
    """
    check_norm_bounds(factor, max_norm)
    start = _as_numpy(current)
    norms = {node: delta_norm(start, _as_numpy(update)) for node, update in updates.items()}
    return outliers_by_norm(norms, factor, max_norm)


def validate_replies(current: ArrayRecord, replies: list[Message], factor: float = DEFAULT_NORM_FACTOR,
                     *, max_norm: float | None = None) -> tuple[list[Message], dict[int, str]]:
    """Every check on one round's replies: errors, layout, metrics, arrays, then the norm bound.

    Args:
        current: The ArrayRecord the server shipped this round.
        replies: One reply per site.
        factor: Norm bound relative to the round's reference, see :func:`norm_outliers`.
        max_norm: Optional absolute bound on the delta norm.

    Returns:
        The accepted replies in their original order, and node id -> reason for the others.
    """
    check_norm_bounds(factor, max_norm)
    start = _as_numpy(current)
    rejected: dict[int, str] = {}
    candidates: dict[int, tuple[Message, dict[str, np.ndarray]]] = {}
    for msg in replies:
        node = msg.metadata.src_node_id
        if node in rejected or node in candidates:
            raise ValueError(f"two replies from node {node}: the pipeline sends one message per site and round")
        arrays, reason = read_reply(start, msg)
        if reason is None:
            candidates[node] = (msg, arrays)
        else:
            rejected[node] = reason
    norms = {node: delta_norm(start, arrays) for node, (_, arrays) in candidates.items()}
    rejected.update(outliers_by_norm(norms, factor, max_norm))
    for node, reason in rejected.items():
        log(WARNING, "Rejected the update of site %s: %s", node, reason)
    accepted = [msg for node, (msg, _) in candidates.items() if node not in rejected]
    return accepted, rejected


def read_reply(start: Mapping[str, np.ndarray], msg: Message, *,
               bf16_deltas: bool = False) -> tuple[dict[str, np.ndarray], str | None]:
    """The reply's arrays, read once, or the reason it is rejected.

    ``bf16_deltas``: the round asked for a bfloat16 uplink (:func:`fedmri.wire.to_delta_record`),
    so a uint16 array where ``start`` has float32 is the bits of a bfloat16 difference from
    ``start``, and its value is ``start`` plus that difference, in float32.
    """
    if msg.has_error():
        return {}, f"site reported an error (code {msg.error.code}): {msg.error.reason}"
    if not msg.has_content():
        return {}, "reply has no content"
    content = msg.content
    metrics = content.metric_records.get(METRICS_KEY)
    if metrics is None:
        return {}, f"reply lacks the MetricRecord {METRICS_KEY!r}"
    update = content.array_records.get(ARRAYS_KEY)
    if update is None:
        return {}, f"reply lacks the ArrayRecord {ARRAYS_KEY!r}"
    reason = validate_metrics(metrics)
    if reason is not None:
        return {}, reason
    return _read_update(start, update, bf16_deltas=bf16_deltas)


def _plus_delta(base: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """``base`` plus the bfloat16 delta ``bits``, in float32, in the decoded delta's own buffer."""
    out = bf16_to_float32(bits)
    return np.add(base, out, out=out)


def _read_update(expected: ArrayRecord | Mapping[str, np.ndarray], update: ArrayRecord, *,
                 bf16_deltas: bool = False) -> tuple[dict[str, np.ndarray], str | None]:
    """Deserialise ``update`` and check it against ``expected``; the arrays, or the first problem."""
    missing = [key for key in expected if key not in update]
    if missing:
        return {}, _keys_reason("missing key", missing)
    unexpected = [key for key in update if key not in expected]
    if unexpected:
        return {}, _keys_reason("unexpected key", unexpected)
    arrays: dict[str, np.ndarray] = {}
    for key, want in expected.items():
        try:
            got = update[key].numpy()
        except Exception as error:  # untrusted bytes: any failure to decode is the site's fault
            return {}, f"{key!r} cannot be read as a NumPy array: {error}"
        if tuple(got.shape) != tuple(want.shape):
            return {}, f"{key!r} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        if bf16_deltas and got.dtype == np.uint16 and np.dtype(want.dtype) == np.float32:
            want = want.numpy() if not isinstance(want, np.ndarray) else want
            got = _plus_delta(want, got)
        if str(got.dtype) != str(want.dtype):
            return {}, f"{key!r} has dtype {got.dtype}, expected {want.dtype}"
        finite = np.isfinite(got)
        if not finite.all():
            return {}, f"{key!r} has {got.size - int(np.count_nonzero(finite))} non-finite values (NaN/Inf)"
        arrays[key] = got
    return arrays, None


def _keys_reason(what: str, keys: list[str]) -> str:
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return f"{what} {keys[0]!r}{more}"


def outliers_by_norm(norms: Mapping[int, float], factor: float, max_norm: float | None) -> dict[int, str]:
    """Node id -> reason for delta norms above ``max_norm`` or above ``factor`` x the reference."""
    if not norms:
        return {}
    values = list(norms.values())
    label, reference = ("median", float(np.median(values))) if len(values) >= 3 else ("smallest", min(values))
    rejected = {}
    for node, norm in norms.items():
        if max_norm is not None and norm > max_norm:
            rejected[node] = f"update norm {norm:.4g} exceeds the absolute bound {max_norm:.4g}"
        elif reference > 0 and norm > factor * reference:
            rejected[node] = (f"update norm {norm:.4g} is {norm / reference:.1f}x the round's {label} "
                              f"{reference:.4g} (bound {factor:g}x)")
    return rejected


def check_norm_bounds(factor: float, max_norm: float | None) -> None:
    """Refuse a norm factor below 1 or a max norm that is not positive (ConfigError)."""
    if not factor >= 1:  # below 1 the median site itself would be rejected
        raise ConfigError(f"norm factor {factor!r} must be >= 1 (10 is the default)")
    if max_norm is not None and not max_norm > 0:
        raise ConfigError(f"max_norm {max_norm!r} must be > 0, or None for no absolute bound")


# Values of a key taken at once by delta_norm: float64 copies of that size stay in cache, where
# whole-key copies of a base encoder's largest keys (tens of MB each) did not.
_NORM_BLOCK = 1 << 16


def delta_norm(start: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]) -> float:
    """``||update - start||_2`` over all keys of ``update``, in float64 (block by block)."""
    total = 0.0
    for key, value in update.items():
        if key not in start:
            raise ValueError(f"update key {key!r} is not among the current parameters: validate_update first")
        a, b = np.asarray(value).ravel(), np.asarray(start[key]).ravel()
        for i in range(0, a.size, _NORM_BLOCK):
            delta = a[i:i + _NORM_BLOCK].astype(np.float64) - b[i:i + _NORM_BLOCK]
            total += float(np.dot(delta, delta))
    return math.sqrt(total)


def _as_numpy(record: ArrayRecord | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if isinstance(record, ArrayRecord):
        return {key: array.numpy() for key, array in record.items()}
    return {key: np.asarray(value) for key, value in record.items()}
