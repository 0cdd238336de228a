"""Errors a user can act on.

Every error that a site admin, coordinator or researcher can fix derives from
:class:`FedmriError`. The CLI prints such errors as one line and exits non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FedmriError(Exception):
    """Base class for errors that name a bad input and say what to do about it."""


class ConfigError(FedmriError, ValueError):
    """A configuration key, value or preset is wrong."""


class InputError(FedmriError, ValueError):
    """A file or folder given by the user cannot be used."""
