"""The ``fedmri`` command line."""

from fedmri.cli.main import app, main

__all__ = ["app", "main"]
