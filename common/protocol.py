"""Wire protocol constants shared by the ServerApp and the ClientApps."""

from __future__ import annotations

# Bumped whenever the content of a message changes shape; a site whose
# protocol differs from the server's declines work with a reason.
PROTOCOL_VERSION = 1
