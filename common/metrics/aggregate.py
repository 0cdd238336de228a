"""Server side: the weighted mean of the sites' metrics, over the sites that have each one."""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real


def weighted_mean(per_site: Mapping[str, Mapping[str, float | None]],
                  weights: Mapping[str, float]) -> dict[str, float]:
    """Weighted mean of each metric over the sites that report a finite value for it.

    A site may lack a metric (AUROC of a label it has one class of) or report
    None or NaN for it; the weights are renormalised over the sites that have
    it. A site with weight 0 contributes to no metric.

    Args:
        per_site: Site -> {metric name -> value}.
        weights: Site -> non-negative weight, typically its test-split size;
            every site in ``per_site`` needs one.

    Returns:
        ``<metric>``: the weighted mean, and ``<metric>/sites``: the number of
        sites that contributed, for each metric at least one site contributed to.
        Counts such as ``hd95_undefined`` are averaged like any other value.

    Raises:
        ValueError: For a site without a weight, a negative or non-finite
            weight, a non-numeric value, or a metric name ending in ``/sites``.
    """
    missing = sorted(set(per_site) - set(weights))
    if missing:
        raise ValueError(f"no weight for sites {missing}; give every reporting site a weight")
    for site, w in weights.items():
        if not (isinstance(w, Real) and math.isfinite(w) and w >= 0):
            raise ValueError(f"weight of site {site!r} must be a finite number >= 0, got {w!r}")

    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    sites: dict[str, int] = {}
    for site, metrics in per_site.items():
        w = float(weights[site])
        for name, value in metrics.items():
            if name.endswith("/sites"):
                raise ValueError(f"site {site!r} reports {name!r}; names ending in '/sites' are the aggregate's counts")
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, Real):
                raise ValueError(f"site {site!r} reports {name}={value!r}; metric values must be numbers or None")
            if not math.isfinite(value) or w == 0:
                continue
            sums[name] = sums.get(name, 0.0) + w * float(value)
            totals[name] = totals.get(name, 0.0) + w
            sites[name] = sites.get(name, 0) + 1

    out: dict[str, float] = {}
    for name in sorted(sums):
        out[name] = sums[name] / totals[name]
        out[f"{name}/sites"] = sites[name]
    return out
