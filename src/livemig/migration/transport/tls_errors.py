"""TLS failures: what each refusal is called (:data:`CHECKS`) and how it is said.

One :class:`TLSError` type for every way a TLS channel refuses or breaks, with a ``check``
naming which check failed, so QMP's ``error-desc`` and the code that reacts to a refusal
(tests, the CLI) need not parse OpenSSL's text. :func:`explain` turns an OpenSSL error
into one; the handshake (``tls``) and the record layer (``tls_channel``) both use it.
"""

from __future__ import annotations

import errno
import ssl
from typing import Any

__all__ = ["CHECKS", "TLSConfigError", "TLSError", "explain", "peer_role"]

CHECKS = {
    "plaintext": "the peer does not speak TLS",
    "untrusted": "the peer's certificate is not signed by ca-cert.pem (or not valid)",
    "hostname": "the destination's certificate does not match tls-hostname",
    "authz": "the source's certificate names are not in tls-authz",
    "no-certificate": "the source presented no client certificate",
    "peer-refused": "the peer refused our certificate or the handshake",
    "handshake": "another TLS handshake failure",
    "timeout": "the whole handshake did not finish within tls.HANDSHAKE_TIMEOUT",
    "cancelled": "the handshake was cut short by the abort event (migrate_cancel)",
    "version": "the peer does not offer TLS 1.3",
    "protocol": "a TLS error after the handshake",
}

# X509_V_ERR_* codes (OpenSSL's x509_vfy.h)
_HOSTNAME_MISMATCH = (62, 64)  # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH


class TLSConfigError(ValueError):
    """tls-creds/tls-hostname/tls-authz cannot work as set; the message is what QMP reports."""


class TLSError(OSError):
    """A TLS channel refused or broke; ``check`` is one of :data:`CHECKS`."""

    def __init__(self, check: str, message: str):
        super().__init__(errno.EPROTO, message)
        self.check = check
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> Any:
        return (TLSError, (self.check, self.message))


def peer_role(server: bool) -> str:
    """What the other end is called in messages: the source talks to the destination."""
    return "source" if server else "destination"


_ALERT_HINTS = {
    "UNKNOWN_CA": "it does not trust our certificate (not signed by its ca-cert.pem)",
    "BAD_CERTIFICATE": "it rejected our certificate",
    "UNSUPPORTED_CERTIFICATE": "it rejected our certificate (unsupported purpose)",
    "CERTIFICATE_EXPIRED": "it says our certificate expired",
    "CERTIFICATE_REVOKED": "it says our certificate is revoked",
    "CERTIFICATE_UNKNOWN": "it rejected our certificate",
    "CERTIFICATE_REQUIRED": "it requires a client certificate",
    "ACCESS_DENIED": "it denied access",
    "PROTOCOL_VERSION": "no TLS version in common (livemig requires TLS 1.3)",
    "HANDSHAKE_FAILURE": "no common parameters",
    "DECRYPT_ERROR": "a signature did not verify",
}


def explain(e: ssl.SSLError, *, server: bool, hostname: str | None = None) -> TLSError:
    """Turn an OpenSSL error into a :class:`TLSError` naming the check that failed."""
    peer = peer_role(server)
    if isinstance(e, ssl.SSLCertVerificationError):
        msg = e.verify_message or e.reason or str(e)
        if e.verify_code in _HOSTNAME_MISMATCH:
            return TLSError(
                "hostname",
                f"TLS: the destination's certificate does not match tls-hostname "
                f"{hostname!r} ({msg})",
            )
        return TLSError(
            "untrusted",
            f"TLS: the {peer}'s certificate is not trusted: {msg} "
            "(is it signed by the CA in our ca-cert.pem, and valid?)",
        )
    reason = e.reason or ""
    if reason in ("UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE"):
        return TLSError("version", f"TLS: the {peer} does not offer TLS 1.3 (livemig requires it)")
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return TLSError("no-certificate", "TLS: refused the source: it presented no client "
                                          "certificate (client-cert.pem)")
    if "_ALERT_" in reason:
        alert = reason.split("_ALERT_", 1)[1]
        hint = _ALERT_HINTS.get(alert, "")
        name = alert.lower().replace("_", " ")
        return TLSError(
            "peer-refused",
            f"TLS: the {peer} refused the session (alert: {name})" + (f": {hint}" if hint else ""),
        )
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG",
                  "RECORD_LAYER_FAILURE"):
        return TLSError("plaintext", f"TLS: the {peer} does not speak TLS ({reason.lower()})")
    return TLSError("handshake", f"TLS handshake with the {peer} failed: {reason or e}")

