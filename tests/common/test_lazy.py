"""Lazy package attributes: heavy modules load on first use, and only then."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fedmri.data
import fedmri.ssl


def test_lazy_name_is_the_defining_modules_object() -> None:
    from fedmri.data.indexer import index_site
    from fedmri.ssl.multicrop import build_multicrop

    assert fedmri.data.index_site is index_site
    assert fedmri.ssl.build_multicrop is build_multicrop


def test_unknown_attribute_names_the_package() -> None:
    with pytest.raises(AttributeError, match="'fedmri.data' has no attribute 'nope'"):
        fedmri.data.nope  # noqa: B018


def test_importing_fedmri_data_loads_neither_torch_nor_monai() -> None:
    code = "import sys, fedmri, fedmri.data; print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
