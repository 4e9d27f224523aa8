"""Per-partition delivery continuity: a partition's batches are applied with no hole between them.

Why: records can be fetched and then never reach the agent. Faust's stream skips a message while its
flow control is off (a rebalance, a recovery); the consumer drops a fetched run of a partition that was
paused meanwhile or whose generation ended mid-fetch. aiokafka's fetch position has moved past them all
the same. Applying the next batch would put later events into a state before the earlier ones, and
those, read again later, would look like redeliveries and be lost.

How: the consumer numbers every fetched run of a partition and every seek in one sequence
(`BatchMessage.seq`, `streams/worker/batches.py`). A batch whose number directly follows the last
batch applied, or the lane's own seek, continues it: nothing was fetched in between, and no seek moved
the position. Any other batch is taken only if it starts at or before the next offset to apply (what it
repeats is skipped per user by the event offset kept in the state); one that starts past it makes the
lane seek back there and drop what was fetched before the seek. A lane starts each consumer generation
by seeking to the group's committed offset: the start every owner agrees on, whatever this process
applied under an earlier ownership of the partition.

After a seek, the first batch fetched starts at the first record at or after the target, so offsets
without a record (transaction markers) are crossed, not read again forever.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from faust.types import TP

log = logging.getLogger("lsti.worker")


class SeekingConsumer(Protocol):
    def seq(self, tp: TP) -> int: ...
    async def seek(self, partition: TP, offset: int) -> None: ...
    async def restart_point(self, tp: TP) -> int: ...


@dataclass
class Lane:
    generation: int
    next_offset: int  # the first offset not yet applied
    anchor: int  # seq of the last batch applied, or of the lane's last seek


class Lanes:
    """The lanes of one agent, one per partition; `admit` before applying a batch, `applied` after."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lanes: dict[int, Lane] = {}
        self.rereads = 0  # seeks back over a hole
        self.restarts = 0  # lanes (re)started at a committed offset

    async def admit(self, msg, consumer: SeekingConsumer, generation: int) -> int | None:
        """The offset from which `msg` may be applied and acked, or None to drop it (it is read again)."""
        if msg.generation_id != generation:
            return None  # fetched before a rebalance: the partition's owner now reads it from the commit
        lane = self.lanes.get(msg.partition)
        if lane is None or lane.generation != generation:
            await self._restart(msg.tp, consumer, generation)
            return None
        if msg.seq == lane.anchor + 1:
            return lane.next_offset
        if msg.seq <= lane.anchor:
            return None  # fetched before the lane's last seek
        if msg.first <= lane.next_offset:
            return msg.first
        self.rereads += 1
        log.info("%s[%d]: batch %d..%d follows records that never arrived from %d; reading again from there",
                 self.name, msg.partition, msg.first, msg.offset, lane.next_offset)
        await consumer.seek(msg.tp, lane.next_offset)
        lane.anchor = consumer.seq(msg.tp)
        return None

    def applied(self, msg) -> None:
        lane = self.lanes[msg.partition]
        lane.next_offset = max(lane.next_offset, msg.offset + 1)
        lane.anchor = msg.seq

    async def _restart(self, tp: TP, consumer: SeekingConsumer, generation: int) -> None:
        try:
            start = await consumer.restart_point(tp)
            await consumer.seek(tp, start)
        except Exception as exc:  # a rebalance or a broker away: the next batch of the partition tries again
            log.warning("%s[%d]: could not start at the committed offset (%s: %s); retrying with the next batch",
                        self.name, tp.partition, type(exc).__name__, exc)
            return
        self.restarts += 1
        self.lanes[tp.partition] = Lane(generation, start, consumer.seq(tp))
        log.info("%s[%d]: generation %d starts at committed offset %d", self.name, tp.partition, generation, start)
