"""The site's privacy gate: plan a private round, check it against the budget, record it.

The coordinator asks for DP in the round's config (``dp``, noise or target ε,
clipping norm; ``site-dp`` for site-level DP); the site decides the rest from
what only it knows: its δ, its budget, its private unit (``policy.dp.unit``),
the samples the stage trains on (series; image-report pairs in alignment)
with each one's patient, and its batch size.

The private unit is the patient by default: the Poisson sampling draws
patients, a drawn patient brings all its samples, and the gradients of one
patient's samples are summed and clipped as one vector
(:func:`fedmri.client.privacy.dp_sgd.clip_and_noise`), so ε is per patient
whatever its number of series. With ``unit: series`` each sample is its own
unit (a patient with k series is protected as a group of k). Either way the
rate is ``q = batch_size / samples``, so a step loads ``batch_size`` samples
on average, as the site sized it for its hardware; per patient that is
``batch_size · patients / samples`` expected patients per step, the divisor of
the noisy sum. The patient keys stay in the site's process: only q, σ, the
steps and the unit (``dp-unit-patient``) are reported.

Order in one round (:mod:`fedmri.client.app` and the trainers):

1. :func:`policy_reason` before any work: DP required but not asked for.
2. :meth:`PrivacyGate.plan` in the trainer, once it knows ``n``: fixes σ, q and
   the steps and declines when the round would pass ``policy.dp.epsilon_total``
   or ``epsilon_per_run`` (:meth:`PrivacyLedger.would_exceed`).
3. Training, with the noise and the batches drawn from :attr:`DPPlan.seed`.
4. :meth:`PrivacyGate.record` after training and before the update leaves, in
   one durable transaction: a round that is not in the ledger never left.

:attr:`DPPlan.seed` mixes the site's secret salt into the round's seed. The
coordinator knows the run seed and the site's name; noise or batches drawn
from those alone could be replayed at the coordinator and subtracted, which
would void the guarantee. A retried round (same request, same weights) draws
the same noise and the same batches, so it is the same release and the ledger
counts it once.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedmri.client.privacy.ledger import (
    LedgerConflictError,
    LedgerEntry,
    PrivacyLedger,
    check_unit,
    default_ledger_path,
)
from fedmri.client.trainers.context import DeclineError, TrainRequest, derive_seed
from fedmri.errors import ConfigError

# Ledger stage label of local site-level DP (its own row beside the stage's DP-SGD row).
SITE_LEVEL_SUFFIX = ":site-level"


@dataclass(frozen=True)
class DPPlan:
    """One private round's mechanism, as the ledger records it."""

    # σ: noise std is σ * clipping norm.
    noise_multiplier: float
    # q: each unit (patient, or series/pair) joins a step's batch independently with this probability.
    sample_rate: float
    steps: int
    # Clipping norm C (per sample for DP-SGD, of the whole update for site-level DP).
    max_grad_norm: float
    delta: float
    # n: private units at the site (patients, or series / report pairs under unit "series").
    units: int
    # Secret seed of the Poisson batches and the noise (see the module docstring).
    seed: int = field(repr=False)
    # How far one sample can move what is clipped, in clipping norms: 1 for DP-SGD's sum
    # (adding or removing a sample adds or removes one clipped term), 2 for a whole
    # site's clipped update (with and without one sample, both anywhere in the C-ball).
    sensitivity: float = 1.0
    # What one unit is: "patient" or "series" (one series, or one image-report pair in alignment).
    unit: str = "series"
    # The trainer's sample indices of each unit (stays at the site); () for site-level DP.
    members: tuple[tuple[int, ...], ...] = field(default=(), repr=False, compare=False)

    @property
    def accounted_noise(self) -> float:
        """The noise multiplier relative to the sensitivity: what the ledger's accountant composes."""
        return self.noise_multiplier / self.sensitivity

    @property
    def expected_batch_size(self) -> float:
        """q * n, the divisor of the noisy gradient sum (Opacus' convention under Poisson sampling), in units."""
        return self.sample_rate * self.units

    @property
    def samples(self) -> int:
        """Series (or pairs) at the site: the units' members, or the units when each is one sample."""
        return sum(len(m) for m in self.members) if self.members else self.units

    @property
    def expected_samples(self) -> float:
        """Samples a step sees on average, q * samples: the round's ``num-examples`` per step."""
        return self.sample_rate * self.samples


def policy_reason(site_cfg: Any, request: TrainRequest) -> str | None:
    """Decline reason when the site requires DP and a training request comes without it."""
    if request.trains and bool(site_cfg.policy.dp.required) and not (
            request.dp or request.site_dp in ("local", "distributed")):
        return (f"this site requires differential privacy (policy.dp.required) and the {request.stage} request "
                "asks for none; set dp (sample-level) or site_dp: local or distributed on the stage")
    return None


@functools.lru_cache(maxsize=64)
def _noise_for(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    from fedmri.client.privacy.dp_sgd import noise_for_epsilon

    return noise_for_epsilon(target_epsilon, delta, sample_rate, steps)


def site_secret(site_cfg: Any) -> str:
    """The site's salt (hex), made by ``fedmri data index``; never leaves the site."""
    from fedmri.data.catalog_db import load_or_create_salt

    return load_or_create_salt(site_cfg.catalog).hex()


class PrivacyGate:
    """Plans, checks and records the private mechanisms of one request at one site.

    Args:
        site_cfg: The site file (its ``policy.dp`` and catalog).
        request: The round's request.
        ledger_path: The ledger; default ``<catalog>/privacy-ledger.sqlite``.
        inputs: Digest of the weights and request the round starts from (see
            :mod:`fedmri.client.privacy.ledger`); the ClientApp gives it.
    """

    def __init__(self, site_cfg: Any, request: TrainRequest, ledger_path: Any = None, inputs: str = "") -> None:
        self.site_cfg, self.request, self.inputs = site_cfg, request, inputs
        self.ledger_path = ledger_path or default_ledger_path(site_cfg)
        self.dp = site_cfg.policy.dp
        self.plans: dict[str, DPPlan] = {}
        # The unit of every round of this run in the ledger, once recorded ("mixed" if they differ).
        self.run_unit: str | None = None

    @property
    def delta(self) -> float:
        return float(self.dp.delta)

    @property
    def unit(self) -> str:
        """The site's private unit, ``policy.dp.unit`` (``"patient"`` when the site object has none).

        Raises:
            ConfigError: Another value than ``"patient"`` or ``"series"``.
        """
        unit = getattr(self.dp, "unit", "patient")
        try:
            return check_unit(unit)
        except ValueError:
            raise ConfigError(f"policy.dp.unit must be patient or series, got {unit!r}") from None

    def seed(self, what: str) -> int:
        r = self.request
        return derive_seed(site_secret(self.site_cfg), r.seed, r.run_name, r.stage, r.round, what)

    def plan(self, patients: Sequence[Hashable], batch_size: int) -> DPPlan:
        """The round's DP-SGD plan for the stage's samples at ``batch_size``; checks the budget.

        Args:
            patients: Each sample's patient key (pseudonymous id), in the order the trainer
                indexes its samples; under ``unit: patient`` the samples of one key form one unit
                (:attr:`DPPlan.members`), under ``unit: series`` only their number counts.
            batch_size: The expected number of samples per step (the site's ``batch_size``):
                ``q = batch_size / samples``, capped at 1.

        Raises:
            DeclineError: No samples, or the round would pass a budget of ``policy.dp``.
        """
        from fedmri.client.privacy.dp_sgd import unit_members

        r = self.request
        if not r.dp:
            raise ValueError("plan() is for requests with dp")
        keys = list(patients)
        if not keys or batch_size < 1:
            raise DeclineError(f"{r.stage} under DP needs at least one private unit and batch size >= 1")
        unit = self.unit
        members = unit_members(keys if unit == "patient" else range(len(keys)))
        rate = min(1.0, batch_size / len(keys))
        if r.dp_noise_multiplier is not None:
            sigma = float(r.dp_noise_multiplier)
        else:
            sigma = _noise_for(float(r.dp_target_epsilon), self.delta, rate, r.local_steps * r.stage_rounds)
        plan = DPPlan(sigma, rate, r.local_steps, float(r.dp_max_grad_norm), self.delta, len(members),
                      self.seed("dp-sgd"), unit=unit, members=tuple(tuple(m) for m in members))
        self._check(r.stage, plan)
        self.plans[r.stage] = plan
        return plan

    def plan_site_level(self) -> DPPlan:
        """Local site-level DP: one Gaussian release of the clipped update (q = 1, one step).

        A bound on the whole site's update bounds any one sample's part in it (by 2C:
        the updates with and without the sample both lie in the C-ball), so the ledger
        composes it with the site's DP-SGD rounds as a sample-level guarantee at noise z/2.
        The same holds for a whole patient, so it is recorded under the site's unit.

        Distributed site-level DP (under secure aggregation) is recorded the same way, at the
        noise multiplier z of the sum: the guarantee when every expected site adds its share
        and none colludes with the coordinator. With m' of m sites contributing the sum's
        noise is z sqrt(m'/m), which the coordinator's privacy report accounts; a site that
        trusts no other site has only its own share, z / sqrt(m).
        """
        r = self.request
        plan = DPPlan(float(r.site_dp_noise_multiplier), 1.0, 1, float(r.site_dp_clip_norm), self.delta, 1,
                      self.seed("site-dp"), sensitivity=2.0, unit=self.unit)
        self._check(r.stage + SITE_LEVEL_SUFFIX, plan)
        self.plans[r.stage + SITE_LEVEL_SUFFIX] = plan
        return plan

    def _check(self, stage: str, plan: DPPlan) -> None:
        r = self.request
        total, per_run = self.dp.epsilon_total, self.dp.epsilon_per_run
        pending = [(s, p) for s, p in self.plans.items() if s != stage]
        with PrivacyLedger(self.ledger_path) as ledger:
            try:
                exceeds, eps_total, eps_run = ledger.would_exceed(
                    r.run_name, plan.accounted_noise, plan.sample_rate, plan.steps, plan.delta,
                    None if total is None else float(total), None if per_run is None else float(per_run),
                    stage=stage, round=r.round, extra=[(p.accounted_noise, p.sample_rate, p.steps)
                                                       for _, p in pending], inputs=self.inputs, unit=plan.unit)
            except LedgerConflictError:
                raise DeclineError(f"run {r.run_name!r} {stage} round {r.round} was already spent at this site "
                                   "from other weights or numbers; give each run a new name") from None
        if exceeds:
            raise DeclineError(
                f"privacy budget: this {stage} round (noise {plan.noise_multiplier:.3g}, q {plan.sample_rate:.3g} "
                f"per {plan.unit}, {plan.steps} steps) would take the site to ε {eps_total:.3g} in total and "
                f"{eps_run:.3g} in this run at δ {plan.delta:g}; its budget is {_limit(total)} in total and "
                f"{_limit(per_run)} per run")

    def record(self) -> list[LedgerEntry]:
        """Write every planned mechanism to the ledger (call before the update leaves)."""
        r = self.request
        out = []
        with PrivacyLedger(self.ledger_path) as ledger:
            for stage, p in self.plans.items():
                out.append(ledger.record_round(r.run_name, stage, r.round, p.accounted_noise, p.sample_rate,
                                               p.steps, p.delta, self.inputs, unit=p.unit))
            self.run_unit = ledger.unit(r.run_name)
        return out

    def metrics(self, entries: list[LedgerEntry]) -> dict[str, float]:
        """Aggregate numbers the coordinator shows: the mechanism, its unit and the ε after the round.

        ``dp-unit-patient`` is 1.0 when the run's ε is per patient (every round of the run at
        this site was patient-level) and 0.0 when it is per series (per pair in alignment):
        metrics are numbers, and no patient key is in them.
        """
        if not entries:
            return {}
        last = entries[-1]
        run_unit = self.run_unit or ("patient" if all(e.unit == "patient" for e in entries) else "series")
        out = {"dp-epsilon-run": last.epsilon_run, "dp-epsilon-total": last.epsilon_total, "dp-delta": last.delta,
               "dp-unit-patient": float(run_unit == "patient")}
        plan = self.plans.get(self.request.stage)
        if plan is not None:
            out |= {"dp-noise-multiplier": plan.noise_multiplier, "dp-sample-rate": plan.sample_rate,
                    "dp-steps": float(plan.steps), "dp-max-grad-norm": plan.max_grad_norm}
        site = self.plans.get(self.request.stage + SITE_LEVEL_SUFFIX)
        if site is not None:
            out |= {"site-dp-noise-multiplier": site.noise_multiplier, "site-dp-clip-norm": site.max_grad_norm}
        return out


def _limit(value: float | None) -> str:
    return "none" if value is None else f"{float(value):g}"


def require_gate(privacy: PrivacyGate | None, request: TrainRequest) -> PrivacyGate:
    """The round's gate, which a DP round must have: the ClientApp makes it, with the ledger's digest.

    Raises:
        RuntimeError: A DP round without a gate (a caller bug: nothing would be recorded).
    """
    if privacy is None:
        raise RuntimeError(f"a DP {request.stage} round needs the ClientApp's PrivacyGate (privacy=...); "
                           "without it the round's ε would not be checked against the budget or recorded")
    return privacy
