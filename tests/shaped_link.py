"""A real slow link on this machine: a network namespace joined to ours by a veth pair whose two
ends are shaped by a token bucket (``tc ... tbf``; netem is not available here).

Traffic goes only between the two veth ends, over a private /30 chosen at run time that no route
of this machine overlaps. Names are unique per run; the pair and the namespace are removed on exit,
and a namespace left by a process killed before it could clean up (its pid is in the name) is
removed, with what still runs in it, the next time a link is made.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# A token bucket of a few full-size packets: large enough for tbf at any rate used here, small
# enough that a transfer of tens of KB is paced, not sent as one burst.
BURST_BYTES = 16 * 1024
# Room for a whole handoff in the queue: the bucket paces TCP instead of dropping its packets.
QUEUE_BYTES = 4 * 1024 * 1024
NAMESPACE_PREFIX = "hybrid-sd-link-"
# Route types `ip route` prints before the destination ("local 127.0.0.0/8 dev lo ...").
_ROUTE_TYPES = ("local", "broadcast", "unicast", "anycast", "multicast", "blackhole", "unreachable", "prohibit")


@dataclass(frozen=True)
class ShapedLink:
    namespace: str
    host_device: str  # our end, in this namespace
    edge_device: str  # the other end, in ``namespace``
    host_address: str
    edge_address: str

    def set_rate(self, mbit: float) -> None:
        """Shape both directions to ``mbit`` megabits per second."""
        for prefix, device in (((), self.host_device), (("ip", "netns", "exec", self.namespace), self.edge_device)):
            _run(*prefix, "tc", "qdisc", "replace", "dev", device, "root", "tbf", *_tbf(mbit))

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no ``ip``/``tc``), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} missing (iproute2; scripts/setup.sh installs it)"
    return None


@contextmanager
def shaped_link(mbit: float) -> Iterator[ShapedLink]:
    """A namespace behind a veth pair shaped to ``mbit`` both ways; removed on exit."""
    _remove_orphans()
    tag = secrets.token_hex(4)
    host_address, edge_address = _free_subnet()
    namespace = f"{NAMESPACE_PREFIX}{os.getpid()}-{tag}"
    link = ShapedLink(namespace, f"hsd{tag}h", f"hsd{tag}e", str(host_address), str(edge_address))
    _run("ip", "netns", "add", link.namespace)
    try:
        _run("ip", "link", "add", link.host_device, "type", "veth", "peer", "name", link.edge_device)
        _run("ip", "link", "set", link.edge_device, "netns", link.namespace)
        _run("ip", "addr", "add", f"{host_address}/30", "dev", link.host_device)
        _run("ip", "link", "set", link.host_device, "up")
        inside = link.command("ip")
        _run(*inside, "addr", "add", f"{edge_address}/30", "dev", link.edge_device)
        _run(*inside, "link", "set", link.edge_device, "up")
        _run(*inside, "link", "set", "lo", "up")
        link.set_rate(mbit)
        yield link
    finally:
        # Deleting one end deletes the pair; deleting the namespace would too, but only once every
        # process in it has gone.
        subprocess.run(["ip", "link", "del", link.host_device], capture_output=True)
        subprocess.run(["ip", "netns", "del", link.namespace], capture_output=True)


def _remove_orphans() -> None:
    """Namespaces made here by processes that have gone, with whatever still runs in them (an edge
    worker whose test was killed); deleting a namespace deletes its veth pair."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in (line.split()[0] for line in listing.splitlines() if line.startswith(NAMESPACE_PREFIX)):
        creator = int(name.removeprefix(NAMESPACE_PREFIX).split("-")[0])
        if os.path.exists(f"/proc/{creator}"):
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            subprocess.run(["kill", "-9", pid], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _tbf(mbit: float) -> list[str]:
    return ["rate", f"{mbit}mbit", "burst", str(BURST_BYTES), "limit", str(QUEUE_BYTES)]


def _free_subnet() -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """The two host addresses of a random /30 in 10.0.0.0/8 that overlaps no route of this machine."""
    routes = subprocess.run(
        ["ip", "-4", "-o", "route", "show", "table", "all"], capture_output=True, text=True, check=True
    ).stdout
    taken = []
    for line in routes.splitlines():
        words = line.split()
        destination = words[1] if words[0] in _ROUTE_TYPES else words[0]
        if destination[:1].isdigit():
            taken.append(ipaddress.ip_network(destination, strict=False))
    private = ipaddress.ip_network("10.0.0.0/8")
    for _ in range(100):
        subnet = ipaddress.ip_network((int(private.network_address) + 4 * random.randrange(2**22), 30))
        if not any(subnet.overlaps(network) for network in taken):
            first, second = subnet.hosts()
            return first, second
    raise RuntimeError("no free /30 in 10.0.0.0/8")


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
