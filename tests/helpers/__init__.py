"""Helpers shared by test folders and benchmarks (not test modules).

Importable as ``helpers`` everywhere under tests/: pyproject.toml puts tests/ on
``sys.path`` (``[tool.pytest.ini_options] pythonpath``). Scripts outside pytest
(benchmarks, tests/server/run_coordinator.py) put tests/ on ``sys.path`` themselves.

- :mod:`helpers.local_grid`: ``LocalGrid``, an in-process Flower grid over the real ClientApp.
- :mod:`helpers.identity`: ``server_identity()``, the task identity Flower's ServerApp runtime sets.
- :mod:`helpers.site_factory`: ``make_site``, a tiny hospital on disk for catalog, CLI and dataset tests.
- :mod:`helpers.dcm2niix`: the cases and measures that compare load_series with dcm2niix.
- :mod:`helpers.geometry`: RAS direction matrices of the DICOM acquisition planes (axial ... oblique).
"""
