"""The site's rules, applied to every request before any work starts.

Each rule is a function ``(site_cfg, request) -> reason | None``; the first
reason wins and goes back to the coordinator as the decline reason, so it is
one line about the request and the policy, never about the site's data.
Add a rule by writing a function and appending it to :data:`RULES`. The
privacy budget needs the site's data size, so the trainer checks it
(:class:`fedmri.client.privacy.gate.PrivacyGate`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from fedmri.client.trainers.context import TrainRequest

Rule = Callable[[Any, TrainRequest], "str | None"]


def stage_allowed(site_cfg: Any, request: TrainRequest) -> str | None:
    """Only the stages listed in ``policy.stages``."""
    allowed = list(site_cfg.policy.stages)
    if request.stage not in allowed:
        return f"stage {request.stage!r} is not in this site's policy.stages ({', '.join(allowed) or 'none'})"
    return None


def local_steps_within_limit(site_cfg: Any, request: TrainRequest) -> str | None:
    """At most ``policy.max_local_steps`` optimisation steps in one round."""
    limit = int(site_cfg.policy.max_local_steps)
    if request.trains and request.local_steps > limit:
        return f"local-steps {request.local_steps} exceeds this site's policy.max_local_steps {limit}"
    return None


def privacy_required(site_cfg: Any, request: TrainRequest) -> str | None:
    """Training only under DP when ``policy.dp.required``."""
    from fedmri.client.privacy.gate import policy_reason

    return policy_reason(site_cfg, request)


def secure_aggregation_required(site_cfg: Any, request: TrainRequest) -> str | None:
    """Training only under secure aggregation when ``policy.secure_aggregation``."""
    if request.trains and bool(site_cfg.policy.get("secure_aggregation", False)) and not request.secagg:
        return ("this site's policy requires secure aggregation (policy.secure_aggregation); the federation's "
                f"{request.stage} stage does not use it (secure_aggregation.enabled)")
    return None


def fedmri_version_accepted(site_cfg: Any, request: TrainRequest) -> str | None:
    """``policy.fedmri_versions``: the coordinator's fedmri must be in the site's range."""
    from fedmri.client.guard import version_refusal

    return version_refusal(request.fedmri_version or None, site_cfg.policy.get("fedmri_versions"))


RULES: list[Rule] = [fedmri_version_accepted, stage_allowed, local_steps_within_limit, privacy_required,
                     secure_aggregation_required]

# Numbers the coordinator needs to aggregate and account: they leave whatever ``policy.metrics`` says.
PROTOCOL_METRICS = ("num-examples", "steps", "declined", "wall-time-s", "bytes-received", "bytes-sent", "dp-*",
                    "site-dp-*")


def allowed_metrics(site_cfg: Any, metrics: dict[str, float]) -> dict[str, float]:
    """The metrics that ``policy.metrics`` (shell patterns) lets leave, plus the protocol's own."""
    patterns = [*PROTOCOL_METRICS, *site_cfg.policy.metrics]
    return {k: v for k, v in metrics.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def check_request(site_cfg: Any, request: TrainRequest) -> str | None:
    """The reason to decline ``request`` under the site's policy, or None to run it."""
    for rule in RULES:
        reason = rule(site_cfg, request)
        if reason is not None:
            return reason
    return None
