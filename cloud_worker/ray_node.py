"""Joining a Ray cluster as a node: Ray's command line as this interpreter has it, with Ray's token
authentication on.

Ray 2.60 authenticates every connection to a cluster when ``RAY_AUTH_MODE=token``, with one token
that every node and driver must hold; it looks for it in ``RAY_AUTH_TOKEN``, then in the file that
``RAY_AUTH_TOKEN_PATH`` names, then in ``~/.ray/auth_token``. A node joining with ``RAY_AUTH_MODE``
unset sends no token and is refused by a head that has one, so the processes here set it.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

# `ray start` writes the cluster's address into the node's temp dir once the node has joined.
CLUSTER_ADDRESS_FILE = "ray_current_cluster"
# A node that misses one of Ray's fixed start-up windows (its raylet's 30 s registration, the GCS
# port file), which a busy machine can make it miss, is started again.
START_ATTEMPTS = 3
START_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")
STOP_TIMEOUT_S = 60


@dataclass(frozen=True)
class RayNode:
    """A node to start on this host for the cluster whose head is at ``address``."""

    address: str
    temp_dir: Path | None = None  # Ray's session files and logs (default: a new /tmp/hybrid-sd-ray-*)
    start_args: str = ""  # more `ray start` flags, as one shell-quoted string

    def start_command(self, *flags: str) -> list[str]:
        """``ray start --block`` joining the cluster; stopped by SIGTERM, which stops the node's processes."""
        command = [*ray_cli(), "start", "--address", self.address, "--block", *flags]
        if self.temp_dir is not None:
            command += ["--temp-dir", str(self.temp_dir)]
        return command + shlex.split(self.start_args)


def run_workers_at_normal_priority() -> None:
    """Ray starts its workers, the denoiser replicas among them, at niceness 15 (``worker_niceness``), below
    its own processes. When a replica's intra-op threads fill the cores, every wakeup of those (GCS, raylet,
    agents, Serve's controller, the gateway) then stops a replica thread at once and the whole parallel
    region waits for it. Replicas are this system's work: the nodes this process starts (their raylets read
    the environment) run them at normal priority, unless the environment says otherwise."""
    os.environ.setdefault("RAY_worker_niceness", "0")


def ray_cli() -> list[str]:
    """Ray's command line from this interpreter's environment (``ray`` on PATH may be another
    installation, or none when the virtualenv is not activated)."""
    if importlib.util.find_spec("ray") is None:
        raise ValueError(f"Ray is not installed for {sys.executable}: install hybrid-sd's dependencies there")
    return [sys.executable, "-m", "ray.scripts.scripts"]


def use_token_auth(token_file: Path | None) -> None:
    """Token authentication for this process and the Ray processes it starts, unless
    ``RAY_AUTH_MODE`` chooses otherwise; ``token_file`` takes precedence over Ray's own places.
    Call it before Ray is imported: Ray reads ``RAY_AUTH_MODE`` once."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if token_file is not None:
        if not token_file.is_file() or not token_file.read_text().strip():
            raise ValueError(f"--ray-token-file {token_file} is not a file holding a token")
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file.resolve())
        os.environ.pop("RAY_AUTH_TOKEN", None)  # Ray would read the variable before the file
    _check_token()


def _check_token() -> None:
    """Fail in one line, before any node starts, when Ray's own lookup finds no token."""
    from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, get_authentication_mode

    if get_authentication_mode() != AuthenticationMode.TOKEN:
        return
    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        raise ValueError(
            "Ray token authentication is on (RAY_AUTH_MODE=token) but there is no token: pass --ray-token-file, "
            "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or copy the cluster's token to ~/.ray/auth_token"
        )


@dataclass(frozen=True)
class JoinedNode:
    """A node this process started, running until ``joined_node``'s block exits."""

    temp_dir: Path
    process: subprocess.Popen  # `ray start --block`, which stops the node's processes on SIGTERM


@contextmanager
def joined_node(node: RayNode, *flags: str) -> Iterator[JoinedNode]:
    """This host as a node of the cluster (``ray start`` with ``flags``) until the block exits; its
    output goes to this process's stderr. A start that timed out is tried again."""
    temp_dir = (node.temp_dir or Path(tempfile.mkdtemp(prefix="hybrid-sd-ray-"))).absolute()
    run_workers_at_normal_priority()
    command = replace(node, temp_dir=temp_dir).start_command(*flags)
    for attempt in range(1, START_ATTEMPTS + 1):
        process, output = _start(command, temp_dir / CLUSTER_ADDRESS_FILE)
        if process is not None:
            break
        if attempt == START_ATTEMPTS or not start_timed_out(output):
            raise ValueError(
                f"could not join the Ray cluster at {node.address}: `ray start` failed (its output is above)"
            )
        logger.warning("Ray node start timed out (attempt %d of %d); again", attempt, START_ATTEMPTS)
    try:
        yield JoinedNode(temp_dir, process)
    finally:
        _stop(process)


def start_timed_out(message: str) -> bool:
    """Whether Ray failed for one of its start-up windows."""
    return any(text in message for text in START_TIMEOUTS)


def _start(command: list[str], address_file: Path) -> tuple[subprocess.Popen | None, str]:
    """Run ``command`` until the node has joined (returns the process) or it exits (returns None and
    the end of its output)."""
    address_file.unlink(missing_ok=True)
    # A session of its own: a Ctrl-C meant for its parent must not stop the node before the parent does.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    output: collections.deque[str] = collections.deque(maxlen=100)
    echo = threading.Thread(target=_echo, args=(process.stdout, output), daemon=True)
    echo.start()
    try:
        while not address_file.exists():
            if process.poll() is not None:
                echo.join(timeout=5)
                return None, "".join(output)
            time.sleep(0.2)
    except BaseException:
        _stop(process)
        raise
    return process, ""


def _echo(stream: IO[str], output: collections.deque[str]) -> None:
    """Copy the node's output to stderr, keeping its last lines."""
    for line in stream:
        sys.stderr.write(line)
        output.append(line)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM, on which ``ray start --block`` stops its node's processes; SIGKILL if it hangs."""
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
