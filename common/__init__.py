"""fedmri: federated training of a 3D MRI vision-language foundation encoder.

The top-level package holds what the server and the sites share: configuration,
data ingestion, models, losses and the command line. Role packages
(``fedmri.client``, ``fedmri.server``, ``fedmri.strategies``,
``fedmri.simulations``) build on it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fedmri.errors import ConfigError, FedmriError, InputError
from fedmri.lazy import lazy_attributes

try:
    __version__ = version("fedmri")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["ConfigError", "FedmriError", "InputError", "__version__", "load_encoder", "save_encoder"]


# Export and load pull in torch: imported on first use so that `import fedmri`
# (and the CLI's start-up) stays light.
__getattr__ = lazy_attributes(__name__, {"save_encoder": "fedmri.export", "load_encoder": "fedmri.export"})
