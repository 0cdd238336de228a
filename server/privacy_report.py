"""The privacy a run spent, from its ``metrics.jsonl`` rows: ``privacy.json``, ``privacy.md``, ``plots/privacy.png``.

A site's "ok" row of a pretrain/align round carries what the site's privacy
ledger recorded for it (``dp-epsilon-run``: the site's ε in this run after the
round, every stage composed; ``dp-epsilon-total``: over all runs; ``dp-delta``;
the DP-SGD and local site-level DP parameters; ``dp-unit-patient``, 1.0 when
that ε is per patient and 0.0 when per series, per image-report pair in
alignment; rows of a fedmri without the key are per series, the only unit it
had). The aggregated row (site "all")
carries the coordinator's central site-level ε (``site-dp-epsilon`` at
``site-dp-delta``). A site that sent an update without these numbers gave no
guarantee for it, so its ε for the run is reported as infinite (None in JSON).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedmri import stages as stage_registry

_BUDGET = "privacy budget"
# metrics.jsonl key -> summary key, for a site's mechanism in one stage.
_MECHANISM = {"dp-noise-multiplier": "noise_multiplier", "dp-sample-rate": "sample_rate", "dp-steps": "steps",
              "dp-max-grad-norm": "max_grad_norm", "site-dp-noise-multiplier": "site_noise_multiplier",
              "site-dp-clip-norm": "site_clip_norm"}
# What one unit of a site's DP-SGD ε is, as the report and the model card say it.
UNIT_TEXT = {"patient": "per patient", "series": "per series (per image-report pair in alignment)"}


def privacy_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What each site and the coordinator spent, per stage; JSON-ready (no ε means no DP).

    Args:
        rows: ``metrics.jsonl`` rows (``RunDir.read_metrics()``), in any order.

    Returns:
        ``{"dp_used", "stages", "sites": {site: {"dp", "epsilon_run", "epsilon_total",
        "delta", "unit", "unprotected_rounds", "mechanisms", "stages": {stage: {"rounds",
        "rounds_dp", "epsilon_run", "delta", "unit", "noise_multiplier", ...}},
        "declined_for_budget": [...]}}, "central": {stage: {"epsilon", "delta",
        "rounds"}}, "central_epsilon", "central_delta"}``. Stage ε values are
        cumulative over the run (after that stage); mechanism values are those of
        the stage's last private round. ``unit`` is ``"patient"`` or ``"series"``
        (None without DP), as the site's last private round reported it for the
        run. A site that sent no update has ε 0.
    """
    rows = sorted((r for r in rows if _trains(r)),
                  key=lambda r: (r.get("server_round", 0), str(r.get("site"))))
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    sites: dict[str, dict[str, Any]] = {}
    central: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("site") == "all":  # its dp-* keys are means over sites; only the central ε is its own
            if _num(r.get("site-dp-epsilon")) is not None:
                c = central.setdefault(r["stage"], {"epsilon": None, "delta": None, "rounds": 0,
                                                    "distributed": False})
                c.update(epsilon=float(r["site-dp-epsilon"]), delta=_num(r.get("site-dp-delta")),
                         rounds=c["rounds"] + 1, distributed=c["distributed"] or bool(r.get("site-dp-distributed")))
            continue
        site = sites.setdefault(str(r.get("site")), {"dp": False, "epsilon_run": None, "epsilon_total": None,
                                                     "delta": None, "unit": None, "unprotected_rounds": 0,
                                                     "mechanisms": [],
                                                     "stages": {}, "declined_for_budget": []})
        if r.get("status") == "declined" and str(r.get("reason", "")).startswith(_BUDGET):
            site["declined_for_budget"].append({k: r.get(k) for k in ("stage", "round", "server_round", "reason")})
        if r.get("status") != "ok":
            continue
        stage = site["stages"].setdefault(r["stage"], {"rounds": 0, "rounds_dp": 0, "epsilon_run": None,
                                                       "delta": None, "unit": None}
                                          | dict.fromkeys(_MECHANISM.values()))
        stage["rounds"] += 1
        if _num(r.get("dp-epsilon-run")) is None:  # no DP, or an unbounded ε
            continue
        stage["rounds_dp"] += 1
        unit = "patient" if _num(r.get("dp-unit-patient")) == 1.0 else "series"
        stage.update(epsilon_run=float(r["dp-epsilon-run"]), delta=_num(r.get("dp-delta")), unit=unit,
                     **{name: _num(r.get(key)) for key, name in _MECHANISM.items()})
        site.update(dp=True, epsilon_run=float(r["dp-epsilon-run"]), epsilon_total=_num(r.get("dp-epsilon-total")),
                    delta=_num(r.get("dp-delta")), unit=unit)
        for mechanism, key in (("dp-sgd", "dp-noise-multiplier"), ("local-site-dp", "site-dp-noise-multiplier")):
            if _num(r.get(key)) is not None and mechanism not in site["mechanisms"]:
                site["mechanisms"].append(mechanism)
    for site in sites.values():
        for stage in site["stages"].values():
            if stage["rounds_dp"] < stage["rounds"]:  # one update sent without DP: that release has no bound
                stage["epsilon_run"] = None
                site["unprotected_rounds"] += stage["rounds"] - stage["rounds_dp"]
        if site["unprotected_rounds"]:
            site.update(epsilon_run=None, epsilon_total=None)
        elif not site["stages"]:  # it declined or failed every round: it released nothing in this run
            site["epsilon_run"] = 0.0
    last = central[list(central)[-1]] if central else {"epsilon": None, "delta": None}
    return {"dp_used": any(s["dp"] for s in sites.values()) or bool(central), "stages": stages,
            "sites": dict(sorted(sites.items())), "central": central,
            "central_epsilon": last["epsilon"], "central_delta": last["delta"],
            "central_distributed": any(c.get("distributed") for c in central.values())}


def _num(value: Any) -> float | None:
    """A finite number, or None (absent, not a number, or infinite: JSON has no infinity)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _in_order(summary: dict[str, Any], per_stage: dict[str, Any]) -> list[tuple[str, Any]]:
    """``per_stage``'s items in run order (privacy.json sorts its keys)."""
    return [(stage, per_stage[stage]) for stage in summary["stages"] if stage in per_stage]


def _eps(value: float | None) -> str:
    return "∞ (no DP)" if value is None else f"{value:.3g}"


def _cell(value: float | None, fmt: str = ".3g") -> str:
    return "–" if value is None else format(value, fmt)


def guarantee(summary: dict[str, Any]) -> str:
    """One line: which (ε, δ)-DP guarantee the run's numbers are."""
    if not summary["dp_used"]:
        return "no differential privacy: the model carries no formal privacy guarantee"
    mechanisms = {m for s in summary["sites"].values() for m in s["mechanisms"]}
    parts = []
    if "dp-sgd" in mechanisms:
        private = {name: s.get("unit") or "series" for name, s in summary["sites"].items()
                   if "dp-sgd" in s["mechanisms"]}
        for unit in ("patient", "series"):
            names = [name for name, u in private.items() if u == unit]
            if not names:
                continue
            level = "patient-level" if unit == "patient" else "sample-level"
            where = "each site" if len(names) == len(private) else ", ".join(names)
            parts.append(f"{level} (ε, δ)-DP {UNIT_TEXT[unit]} at {where}, ε per site as listed "
                         "(DP-SGD, RDP accountant)")
    if "local-site-dp" in mechanisms:
        parts.append("site-level (ε, δ)-DP of each site's updates, noised at the site before they leave (local)")
    if summary["central_epsilon"] is not None:
        how = ("noised by the sites in shares under secure aggregation (distributed; the coordinator sees only the "
               "noised sum, and sites that collude with it can remove their own shares)"
               if summary.get("central_distributed") else
               "noised by the coordinator (central; trusts the coordinator)")
        parts.append(f"site-level ({summary['central_epsilon']:.3g}, {_cell(summary['central_delta'], 'g')})-DP of the "
                     f"released model per site, {how}")
    open_sites = [name for name, s in summary["sites"].items() if s["epsilon_run"] is None]
    if open_sites:
        parts.append(f"no sample-level guarantee for {', '.join(open_sites)} (updates sent without DP)")
    return "; ".join(parts)


def status_lines(summary: dict[str, Any]) -> list[str]:
    """Compact lines for ``fedmri status``: ε per site (and per stage) and the central ε."""
    lines = []
    for name, s in summary.get("sites", {}).items():
        per_stage = ", ".join(f"{stage} {'∞' if v['epsilon_run'] is None else format(v['epsilon_run'], '.3g')}"
                              for stage, v in _in_order(summary, s["stages"]))
        per_stage = per_stage or "sent no update"
        delta = f" at δ {s['delta']:g}" if s["delta"] is not None else ""
        delta += f", per {s['unit']}" if s.get("unit") else ""
        n = len(s["declined_for_budget"])
        declined = f"; {n} round(s) declined for budget" if n else ""
        lines.append(f"ε spent: {name} {_eps(s['epsilon_run'])} ({per_stage}){delta}{declined}")
    if summary.get("central_epsilon") is not None:
        central, delta = summary["central_epsilon"], _cell(summary["central_delta"], "g")
        lines.append(f"central site-level ε {central:.3g} at δ {delta}")
    return lines


def privacy_markdown(summary: dict[str, Any]) -> str:
    """``privacy.md``: a site × stage table, the central site-level ε, the rounds declined for budget."""
    if not summary["dp_used"]:
        return "# Privacy\n\nNo differential privacy in this run: no site and no aggregate was noised.\n"
    out = ["# Privacy", "", guarantee(summary) + ".", "",
           "| site | stage | ε this run (after stage) | δ | σ | q | steps | C | site-DP σ | DP rounds / rounds "
           "| unit |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary["sites"].items():
        for stage, v in _in_order(summary, s["stages"]):
            out.append(f"| {name} | {stage} | {_eps(v['epsilon_run'])} | {_cell(v['delta'], 'g')} | "
                       f"{_cell(v['noise_multiplier'])} | {_cell(v['sample_rate'])} | {_cell(v['steps'], '.0f')} | "
                       f"{_cell(v['max_grad_norm'])} | {_cell(v['site_noise_multiplier'])} | "
                       f"{v['rounds_dp']} / {v['rounds']} | {v.get('unit') or '–'} |")
    out += ["", "q is the rate at which a unit joins a step: a patient, who brings all their series and "
            "image-report pairs and whose gradients are clipped as one (unit patient), or one series, one pair "
            "in alignment (unit series).", ""]
    out += ["| site | ε this run | ε all runs | δ |", "|---|---|---|---|"]
    out += [f"| {name} | {_eps(s['epsilon_run'])} | {'∞' if s['epsilon_run'] is None else _cell(s['epsilon_total'])}"
            f" | {_cell(s['delta'], 'g')} |" for name, s in summary["sites"].items()]
    out += ["", "## Central site-level DP", ""]
    if summary["central"]:
        out += ["| stage | ε (run so far) | δ | rounds |", "|---|---|---|---|"]
        out += [f"| {stage} | {c['epsilon']:.3g} | {_cell(c['delta'], 'g')} | {c['rounds']} |"
                for stage, c in _in_order(summary, summary["central"])]
    else:
        out.append("None: the coordinator added no noise to the aggregate.")
    declines = [(name, d) for name, s in summary["sites"].items() for d in s["declined_for_budget"]]
    out += ["", "## Rounds declined for the privacy budget", ""]
    out += [f"- {name}: {d['stage']} round {d['round']} (global {d['server_round']}): {d['reason']}"
            for name, d in declines] or ["None."]
    return "\n".join(out) + "\n"


def plot_privacy(path: Path, rows: list[dict[str, Any]]) -> None:
    """Cumulative ε per site over global rounds (steps; x for a budget decline) and the central ε (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    by_site: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r.get("site") != "all" and r.get("status") == "ok" and _num(r.get("dp-epsilon-run")) is not None:
            by_site.setdefault(str(r["site"]), []).append((r["server_round"], r["dp-epsilon-run"]))
    for site, points in sorted(by_site.items()):
        xs, ys = zip(*sorted(points))
        (line,) = ax.step(xs, ys, where="post", marker="o", lw=1.2, label=site)
        declined = [r["server_round"] for r in rows if str(r.get("site")) == site and r.get("status") == "declined"
                    and str(r.get("reason", "")).startswith(_BUDGET)]
        for x in declined:  # ε stays where the last private round left it
            ax.plot(x, max((y for px, y in points if px <= x), default=0.0), "x", ms=8, color=line.get_color())
    central = sorted((r["server_round"], r["site-dp-epsilon"]) for r in rows
                     if r.get("site") == "all" and _num(r.get("site-dp-epsilon")) is not None)
    if central:
        xs, ys = zip(*central)
        ax.step(xs, ys, where="post", ls="--", color="black", lw=2, label="central (site-level)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("global round")
    ax.set_ylabel("ε spent in this run")
    ax.set_title("privacy spent (x: round declined for budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_privacy_report(run_dir: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Write ``privacy.json``, ``privacy.md`` and ``plots/privacy.png`` into ``run_dir``; returns the paths.

    Without DP metrics only a short ``privacy.md`` is written (and a previous
    run's ``privacy.json`` and plot under the same name are removed).
    """
    from fedmri.server.checkpoint import _write_text_atomic

    run_dir = Path(run_dir)
    summary = privacy_summary(rows)
    md, js, png = run_dir / "privacy.md", run_dir / "privacy.json", run_dir / "plots" / "privacy.png"
    _write_text_atomic(md, privacy_markdown(summary))
    if not summary["dp_used"]:
        js.unlink(missing_ok=True)
        png.unlink(missing_ok=True)
        return [md]
    _write_text_atomic(js, json.dumps(summary, indent=1, sort_keys=True, allow_nan=False))
    plot_privacy(png, [r for r in rows if _trains(r)])
    return [js, md, png]


def model_card_privacy(summary: dict[str, Any]) -> dict[str, Any]:
    """The model card's ``extra["privacy"]``: ε per site for this run at δ and its unit, central ε, mechanisms,
    guarantee."""
    sites = {name: {"epsilon": s["epsilon_run"], "delta": s["delta"], "unit": s.get("unit"),
                    "mechanisms": s["mechanisms"],
                    "stages": {stage: {k: v.get(k) for k in ("epsilon_run", "rounds_dp", "unit",
                                                             *_MECHANISM.values())}
                               for stage, v in s["stages"].items()}}
             for name, s in summary["sites"].items()}
    return {"dp": summary["dp_used"], "guarantee": guarantee(summary), "sites": sites,
            "central": {"epsilon": summary["central_epsilon"], "delta": summary["central_delta"]}}


def _trains(row: dict[str, Any]) -> bool:
    """A row of a stage that sends model updates (heads too: trained on the site's labels); evaluation sends
    metrics only."""
    return row.get("stage") in stage_registry.names(trains=True)
