"""Child processes kept running: one that exits is started again with backoff, and a stop leaves nothing.

``cluster up`` runs the edge worker and the gateway this way. Each child starts a session of its own, so
everything it starts (the gateway's local Ray: GCS, raylet, dashboard and runtime-env agents, workers)
can be found and stopped with it, even after the child itself has gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0  # up this long: the next exit starts the backoff from the beginning again


@dataclass
class Child:
    """One supervised command: its current process and its restart schedule."""

    name: str
    command: list[str]
    log: Path | None = None  # where its output goes (appended); None: this process's
    process: subprocess.Popen | None = None
    sessions: set[int] = field(default_factory=set)  # every session it ran in, to stop what it left
    started_at: float = 0.0
    backoff_s: float = BACKOFF_FIRST_S
    restart_at: float | None = None

    def start(self) -> None:
        if self.log is None:
            self.process = subprocess.Popen(self.command, start_new_session=True)
        else:
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(
                    self.command, start_new_session=True, stdout=log, stderr=subprocess.STDOUT
                )
        self.sessions.add(self.process.pid)
        self.started_at = time.monotonic()
        self.restart_at = None


class Supervisor:
    """Starts its children, restarts any that exits (:meth:`poll`), and stops them all (:meth:`stop`)."""

    def __init__(self, children: list[Child]):
        self.children = children

    def start(self) -> None:
        for child in self.children:
            child.start()

    def exited(self) -> list[Child]:
        return [child for child in self.children if child.process is not None and child.process.poll() is not None]

    def poll(self) -> None:
        """Schedule a restart for each child that has exited; start those whose backoff has passed."""
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    print(f"restarting the {child.name}", flush=True)
                    child.start()
                continue
            code = child.process.poll()
            if code is None:
                continue
            if now - child.started_at >= HEALTHY_AFTER_S:
                child.backoff_s = BACKOFF_FIRST_S
            _stop_sessions({child.process.pid})  # what it started dies with it, so the restart starts clean
            child.restart_at = now + child.backoff_s
            print(f"the {child.name} exited with code {code}; restarting it in {child.backoff_s:.0f} s", flush=True)
            child.backoff_s = min(2 * child.backoff_s, BACKOFF_MAX_S)

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGINT every child (they finish in-flight requests; Ray's driver prints a stack trace on SIGTERM),
        SIGKILL what is left after ``grace_s``, then every process left in their sessions."""
        running = [child.process for child in self.children if child.process and child.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + grace_s
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        _stop_sessions(set().union(*(child.sessions for child in self.children)))


def session_processes(sessions: set[int]) -> list[psutil.Process]:
    """The live processes of these sessions (a child's session id is its first pid); a zombie, dead and
    waiting to be reaped, is not one."""
    found = []
    for process in psutil.process_iter():
        try:
            alive = process.status() != psutil.STATUS_ZOMBIE
            if alive and process.pid != os.getpid() and os.getsid(process.pid) in sessions:
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def _stop_sessions(sessions: set[int], grace_s: float = 5.0) -> None:
    left = session_processes(sessions)
    for process in left:
        _signal(process, signal.SIGTERM)
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for process in alive:
        _signal(process, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=grace_s)


def _signal(process: psutil.Process, signum: int) -> None:
    try:
        process.send_signal(signum)
    except psutil.NoSuchProcess:
        pass
