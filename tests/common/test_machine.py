"""What a result was computed with (fedmri.machine), as results.json and report.md carry it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from fedmri import __version__
from fedmri.machine import FEATURES, describe, machine_record


def test_the_record_names_this_process_packages_and_kernels() -> None:
    record = machine_record()
    assert record["packages"]["torch"] == torch.__version__ and record["packages"]["fedmri"] == __version__
    assert record["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    assert record["cores"] >= 1 and record["cpu"]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux: the vendor and x86 features as the kernel lists them (ARM lists neither)
        text = cpuinfo.read_text(encoding="utf-8")
        vendor = re.search(r"^vendor_id\s*:\s*(\S.*)$", text, re.M)
        flags = re.search(r"^flags\s*:(.*)$", text, re.M)
        assert record["cpu_vendor"] == (vendor.group(1).strip() if vendor else "")
        assert record["cpu_features"] == [f for f in FEATURES if flags and f in flags.group(1).split()]
    json.dumps(record)  # it goes into results.json as is
    line = describe(record)
    assert f"torch {torch.__version__}" in line and f"{record['cpu_kernels']} kernels" in line


def test_describe_names_the_vendor_and_amx() -> None:
    record = {"cpu": "Intel(R) Xeon(R) Processor", "cpu_vendor": "GenuineIntel", "cores": 2,
              "cpu_kernels": "AVX512", "cpu_features": ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]}
    assert describe(record) == "AVX512 kernels with AMX, Intel(R) Xeon(R) Processor (GenuineIntel), 2 cores"
    record |= {"cpu": "AMD EPYC", "cpu_vendor": "AuthenticAMD", "cpu_kernels": "AVX2", "cpu_features": ["avx2"]}
    assert describe(record) == "AVX2 kernels, AMD EPYC (AuthenticAMD), 2 cores"


def test_describe_leaves_out_what_an_older_record_lacks() -> None:
    assert describe({"cpu": "Some CPU", "cores": 2}) == "Some CPU, 2 cores"
    assert describe({}) == ""


def test_the_report_says_what_computed_it_and_an_older_run_still_reports(tmp_path: Path) -> None:
    from fedmri.simulations.report import write_report

    record = {"cpu": "Test CPU 9000", "cpu_kernels": "AVX512", "cores": 64,
              "packages": {"fedmri": "1.2.3", "torch": "9.9.9"}}
    (tmp_path / "results.json").write_text(json.dumps({"modes": {}, "holdout": {}, "machine": record}))
    md = write_report(tmp_path).read_text(encoding="utf-8")
    assert "Computed with fedmri 1.2.3, torch 9.9.9, AVX512 kernels, Test CPU 9000, 64 cores" in md
    (tmp_path / "results.json").write_text(json.dumps({"modes": {}, "holdout": {}}))  # before the record
    assert "Computed with" not in write_report(tmp_path).read_text(encoding="utf-8")
