"""Build a stage's :class:`Aggregator` from its ``strategy`` spec: one registry of Flower strategies.

Specs, with Flower's defaults for what is left out::

    {"name": "fedavg"}                                   # McMahan et al. 2017, weighted by num-examples
    {"name": "fedprox", "proximal_mu": 0.01}             # Li et al. 2020; sites add mu/2 ||w - w_t||^2
    {"name": "fedadam", "eta": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}   # Reddi et al. 2021
    {"name": "fedyogi", "eta": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    {"name": "fedtrimmedavg", "beta": 0.2}               # Yin et al. 2018, unweighted per coordinate
    {"name": "fedmedian"}                                # Yin et al. 2018, unweighted per coordinate

Unknown names, unknown keys and out-of-range values are :class:`~fedmri.errors.ConfigError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.common.logger import log
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedYogi

from fedmri.errors import ConfigError
from fedmri.strategies.aggregator import AdaptiveAggregator, Aggregator
from fedmri.strategies.trimmed_avg import TrimmedAvg

Check = tuple[Callable[[float], bool], str]  # a test on the value, and what it demands in words

_POSITIVE: Check = (lambda v: v > 0, "> 0")
_NON_NEGATIVE: Check = (lambda v: v >= 0, ">= 0")
_FRACTION: Check = (lambda v: 0 <= v < 1, "in [0, 1)")
_TAIL: Check = (lambda v: 0 <= v < 0.5, "in [0, 0.5)")
_FEDOPT = {"eta": _POSITIVE, "eta_l": _POSITIVE, "beta_1": _FRACTION, "beta_2": _FRACTION, "tau": _POSITIVE}


@dataclass(frozen=True)
class _Entry:
    strategy: Callable[..., FedAvg]  # takes the spec's settings as keyword arguments
    settings: Mapping[str, Check] = field(default_factory=dict)
    aggregator: type[Aggregator] = Aggregator
    client_keys: Mapping[str, str] = field(default_factory=dict)  # ConfigRecord key -> strategy attribute


STRATEGIES: dict[str, _Entry] = {
    "fedavg": _Entry(FedAvg),
    "fedprox": _Entry(FedProx, {"proximal_mu": _NON_NEGATIVE}, client_keys={"proximal-mu": "proximal_mu"}),
    "fedadam": _Entry(FedAdam, _FEDOPT, AdaptiveAggregator),
    "fedyogi": _Entry(FedYogi, _FEDOPT, AdaptiveAggregator),
    "fedtrimmedavg": _Entry(TrimmedAvg, {"beta": _TAIL}),
    "fedmedian": _Entry(FedMedian),
}


def build_aggregator(spec: Mapping[str, Any], *, where: str = "strategy") -> Aggregator:
    """The aggregator that ``spec`` names, with its settings checked.

    Args:
        spec: ``{"name": ..., <setting>: <number>, ...}``; see the module docstring.
        where: The spec's place in the config, for error messages (e.g. ``stages.pretrain.strategy``).

    Returns:
        A fresh aggregator; FedAdam and FedYogi start with zero moments.

    Raises:
        ConfigError: The name is unknown, a key is not a setting of that strategy, or a value
            is not a finite number in its range.
    """
    name = spec.get("name")
    if not isinstance(name, str) or name not in STRATEGIES:
        raise ConfigError(f"{where}.name {name!r} is not one of {', '.join(STRATEGIES)}")
    entry = STRATEGIES[name]
    settings = {key: _checked(entry, name, f"{where}.{key}", key, value)
                for key, value in spec.items() if key != "name"}
    if "eta_l" in settings:
        log(WARNING, "%s.eta_l has no effect: Flower's %s keeps it but never uses it; the sites' learning rate "
            "comes from the stage's schedule", where, name)
    strategy = entry.strategy(**settings)
    client_config = {key: getattr(strategy, attribute) for key, attribute in entry.client_keys.items()}
    return entry.aggregator(name, strategy, client_config)


def _checked(entry: _Entry, name: str, path: str, key: str, value: Any) -> float:
    if key not in entry.settings:
        allowed = ", ".join(entry.settings) or "no settings"
        raise ConfigError(f"{path} is not a setting of {name} (it takes {allowed})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{path} must be a finite number, got {value!r}")
    check, demand = entry.settings[key]
    if not check(value):
        raise ConfigError(f"{path} = {value!r} must be {demand}")
    return float(value)
