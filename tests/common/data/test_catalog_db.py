"""Catalog schema, site salt, pseudonyms and the patient-level split rule."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import numpy as np
import pytest

from fedmri.data.catalog_db import (
    CATALOG_FILE,
    SALT_FILE,
    SCHEMA_VERSION,
    check_split_fractions,
    load_or_create_salt,
    open_catalog,
    assign_splits,
    pseudonym,
)
from fedmri.errors import ConfigError, InputError


def test_salt_is_private_random_and_stable(tmp_path: Path) -> None:
    salt = load_or_create_salt(tmp_path / "a")
    path = tmp_path / "a" / SALT_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(salt) == 32 and load_or_create_salt(tmp_path / "a") == salt
    assert load_or_create_salt(tmp_path / "b") != salt
    assert sorted(p.name for p in path.parent.iterdir()) == [SALT_FILE]  # no temporary left


def test_corrupt_salt_is_refused(tmp_path: Path) -> None:
    (tmp_path / SALT_FILE).write_text("not hex\n")
    with pytest.raises(InputError, match="backup"):
        load_or_create_salt(tmp_path)


def test_pseudonyms_depend_on_salt_and_kind_and_hide_the_id() -> None:
    a, b = b"\x01" * 32, b"\x02" * 32
    assert pseudonym(a, "patient", "PAT001") == pseudonym(a, "patient", "PAT001")
    assert pseudonym(a, "patient", "PAT001") != pseudonym(b, "patient", "PAT001")
    assert pseudonym(a, "patient", "PAT001") != pseudonym(a, "series", "PAT001")
    assert "PAT001" not in pseudonym(a, "patient", "PAT001") and len(pseudonym(a, "x", "y")) == 32


def _add_patients(conn: sqlite3.Connection, salt: bytes, ids: range) -> None:
    """Series rows with just what assign_splits reads: one series per patient."""
    conn.executemany(
        "INSERT INTO series (id, series_uid, patient_id, study_id, study_uid, accession, split, shape, spacing, meta, "
        "source_kind, source_paths, files_digest, settings, settings_digest, cache_key, cache_path, has_mask, "
        "indexed_at) VALUES (?, ?, ?, '', '', '', '', '[]', '[]', '{}', 'dicom', '[]', '', '{}', '', '', '', 0, '')",
        [(f"s{i}", f"uid{i}", pseudonym(salt, "patient", f"P{i}")) for i in ids],
    )


def _shares(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT split, COUNT(DISTINCT patient_id) FROM series GROUP BY split").fetchall())


@pytest.mark.parametrize("n", [7, 10, 11, 13, 20])
def test_small_sites_get_every_split(tmp_path: Path, n: int) -> None:
    conn = open_catalog(tmp_path, create=True)
    _add_patients(conn, b"\x05" * 32, range(n))
    assign_splits(conn, (0.7, 0.15, 0.15))
    shares = _shares(conn)
    assert set(shares) == {"train", "val", "test"}
    # Largest remainder: each count is within one patient of its target share.
    for name, fraction in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs(shares[name] - fraction * n) <= 1.0


def test_split_follows_the_fractions_and_never_moves_a_patient(tmp_path: Path) -> None:
    conn = open_catalog(tmp_path, create=True)
    salt = np.random.default_rng(0).bytes(32)
    _add_patients(conn, salt, range(50))
    assign_splits(conn, (0.7, 0.15, 0.15))
    before = dict(conn.execute("SELECT patient_id, split FROM series").fetchall())
    _add_patients(conn, salt, range(50, 2000))  # the site grows forty-fold
    assign_splits(conn, (0.7, 0.15, 0.15))
    after = dict(conn.execute("SELECT patient_id, split FROM series").fetchall())
    assert all(after[pid] == split for pid, split in before.items())
    shares = _shares(conn)
    assert abs(shares["train"] / 2000 - 0.7) < 0.01 and abs(shares["val"] / 2000 - 0.15) < 0.01


def test_a_split_with_no_share_stays_empty(tmp_path: Path) -> None:
    conn = open_catalog(tmp_path, create=True)
    _add_patients(conn, b"\x07" * 32, range(30))
    assign_splits(conn, (0.5, 0.5, 0.0))
    assert _shares(conn) == {"train": 15, "val": 15}


@pytest.mark.parametrize("fractions", [(0.7, 0.3), (0.5, 0.5, 0.5), (1.2, -0.1, -0.1)])
def test_bad_split_fractions(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ConfigError, match="split_fractions"):
        check_split_fractions(fractions)


def test_open_creates_migrates_and_refuses_newer(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="data index"):
        open_catalog(tmp_path / "none")
    conn = open_catalog(tmp_path / "cat", create=True)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"files", "series", "skipped", "failed_series", "runs", "info"} <= tables
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(InputError, match="newer"):
        open_catalog(tmp_path / "cat")
    assert (tmp_path / "cat" / CATALOG_FILE).is_file()
