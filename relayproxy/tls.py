"""TLS settings of a listener: the proxy's certificate, and how it trusts backends.

Owns reading certificate and key files into Twisted's TLS options, with
errors that name the listener, the key and the file. Used at start-up, by
``--check-config`` and on reload, so a bad file is found before it matters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from relayproxy.config import ListenerConfig

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


BackendTLS = IOpenSSLClientConnectionCreator | ssl.CertificateOptions


class TLSConfigError(Exception):
    """A certificate, key or CA file that cannot be used; one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ListenerTLS:
    """What the glue needs: a server context for clients, a creator for the backend."""

    server: ssl.CertificateOptions | None
    backend: BackendTLS | None


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
) -> BackendTLS | None:
    host = listener.backend.host
    if not listener.backend_verify:
        # Encrypted, but anyone on the path could be the backend: the operator's choice.
        return ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    if listener.backend_ca is None:
        return ssl.optionsForClientTLS(host, trustRoot=ssl.platformTrust())  # type: ignore[no-untyped-call]
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
    trust = ssl.trustRootFromCertificates(authorities)  # type: ignore[no-untyped-call]
    return ssl.optionsForClientTLS(host, trustRoot=trust)
