"""Detect a worker that holds partitions with events waiting but consumes nothing, and say why.

Faust's fetch path has several places that can stop a partition for good (buffer-pressure pauses,
flow control during a rebalance, recovery pauses). When that happens the worker looks healthy but
its users get no recommendations. This watch compares what the fetcher last saw at the end of each
assigned partition with the offsets the agent actually received; if events wait and nothing moved
for `stall_after` seconds outside a rebalance, it logs the consumer's flow state (one line, no
payloads) and, if asked, restarts the fetch of the stuck partitions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

log = logging.getLogger("lsti.stall")


class StallWatch:
    """Fed by the agent (`saw`), polled by a timer (`check`)."""

    def __init__(self, topic: str, stall_after: float = 20.0) -> None:
        self.topic = topic
        self.stall_after = stall_after
        self.last_offset: dict[int, int] = {}
        self.last_progress = time.monotonic()
        self.fault_done = False
        self.generation = None
        self.batch_started: float | None = None  # set by the agent while it works on a micro-batch
        self._reported_idle = False
        self._reported_batch: float | None = None
        self._last_view: dict = {}  # what `waiting` last compared, for the idle log line

    def saw(self, offsets: dict[int, int]) -> None:
        """The last offset the agent received per partition in a micro-batch."""
        last = self.last_offset
        for partition, offset in offsets.items():
            if offset > last.get(partition, -1):
                last[partition] = offset
        self.last_progress = time.monotonic()
        self._reported_idle = False

    async def waiting(self, app) -> dict[int, int]:
        """Events at the broker beyond what the agent received, per assigned partition.

        The log end comes from the broker (a ListOffsets request), not from the fetcher, whose view stops
        with the fetching. A partition the agent has not received anything from since it was assigned is
        measured from Faust's committed offset; Faust keeps that as the last processed offset in some
        paths and the next one to read in others, so one event of slack avoids false alarms when idle."""
        consumer = app.consumer
        tps = [tp for tp in consumer.assignment() if tp.topic == self.topic]
        if not tps:
            return {}
        ends = await asyncio.wait_for(consumer.highwaters(*tps), timeout=10.0)
        out = {}
        self._last_view = {"assigned": sorted(tp.partition for tp in tps),
                           "ends": {tp.partition: ends.get(tp) for tp in tps}, "seen": dict(self.last_offset),
                           "generation": self.generation}
        for tp in tps:
            end = ends.get(tp)
            if end is None:
                continue
            if tp.partition in self.last_offset:
                behind = end - 1 - self.last_offset[tp.partition]
            else:
                behind = end - 1 - (consumer._committed_offset.get(tp) or 0)
            if behind > 0:
                out[tp.partition] = int(behind)
        return out

    async def check(self, app, unstick: bool = True) -> dict | None:
        """Return a snapshot (and log it) when stalled; None otherwise."""
        if app.rebalancing or getattr(app, "in_recovery", False) or not app.consumer.assignment():
            self.last_progress = time.monotonic()
            return None
        generation = getattr(app, "consumer_generation_id", None)
        if generation != self.generation:  # partitions may have moved: forget offsets from before
            self.generation = generation
            self.last_offset.clear()
        now = time.monotonic()
        if self.batch_started is not None and now - self.batch_started > self.stall_after \
                and self._reported_batch != self.batch_started:
            self._reported_batch = self.batch_started
            log.warning("agent busy in one micro-batch for %.0f s; its stack:\n%s", now - self.batch_started,
                        agent_stacks())
        idle = now - self.last_progress
        if idle < self.stall_after:
            return None
        try:
            waiting = await self.waiting(app)
        except Exception as exc:  # the broker or the consumer thread did not answer: try again next time
            log.warning("stall watch: could not read end offsets: %r", exc)
            return None
        if not waiting:
            if not self._reported_idle:  # once per idle period: what the watch compared, for a later look
                self._reported_idle = True
                log.info("idle %.0f s with nothing waiting: %s", idle, self._last_view)
            return None
        snap = flow_snapshot(app, self.topic)
        snap.update(idle_seconds=round(idle, 1), waiting=waiting)
        log.warning("consumer stalled: %s", snap)
        if unstick:
            await self.unstick(app, [tp for tp in app.consumer.assignment()
                               if tp.topic == self.topic and tp.partition in waiting])
            self.last_progress = time.monotonic()
        return snap

    async def unstick(self, app, tps: Iterable) -> None:
        """Put stuck partitions back into the fetch set and re-read them from the last commit.

        Seen here after a failover under CPU load: the taken-over partitions were active, unpaused, with
        flow on and empty buffers, the fetcher knew their log end, yet no record reached the agent. A seek
        resets both the fetch position and Faust's read offset (below which Faust silently drops records).
        Re-reading from the commit is safe: the per-user offset in each state skips what was applied."""
        consumer = app.consumer
        tps = set(tps)
        consumer._buffered_partitions.difference_update(tps)
        consumer.resume_partitions(tps)
        if not consumer.flow_active:
            consumer.resume_flow()
        if not app.flow_control.is_active():
            app.flow_control.resume()
        targets = {}
        missing = [tp for tp in tps if consumer._committed_offset.get(tp) is None]
        earliest = await asyncio.wait_for(consumer.earliest_offsets(*missing), 10.0) if missing else {}
        for tp in tps:
            committed = consumer._committed_offset.get(tp)
            targets[tp] = committed if committed is not None else earliest.get(tp, 0)
            await consumer.seek(tp, targets[tp])
        log.warning("resumed fetching of partitions %s from offsets %s", sorted(tp.partition for tp in tps),
                    {tp.partition: off for tp, off in sorted(targets.items())})

    def inject_stop_fetch(self, app) -> None:
        """Fault injection (tests): stop fetching every assigned partition of the topic the way Faust does
        under buffer pressure (`Consumer.on_buffer_full`), without the matching resume."""
        self.fault_done = True
        for tp in app.consumer.assignment():
            if tp.topic == self.topic:
                app.consumer._get_active_partitions().discard(tp)
                app.consumer._buffered_partitions.add(tp)
        log.warning("fault injection: fetching of %s stopped", self.topic)


def flow_snapshot(app, topic: str) -> dict:
    """The consumer's flow state for `topic`: which partitions are fetched, paused, buffer-stopped."""
    c = app.consumer

    def parts(tps) -> list[int]:
        return sorted(tp.partition for tp in (tps or ()) if tp.topic == topic)

    queues = []
    for tp, channels in getattr(app.topics, "_tp_index", {}).items():
        if tp.topic != topic:
            continue
        for ch in channels:
            q = getattr(ch, "queue", None)
            if q is not None:
                queues.append({"partition": tp.partition, "qsize": q.qsize(),
                               "pending_drop_callbacks": len(getattr(q, "_pending_pressure_drop_callbacks", ()))})
    return {
        "assigned": parts(c.assignment()),
        "active": parts(c._active_partitions),
        "paused": parts(c._paused_partitions),
        "buffer_stopped": parts(c._buffered_partitions),
        "consumer_flow_active": c.flow_active,
        "app_flow_active": app.flow_control.is_active(),
        "highwater": {tp.partition: c.highwater(tp) for tp in c.assignment() if tp.topic == topic},
        "committed": {tp.partition: c._committed_offset.get(tp) for tp in c.assignment() if tp.topic == topic},
        "read_offset": {tp.partition: c._read_offset.get(tp) for tp in c.assignment() if tp.topic == topic},
        "fetch_position": _positions(app, [tp for tp in c.assignment() if tp.topic == topic]),
        "queues": queues,
    }


def _positions(app, tps: list) -> dict:
    """aiokafka's fetch position per partition (None when it has none), read from its subscription state."""
    try:
        assignment = app.consumer._thread._consumer._subscription.subscription.assignment
    except AttributeError:
        return {}
    out = {}
    for tp in tps:
        try:
            st = assignment.state_value(tp)
            out[tp.partition] = st.position if st is not None and st.has_valid_position else None
        except Exception:  # internals of another aiokafka version: leave it out of the snapshot
            out[tp.partition] = "?"
    return out


def agent_stacks(limit: int = 12) -> str:
    """The coroutine stacks of the running agent tasks (where a stuck micro-batch waits)."""
    import io

    out = io.StringIO()
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        name = getattr(coro, "__qualname__", "") or str(coro)
        if "recommend" in name or "Agent" in name or "_execute_actor" in name:
            task.print_stack(limit=limit, file=out)
    return out.getvalue() or "(no agent task found)"
