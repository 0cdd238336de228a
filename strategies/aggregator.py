"""One stage's aggregation: a Flower strategy's ``aggregate_train`` on the replies that passed validation.

The pipeline owns the rounds (sampling, sending, validation, checkpoints); an
:class:`Aggregator` owns what Flower's strategy needs around its maths: a copy of
the replies it may consume (FedMedian and FedTrimmedAvg pop arrays out of them),
metrics cut to the keys every site sent (Flower refuses the round otherwise), the
starting point of the FedOpt family, dtypes kept as shipped, and the strategy's
state for checkpoints.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.fedopt import FedOpt

from fedmri.errors import ConfigError
from fedmri.strategies.validation import ARRAYS_KEY, METRICS_KEY

ClientConfig = dict[str, int | float | str]


class Aggregator:
    """Aggregates one stage's accepted replies with a Flower strategy; stateless strategies.

    Args:
        name: The strategy's name in the config (``fedavg``, ``fedmedian``, ...).
        strategy: The Flower strategy whose ``aggregate_train`` does the maths.
        client_config: Keys the site trainer needs every round (FedProx's ``proximal-mu``).
    """

    def __init__(self, name: str, strategy: FedAvg,
                 client_config: Mapping[str, int | float | str] | None = None) -> None:
        self.name = name
        self.strategy = strategy
        self._client_config = dict(client_config or {})

    def client_config(self) -> ClientConfig:
        """Keys to add to every round's ConfigRecord for this stage; ``{}`` for most strategies."""
        return dict(self._client_config)

    def summary(self) -> None:
        """Log the strategy's settings, Flower's way."""
        log(INFO, "Aggregator %r, client config %s", self.name, self._client_config)
        self.strategy.summary()

    def aggregate(self, server_round: int, current: ArrayRecord,
                  replies: list[Message]) -> tuple[ArrayRecord, MetricRecord]:
        """The new global values of the parameters the replies carry.

        Args:
            server_round: The round, for Flower's log lines. (FedAdam's bias correction
                counts the steps this aggregator has taken instead, see :class:`AdaptiveAggregator`.)
            current: The parameters shipped this round.
            replies: The replies that :func:`~fedmri.strategies.validate_replies` accepted;
                they are not modified.

        Returns:
            The aggregate of the keys of ``current`` that the replies carry, in ``current``'s
            order and dtypes, and Flower's num-examples-weighted mean of their metrics. With
            no reply, ``current`` unchanged and empty metrics (a FedOpt strategy takes no step).
        """
        replies = [msg for msg in replies if msg.has_content()]
        if not replies:
            log(WARNING, "Round %d: no update to aggregate; the %d shipped parameters stay as they were",
                server_round, len(current))
            return ArrayRecord(dict(current.items())), MetricRecord()
        keys = _shared_keys(current, replies)
        flower_round = self._before_aggregate(server_round, current, keys)
        arrays, metrics = self.strategy.aggregate_train(flower_round, _flower_view(replies))
        assert arrays is not None and metrics is not None, "Flower returns None only for no replies"
        return _cast_like(current, keys, arrays), metrics

    def _before_aggregate(self, server_round: int, current: ArrayRecord, keys: list[str]) -> int:
        """Hook: tell the strategy what it must know of ``current``; returns the round to hand it."""
        return server_round

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and JSON-able scalars that a checkpoint needs to resume this aggregator."""
        return {}, {"name": self.name}

    def load_state_dict(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._check_meta(meta)
        if arrays:
            raise ConfigError(f"the checkpoint holds arrays ({next(iter(arrays))!r}, ...) for the stateless "
                              f"{self.name!r} aggregator: it was written with another strategy")

    def _check_meta(self, meta: Mapping[str, Any]) -> None:
        if meta.get("name") != self.name:
            raise ConfigError(f"the checkpoint holds state of the {meta.get('name')!r} aggregator, but this "
                              f"stage aggregates with {self.name!r}: resume with the strategy it was run with")


class AdaptiveAggregator(Aggregator):
    """FedAdam / FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization").

    The server applies an Adam- or Yogi-like step to the mean delta. Its state, which
    checkpoints carry, is the moments ``m_t`` and ``v_t`` (as ``m_t/<key>`` and
    ``v_t/<key>`` arrays) and ``steps``, the steps taken so far. Flower's FedAdam
    takes its bias correction from the round number it is given; it is given
    ``steps`` (from 1), not the pipeline's round, so the correction matches the
    moments in every stage and after rounds that had no update.
    """

    strategy: FedOpt
    _MOMENTS = ("m_t", "v_t")

    def __init__(self, name: str, strategy: FedOpt,
                 client_config: Mapping[str, int | float | str] | None = None) -> None:
        super().__init__(name, strategy, client_config)
        self.steps = 0

    def _before_aggregate(self, server_round: int, current: ArrayRecord, keys: list[str]) -> int:
        # Flower sets this in configure_train, which the pipeline does not call.
        self.strategy.current_arrays = {key: current[key].numpy() for key in keys}
        for name in self._MOMENTS:
            moment = getattr(self.strategy, name)
            if moment is not None and set(moment) != set(keys):
                other = sorted(set(moment) ^ set(keys))[0]
                raise ConfigError(f"the {self.name} moments were made for other parameters (differ at {other!r}): "
                                  "one aggregator serves one stage, resume with that stage's checkpoint")
        self.steps += 1
        return self.steps

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The moments ``m_t``, ``v_t`` (none before the first step); the name and step count."""
        arrays = {f"{name}/{key}": np.array(value, copy=True)
                  for name in self._MOMENTS for key, value in (getattr(self.strategy, name) or {}).items()}
        return arrays, {"name": self.name, "steps": self.steps}

    def load_state_dict(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Restore the moments so that the next round is the one an uninterrupted run would take."""
        self._check_meta(meta)
        steps = meta.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"the checkpoint's {self.name} state has steps {steps!r}; expected an integer >= 0")
        moments: dict[str, dict[str, np.ndarray]] = {name: {} for name in self._MOMENTS}
        for flat, value in arrays.items():
            name, _, key = flat.partition("/")
            if name not in moments or not key:
                raise ConfigError(f"the checkpoint's {self.name} state holds {flat!r}; "
                                  "expected m_t/<key> and v_t/<key> arrays")
            moments[name][key] = np.array(value, copy=True)
        for name, moment in moments.items():
            setattr(self.strategy, name, moment or None)
        self.steps = steps


def _shared_keys(current: ArrayRecord, replies: list[Message]) -> list[str]:
    """The parameter names every reply carries, in ``current``'s order."""
    names = set(replies[0].content[ARRAYS_KEY].keys())
    for msg in replies[1:]:
        if set(msg.content[ARRAYS_KEY].keys()) != names:
            raise ValueError(f"site {msg.metadata.src_node_id} sent other parameter names than site "
                             f"{replies[0].metadata.src_node_id}: pass replies through validate_replies first")
    keys = [key for key in current.keys() if key in names]
    if len(keys) != len(names):
        raise ValueError(f"replies carry {sorted(names - set(keys))[0]!r}, which was not shipped: "
                         "pass replies through validate_replies first")
    return keys


def _flower_view(replies: list[Message]) -> list[Message]:
    """Copies holding just what Flower aggregates: the arrays and the metrics every site sent."""
    metric_keys = set.intersection(*(set(msg.content[METRICS_KEY].keys()) for msg in replies))
    dropped = sorted(set().union(*(msg.content[METRICS_KEY].keys() for msg in replies)) - metric_keys)
    if dropped:
        log(WARNING, "Metrics not sent by every site are left out of the mean: %s", ", ".join(dropped))
    views = []
    for msg in replies:
        metrics = msg.content[METRICS_KEY]
        content = RecordDict({ARRAYS_KEY: ArrayRecord(dict(msg.content[ARRAYS_KEY].items())),
                              METRICS_KEY: MetricRecord({key: metrics[key] for key in metrics if key in metric_keys})})
        # Metadata, not reply_to: this is the site's reply, re-wrapped, and needs no runtime identity.
        views.append(Message(content=content, metadata=copy.copy(msg.metadata)))
    return views


def _cast_like(current: ArrayRecord, keys: list[str], arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` in ``current``'s key order and dtypes (FedAdam's step comes back as float64)."""
    assert set(arrays.keys()) == set(keys), "Flower aggregates exactly the keys it was given"
    # np.asarray, not np.ascontiguousarray: that one turns a 0-d parameter (logit_scale) into shape (1,).
    return ArrayRecord({key: Array(np.asarray(arrays[key].numpy(), dtype=np.dtype(current[key].dtype)))
                        for key in keys})
