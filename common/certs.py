"""Certificates and keys for a deployed federation, made with ``cryptography``.

One folder holds everything the coordinator issues::

    ca.crt  ca.key            the federation's own certificate authority (EC P-384)
    server.crt  server.key    the SuperLink's TLS certificate, signed by the CA
    <site>.key  <site>.pub    one EC P-384 key pair per site, OpenSSH format

Flower 1.42 reads a SuperNode's authentication key with
``load_ssh_private_key`` (a PKCS8 PEM key is refused) and registers the
public half from an OpenSSH public key file, so the site keys are written in
that format. Every private key file is mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmri.errors import InputError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"

# The SuperLink's own ServerApp runtime connects back to it on the loopback
# address over TLS, so its certificate always names these.
LOOPBACK_NAMES = ("localhost", "127.0.0.1")

# Site names become file names and SuperNode names: keep them plain.
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RESERVED = {"ca", "server"}


@dataclass
class IssuedFiles:
    """What one command wrote, for the message that says whom to give it to."""

    folder: Path
    ca: list[Path]
    server: list[Path]
    sites: dict[str, tuple[Path, Path]]  # name -> (private key, public key)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write a file; a private key is created with mode 0600 and never exists wider."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600 if private else 0o644)  # whatever the umask was


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _subject_alt_names(sans: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for san in sans:
        if not san:
            raise InputError("an empty --san was given; pass host names or IP addresses")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", san):
                raise InputError(f"--san {san!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(san))
    return names


def check_site_name(name: str) -> str:
    """Return ``name`` if it can name a site's key files, else raise :class:`InputError`."""
    if not _SITE_NAME.match(name) or name in _RESERVED:
        raise InputError(f"site name {name!r} must be letters, digits, '.', '_' or '-' "
                         f"(at most 64, not {' or '.join(sorted(_RESERVED))})")
    return name


def init_authority(out: str | Path, sans: list[str], sites: list[str], *, days: int = 825,
                   force: bool = False) -> IssuedFiles:
    """Issue a new CA, the SuperLink's certificate and one key pair per site.

    Args:
        out: Folder to write into (made if needed).
        sans: Host names and IP addresses the sites use to reach the SuperLink;
            each becomes a DNS or IP subject alternative name. ``localhost`` and
            ``127.0.0.1`` are always added: the SuperLink reaches itself there.
        sites: Site names; each gets ``<name>.key`` and ``<name>.pub``.
        days: Validity of the certificates (default 825, the CA/Browser limit).
        force: Replace an existing CA. Every certificate and key it signed stops
            being trusted by sites that get the new ``ca.crt``.

    Raises:
        InputError: No SAN, a bad SAN or site name, or a CA already there without ``force``.
    """
    folder = Path(out).expanduser().resolve()
    sans = [s.strip() for s in sans]
    sans += [name for name in LOOPBACK_NAMES if name not in sans]
    if days < 1:
        raise InputError(f"--days must be >= 1, got {days}")
    names = _subject_alt_names(sans)
    for site in sites:
        check_site_name(site)
    if len(set(sites)) != len(sites):
        raise InputError(f"site names repeat: {sites}")
    if (folder / CA_CERT).exists() or (folder / CA_KEY).exists():
        if not force:
            raise InputError(f"{folder} already holds a CA ({CA_CERT}); keep it and add sites with "
                             "`fedmri certs add-site NAME --dir DIR`, or pass --force to replace it "
                             "(every site then needs the new ca.crt)")
    folder.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + dt.timedelta(days=days)

    ca_key = _new_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmri federation"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedmri federation CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = _new_key()
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write(folder / CA_KEY, _pem_key(ca_key), private=True)
    _write(folder / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(folder / SERVER_KEY, _pem_key(server_key), private=True)
    _write(folder / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    issued = {site: issue_site_key(folder, site, force=True) for site in sites}
    return IssuedFiles(folder, [folder / CA_CERT, folder / CA_KEY],
                       [folder / SERVER_CERT, folder / SERVER_KEY], issued)


def issue_site_key(folder: str | Path, site: str, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``<site>.key`` (OpenSSH private, 0600) and ``<site>.pub`` (OpenSSH public).

    Raises:
        InputError: A bad name, a folder without a CA, or a key already there without ``force``.
    """
    check_site_name(site)
    folder = Path(folder).expanduser().resolve()
    if not (folder / CA_CERT).is_file():
        raise InputError(f"{folder} holds no {CA_CERT}; run `fedmri certs init --out {folder}` first")
    private, public = folder / f"{site}.key", folder / f"{site}.pub"
    if (private.exists() or public.exists()) and not force:
        raise InputError(f"{private.name} already exists in {folder}; a site keeps its key "
                         "(remove both files first to issue a new one, then register the new .pub)")
    key = _new_key()
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH) + f" {site}\n".encode(),
           private=False)
    return private, public


def site_public_keys(folder: str | Path) -> dict[str, Path]:
    """The site public keys in a certs folder, by site name (sorted)."""
    return {p.stem: p for p in sorted(Path(folder).glob("*.pub"))}


def server_names(cert_path: str | Path) -> list[str]:
    """DNS names and IP addresses in a certificate's subject alternative names."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]
