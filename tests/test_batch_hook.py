"""Contract of the batch path (streams/worker/batches.py) with the Faust internals it touches.

Fails loudly on a faust-streaming upgrade that changes any of them: the pinned version, the attributes,
and the behaviour of Faust's own offset bookkeeping under `ack_batch` (exact range commits, no commit
past a batch that was not acked, no gap fill at fetch time). No broker: the consumer is not started.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import namedtuple
from importlib.metadata import version

import faust
import pytest
from aiokafka import AIOKafkaConsumer
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from faust.types.tuples import ConsumerMessage

from streams.worker.batches import PINNED_FAUST, BatchApp, BatchConsumer, BatchMessage, ack_batch, batch_message

Record = namedtuple("Record", "topic partition offset timestamp timestamp_type headers key value checksum "
                              "serialized_key_size serialized_value_size")


def rec(topic: str, partition: int, offset: int) -> Record:
    return Record(topic, partition, offset, 1_700_000_000_000, 0, [], b"u", b"{}", None, 1, 2)


def test_faust_streaming_is_the_pinned_version():
    assert version("faust-streaming") == PINNED_FAUST, (
        "faust-streaming changed: re-check every internal listed in streams/worker/batches.py, then re-pin")


def test_the_internals_the_hook_touches_are_there():
    base = faust_consumer.Consumer
    for name in ("getmany", "_wait_next_records", "_add_gap", "ack", "_new_offset", "perform_seek", "seek",
                 "seek_to_committed", "on_partitions_revoked", "highwater", "earliest_offsets"):
        assert hasattr(base, name), name
    assert list(inspect.signature(base._add_gap).parameters) == ["self", "tp", "offset_from", "offset_to"]
    assert list(inspect.signature(base._wait_next_records).parameters) == ["self", "timeout"]
    assert "await self.seek_to_committed()" in inspect.getsource(base.perform_seek)
    thread = faust_aiokafka.AIOKafkaConsumerThread
    assert hasattr(thread, "call_thread") and hasattr(thread, "_ensure_consumer")
    assert "await self._seek(partition, offset)" in inspect.getsource(base.seek)
    assert "self._thread.seek(partition, offset)" in inspect.getsource(faust_aiokafka.Consumer._seek)
    assert inspect.iscoroutinefunction(AIOKafkaConsumer.committed)
    assert inspect.isasyncgenfunction(base.getmany)
    assert faust_aiokafka.Transport.Consumer is faust_aiokafka.Consumer
    assert issubclass(BatchConsumer, faust_aiokafka.Consumer)
    assert hasattr(faust.App, "_new_transport")
    # The fetch wait (batches.FETCH_MAX_WAIT_MS): Faust hard-codes it where it builds the consumer, and aiokafka
    # reads the attribute when its start() builds the Fetcher.
    assert "fetch_max_wait_ms=1500" in inspect.getsource(thread._create_worker_consumer)
    assert "fetch_max_wait_ms=self._fetch_max_wait_ms" in inspect.getsource(AIOKafkaConsumer.start)
    assert "AIOKafkaConsumerThread(self" in inspect.getsource(faust_aiokafka.Consumer._new_consumer_thread)
    assert "generation_id" in ConsumerMessage.__slots__ or "generation_id" in faust.types.tuples.Message.__slots__
    src = inspect.getsource(base._drain_messages)
    assert "gap > 1 and r_offset" in src and "set_read_offset(tp, offset)" in src, "Faust's fetch-time gap fill changed"
    assert "getmany(timeout=1.0)" in src, "Faust's fetch timeout changed: see FETCH_POLL_S"
    assert "callback(message), self.suspend_flow.wait()" in src, "Faust's hand-off changed: see fetch_groups"


@pytest.fixture
def app():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    a = BatchApp("hook-contract", broker="kafka://127.0.0.1:1", store="memory://")
    a.batch_topics = frozenset({"events"})
    a.topics.add(a.topic("events"))  # an agent's source topic: acks on
    loop.run_until_complete(a.topics._update_indices())  # what Faust's subscriber does at start
    assert a.topics.acks_enabled_for("events")
    yield a
    loop.close()


class Ev:
    def __init__(self, app, msg):
        self.app, self.message = app, msg

    def ack(self):
        return self.message.ack(self.app.consumer)


def _batch(app, tp, lo, hi):
    msg = batch_message(tp, [rec(tp.topic, tp.partition, o) for o in range(lo, hi + 1)],
                        app.consumer_generation_id)
    msg.refcount = 1
    return msg


def test_consumer_is_the_batch_consumer_and_acks_commit_exactly_the_processed_range(app):
    consumer = app.consumer
    assert isinstance(consumer, BatchConsumer)
    tp = TP("events", 0)
    consumer._committed_offset[tp] = 100
    loop = asyncio.get_event_loop()
    loop.run_until_complete(ack_batch(Ev(app, _batch(app, tp, 100, 149))))
    assert consumer._new_offset(tp) == 150


def test_no_commit_passes_a_batch_that_was_not_acked(app):
    consumer = app.consumer
    tp = TP("events", 1)
    consumer._committed_offset[tp] = 100
    _batch(app, tp, 100, 149)  # fetched, failed: never acked
    loop = asyncio.get_event_loop()
    loop.run_until_complete(ack_batch(Ev(app, _batch(app, tp, 150, 199))))
    assert consumer._new_offset(tp) is None


def test_a_batch_from_an_older_generation_is_never_counted(app):
    consumer = app.consumer
    tp = TP("events", 2)
    consumer._committed_offset[tp] = 10
    old = _batch(app, tp, 10, 19)
    old.generation_id = app.consumer_generation_id - 1
    assert old.ack(consumer) is False
    assert consumer._new_offset(tp) is None


def test_getmany_yields_one_message_per_partition_batch_and_passes_other_topics_through(app):
    consumer = app.consumer
    ev0, ev1, other = TP("events", 0), TP("events", 1), TP("long-term", 0)
    records = {ev0: [rec("events", 0, o) for o in range(5, 9)], ev1: [rec("events", 1, 3)],
               other: [rec("long-term", 0, o) for o in range(2)]}

    async def fake_wait(timeout):
        return records, None

    consumer._wait_next_records = fake_wait
    consumer.highwater = lambda tp: 100  # the only call into the (unstarted) aiokafka client
    consumer.flow_active = True

    async def collect():
        return [m async for _tp, m in consumer.getmany(1.0)]

    got = asyncio.get_event_loop().run_until_complete(collect())
    batches = [m for m in got if isinstance(m, BatchMessage)]
    singles = [m for m in got if not isinstance(m, BatchMessage)]
    assert [(m.partition, m.first, m.offset, len(m.records)) for m in batches] == [(0, 5, 8, 4), (1, 3, 3, 1)]
    assert [(m.topic, m.offset) for m in singles] == [("long-term", 0), ("long-term", 1)]
    # Faust's reader must see no gap before the batch's last offset (it would mark the batch done unprocessed).
    assert consumer._read_offset[ev0] == 7


def _getmany(app, records, active=None):
    consumer = app.consumer

    async def fake_wait(timeout):
        return records, active

    consumer._wait_next_records = fake_wait
    consumer.highwater = lambda tp: 100
    consumer.flow_active = True

    async def collect():
        return [m async for _tp, m in consumer.getmany(1.0)]

    return asyncio.get_event_loop().run_until_complete(collect())


def test_runs_and_seeks_share_one_sequence_per_partition(app):
    """A run that directly follows the last one handed out has the next number; a dropped run or a seek in
    between leaves a hole in the numbers, which is what tells the agent a hole may be in the offsets."""
    consumer = app.consumer
    ev0, ev1 = TP("events", 0), TP("events", 1)
    runs = lambda tp, lo, hi: [rec(tp.topic, tp.partition, o) for o in range(lo, hi)]  # noqa: E731
    [a0, a1] = _getmany(app, {ev0: runs(ev0, 0, 5), ev1: runs(ev1, 0, 3)})
    assert (a0.seq, a1.seq) == (1, 1)
    [b0] = _getmany(app, {ev0: runs(ev0, 5, 9), ev1: runs(ev1, 3, 4)}, active={ev0})  # ev1 paused: dropped
    assert b0.seq == 2 and consumer.seq(ev1) == 2
    [c1] = _getmany(app, {ev1: runs(ev1, 4, 6)})
    assert c1.seq == 3  # not 2: a run was lost before it

    async def seek_in_between(timeout):  # a seek while the fetch was waiting: what arrives may predate it
        consumer._seq[ev0] += 1
        return {ev0: runs(ev0, 9, 12)}, None

    consumer._wait_next_records = seek_in_between

    async def collect():
        return [m async for _tp, m in consumer.getmany(1.0)]

    assert asyncio.get_event_loop().run_until_complete(collect()) == []
    assert consumer.seq(ev0) == 4


def test_the_worker_consumer_waits_briefly_for_quiet_partitions(app):
    """Faust's 1.5 s fetch wait held events behind fetches of quiet partitions (about 1.2 s of latency at
    2,500 events/s); the batch consumer's thread builds its aiokafka consumer with the short wait."""
    from streams.worker.batches import FETCH_MAX_WAIT_MS, BatchConsumerThread

    async def build():
        thread = app.consumer._new_consumer_thread()
        assert isinstance(thread, BatchConsumerThread)
        return thread._create_worker_consumer(app.transport)

    consumer = asyncio.get_event_loop().run_until_complete(build())
    assert consumer._fetch_max_wait_ms == FETCH_MAX_WAIT_MS < 100


def test_getmany_asks_the_fetcher_with_a_short_timeout(app):
    """Faust asks with a 1 s timeout; aiokafka's wait then sometimes ran the whole second with records buffered
    (the p99 of ~1.2 s in BENCHMARKS.md section 3): the batch consumer asks for at most `FETCH_POLL_S`."""
    from streams.worker.batches import FETCH_POLL_S

    consumer = app.consumer
    asked = []

    async def fake_wait(timeout):
        asked.append(timeout)
        return {}, None

    consumer._wait_next_records = fake_wait
    consumer.flow_active = True

    async def collect():
        return [m async for _tp, m in consumer.getmany(1.0)]

    assert asyncio.get_event_loop().run_until_complete(collect()) == []
    assert asked == [FETCH_POLL_S] and FETCH_POLL_S <= 0.1


def test_the_gap_bookkeeping_equals_faust_own(app):
    """The batch consumer's `_add_gap` skips Faust's re-merge of the whole tree when the new range overlaps
    nothing; whatever the ranges, the tree after each add and the commits are Faust's own."""
    import random

    assert "merge_overlaps()" in inspect.getsource(faust_consumer.Consumer._add_gap)
    ours, theirs = app.consumer, faust_consumer.Consumer._add_gap
    rng = random.Random(0)
    loop = asyncio.get_event_loop()
    for case in range(30):
        tp_a, tp_b = TP("events", 100 + case), TP("events", 200 + case)
        ours._committed_offset[tp_a] = ours._committed_offset[tp_b] = rng.choice([None, 5, 40])
        for _ in range(40):
            lo = rng.randrange(0, 120)
            hi = lo + rng.randrange(-2, 15)
            loop.run_until_complete(ours._add_gap(tp_a, lo, hi))
            loop.run_until_complete(theirs(ours, tp_b, lo, hi))
            assert sorted(ours._gap[tp_a]) == sorted(ours._gap[tp_b])
    tp = TP("events", 3)
    ours._committed_offset[tp] = 0
    for lo in range(0, 1000, 50):
        loop.run_until_complete(ack_batch(Ev(app, _batch(app, tp, lo, lo + 49))))
    assert ours._new_offset(tp) == 1000


def test_getmany_tags_the_batches_of_one_fetch_as_one_group(app):
    ev0, ev1, lt0 = TP("events", 0), TP("events", 1), TP("long-term", 0)
    app.batch_topics = frozenset({"events", "long-term"})
    runs = lambda tp, lo, hi: [rec(tp.topic, tp.partition, o) for o in range(lo, hi)]  # noqa: E731
    first = _getmany(app, {ev0: runs(ev0, 0, 5), ev1: runs(ev1, 0, 3), lt0: runs(lt0, 0, 2)})
    second = _getmany(app, {ev0: runs(ev0, 5, 9), ev1: runs(ev1, 3, 4)}, active={ev0})  # ev1 paused: not counted
    groups = [(m.topic, m.group) for m in first + second]
    (n1, _), (n2, _) = first[0].group, second[0].group
    assert n2 == n1 + 1
    assert groups == [("events", (n1, 2)), ("events", (n1, 2)), ("long-term", (n1, 1)), ("events", (n2, 1))]


class _Msg:
    def __init__(self, group):
        self.group = group


class _Event:
    def __init__(self, name, group):
        self.name, self.message = name, _Msg(group)


async def _source(script):
    """The events of `script` (a list of events and pauses in seconds), as an agent's stream gives them."""
    for item in script:
        if isinstance(item, float):
            await asyncio.sleep(item)
        else:
            yield item


def _groups(script, wait=0.05):
    """The names in each group `fetch_groups` hands on for `script`."""
    from streams.worker.batches import fetch_groups

    async def collect():
        return [[e.name for e in g] async for g in fetch_groups(_source(script), wait)]

    return asyncio.get_event_loop().run_until_complete(collect())


def test_fetch_groups_hands_on_a_complete_group_at_once(app):
    script = [_Event("a", (1, 2)), _Event("b", (1, 2)), 10.0, _Event("c", (2, 1))]
    loop = asyncio.get_event_loop()
    started = loop.time()
    got = []

    async def first_group():
        from streams.worker.batches import fetch_groups

        async for g in fetch_groups(_source(script), wait=30.0):
            got.append([e.name for e in g])
            return loop.time() - started

    took = loop.run_until_complete(first_group())
    assert got == [["a", "b"]]
    assert took < 10.0  # complete: not held for the next event nor for the wait


def test_fetch_groups_splits_at_a_new_fetch_and_after_the_wait(app):
    # b's fetch was counted as 3 batches but one was dropped: the group ends when c's fetch arrives
    assert _groups([_Event("a", (1, 3)), _Event("b", (1, 3)), _Event("c", (2, 1))]) == [["a", "b"], ["c"]]
    # a short group with nothing after it is handed on after the wait, not held until the next event
    # (b carries a's group: held, it would join it)
    assert _groups([_Event("a", (1, 2)), 0.3, _Event("b", (1, 2))], wait=0.05) == [["a"], ["b"]]
    # events without a group (other topics) go one by one
    assert _groups([_Event("a", None), _Event("b", None)]) == [["a"], ["b"]]
