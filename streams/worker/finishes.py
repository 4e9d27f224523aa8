"""Per-partition finishes in batch order, a bounded number in flight.

Why: a batch is finished (answers delivered, then the states that say so written, then its offsets acked)
by two broker round trips. Awaiting them before taking the next batch leaves the worker idle for most of
each batch; instead each batch's finish runs as a task that first waits for the partition's previous
finish, so acks and state writes still land in batch order, while the agent goes on computing. How many
may wait per partition is only backpressure: with 2 the agent was held back 35% of the time at 3,000
events/s, with 16 1-2% (BENCHMARKS.md section 3, session 8).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

IN_FLIGHT_PER_PARTITION = 16

Finish = Callable[[asyncio.Future | None], Awaitable[None]]


class Finishes:
    """`submit(partition, finish)` runs `finish(previous)` as a task; `finish` must await `previous` first."""

    def __init__(self, depth: int = IN_FLIGHT_PER_PARTITION) -> None:
        self.depth = depth
        self._last: dict[int, asyncio.Future] = {}
        self._chained: dict[int, int] = {}  # finishes chained behind the last one known complete

    def last(self, partition: int) -> asyncio.Future | None:
        """The partition's latest finish (done or not), for whoever must wait for all of them."""
        return self._last.get(partition)

    async def submit(self, partition: int, finish: Finish) -> float:
        """Chain `finish` behind the partition's previous one; returns the seconds spent held back because
        `depth` finishes were already waiting."""
        held = 0.0
        prev = self._last.get(partition)
        if prev is not None and prev.done():
            prev = None
        if prev is not None and self._chained.get(partition, 0) >= self.depth:
            t = time.perf_counter()
            await asyncio.shield(prev)
            held = time.perf_counter() - t
            prev = None
        self._chained[partition] = 1 if prev is None else self._chained.get(partition, 0) + 1
        self._last[partition] = asyncio.ensure_future(finish(prev))
        return held


def drop_written(overlay: dict[bytes, bytes], written: dict[bytes, bytes]) -> None:
    """A finish's states are in the store now: drop them from the partition's pending overlay, except those a
    later batch replaced meanwhile (still on their way; compared by identity, as the overlay holds them)."""
    for k, v in written.items():
        if overlay.get(k) is v:
            del overlay[k]
