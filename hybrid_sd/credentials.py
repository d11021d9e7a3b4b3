"""Credentials: bearer tokens and TLS files, checked before a server starts or a call is made, and
the gRPC credentials made from them."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


def check_certificate(name: str, path: Path | None, key: Path | None = None) -> None:
    """Raise a ValueError naming ``name`` unless ``path`` holds PEM certificates (with ``key``: a certificate
    chain and its unencrypted private key), as gRPC needs them."""
    if path is None:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        if key is None:
            context.load_verify_locations(path)
        else:
            context.load_cert_chain(path, key, password=b"")  # an encrypted key: an error, never a prompt
    except ssl.SSLError as error:
        files = f"{str(path)!r} (with tls_key {str(key)!r})" if key else repr(str(path))
        what = "a PEM certificate and its key" if key else "a PEM certificate"
        raise ValueError(f"{name} {files} is not {what} ({error.reason})") from error
    except OSError as error:
        raise ValueError(f"{name} {str(path)!r}: {error.strerror}") from error


def check_token(token: str | None, name: str = "token") -> None:
    """An empty token is a mistake (an unset variable?), not a way to turn auth off: that is no token."""
    if token is not None and not token.strip():
        raise ValueError(f"{name} is empty: give the bearer token, or leave it out to turn auth off")


def channel_credentials(
    tls_ca: Path | None, client_cert: Path | None = None, client_key: Path | None = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials verifying servers with ``tls_ca`` (presenting a client certificate if given);
    None without ``tls_ca``: plaintext."""
    if tls_ca is None:
        return None
    check_certificate("tls_ca", tls_ca)
    return grpc.ssl_channel_credentials(
        root_certificates=tls_ca.read_bytes(),
        private_key=client_key.read_bytes() if client_key else None,
        certificate_chain=client_cert.read_bytes() if client_cert else None,
    )


@dataclass(frozen=True)
class Security:
    """Bearer-token auth and TLS (with a client CA: mutual TLS); all off by default.

    ``tls_ca`` verifies the servers this one calls (gateway and edge call each other); when set,
    those calls present ``tls_cert``/``tls_key`` as the client certificate.
    """

    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    tls_ca: Path | None = None

    def check(self) -> None:
        check_token(self.token)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "tls_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {str(path)!r} is not a file")
        check_certificate("tls_cert", self.tls_cert, self.tls_key)
        check_certificate("tls_client_ca", self.tls_client_ca)
        check_certificate("tls_ca", self.tls_ca)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None:
            return None
        client_ca = self.tls_client_ca.read_bytes() if self.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(self.tls_key.read_bytes(), self.tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    def peer_credentials(self) -> grpc.ChannelCredentials | None:
        """For calls to another hybrid-sd server: verify it with ``tls_ca``, present this server's TLS
        identity; None without ``tls_ca`` (plaintext)."""
        return channel_credentials(self.tls_ca, self.tls_cert, self.tls_key)
