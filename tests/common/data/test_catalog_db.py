"""Catalog schema, site salt, pseudonyms and the patient-level split rule."""

from __future__ import annotations

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
    pseudonym,
    split_for,
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


def test_split_follows_the_fractions() -> None:
    rng = np.random.default_rng(0)
    salt = rng.bytes(32)
    splits = [split_for(pseudonym(salt, "patient", f"P{i}"), (0.7, 0.15, 0.15)) for i in range(4000)]
    shares = {name: splits.count(name) / len(splits) for name in ("train", "val", "test")}
    assert abs(shares["train"] - 0.7) < 0.03 and abs(shares["val"] - 0.15) < 0.03 and abs(shares["test"] - 0.15) < 0.03
    assert {split_for(pseudonym(salt, "patient", f"P{i}"), (0.0, 0.0, 1.0)) for i in range(50)} == {"test"}
    assert split_for("f" * 32, (0.5, 0.5, 0.0)) == "val"  # the top of the range stays in a split with a share


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
