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

Continuity: the consumer numbers every fetched run and every seek of a partition in one sequence
(`BatchMessage.seq`); a run it drops (a partition paused meanwhile, a generation that ended mid-fetch, a
fetch that waited across a seek) still takes a number. `streams/worker/lanes.py` uses the numbers to
apply a partition's batches with no hole between them.

Groups: the batches one fetch hands out are tagged as one group (`BatchMessage.group`), so that the
events agent can take them together (`fetch_groups`) and run the model once for all partitions.

Faust internals touched (faust-streaming pinned; `tests/test_batch_hook.py` fails on a change):
`Consumer.getmany` (replaced for batch topics, same flow/generation/active-partition checks),
`Consumer._wait_next_records`, `Consumer._read_offset`, `Consumer._add_gap` (replaced: the same intervals
in `Consumer._gap`, clamped at `Consumer._committed_offset`, without re-merging when nothing overlaps),
`Consumer._new_offset` (reads the gap), `Consumer.ack`,
`Consumer.seek` and `seek_to_committed` (counted; `_seek` run on the consumer thread),
`Consumer.scheduler` untouched, `App._new_transport`, `Transport.Consumer`, `ConsumerMessage`,
`AIOKafkaConsumerThread.call_thread` (committed offsets, seeks), `Consumer._new_consumer_thread` and
`AIOKafkaConsumerThread._create_worker_consumer` (the fetch wait: aiokafka's `AIOKafkaConsumer._fetch_max_wait_ms`),
`Consumer._drain_messages` (its `getmany(timeout=1.0)`, capped at `FETCH_POLL_S`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from faust.types.tuples import ConsumerMessage

PINNED_FAUST = "0.15.3"
# Faust builds its aiokafka consumer with fetch_max_wait_ms=1500. aiokafka sends one fetch at a time per broker,
# for the partitions that hold no buffered records: while the events partitions' records wait to be handed
# out, the fetch in flight covers only quiet partitions (long-term, forget), and the broker holds it the full
# wait. Events arriving meanwhile waited for it: p50 latency 1.16 s at 2,500 events/s (BENCHMARKS.md
# section 3; 0.56 s with a 20 ms wait, 0.31 s with 5 ms, one run each). A short wait bounds that delay; an
# idle worker then sends ~100 empty fetches per second.
FETCH_MAX_WAIT_MS = 10
# Faust's fetch loop asks for records with a 1 s timeout, and aiokafka's `Fetcher.fetched_records` then waits on
# a "new data" waiter. In the latency runs that wait often ran its whole second and returned nothing although
# the events partitions' records had arrived meanwhile (a dump of the fetcher at the end of such a wait showed
# them buffered; why the waiter was not woken is not known): the next call got them ~1 s old. That was the
# whole latency tail (p95 ~1 s, p99 1.0-1.3 s; BENCHMARKS.md section 3, session 8). Asking with a short timeout
# and asking again bounds that to this much; an idle worker then makes ~20 cheap calls a second.
FETCH_POLL_S = 0.05
# How long the agent waits for the next batch of a fetch before it takes the group it has (`fetch_groups`):
# the fetch loop hands batches over back to back, so a complete group never waits this long.
GROUP_WAIT_S = 0.005


class BatchMessage(ConsumerMessage):
    """One message standing for a fetched run of records of one partition (offsets `first`..`offset`).

    `seq` numbers the run in its partition's fetch sequence (`BatchConsumer`): runs and seeks share one
    counter, so a run whose number follows the previous one's directly continues it in the log. `group` is
    (fetch number, batches of this topic the fetch hands out): the batches of one fetch, for `fetch_groups`.
    """

    __slots__ = ("records", "first", "seq", "fetched_at", "group")

    def on_final_ack(self, consumer: Any) -> bool:
        # A batch fetched before a rebalance is acked by Faust's stream when it drops it; it must not
        # count in the new generation's bookkeeping, where its range may belong to records not yet read.
        if self.generation_id != consumer.app.consumer_generation_id:
            return False
        return consumer.ack(self)


def batch_message(tp: TP, records: list, generation_id: int, seq: int = 0) -> BatchMessage:
    last = records[-1]
    msg = BatchMessage(last.topic, last.partition, last.offset, (last.timestamp or 0) / 1000.0,
                       last.timestamp_type, last.headers, last.key, last.value, None, 0, 0, tp,
                       generation_id=generation_id)
    msg.records = records
    msg.first = records[0].offset
    msg.seq = seq
    msg.fetched_at = time.time()  # when the consumer handed it out: the progress line splits an event's age there
    msg.group = None
    return msg


class BatchConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, its worker consumer built with a short fetch wait (`FETCH_MAX_WAIT_MS`)."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read by AIOKafkaConsumer.start() to build its Fetcher
        return consumer


class BatchConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer, yielding one `BatchMessage` per partition for the app's batch topics.

    Per partition it counts, in one sequence, every fetched run of records (handed out or dropped) and
    every seek. The agent uses the numbers to tell a batch that continues the last one it applied from
    one that follows a hole (`streams/worker/lanes.py`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seq: dict[TP, int] = {}
        self._sought: dict[TP, int] = {}  # the target of the last seek, per partition
        self._handed_out = 0  # records handed out, for the fault injection of tests
        self._fetches = 0  # fetches handed out: numbers the groups (`BatchMessage.group`)

    def _new_consumer_thread(self) -> BatchConsumerThread:
        return BatchConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def seq(self, tp: TP) -> int:
        return self._seq.get(tp, 0)

    def _bump(self, tp: TP) -> int:
        self._seq[tp] = n = self._seq.get(tp, 0) + 1
        return n

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, ConsumerMessage]]:
        batch_topics = getattr(self.app, "batch_topics", frozenset())
        before = dict(self._seq)  # a seek while we wait makes what arrives suspect: see below
        records, active = await self._wait_next_records(min(timeout, FETCH_POLL_S))
        generation_id = self.app.consumer_generation_id
        if records is None or self.should_stop:
            return
        if not self.flow_active:
            self._dropped(records, batch_topics)
            try:
                await self.perform_seek()
            except Exception as exc:  # same as Faust: log and go on
                self.log.warning(f"exception performing seek when flow not active {exc}")
            return
        singles, runs = {}, []
        for tp, recs in records.items():
            if not recs:
                continue
            if tp.topic not in batch_topics:
                singles[tp] = recs
            elif self._hand_out(tp, recs, active, before):
                runs.append((tp, recs, self._seq.get(tp, 0)))
        # One fetch of a topic is one group: the agent may take its partitions' batches together
        # (`fetch_groups`). The size is what this fetch means to hand out; a run dropped below leaves the
        # group short, which the agent's short wait covers.
        self._fetches += 1
        sizes = Counter(tp.topic for tp, _recs, _pre in runs)
        for tp, recs, pre in runs:
            if not self.flow_active or self.app.consumer_generation_id != generation_id:
                self._dropped(records, batch_topics)
                return
            if self._maybe_before_seek(tp, recs, pre):  # sought while the fetch's earlier batches were handed over
                self._bump(tp)
                continue
            self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
            # Faust's reader fills the offsets between two messages as a "gap" at fetch time; for a batch
            # that would mark its records done before they are applied. One below the last: no gap.
            self._read_offset[tp] = recs[-1].offset - 1
            self._handed_out += len(recs)
            msg = batch_message(tp, recs, generation_id, self._bump(tp))
            msg.group = (self._fetches, sizes[tp.topic])
            yield tp, msg
        if singles:
            async for item in _per_record(self, singles, generation_id, active):
                yield item

    def _hand_out(self, tp: TP, recs: list, active: set | None, before: dict[TP, int]) -> bool:
        """Whether a fetched run goes to the agent. Not: a paused partition; or a run fetched around a seek
        that does not start at its target, so maybe from before it. The fetch position is past these
        records all the same, so the next run must not look like a continuation (`_bump`)."""
        if (active is not None and tp not in active and tp not in self._buffered_partitions) \
                or self._maybe_before_seek(tp, recs, before.get(tp, 0)) or self._fault_drop(len(recs)):
            self._bump(tp)
            return False
        return True

    def _maybe_before_seek(self, tp: TP, recs: list, seq_then: int) -> bool:
        """A seek of `tp` since its sequence stood at `seq_then`, and the run does not start at its target."""
        return self._seq.get(tp, 0) != seq_then and recs[0].offset != self._sought.get(tp)

    def _dropped(self, records: dict, batch_topics: frozenset) -> None:
        for tp, recs in records.items():
            if recs and tp.topic in batch_topics:
                self._bump(tp)

    def _fault_drop(self, n: int) -> bool:
        after = getattr(self.app, "fault_drop_fetched_after", None)
        if after is not None and self._handed_out >= after:
            self.app.fault_drop_fetched_after = None
            self.log.warning("fault injection: dropping a fetched run of %d records", n)
            return True
        return False

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        """Faust's `_add_gap` (the same clamp at the committed offset, the same intervals after), cheaper.

        Faust re-merges the partition's whole interval tree after every add, and each acked batch leaves one
        interval until the next commit (its last offset, acked apart, separates it from the next): ~300 per
        partition at 110 batches/s, 4.8% of the worker's time in the latency profile (BENCHMARKS.md section 3).
        A range that overlaps none of them leaves nothing to merge; only one that does is merged. Faust's
        `sleep(0)` after each add (for health checks while a big gap is built) is left out: a batch adds one
        interval."""
        committed = self._committed_offset[tp]
        if committed is not None:
            offset_from = max(offset_from, committed + 1)
        if offset_from <= offset_to:
            gap = self._gap[tp]
            overlaps = gap.overlaps_range(offset_from, offset_to + 1)  # intervaltree intervals exclude the end
            gap.addi(offset_from, offset_to + 1)
            if overlaps:
                gap.merge_overlaps()

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        for tp in revoked:
            self._bump(tp)
        await super().on_partitions_revoked(revoked)

    async def seek(self, partition: TP, offset: int) -> None:
        self._bump(partition)
        self._sought[partition] = offset
        await super().seek(partition, offset)

    async def _seek(self, partition: TP, offset: int) -> None:
        # Faust calls aiokafka's seek from this loop while the consumer thread fetches: the two threads then
        # race on the fetcher's records (a KeyError in Fetcher.fetched_records crashed a worker in a CI run
        # once lanes seek at each generation's start). On the consumer's own thread the seek is atomic to it.
        thread = self._thread
        await thread.call_thread(thread._ensure_consumer().seek, partition, offset)

    async def seek_to_committed(self) -> Mapping[TP, int]:
        for tp in self.assignment():
            self._bump(tp)
            self._sought.pop(tp, None)
        committed = await super().seek_to_committed()
        self._sought.update({tp: off for tp, off in committed.items() if off is not None})
        return committed

    async def restart_point(self, tp: TP) -> int:
        """Where the group's processing of `tp` stands: its committed offset, or the log start if none."""
        thread = self._thread
        aio = thread._ensure_consumer()
        committed = await thread.call_thread(aio.committed, faust_aiokafka.ensure_aiokafka_TP(tp))
        if committed is not None:
            return int(committed)
        earliest = await self.earliest_offsets(tp)
        return int(earliest.get(tp) or 0)


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


async def fetch_groups(events: AsyncIterator, wait: float = GROUP_WAIT_S) -> AsyncIterator[list]:
    """The events of an agent's stream in the groups of their fetch (`BatchMessage.group`), in order.

    Why: Faust's fetch loop hands a fetch's partition batches to the agent one at a time, each hand-off a
    suspension, so the agent woke with one partition's batch and computed it alone: at a few thousand
    events/s that is ~26 events per model pass, the pass's fixed cost paid per partition. A group is
    handed on when it is complete, when an event of another fetch arrives, or when the next event takes
    longer than `wait` (a batch dropped after the fetch was counted: the group stays short). Only speed
    depends on the groups; what the agent does with each batch is the same.

    The next event is awaited in a task that a timeout does not cancel: cancelling the stream's own
    iterator would end it.
    """
    it = events.__aiter__()
    nxt: asyncio.Future | None = None
    group: list = []
    try:
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(it.__anext__())
            if group:
                done, _ = await asyncio.wait({nxt}, timeout=wait)
                if not done:
                    yield group
                    group = []
                    continue
            try:
                event = await nxt
            except StopAsyncIteration:
                break
            finally:
                nxt = None
            key = getattr(event.message, "group", None)
            if group and (key is None or key != group[0].message.group):
                yield group
                group = []
            group.append(event)
            if key is None or len(group) >= key[1]:
                yield group
                group = []
        if group:
            yield group
    finally:
        if nxt is not None:
            nxt.cancel()


async def ack_batch(event: faust.types.EventT, start: int | None = None) -> None:
    """Mark offsets `start` (default: the batch's first record) to the batch's last as processed: Faust's
    next commit may move past them. A `start` below the first record covers offsets holding no record
    (proved by the lane: `streams/worker/lanes.py`)."""
    msg: BatchMessage = event.message  # type: ignore[assignment]
    consumer = event.app.consumer
    if msg.generation_id != event.app.consumer_generation_id:
        return  # fetched before a rebalance: its offsets are not ours to commit any more
    start = msg.first if start is None else start
    if msg.offset > start:
        await consumer._add_gap(msg.tp, start, msg.offset - 1)
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
