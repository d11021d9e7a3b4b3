"""Open-loop load: Poisson arrivals, the policy that sets each request's switch step, and the runner that
sends every arrival on time whatever the server answers, recording one outcome per request sent.

A run at one rate draws its arrival times up front (exponential gaps from a seeded RNG, within
``duration`` and ``max_requests``), sends each request at its time as a task of its own, then awaits the
answers still in flight for up to ``grace`` seconds; those given up on are recorded as CANCELLED.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from tqdm import tqdm

from hybrid_sd.request import GenerationRequest

if TYPE_CHECKING:
    from hybrid_sd.results import GenerationResult

# Sends one request and returns the server's answer; raises grpc.RpcError for an error status.
Send = Callable[[GenerationRequest], Awaitable["GenerationResult"]]


def arrival_times(rate: float, duration: float, max_requests: int | None, seed: int) -> list[float]:
    """Seconds from the start of each arrival of a Poisson process of ``rate`` per second: exponential
    gaps from ``random.Random(seed)``, every time under ``duration``, at most ``max_requests`` of them."""
    check_positive("rate", rate)
    check_positive("duration", duration)
    rng = random.Random(seed)
    times: list[float] = []
    now = rng.expovariate(rate)
    while now < duration and (max_requests is None or len(times) < max_requests):
        times.append(now)
        now += rng.expovariate(rate)
    return times


def check_positive(name: str, value: float) -> None:
    """A ValueError naming ``name`` unless ``value`` is a positive finite number."""
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class Policy:
    """How each request's switch step is set: fixed (cloud = all steps, edge = none, fixed:K), or chosen by
    the server (auto, aiming at ``latency_target_s``)."""

    name: str
    switch_step: int | None  # None: auto
    latency_target_s: float | None = None

    def request(self, template: GenerationRequest) -> GenerationRequest:
        """``template`` with this policy's switch fields."""
        if self.switch_step is None:
            return dataclasses.replace(template, auto_switch=True, latency_target_s=self.latency_target_s)
        return dataclasses.replace(template, switch_step=self.switch_step)


def parse_policy(text: str, steps: int, latency_target_s: float | None, flag: str = "--policy") -> Policy:
    """``cloud``, ``edge``, ``fixed:K`` (0 <= K <= ``steps``) or ``auto`` (which needs a latency target)."""
    if text == "cloud":
        return Policy(text, steps)
    if text == "edge":
        return Policy(text, 0)
    if text == "auto":
        if latency_target_s is None:
            raise ValueError(f"{flag} auto needs --latency-target: the end-to-end seconds the server aims for")
        return Policy(text, None, latency_target_s)
    kind, _, k = text.partition(":")
    if kind != "fixed" or not k.isdigit():
        raise ValueError(f"{flag} must be cloud, edge, fixed:K (K a whole number of steps) or auto, got {text!r}")
    if int(k) > steps:
        raise ValueError(f"{flag} {text}: K must be in [0, {steps}] (the steps of a request), got {k}")
    return Policy(text, int(k))


@dataclass(frozen=True)
class Outcome:
    """One request sent: when, how long its answer took and what the server chose and did. ``latency`` is
    None for a request given up on; the response fields are None (empty) without an OK answer."""

    rate: float
    index: int
    sent: float  # seconds from the start of its rate's run
    latency: float | None
    status: str  # a gRPC status name: OK, UNAVAILABLE, ...; CANCELLED: given up on at the end
    switch_step: int | None = None
    cloud_unet_evaluations: int | None = None
    edge_unet_evaluations: int | None = None
    cloud_batch_sizes: tuple[int, ...] = ()
    cloud_denoise_s: float | None = None
    predicted_latency_s: float | None = None
    quality: float | None = None


def answered(rate: float, index: int, sent: float, latency: float, result: GenerationResult) -> Outcome:
    """The outcome of an OK answer."""
    choice = result.switch_choice
    return Outcome(
        rate,
        index,
        sent,
        latency,
        "OK",
        switch_step=result.request.switch_step,
        cloud_unet_evaluations=result.unet_evaluations["cloud"],
        edge_unet_evaluations=result.unet_evaluations["edge"],
        cloud_batch_sizes=tuple(result.batch_sizes["cloud"]),
        cloud_denoise_s=result.timings["cloud_denoise"],
        predicted_latency_s=choice.predicted_latency_s if choice else None,
        quality=choice.quality if choice else None,
    )


async def run_rate(
    rate: float,
    arrivals: list[float],
    requests: Callable[[int], GenerationRequest],
    send: Send,
    outcomes: list[Outcome],
    grace: float,
    on_done: Callable[[int], None] = lambda sent: None,
) -> None:
    """Send ``requests(i)`` at ``arrivals[i]`` seconds from now, each without waiting for any answer, then
    await those in flight for up to ``grace`` seconds. Appends one outcome per request sent to
    ``outcomes`` as it ends (cancelled ones too, on Ctrl-C as well), and calls ``on_done`` with the number
    sent so far after each."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: list[asyncio.Task] = []
    sent_at: list[float] = []  # seconds from the start at which each task was made: its request sent

    def end(outcome: Outcome) -> None:
        outcomes.append(outcome)
        on_done(len(tasks))

    async def one(index: int, request: GenerationRequest) -> None:
        sent = sent_at[index]
        try:
            result = await send(request)
        except grpc.RpcError as error:
            end(Outcome(rate, index, sent, loop.time() - start - sent, error.code().name))
        else:
            end(answered(rate, index, sent, loop.time() - start - sent, result))

    try:
        for index, at in enumerate(arrivals):
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            sent_at.append(loop.time() - start)
            tasks.append(asyncio.create_task(one(index, requests(index))))
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for index, task in enumerate(tasks):
            if task.cancelled():  # no answer in time (or Ctrl-C): given up on
                end(Outcome(rate, index, sent_at[index], None, "CANCELLED"))
            elif task.exception() is not None:  # not a status but a fault of this side: shown, not counted
                raise task.exception()


@dataclass(frozen=True)
class LoadPlan:
    """A benchmark: the rates run one after another, each for ``duration`` seconds of arrivals (at most
    ``max_requests``) and ``grace`` seconds more for answers; request i of every rate gets prompt i (in a
    cycle) and seed ``seed + i``, the template's other fields and the policy's switch fields."""

    rates: list[float]
    duration: float
    max_requests: int | None
    grace: float
    seed: int
    policy: Policy
    prompts: list[str]
    template: GenerationRequest

    def request(self, index: int) -> GenerationRequest:
        prompt = self.prompts[index % len(self.prompts)]
        return self.policy.request(dataclasses.replace(self.template, prompt=prompt, seed=self.seed + index))


async def run_plan(plan: LoadPlan, send: Send, outcomes: list[Outcome], progress: bool = True) -> None:
    """Every rate of ``plan`` in turn, with a progress bar of requests answered (and sent) each."""
    for rate in plan.rates:
        arrivals = arrival_times(rate, plan.duration, plan.max_requests, plan.seed)
        with tqdm(total=len(arrivals), desc=f"{rate:g} req/s", unit="req", disable=not progress) as bar:

            def show(sent: int, bar: tqdm = bar) -> None:
                bar.set_postfix(sent=sent, refresh=False)
                bar.update()

            await run_rate(rate, arrivals, plan.request, send, outcomes, plan.grace, show)


async def run_remote(
    plan: LoadPlan,
    target: str,
    outcomes: list[Outcome],
    token: str | None = None,
    tls_ca: Path | None = None,
    timeout: float | None = None,
) -> None:
    """:func:`run_plan` against the server at ``target``, all calls over one channel, each asking a PNG."""
    from hybrid_sd.client import generate_on  # the gRPC stack and torch: only against a live server
    from hybrid_sd.credentials import channel_credentials
    from hybrid_sd.results import CallOptions, OutputSpec
    from hybrid_sd.rpc_clients import open_channel

    options = CallOptions(output=OutputSpec(image_format="PNG", latents=False))
    async with open_channel(target, channel_credentials(tls_ca)) as channel:

        def send(request: GenerationRequest) -> Awaitable[GenerationResult]:
            return generate_on(channel, request, options, token, timeout)

        await run_plan(plan, send, outcomes)
