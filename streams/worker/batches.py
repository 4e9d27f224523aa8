"""The batch path: Faust hands an agent ONE event per fetched partition batch instead of one per record.

Why: Faust's per-record path (conductor callback, channel queue, Event, ack bookkeeping, sensors) costs
more than the whole model does; a fetched batch of a partition already is the unit the worker wants.

The hook is the narrowest one found: `BatchConsumer.getmany`, the method of Faust's aiokafka consumer
that turns fetched records into messages. For a topic named in `App.batch_topics` the records of one
partition become one `BatchMessage` (offset and key of the last record, the records in `.records`);
every other topic (changelogs, control topics) passes through untouched. From there on it is an
ordinary Faust message: the conductor delivers it, the agent's stream yields it, Faust's generation
check drops it after a rebalance, the current-event partition is its partition.

Acks: the agent's stream runs with `noack()`, and the agent calls `ack_batch` only after the whole
batch was applied and its outputs were delivered. `ack_batch` marks the batch's offset range
[first, last] as done in Faust's own bookkeeping (its gap set, then an ack of `last`), so Faust's commit
timer commits exactly what was processed: an exception anywhere leaves the batch un-acked, and no commit
can pass it. `getmany` keeps Faust's reader from marking the range itself at fetch time (its automatic
gap fill would let a commit pass a failed batch). A message fetched in an older generation never
reaches the consumer's bookkeeping (`on_final_ack`).

Faust internals touched (faust-streaming pinned; `tests/test_batch_hook.py` fails on a change):
`Consumer.getmany` (replaced for batch topics, same flow/generation/active-partition checks),
`Consumer._wait_next_records`, `Consumer._read_offset`, `Consumer._add_gap`, `Consumer.ack`,
`Consumer.scheduler` untouched, `App._new_transport`, `Transport.Consumer`, `ConsumerMessage`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from faust.types.tuples import ConsumerMessage

PINNED_FAUST = "0.15.3"


class BatchMessage(ConsumerMessage):
    """One message standing for a fetched run of records of one partition (offsets `first`..`offset`)."""

    __slots__ = ("records", "first")

    def on_final_ack(self, consumer: Any) -> bool:
        # A batch fetched before a rebalance is acked by Faust's stream when it drops it; it must not
        # count in the new generation's bookkeeping, where its range may belong to records not yet read.
        if self.generation_id != consumer.app.consumer_generation_id:
            return False
        return consumer.ack(self)


def batch_message(tp: TP, records: list, first: int, generation_id: int) -> BatchMessage:
    last = records[-1]
    msg = BatchMessage(last.topic, last.partition, last.offset, (last.timestamp or 0) / 1000.0,
                       last.timestamp_type, last.headers, last.key, last.value, None, 0, 0, tp,
                       generation_id=generation_id)
    msg.records = records
    msg.first = first
    return msg


class BatchConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer, yielding one `BatchMessage` per partition for the app's batch topics."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batch_next: dict[TP, int] = {}  # offset after the last batch handed out, per partition

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, ConsumerMessage]]:
        batch_topics = getattr(self.app, "batch_topics", frozenset())
        records, active = await self._wait_next_records(timeout)
        generation_id = self.app.consumer_generation_id
        if records is None or self.should_stop:
            return
        if not self.flow_active:
            try:
                await self.perform_seek()
            except Exception as exc:  # same as Faust: log and go on
                self.log.warning(f"exception performing seek when flow not active {exc}")
            return
        singles = {}
        for tp, recs in records.items():
            if not recs:
                continue
            if tp.topic not in batch_topics:
                singles[tp] = recs
                continue
            if not self.flow_active or self.app.consumer_generation_id != generation_id:
                return
            if active is not None and tp not in active and tp not in self._buffered_partitions:
                continue
            self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
            prev = self._batch_next.get(tp)
            first = recs[0].offset if prev is None or prev > recs[0].offset else prev
            self._batch_next[tp] = recs[-1].offset + 1
            # Faust's reader fills the offsets between two messages as a "gap" at fetch time; for a batch
            # that would mark its records done before they are applied. One below the last: no gap.
            self._read_offset[tp] = recs[-1].offset - 1
            yield tp, batch_message(tp, recs, first, generation_id)
        if singles:
            async for item in _per_record(self, singles, generation_id, active):
                yield item

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        for tp in revoked:
            self._batch_next.pop(tp, None)
        await super().on_partitions_revoked(revoked)

    async def seek(self, partition: TP, offset: int) -> None:
        # After a seek the next batch's range starts at its first record: a batch fetched before the seek
        # took effect must not look as if it continued from the seek target (the agent would apply it).
        self._batch_next.pop(partition, None)
        await super().seek(partition, offset)


async def _per_record(consumer: BatchConsumer, records: dict, generation_id: int,
                      active: set | None) -> AsyncIterator[tuple[TP, ConsumerMessage]]:
    """Faust's own per-record delivery (the body of `Consumer.getmany`) for topics not on the batch path."""
    to_message = consumer._to_message
    for tp, record in consumer.scheduler.iterate(records):
        if not consumer.flow_active or consumer.app.consumer_generation_id != generation_id:
            break
        if active is None or tp in active or tp in consumer._buffered_partitions:
            consumer.app.monitor.track_tp_end_offset(tp, consumer.highwater(tp))
            yield tp, to_message(tp, record)


class BatchTransport(faust_aiokafka.Transport):
    Consumer = BatchConsumer


class BatchApp(faust.App):
    """A Faust app whose consumer hands the topics in `batch_topics` to agents as whole fetched batches."""

    batch_topics: frozenset[str] = frozenset()

    def _new_transport(self) -> BatchTransport:
        return BatchTransport(self.conf.broker_consumer, self)


async def ack_batch(event: faust.types.EventT) -> None:
    """Mark the batch's whole offset range processed: Faust's next commit may move past it."""
    msg: BatchMessage = event.message  # type: ignore[assignment]
    consumer = event.app.consumer
    if msg.generation_id != event.app.consumer_generation_id:
        return  # fetched before a rebalance: its offsets are not ours to commit any more
    if msg.offset > msg.first:
        await consumer._add_gap(msg.tp, msg.first, msg.offset - 1)
    event.ack()


async def send_records(app: faust.App, topic: str, partition: int,
                       records: list[tuple[bytes | None, bytes | None]]) -> list[tuple[Any, int]]:
    """Records out as aiokafka record batches for one partition: [(delivery future, records in it)].

    One `send_batch` per ~512 KB instead of one awaited `send` (and its future) per record.
    """
    if not records:
        return []
    producer = app.producer._ensure_producer()
    sent, batch, n = [], producer.create_batch(), 0
    for key, value in records:
        if batch.append(key=key, value=value, timestamp=None) is None:
            sent.append((await producer.send_batch(batch, topic, partition=partition), n))
            batch, n = producer.create_batch(), 0
            if batch.append(key=key, value=value, timestamp=None) is None:
                raise ValueError(f"a record of {len(value or b'')} bytes does not fit in a record batch")
        n += 1
    sent.append((await producer.send_batch(batch, topic, partition=partition), n))
    return sent
