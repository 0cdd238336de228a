"""Certificates and keys from `fedmri certs`: contents, formats, modes, refusals."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedmri.certs import init_authority, issue_site_key, server_names, site_public_keys
from fedmri.errors import InputError


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory):
    return init_authority(tmp_path_factory.mktemp("certs"), ["coordinator.example.org", "10.1.2.3"],
                          ["site-01", "site-02"], days=30)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_written_and_private_keys_are_0600(issued) -> None:
    folder = issued.folder
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["ca.crt", "ca.key", "server.crt", "server.key",
                     "site-01.key", "site-01.pub", "site-02.key", "site-02.pub"]
    for key in ("ca.key", "server.key", "site-01.key", "site-02.key"):
        assert _mode(folder / key) == 0o600, key
    for public in ("ca.crt", "server.crt", "site-01.pub"):
        assert _mode(folder / public) == 0o644, public


def test_ca_is_p384_and_a_ca(issued) -> None:
    ca = _cert(issued.folder / "ca.crt")
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp384r1"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.issuer == ca.subject


def test_server_cert_names_dns_and_ip_sans_plus_loopback(issued) -> None:
    cert = _cert(issued.folder / "server.crt")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"coordinator.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.1.2.3"),
                                                             ipaddress.ip_address("127.0.0.1")}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert server_names(issued.folder / "server.crt")[0] == "coordinator.example.org"
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 29 <= days <= 30


def test_ca_signs_server_cert_and_key_matches(issued) -> None:
    ca, cert = _cert(issued.folder / "ca.crt"), _cert(issued.folder / "server.crt")
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match
    key = serialization.load_pem_private_key((issued.folder / "server.key").read_bytes(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_site_keys_are_openssh_ec_and_pair_up(issued) -> None:
    private_path, public_path = issued.sites["site-01"]
    data = private_path.read_bytes()
    assert data.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    private = serialization.load_ssh_private_key(data, password=None)  # how flwr reads it
    public = serialization.load_ssh_public_key(public_path.read_bytes())  # how `flwr supernode register` reads it
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert public_path.read_text().startswith("ecdsa-sha2-nistp384 ")
    other = serialization.load_ssh_public_key(issued.sites["site-02"][1].read_bytes())
    assert other.public_numbers() != public.public_numbers()
    assert list(site_public_keys(issued.folder)) == ["site-01", "site-02"]


def test_refuses_to_overwrite_a_ca_without_force(issued) -> None:
    before = (issued.folder / "ca.crt").read_bytes()
    with pytest.raises(InputError, match="already holds a CA.*--force"):
        init_authority(issued.folder, ["localhost"], [])
    assert (issued.folder / "ca.crt").read_bytes() == before


def test_force_replaces_the_ca(tmp_path: Path) -> None:
    first = init_authority(tmp_path, [], ["a"])
    old = (first.folder / "ca.crt").read_bytes()
    init_authority(tmp_path, [], [], force=True)
    assert (tmp_path / "ca.crt").read_bytes() != old
    assert server_names(tmp_path / "server.crt") == ["localhost", "127.0.0.1"]


def test_add_site_later_and_refuse_to_replace_a_site_key(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no ca.crt"):
        issue_site_key(tmp_path, "site-09")
    init_authority(tmp_path, ["localhost"], ["site-01"])
    key, pub = issue_site_key(tmp_path, "site-09")
    assert _mode(key) == 0o600 and pub.is_file()
    with pytest.raises(InputError, match="already exists"):
        issue_site_key(tmp_path, "site-01")


@pytest.mark.parametrize("sans, sites, match", [
    (["bad host!"], [], "neither an IP address nor a DNS name"),
    (["localhost"], ["../evil"], "site name"),
    (["localhost"], ["ca"], "site name"),
    (["localhost"], ["a", "a"], "repeat"),
])
def test_illegal_arguments(tmp_path: Path, sans: list[str], sites: list[str], match: str) -> None:
    with pytest.raises(InputError, match=match):
        init_authority(tmp_path, sans, sites)
    assert not (tmp_path / "ca.crt").exists()


def _fedmri(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from fedmri.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_says_what_goes_to_whom_and_refuses_overwrite(tmp_path: Path) -> None:
    out = _fedmri("certs", "init", "--out", str(tmp_path), "--san", "localhost", "--san", "127.0.0.1",
                  "--site", "site-01", "--site", "site-02")
    assert out.returncode == 0, out.stderr
    assert "site-01.key" in out.stdout and "ca.crt" in out.stdout and "give" in out.stdout
    again = _fedmri("certs", "init", "--out", str(tmp_path), "--site", "site-03")
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    added = _fedmri("certs", "add-site", "site-03", "--dir", str(tmp_path))
    assert added.returncode == 0, added.stderr
    assert "fedmri server register site-03" in added.stdout
    assert _mode(tmp_path / "site-03.key") == 0o600
