"""The TCP ports servers listen on, checked before anything starts."""

from __future__ import annotations

import socket


def check_port(port: int, flag: str = "--port") -> None:
    """Raise a ValueError naming ``flag`` unless ``port`` is a TCP port number (0: any free port)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"{flag} must be in [0, 65535], got {port}")


def check_can_listen(host: str, port: int, service: str, hint: str = "choose another with --port") -> None:
    """Raise a ValueError naming ``service`` and ``port`` if a server cannot listen on ``host:port`` now (the
    port is taken, or the address is not this machine's)."""
    check_port(port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no obstacle
            probe.bind(address)
    except OSError as error:
        raise ValueError(f"the {service} cannot listen on port {port} of {host} ({error.strerror}); {hint}") from error
