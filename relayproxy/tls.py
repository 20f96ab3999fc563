"""TLS settings of a listener: the proxy's certificate, and how it trusts backends.

Owns reading certificate and key files into Twisted's TLS options, with
errors that name the listener, the key and the file. Used at start-up, by
``--check-config`` and on reload, so a bad file is found before it matters.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL, crypto
from service_identity import VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from relayproxy.config import HostPort, ListenerConfig

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


BackendTLS = IOpenSSLClientConnectionCreator | ssl.CertificateOptions


class BackendIdentityError(Exception):
    """The backend's certificate chains to a trusted CA but does not name the backend."""


class TLSConfigError(Exception):
    """A certificate, key or CA file that cannot be used; one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ListenerTLS:
    """What the glue needs: a server context for clients, a creator for each backend."""

    server: ssl.CertificateOptions | None
    # One per backend: each is verified for its own name.
    backend: Mapping[HostPort, BackendTLS] | None


def _read(path: str, where: str, problems: list[str]) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        problems.append(f"{where}: cannot read {path}: {exc.strerror}")
        return None


def _certificates(pem: bytes) -> list[crypto.X509]:
    return [
        crypto.load_certificate(crypto.FILETYPE_PEM, block)
        for block in _PEM_CERTIFICATE.findall(pem)
    ]


def load_listener_tls(listener: ListenerConfig, source: str) -> ListenerTLS:
    """Build the TLS options of ``listener``; raises TLSConfigError naming what is wrong."""
    problems: list[str] = []
    section = f"{source}: [listener:{listener.name}]"
    server = None
    if listener.tls != "none" and listener.certificate and listener.private_key:
        server = _server_options(listener.certificate, listener.private_key, section, problems)
    backend = None
    if listener.backend_tls != "none":
        backend = _backend_options(listener, section, problems)
    if problems:
        raise TLSConfigError(problems)
    return ListenerTLS(server, backend)


def _server_options(
    certificate: str, private_key: str, section: str, problems: list[str]
) -> ssl.CertificateOptions | None:
    cert_pem = _read(certificate, f"{section} certificate", problems)
    key_pem = _read(private_key, f"{section} private_key", problems)
    if cert_pem is None or key_pem is None:
        return None
    try:
        chain = _certificates(cert_pem)
    except crypto.Error as exc:
        problems.append(f"{section} certificate: {certificate} is not a PEM certificate ({exc})")
        return None
    if not chain:
        problems.append(f"{section} certificate: no PEM certificate in {certificate}")
        return None
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except crypto.Error:
        # Never echo the key file's content, not even in part.
        problems.append(f"{section} private_key: {private_key} is not an unencrypted PEM key")
        return None
    try:
        options = ssl.CertificateOptions(
            privateKey=key,
            certificate=chain[0],
            extraCertChain=chain[1:],
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
        options.getContext()  # checks that the key matches the certificate
    except Exception as exc:  # OpenSSL's errors have no common base worth naming
        problems.append(
            f"{section} private_key: {private_key} cannot be used with {certificate} ({exc})"
        )
        return None
    return options


def _backend_options(
    listener: ListenerConfig, section: str, problems: list[str]
) -> Mapping[HostPort, BackendTLS] | None:
    if not listener.backend_verify:
        # Encrypted, but anyone on the path could be the backend: the operator's choice.
        unverified = ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
        return dict.fromkeys(listener.backend, unverified)
    trust = _backend_trust(listener, section, problems)
    if trust is None:
        return None
    return {backend: BackendNameCheck(backend.host, trust) for backend in listener.backend}


def _backend_trust(listener: ListenerConfig, section: str, problems: list[str]) -> Any:
    if listener.backend_ca is None:
        return ssl.platformTrust()  # type: ignore[no-untyped-call]
    pem = _read(listener.backend_ca, f"{section} backend_ca", problems)
    if pem is None:
        return None
    try:
        authorities = [ssl.Certificate(c) for c in _certificates(pem)]  # type: ignore[no-untyped-call]
    except crypto.Error as exc:
        problems.append(f"{section} backend_ca: {listener.backend_ca}: {exc}")
        return None
    if not authorities:
        problems.append(f"{section} backend_ca: no PEM certificate in {listener.backend_ca}")
        return None
    return ssl.trustRootFromCertificates(authorities)  # type: ignore[no-untyped-call]


@implementer(IOpenSSLClientConnectionCreator)
class BackendNameCheck:
    """``optionsForClientTLS`` with a name check that fails closed.

    Twisted's own check (``twisted.internet._sslverify._verifyCB``) fails the
    handshake only on service_identity's ``VerificationError``. Since
    service_identity 24.1 a certificate without subjectAltName raises
    ``CertificateError`` instead, which Twisted logs as a critical error and
    then accepts: any certificate without subjectAltName that chains to
    ``backend_ca`` passed, whatever name it was issued for. Here every
    failure of the check, whatever its type, ends the handshake, before the
    proxy's first byte to the backend (a client's login among them) leaves.
    """

    def __init__(self, host: str, trust: Any) -> None:
        self.host = host
        # SNI, the trust root and the protocol floor stay Twisted's.
        self._options = ssl.optionsForClientTLS(host, trustRoot=trust)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            self._host_is_ip = False
        else:
            self._host_is_ip = True

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection: SSL.Connection = self._options.clientConnectionForTLS(tls_protocol)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verifier(tls_protocol)
        )
        return connection

    def _verifier(self, tls_protocol: Any) -> Callable[[SSL.Connection, Any, int, int, int], bool]:
        def verify(
            connection: SSL.Connection, certificate: Any, error: int, depth: int, ok: int
        ) -> bool:
            if not ok:
                return False  # the chain failed: OpenSSL's own error says why
            if depth != 0:
                return True
            why = self._mismatch(certificate)
            if why is None:
                return True
            mismatch = BackendIdentityError(f"certificate is not for {self.host}: {why}")
            tls_protocol.failVerification(Failure(mismatch))  # type: ignore[no-untyped-call]
            return False

        return verify

    def _mismatch(self, certificate: Any) -> str | None:
        """Why ``certificate`` does not name the backend, or None when it does."""
        try:
            if self._host_is_ip:
                verify_certificate_ip_address(certificate.to_cryptography(), self.host)
            else:
                verify_certificate_hostname(certificate.to_cryptography(), self.host)
        except VerificationError:
            return "its subjectAltName names other hosts"
        except Exception as exc:  # nothing may escape into OpenSSL's callback: refuse instead
            return str(exc) or type(exc).__name__  # CertificateError: no subjectAltName at all
        return None
