"""Run a pipeline over the in-process grid as a coordinator process of its own (not a test module).

    python run_coordinator.py FEDERATION_YAML SITES_JSON

The kill test SIGKILLs this process between rounds, as a crash or an operator would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# A script, outside pytest's pythonpath: tests/ holds the shared helpers.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.identity import server_identity  # noqa: E402
from helpers.local_grid import LocalGrid  # noqa: E402

from fedmri.server.config import load_federation  # noqa: E402
from fedmri.server.pipeline import Pipeline  # noqa: E402


def main() -> None:
    with server_identity():
        fed = load_federation(sys.argv[1])
        sites = {int(k): Path(v) for k, v in json.loads(Path(sys.argv[2]).read_text()).items()}
        Pipeline(fed).run_all(LocalGrid(sites))


if __name__ == "__main__":
    main()
