"""The site policy declines what the site admin did not allow, with a reason."""

from __future__ import annotations

from fedmri.client.policy import check_request
from fedmri.client.site import load_site
from fedmri.client.trainers import TrainRequest


def test_an_allowed_request_passes(site_file, request_values) -> None:
    assert check_request(load_site(site_file), TrainRequest.from_config(request_values("pretrain"))) is None


def test_a_stage_outside_the_policy_is_declined(site_file, request_values) -> None:
    site = load_site(site_file, ["policy.stages=[pretrain,evaluate]"])
    reason = check_request(site, TrainRequest.from_config(request_values("align")))
    assert reason == "stage 'align' is not in this site's policy.stages (pretrain, evaluate)"


def test_too_many_local_steps_are_declined(site_file, request_values) -> None:
    site = load_site(site_file, ["policy.max_local_steps=10"])
    assert check_request(site, TrainRequest.from_config(request_values("pretrain", local_steps=10))) is None
    reason = check_request(site, TrainRequest.from_config(request_values("pretrain", local_steps=11)))
    assert reason == "local-steps 11 exceeds this site's policy.max_local_steps 10"
    # Evaluation runs no optimisation steps, whatever the limit.
    assert check_request(load_site(site_file, ["policy.max_local_steps=0"]),
                         TrainRequest.from_config(request_values("evaluate"))) is None


def test_a_site_that_requires_secure_aggregation_declines_plain_training(site_file, request_values) -> None:
    site = load_site(site_file, ["policy.secure_aggregation=true"])
    reason = check_request(site, TrainRequest.from_config(request_values("pretrain")))
    assert reason is not None and "requires secure aggregation" in reason and "pretrain" in reason
    secure = request_values("pretrain", secagg=True, secagg_clip_norm=5.0, secagg_max_weight=100.0, secagg_scale=1e4)
    assert check_request(site, TrainRequest.from_config(secure)) is None
    # Evaluation sends no update: nothing to hide.
    assert check_request(site, TrainRequest.from_config(request_values("evaluate"))) is None
