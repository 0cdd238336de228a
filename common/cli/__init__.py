"""The ``fedmri`` command line."""

import os

from fedmri.flower_cli import telemetry_off

# Before anything imports Flower: `fedmri simulate` runs Flower in this process.
telemetry_off(os.environ)

from fedmri.cli.main import app, main  # noqa: E402

__all__ = ["app", "main"]
