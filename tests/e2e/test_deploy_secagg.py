"""A deployed secure-aggregation round that loses a site after its masked update arrived.

The federation of test_deploy.py (deployed_federation: TLS, node keys, the micro preset on
the synthetic hospitals), on a SuperLink of this module's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import Daemon, hold_clientapps
from deployed_federation import GOOD, RUN_TIMEOUT_S, SPARE, SPARES, Federation, start_federation
from deployed_federation import aggregate as _aggregate
from deployed_federation import finish as _finish
from deployed_federation import metrics as _metrics
from deployed_federation import sites as _sites
from deployed_federation import start_run as _start_run
from deployed_federation import start_spares

from fedmri.protocol import SECAGG_UNMASK


@pytest.fixture(scope="module")
def federation(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    yield from start_federation(request, tmp_path_factory)


@pytest.mark.slow
def test_a_site_killed_after_sending_its_masked_update_still_counts(federation: Federation, federation_sites: list,
                                                                   daemons: list[Daemon], tmp_path: Path) -> None:
    """Five sites under secure aggregation, threshold 3: one site's SuperNode is killed (SIGKILL)
    once its masked update has reached the coordinator, when the unmask message reaches it and
    before it can answer. Its input is in the sum and its pairwise masks cancel with the others';
    its self-mask comes off through the shares that the four survivors hold. So the round counts
    all five sites, and the unmasked weight is checked against their five example counts.

    The coordinator stops waiting as soon as every secret has its threshold of shares: the dead
    site's unmask reply would otherwise be waited for until the SuperLink gives up on its heartbeat
    (37-60 s, see test_deploy.py's kill test), and the site would be booked as failed.

    Its own module, so its own SuperLink: in test_deploy.py it ran after the test that kills
    two spares and stops the third, and waited up to a minute for the SuperLink to let those
    nodes in again (Flower refuses a node it still counts online until its heartbeat lapses).
    """
    assert {name for name, _, _ in federation_sites} >= {*GOOD, SPARE}
    doomed = SPARES[1]
    spares = start_spares(federation, daemons, tmp_path)
    run, _, run_dir = _start_run(federation, daemons, tmp_path, "e2e-kill-late",
                                 [{"name": "pretrain", "rounds": 1, "local_steps": 1,
                                   "secure_aggregation": {"enabled": True, "threshold": 0.5}}],
                                 round_timeout_s=150, export=False, min_sites=5, wait_for_sites_s=120)
    # The coordinator sends the unmask message only to sites whose masked update it holds, once
    # every site's is in. Held once its masked update went out (hold_clientapps), the site cannot
    # fork the ClientApp that would answer the unmask message (warm, it would in about a second),
    # so the kill comes first.
    spares[doomed].wait_for(r"Sending: train message", RUN_TIMEOUT_S, poll=0.05)
    hold_clientapps(spares[doomed])
    spares[doomed].wait_for(rf"Receiving: {SECAGG_UNMASK} message", RUN_TIMEOUT_S)
    killed = spares[doomed].kill_tree()
    assert any("flower-supernode" in c for c in killed.values()), killed
    assert f"Sending: {SECAGG_UNMASK} message" not in spares[doomed].output

    _finish(federation, run)
    rows = _metrics(run_dir)
    assert _sites(rows, 1, "ok") == {*GOOD, *SPARES}, rows
    assert not _sites(rows, 1, "failed"), rows
    first = _aggregate(rows, 1)
    assert first["status"] == "aggregated" and first["sites"] == 5 and first["secagg-sites"] == 5, first
