"""The site's privacy ledger: ε equal to Opacus' RDP accountant, across runs and restarts;
budgets, retries, damaged files and ``fedmri client privacy``."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedmri.client.privacy import LedgerConflictError, LedgerError, PrivacyLedger, default_ledger_path
from fedmri.client.site import load_site
from fedmri.errors import InputError

DELTA = 1e-5
# (run, stage, round, noise_multiplier, sample_rate, steps): two runs, interleaved, several noises and rates.
ROUNDS = [
    ("run-a", "pretrain", 1, 1.1, 0.01, 100),
    ("run-a", "pretrain", 2, 1.1, 0.01, 100),
    ("run-a", "pretrain", 3, 1.2, 0.008, 60),
    ("run-b", "align", 1, 1.3, 0.005, 200),  # the test restarts the ledger before this round
    ("run-a", "heads", 1, 1.0, 0.004, 20),
    ("run-b", "align", 2, 1.05, 0.01, 40),
]


def _direct_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε from Opacus' RDP analysis functions, without any accountant object."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(compute_rdp(q=q, noise_multiplier=noise, steps=steps, orders=orders) for noise, q, steps in history)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


def test_epsilon_is_opacus_rdp_across_two_runs_and_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = PrivacyLedger(path)
    total, per_run = RDPAccountant(), {"run-a": RDPAccountant(), "run-b": RDPAccountant()}
    history: dict[str, list[tuple[float, float, int]]] = {"run-a": [], "run-b": []}
    worst = 0.0
    for i, (run, stage, round_, noise, rate, steps) in enumerate(ROUNDS):
        if i == 3:  # restart: everything the ledger knows must come back from the file
            before = ledger.entries()
            ledger.close()
            ledger = PrivacyLedger(path)
            assert ledger.entries() == before
        for _ in range(steps):  # the accountant as Opacus' optimizer drives it, one step at a time
            total.step(noise_multiplier=noise, sample_rate=rate)
            per_run[run].step(noise_multiplier=noise, sample_rate=rate)
        history[run].append((noise, rate, steps))
        entry = ledger.record_round(run, stage, round_, noise, rate, steps, DELTA)
        everything = history["run-a"] + history["run-b"]
        checks = [(entry.epsilon_total, total.get_epsilon(DELTA)), (entry.epsilon_run, per_run[run].get_epsilon(DELTA)),
                  (entry.epsilon_total, _direct_epsilon(everything, DELTA)),
                  (entry.epsilon_run, _direct_epsilon(history[run], DELTA))]
        worst = max([worst] + [abs(got - want) for got, want in checks])
        assert entry.epsilon_run <= entry.epsilon_total
    assert worst < 1e-6, worst
    # Recomputed from the stored history at another δ, for the site and for one run.
    assert ledger.epsilon(1e-6) == pytest.approx(total.get_epsilon(1e-6), abs=1e-6)
    assert ledger.epsilon(1e-6, run="run-b") == pytest.approx(per_run["run-b"].get_epsilon(1e-6), abs=1e-6)
    assert ledger.epsilon(DELTA, run="run-a", stage="heads") == pytest.approx(_direct_epsilon([(1.0, 0.004, 20)], DELTA))
    # The total is composed, not added: less than the sum of the runs' ε.
    last = {e.run: e.epsilon_run for e in ledger.entries()}
    assert ledger.entries()[-1].epsilon_total < sum(last.values())
    ledger.close()


def test_summary_per_run_and_stage(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.summary().rounds == 0 and ledger.summary().epsilon_total == 0.0
        entries = [ledger.record_round(*r, DELTA) for r in ROUNDS[:4]]
        summary = ledger.summary()
    assert [(s.run, s.stage, s.rounds, s.steps) for s in summary.stages] == [
        ("run-a", "pretrain", 3, 260), ("run-b", "align", 1, 200)]
    assert summary.stages[0].epsilon_run == entries[2].epsilon_run
    assert (summary.runs, summary.rounds, summary.epsilon_total) == (2, 4, entries[-1].epsilon_total)


def test_a_budget_of_one_declines_the_round_that_would_pass_it(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:
        declined = None
        for round_ in range(1, 50):  # ε after k rounds: 0.64, 0.72, 0.80, 0.87, 0.94, 1.002
            exceeds, eps_total, eps_run = ledger.would_exceed("run-a", 1.3, 0.01, 100, DELTA, 1.0, None)
            if exceeds:
                declined = (round_, eps_total)
                break
            entry = ledger.record_round("run-a", "pretrain", round_, 1.3, 0.01, 100, DELTA)
            assert (entry.epsilon_total, entry.epsilon_run) == (eps_total, eps_run)  # the prediction is exact
        assert declined is not None and declined[0] == 6 and declined[1] > 1.0
        assert max(e.epsilon_total for e in ledger.entries()) <= 1.0
        # A per-run budget: run-b may start although run-a is near the site's total.
        exceeds, eps_total, eps_run = ledger.would_exceed("run-b", 1.3, 0.01, 100, DELTA, None, 0.7)
        assert not exceeds and eps_run < 0.7 < 1.0 < eps_total
        assert ledger.would_exceed("run-b", 1.3, 0.01, 100, DELTA, 1.0, 0.7)[0]  # but not within the total


def test_a_retried_round_is_recorded_once(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:
        first = ledger.record_round("run-a", "pretrain", 1, 1.1, 0.01, 100, DELTA)
        spent = ledger.epsilon(DELTA)
        # The retry's prospective ε is today's ε; without naming the round it counts as new.
        assert ledger.would_exceed("run-a", 1.1, 0.01, 100, DELTA, None, None, stage="pretrain", round=1) == (
            False, spent, spent)
        assert ledger.would_exceed("run-a", 1.1, 0.01, 100, DELTA, None, None)[1] > spent
        assert ledger.record_round("run-a", "pretrain", 1, 1.1, 0.01, 100, DELTA) == first
        assert len(ledger.entries()) == 1 and ledger.epsilon(DELTA) == spent
        with pytest.raises(LedgerConflictError, match="already recorded"):
            ledger.record_round("run-a", "pretrain", 1, 1.1, 0.01, 120, DELTA)
        with pytest.raises(LedgerConflictError):
            ledger.would_exceed("run-a", 0.7, 0.01, 100, DELTA, None, None, stage="pretrain", round=1)
        assert ledger.entries() == [first]


def test_a_reused_run_name_with_other_weights_is_a_conflict_not_a_retry(tmp_path: Path) -> None:
    """Same numbers, other inputs: a second release with the same noise seed, which must not pass as a retry."""
    with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:
        first = ledger.record_round("demo", "pretrain", 1, 1.1, 0.01, 100, DELTA, inputs="weights-a")
        assert ledger.record_round("demo", "pretrain", 1, 1.1, 0.01, 100, DELTA, inputs="weights-a") == first
        with pytest.raises(LedgerConflictError, match="run name was reused"):
            ledger.record_round("demo", "pretrain", 1, 1.1, 0.01, 100, DELTA, inputs="weights-b")
        with pytest.raises(LedgerConflictError, match="run name was reused"):
            ledger.would_exceed("demo", 1.1, 0.01, 100, DELTA, None, None, stage="pretrain", round=1,
                                inputs="weights-b")
        assert ledger.entries() == [first]


def test_a_recorded_round_survives_kill_9(tmp_path: Path) -> None:
    """A real SIGKILL while the child records rounds: every acknowledged row is in the file,
    and ε goes on from the stored (noise, rate, steps), not from stored ε."""
    path = tmp_path / "ledger.sqlite"
    child = textwrap.dedent(f"""
        import fedmri.client.privacy.ledger as ledger
        ledger.rdp_epsilon = lambda history, delta: float(len(history))  # no Opacus: a fast child
        book = ledger.PrivacyLedger({str(path)!r})
        for i in range(1, 100000):
            book.record_round("run-a", "pretrain", i, 1.2, 0.01, 10, 1e-5)
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acked = [int(proc.stdout.readline()) for _ in range(5)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    with PrivacyLedger(path) as ledger:
        rounds = [e.round for e in ledger.entries()]
        assert rounds[: len(acked)] == acked and rounds == list(range(1, len(rounds) + 1))
        assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        entry = ledger.record_round("run-b", "align", 1, 0.9, 0.01, 30, DELTA)
    want = _direct_epsilon([(1.2, 0.01, 10 * len(rounds)), (0.9, 0.01, 30)], DELTA)
    assert entry.epsilon_total == pytest.approx(want, abs=1e-6)


def test_a_file_that_is_not_a_ledger_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database" + bytes(range(256)) * 20)
    with pytest.raises(LedgerError, match="file is not a database"):
        PrivacyLedger(garbage)
    other = tmp_path / "catalog.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE series (uid TEXT)")
    with pytest.raises(InputError, match="not a fedmri privacy ledger"):
        PrivacyLedger(other)
    with pytest.raises(FileNotFoundError):
        PrivacyLedger(tmp_path / "missing.sqlite", create=False)
    assert not (tmp_path / "missing.sqlite").exists()


@pytest.mark.parametrize("bad", [
    {"noise_multiplier": 0.0}, {"noise_multiplier": float("nan")}, {"sample_rate": 0.0}, {"sample_rate": 1.5},
    {"steps": 0}, {"steps": 2.5}, {"delta": 0.0}, {"delta": 1.0}, {"round": 0}, {"stage": ""}, {"run": " "},
])
def test_illegal_round_values_are_refused(tmp_path: Path, bad: dict) -> None:
    values = {"run": "run-a", "stage": "pretrain", "round": 1, "noise_multiplier": 1.0, "sample_rate": 0.01,
              "steps": 10, "delta": DELTA} | bad
    with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:
        with pytest.raises(ValueError, match=next(iter(bad))):
            ledger.record_round(**values)
        with pytest.raises(ValueError, match="budget_run"):
            ledger.would_exceed("run-a", 1.0, 0.01, 10, DELTA, 1.0, -1.0)
        assert ledger.entries() == []


# ---- fedmri client privacy, as a site admin runs it ----

def _fedmri(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from fedmri.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def site_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text("name: site-a\ncatalog: catalog\n")
    return path


def test_cli_prints_the_ledger_as_json_and_as_tables(site_yaml: Path) -> None:
    ledger_path = default_ledger_path(load_site(site_yaml))
    assert ledger_path == site_yaml.parent / "catalog" / "privacy-ledger.sqlite"
    with PrivacyLedger(ledger_path) as ledger:
        entries = [ledger.record_round(*r, DELTA) for r in ROUNDS]
    out = _fedmri("client", "privacy", "--site", str(site_yaml), "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) == len(ROUNDS)
    for row, entry in zip(rows, entries):
        assert {"run", "stage", "round", "noise_multiplier", "sample_rate", "steps", "delta",
                "epsilon_total"} <= set(row)
        assert row == entry.to_dict()

    out = _fedmri("client", "privacy", "--site", str(site_yaml))
    assert out.returncode == 0, out.stderr
    assert "Private rounds of site site-a (δ = 1e-05)" in out.stdout
    assert "ε spent per run and stage" in out.stdout
    assert "unit" in out.stdout and "series" in out.stdout  # what each round protected
    for entry in entries:
        assert f"{entry.epsilon_total:.4f}" in out.stdout
    assert f"site total: ε = {entries[-1].epsilon_total:.4f}" in out.stdout


def test_cli_missing_and_damaged_ledgers(site_yaml: Path, tmp_path: Path) -> None:
    out = _fedmri("client", "privacy", "--site", str(site_yaml))
    assert out.returncode == 0 and "no private rounds recorded yet" in out.stdout
    assert not (tmp_path / "catalog" / "privacy-ledger.sqlite").exists()  # reading creates nothing
    out = _fedmri("client", "privacy", "--site", str(site_yaml), "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == []

    damaged = tmp_path / "damaged.sqlite"
    damaged.write_bytes(b"\x00garbage" * 500)
    out = _fedmri("client", "privacy", "--site", str(site_yaml), "--ledger", str(damaged))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(damaged) in lines[0] and "not a database" in lines[0], out.stderr
