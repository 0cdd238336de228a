"""kill -9 in the middle of `fedmri data index`: the catalog is as before, a rerun completes it.

With worker processes too: they leave with the killed indexer, and what they
wrote (cache entries only, never the catalog) is reused by the rerun.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.site_factory import make_site

from fedmri.config import load_config
from fedmri.data.indexer import HANG_ENV, index_site

OVERRIDE = "data.preprocess.target_shape=[16,16,8]"
CFG = load_config("tiny", overrides=[OVERRIDE])


def _dump(catalog: Path, skip_columns: tuple[str, ...] = ()) -> dict[str, list[tuple]]:
    conn = sqlite3.connect(catalog / "catalog.sqlite")
    conn.row_factory = sqlite3.Row
    dump = {}
    for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
        rows = [tuple(v for k, v in zip(r.keys(), r, strict=True) if k not in skip_columns)
                for r in conn.execute(f"SELECT * FROM {table}")]
        dump[table] = sorted(rows, key=repr)
    conn.close()
    return dump


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited; only its parent (here: gone) would reap it
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_mid_index_then_rerun(tmp_path: Path, workers: int) -> None:
    site = make_site(tmp_path / "site", n_patients=2, series_per_patient=2, seed=4)
    cat = tmp_path / "cat"
    index_site(site.dicom, site.reports, cat, labels=site.labels, cfg=CFG)
    extra = make_site(tmp_path / "extra", n_patients=3, series_per_patient=2, seed=5, with_mask=False)
    shutil.copytree(extra.dicom, site.dicom / "new")
    before = _dump(cat)
    # The uninterrupted twin starts from the same catalog (same salt, same patients' splits).
    fresh = tmp_path / "fresh"
    shutil.copytree(cat, fresh)

    cmd = [sys.executable, "-c", "from fedmri.cli import main; main()", "data", "index", str(site.dicom),
           "--reports", str(site.reports), "--labels", str(site.labels), "--out", str(cat),
           "--workers", str(workers), OVERRIDE]
    env = {**os.environ, HANG_ENV: "3"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:  # blocks until the hook says the transaction is mid-way
            lines.append(line)
            if "fedmri-test-hook" in line:
                break
        hook = next((line for line in lines if "fedmri-test-hook: hanging after 3 series" in line), None)
        assert hook is not None, "".join(lines)
        pids = [int(p) for p in hook.rpartition("worker pids:")[2].strip(" )\n").split() if p.isdigit()]
        assert len(pids) == (2 if workers == 2 else 0), hook
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, pids)), f"worker processes {pids} outlived the killed indexer"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.stderr.close()

    assert _dump(cat) == before  # no loss, no half-written rows
    rerun = index_site(site.dicom, site.reports, cat, labels=site.labels, cfg=CFG)
    assert rerun.n_loaded == 6
    # One process: the three cache entries written before the kill survive. Workers run ahead of the
    # indexer, so they may have written more.
    assert rerun.n_preprocessed == 3 if workers == 1 else rerun.n_preprocessed <= 3
    assert rerun.n_series == 10

    # Same catalog as one uninterrupted index of the same data from the same starting catalog.
    index_site(site.dicom, site.reports, fresh, labels=site.labels, cfg=CFG)
    a, b = _dump(cat, ("indexed_at", "run_id")), _dump(fresh, ("indexed_at", "run_id"))
    assert a["series"] == b["series"] and a["files"] == b["files"] and a["skipped"] == b["skipped"]
    assert len({row[1] for row in a["series"]}) == 10  # one row per series UID, no duplicates
