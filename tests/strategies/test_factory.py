"""build_aggregator: every named strategy, its settings, and one clear error per bad spec."""

from __future__ import annotations

import logging

import pytest
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi

from fedmri.errors import ConfigError
from fedmri.strategies import STRATEGIES, AdaptiveAggregator, TrimmedAvg, build_aggregator


@pytest.mark.parametrize(("name", "strategy_class", "adaptive"), [
    ("fedavg", FedAvg, False), ("fedprox", FedProx, False), ("fedadam", FedAdam, True),
    ("fedyogi", FedYogi, True), ("fedtrimmedavg", TrimmedAvg, False), ("fedmedian", FedMedian, False),
])
def test_each_name_builds_its_flower_strategy(name: str, strategy_class: type, adaptive: bool) -> None:
    aggregator = build_aggregator({"name": name})
    assert aggregator.name == name
    assert type(aggregator.strategy) is strategy_class
    assert isinstance(aggregator, AdaptiveAggregator) is adaptive


def test_the_registry_names_flowers_strategies() -> None:
    assert list(STRATEGIES) == ["fedavg", "fedprox", "fedadam", "fedyogi", "fedtrimmedavg", "fedmedian"]
    assert issubclass(TrimmedAvg, FedTrimmedAvg)


def test_fedprox_sends_proximal_mu_to_the_sites() -> None:
    assert build_aggregator({"name": "fedprox", "proximal_mu": 0.01}).client_config() == {"proximal-mu": 0.01}
    assert build_aggregator({"name": "fedavg"}).client_config() == {}
    assert build_aggregator({"name": "fedadam"}).client_config() == {}


def test_fedprox_without_mu_warns_that_it_is_fedavg(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert build_aggregator({"name": "fedprox"}).client_config() == {"proximal-mu": 0.0}
    assert "equivalent to FedAvg" in caplog.text


def test_settings_reach_the_flower_strategy() -> None:
    adam = build_aggregator({"name": "fedadam", "eta": 0.02, "beta_1": 0.5, "beta_2": 0.9, "tau": 1e-4}).strategy
    assert (adam.eta, adam.beta_1, adam.beta_2, adam.tau) == (0.02, 0.5, 0.9, 1e-4)
    assert build_aggregator({"name": "fedtrimmedavg", "beta": 0.3}).strategy.beta == 0.3


def test_eta_l_is_accepted_with_a_warning_that_it_does_nothing(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        build_aggregator({"name": "fedyogi", "eta_l": 0.01})
    assert "strategy.eta_l has no effect" in caplog.text


@pytest.mark.parametrize(("spec", "words"), [
    ({"name": "fedsgd"}, "strategy.name 'fedsgd' is not one of fedavg, fedprox, fedadam"),
    ({}, "strategy.name None is not one of"),
    ({"name": ["fedavg"]}, "is not one of"),
    ({"name": "fedavg", "proximal_mu": 0.1}, "strategy.proximal_mu is not a setting of fedavg (it takes no settings)"),
    ({"name": "fedadam", "lr": 0.1}, "strategy.lr is not a setting of fedadam (it takes eta, eta_l, beta_1"),
    ({"name": "fedadam", "eta": 0}, "strategy.eta = 0 must be > 0"),
    ({"name": "fedyogi", "beta_1": 1.0}, "strategy.beta_1 = 1.0 must be in [0, 1)"),
    ({"name": "fedprox", "proximal_mu": -0.1}, "strategy.proximal_mu = -0.1 must be >= 0"),
    ({"name": "fedtrimmedavg", "beta": 0.5}, "strategy.beta = 0.5 must be in [0, 0.5)"),
    ({"name": "fedadam", "tau": "1e-3"}, "strategy.tau must be a finite number, got '1e-3'"),
    ({"name": "fedadam", "tau": True}, "strategy.tau must be a finite number, got True"),
    ({"name": "fedadam", "eta": float("nan")}, "strategy.eta must be a finite number, got nan"),
])
def test_bad_spec_is_one_clear_config_error(spec: dict, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_aggregator(spec)
    assert words in str(caught.value)


def test_errors_name_the_spec_where_it_sits() -> None:
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.strategy\.beta_2 = 2 must be"):
        build_aggregator({"name": "fedadam", "beta_2": 2}, where="stages.pretrain.strategy")
