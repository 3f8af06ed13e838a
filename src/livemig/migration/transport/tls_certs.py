"""Throw-away x509 credentials in QEMU's ``tls-creds-x509`` directory layout.

For tests, benchmarks and trying TLS migration out — not for production, where the
certificates come from the site's own CA. Needs the ``cryptography`` package (in
livemig's ``test`` extras). Keys are ECDSA P-256: quick to make and to handshake with.

A directory written by :func:`write_creds` holds what both ends of a migration need::

    ca-cert.pem                      the CA both ends trust
    server-cert.pem server-key.pem   the destination's certificate (names: server_names)
    client-cert.pem client-key.pem   the source's certificate (CN: client_name)

Giving ``trust=`` another CA writes that CA's certificate as ``ca-cert.pem``: the result
presents certificates that a peer using the first CA does not trust.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "livemig.migration.transport.tls_certs needs the 'cryptography' package "
        "(pip install 'livemig[test]')"
    ) from _e

__all__ = ["CA", "make_ca", "issue", "write_creds"]


@dataclass(frozen=True)
class CA:
    cert: Any  # x509.Certificate
    key: Any  # ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str) -> Any:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _validity(days: int, not_before: datetime.datetime | None) -> tuple[Any, Any]:
    start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    return start, start + datetime.timedelta(days=days)


def make_ca(name: str = "livemig test CA", days: int = 2) -> CA:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days, None)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CA(cert, key)


def _san(names: Iterable[str]) -> list[Any]:
    out: list[Any] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


def issue(
    ca: CA,
    cn: str,
    *,
    names: Iterable[str] = (),
    server: bool = False,
    client: bool = False,
    days: int = 2,
    not_before: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    """A certificate signed by ``ca`` and its key, both PEM.

    ``names`` go into subjectAltName (IP addresses as IP entries, the rest as DNS names);
    ``server``/``client`` set the extended key usage.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days, not_before)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    if usages:
        b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    sans = _san(names)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(ca.key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_creds(
    directory: str | os.PathLike[str],
    ca: CA,
    *,
    server_names: Iterable[str] = ("localhost", "127.0.0.1", "::1"),
    server_cn: str | None = None,
    client_name: str = "livemig-source",
    trust: CA | None = None,
) -> Path:
    """Write a tls-creds directory whose certificates ``ca`` signed; return its path.

    ``ca-cert.pem`` is ``trust`` (default: ``ca`` itself). Keys are written 0600.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    server_names = list(server_names)
    scert, skey = issue(
        ca, server_cn or (server_names[0] if server_names else "livemig-destination"),
        names=server_names, server=True,
    )
    ccert, ckey = issue(ca, client_name, names=[client_name], client=True)
    _write(d / "ca-cert.pem", (trust or ca).pem, 0o644)
    _write(d / "server-cert.pem", scert, 0o644)
    _write(d / "server-key.pem", skey, 0o600)
    _write(d / "client-cert.pem", ccert, 0o644)
    _write(d / "client-key.pem", ckey, 0o600)
    return d
