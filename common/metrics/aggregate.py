"""Server side: the one aggregate of the sites' metrics that a round's row, the results and the runner use."""

from __future__ import annotations

import math
from collections.abc import Mapping


def aggregate_metrics(rows: list[Mapping[str, float]]) -> dict[str, float]:
    """The coordinator's aggregate of site metrics.

    Counts of series (``num-examples`` and every ``*-examples``, e.g.
    ``dense-examples``) are summed. Every other finite value is weighted by the
    site's ``num-examples`` over the sites that have it: a site may lack a metric
    (AUROC of a label it has one class of) or report NaN for it. When those
    sites' weights sum to 0 the plain mean is taken.
    """
    weights = [float(r.get("num-examples", 0)) for r in rows]
    total = sum(weights)
    out: dict[str, float] = {"num-examples": total}
    keys = sorted({k for r in rows for k in r if k not in ("num-examples", "declined")})
    for k in keys:
        if k.endswith("-examples"):  # the series behind a figure: the sites' together
            out[k] = sum(float(r[k]) for r in rows if k in r)
            continue
        pairs = [(w, float(r[k])) for w, r in zip(weights, rows) if k in r and math.isfinite(float(r[k]))]
        wsum = sum(w for w, _ in pairs)
        if pairs:
            out[k] = sum(w * v for w, v in pairs) / wsum if wsum > 0 else sum(v for _, v in pairs) / len(pairs)
    return out
