"""Flower's telemetry stays off in every process fedmri starts, unless a site or coordinator asks for it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedmri.flower_cli import TELEMETRY_ENV, child_env

# What Flower itself reads (flwr/supercore/telemetry.py), in a fresh interpreter that imports fedmri's CLI first.
PROBE = "import fedmri.cli; from flwr.supercore import telemetry; print(telemetry.FLWR_TELEMETRY_ENABLED)"


def test_children_get_telemetry_off_unless_it_was_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TELEMETRY_ENV, raising=False)
    assert child_env()[TELEMETRY_ENV] == "0"
    assert TELEMETRY_ENV not in os.environ  # the caller's own environment is left as it was
    monkeypatch.setenv(TELEMETRY_ENV, "1")
    assert child_env()[TELEMETRY_ENV] == "1"


@pytest.mark.parametrize(("given", "flower_sees"), [(None, "0"), ("1", "1")])
def test_flower_in_the_cli_process_sees_telemetry_off_unless_asked(given: str | None, flower_sees: str) -> None:
    """`fedmri simulate` runs Flower in the CLI's own process: the CLI turns it off before Flower loads."""
    env = {k: v for k, v in os.environ.items() if k != TELEMETRY_ENV} | ({TELEMETRY_ENV: given} if given else {})
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == flower_sees
