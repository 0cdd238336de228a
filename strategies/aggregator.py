"""One stage's aggregation: a Flower strategy's arithmetic on the updates that passed validation.

The pipeline owns the rounds (sampling, sending, validation, checkpoints); an
:class:`Aggregator` owns the maths of the stage's Flower strategy, applied to the
round's updates as :class:`~fedmri.strategies.updates.RoundUpdates` keeps them
(one update or one block of coordinates in memory at a time, in content order):
FedAvg and FedProx as a streamed weighted mean, FedMedian and FedTrimmedAvg
block by block, the FedOpt family as Flower's own ``aggregate_train`` on the
streamed mean. Each step is Flower's, so the result is bit-identical to
Flower's ``aggregate_train`` on the list of replies. Around the maths: metrics
cut to the keys every site sent (Flower refuses the round otherwise), the
starting point of the FedOpt family, dtypes kept as shipped, and the strategy's
state for checkpoints.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from fedmri.errors import ConfigError
from fedmri.strategies.trimmed_avg import TrimmedAvg
from fedmri.strategies.updates import RoundUpdates, coordinatewise, weighted_mean
from fedmri.strategies.validation import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES

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
                  replies: RoundUpdates | list[Message]) -> tuple[ArrayRecord, MetricRecord]:
        """The new global values of the parameters the updates carry.

        Args:
            server_round: The round, for Flower's log lines. (FedAdam's bias correction
                counts the steps this aggregator has taken instead, see :class:`AdaptiveAggregator`.)
            current: The parameters shipped this round.
            replies: The round's kept updates (:class:`~fedmri.strategies.updates.RoundUpdates`,
                the pipeline's streamed form), or the replies that
                :func:`~fedmri.strategies.validate_replies` accepted; neither is modified.

        Returns:
            The aggregate of the keys of ``current`` that the updates carry, in ``current``'s
            order and dtypes, and Flower's num-examples-weighted mean of their metrics. With
            no update, ``current`` unchanged and empty metrics (a FedOpt strategy takes no step).
        """
        if isinstance(replies, list):
            with RoundUpdates.from_replies(current, replies) as updates:
                return self.aggregate(server_round, current, updates)
        if not len(replies):
            log(WARNING, "Round %d: no update to aggregate; the %d shipped parameters stay as they were",
                server_round, len(current))
            return ArrayRecord(dict(current.items())), MetricRecord()
        missing = [key for key in replies.keys if key not in current]
        if missing:
            raise ValueError(f"updates carry {missing[0]!r}, which was not shipped: pass replies through "
                             "validate_replies first")
        flower_round = self._before_aggregate(server_round, current, replies.keys)
        arrays = self._combine(flower_round, replies)
        return cast_like(current, replies.keys, arrays), self.mean_metrics(replies)

    def _combine(self, server_round: int, updates: RoundUpdates) -> dict[str, np.ndarray]:
        """The strategy's arithmetic on the kept updates, as Flower's ``aggregate_train`` does it."""
        if isinstance(self.strategy, FedMedian):
            return coordinatewise(updates, lambda stack: np.median(stack, axis=0))
        if isinstance(self.strategy, FedTrimmedAvg):
            beta = self.strategy.beta
            if isinstance(self.strategy, TrimmedAvg):
                self.strategy.warn_if_trims_nothing(server_round, len(updates))
            return coordinatewise(updates, lambda stack: trim_mean(stack, beta))
        return weighted_mean(updates)

    def mean_metrics(self, updates: RoundUpdates, *, equal_weights: bool = False) -> MetricRecord:
        """Flower's weighted mean of the updates' metrics, over the keys every site sent.

        Args:
            updates: The round's kept updates.
            equal_weights: Weigh every site 1 instead of its num-examples (central site DP).
        """
        accepted = updates.accepted
        if not accepted:
            return MetricRecord()
        keys = set.intersection(*(set(u.metrics.keys()) for u in accepted))
        dropped = sorted(set().union(*(u.metrics.keys() for u in accepted)) - keys)
        if dropped:
            log(WARNING, "Metrics not sent by every site are left out of the mean: %s", ", ".join(dropped))
        records = [RecordDict({METRICS_KEY: MetricRecord({key: u.metrics[key] for key in u.metrics if key in keys}
                                                         | ({NUM_EXAMPLES: 1} if equal_weights else {}))})
                   for u in accepted]
        return self.strategy.train_metrics_aggr_fn(records, self.strategy.weighted_by_key)

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

    def _combine(self, server_round: int, updates: RoundUpdates) -> dict[str, np.ndarray]:
        """Flower's FedOpt step on the streamed mean: its ``aggregate_train`` given one reply that
        carries the mean (FedAvg of one reply is that reply exactly, ``x * (w / w)``)."""
        mean = weighted_mean(updates)
        total = sum(u.weight for u in updates.accepted)
        reply = Message(RecordDict({ARRAYS_KEY: ArrayRecord({key: Array(value) for key, value in mean.items()}),
                                    METRICS_KEY: MetricRecord({NUM_EXAMPLES: total})}), dst_node_id=0,
                        message_type=MessageType.TRAIN)
        arrays, _ = self.strategy.aggregate_train(server_round, [_as_reply(reply)])
        assert arrays is not None, "Flower returns None only for no replies"
        return {key: arrays[key].numpy() for key in arrays.keys()}

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


def _as_reply(msg: Message) -> Message:
    """``msg`` with the metadata of a site's reply, which Flower's strategies check for."""
    metadata = copy.copy(msg.metadata)
    metadata.__dict__["_reply_to_message_id"] = "streamed-mean"
    return Message(content=msg.content, metadata=metadata)


def cast_like(current: ArrayRecord, keys: list[str], arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``arrays`` in ``current``'s key order and dtypes (FedAdam's step comes back as float64)."""
    assert set(arrays) == set(keys), "the strategy aggregates exactly the keys it was given"
    # np.asarray, not np.ascontiguousarray: that one turns a 0-d parameter (logit_scale) into shape (1,).
    return ArrayRecord({key: Array(np.asarray(arrays[key], dtype=np.dtype(current[key].dtype))) for key in keys})
