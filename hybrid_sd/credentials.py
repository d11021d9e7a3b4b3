"""Credentials a command names, checked before a server starts or a call is made: bearer tokens, TLS files."""

from __future__ import annotations

import ssl
from pathlib import Path


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
