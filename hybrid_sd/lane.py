"""The compute lane a worker runs model work on, with deadlines and cancellation between steps, and
the progress it reports."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from hybrid_sd.denoise import StepCallback
from hybrid_sd.errors import DeadlineExceededError, RunCancelledError

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One UNet evaluation done: ``step`` of ``total`` in the whole schedule, on ``stage``'s side."""

    stage: str  # "cloud_denoise" or "edge_denoise"
    step: int
    total: int
    preview_png: bytes = b""  # where the request asked for previews, every preview_every steps


ProgressCallback = Callable[[Progress], None]


class ComputeLane:
    """Runs model work one request at a time on a worker thread, so the event loop stays free to
    take calls, health checks and cancellations. A cancelled or expired request stops at the next
    denoising step and frees the lane."""

    def __init__(self):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="denoise")
        # Each counted by one thread only (the event loop's, the lane's), so no lock is needed.
        self._submitted = 0
        self._started = 0

    @property
    def waiting(self) -> int:
        """Requests waiting for the lane."""
        return self._submitted - self._started

    async def run(
        self,
        work: Callable[[StepCallback], T],
        deadline: float | None,
        on_progress: ProgressCallback | None = None,
        stage: str = "",
    ) -> tuple[T, float]:
        """Run ``work(callback)`` on the lane; ``on_progress`` hears of every UNet evaluation (as
        ``stage``), on the event loop. Returns its value and the seconds it waited for the lane."""
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        submitted = time.perf_counter()
        queued = 0.0

        def check(step: dict) -> None:
            """Called after every UNet evaluation, and with ``{}`` between stages."""
            if stop.is_set():
                raise RunCancelledError("request cancelled")
            if deadline is not None and time.time() > deadline:
                raise DeadlineExceededError("deadline exceeded during denoising")
            if on_progress is not None and step:
                preview = step["preview"]() if "preview" in step else b""  # rendered only for a listener
                progress = Progress(stage, step["step"] + 1, step["total"], preview)
                loop.call_soon_threadsafe(on_progress, progress)

        def guarded() -> T:
            nonlocal queued
            self._started += 1
            queued = time.perf_counter() - submitted
            check({})  # a request whose deadline passed in the queue never starts
            return work(check)

        self._submitted += 1
        future = loop.run_in_executor(self._executor, guarded)
        try:
            return await asyncio.shield(future), queued
        except asyncio.CancelledError:
            stop.set()
            raise

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
