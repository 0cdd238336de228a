"""fedmri: federated training of a 3D MRI vision-language foundation encoder.

The top-level package holds what the server and the sites share: configuration,
data ingestion, models, losses and the command line. Role packages
(``fedmri.client``, ``fedmri.server``, ``fedmri.strategies``,
``fedmri.simulations``) build on it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fedmri.errors import ConfigError, FedmriError, InputError

try:
    __version__ = version("fedmri")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["ConfigError", "FedmriError", "InputError", "__version__", "load_encoder", "save_encoder"]


def __getattr__(name: str) -> object:
    # Export and load pull in torch: import them on first use so that
    # `import fedmri` (and the CLI's start-up) stays light.
    if name in {"save_encoder", "load_encoder"}:
        from fedmri import export

        return getattr(export, name)
    raise AttributeError(f"module 'fedmri' has no attribute {name!r}")
