"""Stream adapters of the servers: a call that reports progress as a stream of its progress events,
then its value, wrapped in a protobuf event message."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from hybrid_sd.lane import Progress
from hybrid_sd.wire import progress_to_pb

T = TypeVar("T")


async def with_progress(call: Callable[..., Awaitable[T]]) -> AsyncIterator[Progress | T]:
    """Turn ``call(on_progress=...)`` into a stream: its progress events as they come, then its
    value (or its error)."""
    events: asyncio.Queue[Progress] = asyncio.Queue()
    task = asyncio.ensure_future(call(on_progress=events.put_nowait))
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
                continue
            getter.cancel()
            while not events.empty():
                yield events.get_nowait()
            yield task.result()
            return
    finally:
        task.cancel()


async def as_events(
    call: Callable[..., Awaitable[T]], event_type: type, final_field: str, encode: Callable[[T], object]
) -> AsyncIterator:
    """``call``'s progress stream as ``event_type`` messages (a oneof of ``progress`` and
    ``final_field``), its value encoded by ``encode``."""
    async for item in with_progress(call):
        if isinstance(item, Progress):
            yield event_type(progress=progress_to_pb(item))
        else:
            yield event_type(**{final_field: encode(item)})
