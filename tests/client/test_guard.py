"""The site runs only the fedmri it installed: the coordinator's app bundle is checked before it is installed."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedmri import __version__
from fedmri.cli.run_cmd import app_pyproject
from fedmri.client.guard import BundleRefused, check_bundle, version_refusal, write_launcher
from fedmri.client.policy import check_request
from fedmri.client.site import load_site
from fedmri.client.trainers import TrainRequest


def _fab(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as fab:
        for name, text in files.items():
            fab.writestr(name, text)
    return buffer.getvalue()


GENUINE = {"pyproject.toml": app_pyproject(), ".info/CONTENT": "pyproject.toml,abc,123\n"}


def test_the_bundle_fedmri_run_builds_passes() -> None:
    bundle = check_bundle(_fab(GENUINE))
    assert bundle.version == __version__ and bundle.clientapp == "fedmri.client.app:app"


@pytest.mark.parametrize("extra", ["fedmri/__init__.py", "fedmri/client/app.py", "torch/__init__.py", "helper.py",
                                   "data/weights.bin"])
def test_a_bundle_that_brings_files_is_refused_and_names_them(extra: str) -> None:
    with pytest.raises(BundleRefused, match=f"files besides pyproject.toml \\({extra}\\)"):
        check_bundle(_fab(GENUINE | {extra: "print('coordinator code')\n"}))


def test_a_bundle_naming_another_clientapp_is_refused() -> None:
    other = app_pyproject().replace('clientapp = "fedmri.client.app:app"', 'clientapp = "os:system"')
    with pytest.raises(BundleRefused, match="clientapp 'os:system'"):
        check_bundle(_fab({"pyproject.toml": other}))
    with pytest.raises(BundleRefused, match="not a readable"):
        check_bundle(b"not a zip")


def test_the_sites_version_range_is_kept_on_the_bundle_and_on_every_request(site_file, request_values,
                                                                           tmp_path: Path) -> None:
    assert version_refusal(__version__, None) is None
    assert version_refusal("0.1.0", ">=0.1,<0.2") is None
    refusal = version_refusal("9.0.0", ">=0.1,<0.2")
    assert "the coordinator runs fedmri 9.0.0; this site accepts fedmri >=0.1,<0.2" in refusal
    assert "not a version range" in version_refusal("1.0", "latest please")
    with pytest.raises(BundleRefused, match="accepts fedmri <0.0.1"):
        check_bundle(_fab(GENUINE), "<0.0.1")
    site = tmp_path / "site.yaml"
    site.write_text(site_file.read_text().replace("max_local_steps: 20\n", "max_local_steps: 20\n"
                                                  "  fedmri_versions: '<0.0.1'\n").replace("catalog: catalog",
                                                                                           f"catalog: {site_file.parent / 'catalog'}"))
    request = TrainRequest.from_config(request_values("evaluate") | {"fedmri-version": __version__})
    reason = check_request(load_site(site), request)
    assert reason is not None and f"the coordinator runs fedmri {__version__}" in reason
    assert check_request(load_site(site_file), request) is None


def test_the_launcher_runs_the_guarded_clientapp(tmp_path: Path) -> None:
    launcher = write_launcher(tmp_path / "bin")
    assert launcher.name == "flwr-clientapp" and launcher.stat().st_mode & 0o111
    out = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: flwr-clientapp" in out.stdout and "--runtime-api-address" in out.stdout


def test_a_clientapp_process_the_launcher_did_not_start_declines_every_message(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A SuperNode run by hand starts Flower's own `flwr-clientapp`: no bundle was checked, so nothing is answered."""
    from flwr.app import Message, RecordDict

    from fedmri.client import guard
    from fedmri.protocol import STATUS_KEY, VERSIONS_KEY

    from helpers.identity import server_identity
    from helpers.local_grid import LocalGrid

    def ask() -> Message:
        grid = LocalGrid({101: tmp_path / "site.yaml"})
        with server_identity():
            ids = grid.push_messages([Message(RecordDict(), dst_node_id=101, message_type="query")])
            (reply,) = grid.pull_messages(ids)
        return reply

    monkeypatch.setattr(guard, "_installed", False)
    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/flwr-clientapp", "--token", "7"])
    status = ask().content.config_records[STATUS_KEY]
    assert status["declined"] and "fedmri client start" in status["reason"]
    monkeypatch.setattr(guard, "_installed", True)  # fedmri's launcher (cold or warm) installed the guard
    assert VERSIONS_KEY in ask().content.config_records
    monkeypatch.setattr(guard, "_installed", False)
    monkeypatch.setattr(sys, "argv", ["pytest"])  # not a ClientApp process: a simulation, a test
    assert VERSIONS_KEY in ask().content.config_records
