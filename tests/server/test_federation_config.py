"""The coordinator's federation config: how DP is asked for, and what is refused before a run starts."""

from __future__ import annotations

import pytest

from fedmri.errors import ConfigError
from fedmri.server.config import dp_request, load_federation


def test_dp_is_sent_only_when_asked_and_as_one_of_noise_or_target() -> None:
    fed = load_federation(overrides=["stages.0.dp.enabled=true", "stages.0.dp.target_epsilon=8",
                                     "stages.0.site_dp.mode=central"])
    assert dp_request(fed.stages[0]) == {"dp": True, "dp_max_grad_norm": 1.0, "dp_target_epsilon": 8.0,
                                         "site_dp": "central", "site_dp_noise_multiplier": 1.0,
                                         "site_dp_clip_norm": 1.0}
    assert dp_request(fed.stages[1]) == {}


@pytest.mark.parametrize(("overrides", "match"), [
    (["stages.0.dp.enabled=true"], "exactly one of noise_multiplier and target_epsilon"),
    (["stages.0.dp.enabled=true", "stages.0.dp.noise_multiplier=1", "stages.0.dp.target_epsilon=8"], "exactly one"),
    (["stages.0.dp.enabled=true", "stages.0.dp.noise_multiplier=-1"], "must be > 0"),
    (["stages.3.dp.enabled=true", "stages.3.dp.noise_multiplier=1"], "for the training stages"),
    (["stages.0.site_dp.mode=sometimes"], "not one of off, central, local"),
    (["stages.0.site_dp.mode=central", "stages.0.strategy.name=fedadam"], "needs strategy fedavg or fedprox"),
    (["stages.1.dp.enabled=true", "stages.1.dp.target_epsilon=4"], "in-batch negatives"),
])
def test_a_dp_request_that_cannot_hold_is_refused_before_the_run(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_federation(overrides=overrides)


def test_dp_valid_alignment_loads() -> None:
    fed = load_federation(overrides=["stages.1.dp.enabled=true", "stages.1.dp.target_epsilon=4",
                                     "overrides=[align.dp_negatives=synthetic]"])
    assert fed.stages[1].dp.enabled
