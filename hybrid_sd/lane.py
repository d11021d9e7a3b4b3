"""The compute lane a worker runs model work on: requests' denoising steps batched into shared UNet
calls, with deadlines and cancellation between steps, and the progress it reports."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

import torch

from hybrid_sd.denoise import StepCallback, StepRun, Steps, unet_outputs
from hybrid_sd.errors import DeadlineExceededError, QueueFullError, RunCancelledError

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One UNet evaluation done: ``step`` of ``total`` in the whole schedule, on ``stage``'s side."""

    stage: str  # "cloud_denoise" or "edge_denoise"
    step: int
    total: int
    preview_png: bytes = b""  # where the request asked for previews, every preview_every steps


ProgressCallback = Callable[[Progress], None]


class Ran(NamedTuple, Generic[T]):
    """What a request's work on a lane gave: its value, the seconds it waited to join the lane, and
    the requests in each UNet call of its steps."""

    value: T
    queued_s: float
    batch_sizes: list[int]


@dataclass(eq=False)
class _Member:
    """A request on the lane: its work's steps, the run being stepped, and how to answer it."""

    work: Callable[[StepCallback], Steps]
    check: StepCallback
    settle: Callable[[Callable[[asyncio.Future], None]], None]
    submitted: float = field(default_factory=time.perf_counter)
    queued_s: float = 0.0
    steps: Steps | None = None
    run: StepRun | None = None
    last_stepped: int = 0  # the lane's UNet call count when this request last stepped (or joined)
    batch_sizes: list[int] = field(default_factory=list)


class ComputeLane:
    """Runs requests' model work on one worker thread, so the event loop stays free to take calls,
    health checks and cancellations, and batches their denoising steps.

    A request joins while fewer than ``max_batch`` are in (else it queues) and runs its work up to its
    first denoising loop. Every iteration then makes one UNet call for up to ``max_batch`` requests
    that can share it (:meth:`~hybrid_sd.denoise.StepRun.batch_key`; the one that stepped least
    recently, and those like it, in join order), and steps each one's own scheduler. A request
    leaves the moment its loop ends (its handoff or image goes out then, not when the batch drains);
    one cancelled or past its deadline leaves at its next step and the others go on. An ``exact``
    request's calls are its own. With ``max_batch`` 1 the lane runs one request at a time.
    ``batch_wait_s``: how long an idle lane waits for a batch to fill before its first call.
    ``max_waiting``: how many requests may wait to join (None: any number); one more is refused at once
    (:class:`~hybrid_sd.errors.QueueFullError`, RESOURCE_EXHAUSTED on the wire) rather than queued.
    """

    def __init__(self, max_batch: int = 1, batch_wait_s: float = 0.0, max_waiting: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if batch_wait_s < 0:
            raise ValueError(f"batch wait must not be negative, got {batch_wait_s}")
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max_waiting must not be negative, got {max_waiting}")
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.max_waiting = max_waiting
        self._arrivals: deque[_Member] = deque()
        self._members: list[_Member] = []  # joined, in join order; the lane's thread alone changes it
        self._wake = threading.Condition()
        self._closed = False
        self._calls = 0
        self._thread: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        """Requests waiting to join the lane."""
        return len(self._arrivals)

    @property
    def occupancy(self) -> int:
        """Requests on the lane (between their first and last steps, or in their work around them)."""
        return len(self._members)

    async def run(
        self,
        work: Callable[[StepCallback], Steps[T]],
        deadline: float | None,
        on_progress: ProgressCallback | None = None,
        stage: str = "",
    ) -> Ran[T]:
        """Run ``work(callback)`` on the lane, its denoising loops batched with other requests';
        ``on_progress`` hears of every UNet evaluation (as ``stage``), on the event loop."""
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

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

        def settle(answer: Callable[[asyncio.Future], None]) -> None:
            try:
                loop.call_soon_threadsafe(lambda: future.done() or answer(future))
            except RuntimeError:  # the caller's event loop is closed: nobody waits for the answer
                pass

        self._submit(_Member(work, check, settle))
        try:
            return await future
        except asyncio.CancelledError:
            stop.set()  # it leaves the lane at its next step
            raise

    def shutdown(self) -> None:
        """Refuse new work, end the requests on the lane (cancelled), and stop its thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _submit(self, member: _Member) -> None:
        with self._wake:
            if self._closed:
                raise RunCancelledError("the compute lane is shut down")
            if self.max_waiting is not None and len(self._arrivals) >= self.max_waiting:
                raise QueueFullError(
                    f"the compute lane is full: {len(self._members)} requests on it and {len(self._arrivals)}"
                    " waiting; try again later"
                )
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="denoise", daemon=True)
                self._thread.start()
            self._arrivals.append(member)
            self._wake.notify()

    @torch.no_grad()
    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self._arrivals or self._members or self._closed):
                    self._wake.wait()
                if self._closed:
                    break
                if not self._members and self.batch_wait_s:
                    filled = time.perf_counter() + self.batch_wait_s
                    while len(self._arrivals) < self.max_batch and (left := filled - time.perf_counter()) > 0:
                        self._wake.wait(left)
                joining = []
                while self._arrivals and len(self._members) + len(joining) < self.max_batch:
                    joining.append(self._arrivals.popleft())
            for member in joining:
                self._join(member)
            self._leave_if_stopped()
            if self._members:
                self._step(self._next_batch())
        for member in [*self._members, *self._arrivals]:
            self._fail(member, RunCancelledError("the server is stopping"))

    def _join(self, member: _Member) -> None:
        member.queued_s = time.perf_counter() - member.submitted
        member.last_stepped = self._calls
        try:
            member.check({})  # a request whose deadline passed in the queue never starts
            member.steps = member.work(member.check)
        except Exception as error:
            self._fail(member, error)
            return
        self._members.append(member)
        self._resume(member, first=True)

    def _resume(self, member: _Member, first: bool = False) -> None:
        """Run the member's work on to its next denoising loop, or to its value (it leaves)."""
        try:
            run = next(member.steps) if first else member.steps.send(None)
            while run.done:
                run = member.steps.send(None)
        except StopIteration as stop:
            self._members.remove(member)
            ran = Ran(stop.value, member.queued_s, member.batch_sizes)
            member.settle(lambda future: future.set_result(ran))
        except Exception as error:
            self._fail(member, error)
        else:
            member.run = run

    def _leave_if_stopped(self) -> None:
        """Cancelled and late requests leave now, not when their turn to step comes."""
        for member in list(self._members):
            try:
                member.check({})
            except Exception as error:
                self._fail(member, error)

    def _next_batch(self) -> list[_Member]:
        first = min(self._members, key=lambda member: member.last_stepped)
        if first.run.alone:
            return [first]
        key = first.run.batch_key()
        alike = [m for m in self._members if not m.run.alone and m.run.batch_key() == key]
        alike.sort(key=lambda member: member is not first)  # the one whose turn it is, then join order
        return alike[: self.max_batch]

    def _step(self, batch: list[_Member]) -> None:
        self._calls += 1
        try:
            model_inputs = [member.run.model_input() for member in batch]
            outputs = unet_outputs([member.run for member in batch], model_inputs)
        except Exception as error:
            for member in batch:
                self._fail(member, error)
            return
        for member, model_input, output in zip(batch, model_inputs, outputs, strict=True):
            member.last_stepped = self._calls
            member.batch_sizes.append(len(batch))
            try:
                member.run.advance(model_input, output)
            except Exception as error:
                self._fail(member, error)
                continue
            if member.run.done:
                self._resume(member)

    def _fail(self, member: _Member, error: Exception) -> None:
        if member in self._members:
            self._members.remove(member)
        if member.steps is not None:
            member.steps.close()
        member.settle(lambda future: future.set_exception(error))
