"""Faust tables on RocksDB, read and written a micro-batch at a time, fenced against zombie writers.

Batched: `get_many` is one RocksDB multi-get per partition; `put_many` sends the changelog records as
record batches (aiokafka `send_batch`), awaits them, then writes one RocksDB WriteBatch. Same store
files, same changelog topic, same recovery as `table[key] = value`, without a coroutine and a future
per key.

Fenced (why): a worker paused past its session timeout (GC pause, VM stall, SIGSTOP) resumes still
believing it owns its partitions and writes states computed from what it had before the pause, while
the new owner has moved on. Kafka refuses its offset commit, but not its changelog records. Such a
record can land after the owner's newer one, so both "last record wins" (Faust's recovery, and log
compaction) and Faust's persisted changelog offset (advanced by every own write, so a recovery can skip
the owner's records written in between) would make a state go back. Three rules stop that:

1. Newest event wins, not newest record: every short-term state carries the (partition, offset) of the
   last event applied to it; recovery (`apply_changelog_batch`) keeps, per key, the value with the
   highest event offset, against the local value as well as within the batch. So does every local write
   of our own: a batch computed before a rebalance (a worker resumed from a pause, a finish still in
   flight) can land after the recovery that brought its users' newer states, and must not take them back
   (the next events would be applied to the older state and the ones in between lost); the newer state
   is written to the changelog again, so that it stays its key's last record. A zombie's state is a
   deterministic replay of events the owner also applies, so at equal offsets it is the same bytes.
2. The persisted changelog offset only moves over records this worker has seen: after its own batch
   only when the batch landed right after the last offset it knew of (no foreign record in between);
   otherwise it stays, so the next recovery reads the foreign records and rule 1 merges them.
3. The owner re-asserts: when a foreign record is found in one of its changelog partitions (its own
   write landed past a hole, or the periodic `check_foreign` sees the log end beyond what it wrote), it
   reads that range and, for each key whose record there is older than its own state, writes its state
   again, so that the last record of every key is the newest state and compaction keeps it.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import faust
from faust.stores import rocksdb as faust_rocksdb
from faust.types import TP

from streams.worker.batches import send_records

log = logging.getLogger("lsti.state")
OFFSET_AT = struct.Struct("<q")  # the last applied event's offset inside a state header (streams/worker/state.py)
OFFSET_POS = 12


def event_offset(value: bytes | None) -> int:
    """The offset of the last event applied to a state (-2 for none, -1 for a fresh state)."""
    if value is None or len(value) < OFFSET_POS + 8:
        return -2
    return OFFSET_AT.unpack_from(value, OFFSET_POS)[0]


def split_by_offset(db: Any, items: dict[bytes, bytes | None]) -> tuple[dict, dict]:
    """Of `items`, (those to write: tombstones, new keys and states at least as new as the local one by event
    offset; per key where the local state is newer, that local state). Local writes never take a state back."""
    keys = list(items)
    fresh, newer = {}, {}
    for key, old in zip(keys, db[keys] if keys else [], strict=True):
        value = items[key]
        if value is None or old is None or event_offset(value) >= event_offset(old):
            fresh[key] = value
        else:
            newer[key] = old
    return fresh, newer


def write_local(db: Any, items: dict[bytes, bytes | None]) -> None:
    """One RocksDB WriteBatch: put each value, delete each key whose value is None (a tombstone)."""
    wb = faust_rocksdb.rocksdict.WriteBatch(raw_mode=True)
    for key, value in items.items():
        if value is None:
            wb.delete(key)
        else:
            wb.put(key, value)
    db.write(wb)


class FencedStore(faust_rocksdb.Store):
    """Faust's RocksDB store with the recovery merge of rule 1 (when `merge_by_offset`)."""

    merge_by_offset = False

    def apply_changelog_batch(self, batch: Iterable[Any], to_key: Callable, to_value: Callable) -> None:
        if not self.merge_by_offset:
            return super().apply_changelog_batch(batch, to_key, to_value)
        newest: dict[int, dict[bytes, bytes | None]] = defaultdict(dict)
        tp_offsets: dict[TP, int] = {}
        for event in batch:
            msg = event.message
            tp_offsets[msg.tp] = max(msg.offset, tp_offsets.get(msg.tp, -1))
            part = newest[msg.partition]
            if msg.value is None:  # a tombstone (a forgotten user) deletes, whatever came before
                part[msg.key] = None
            elif msg.key not in part or event_offset(msg.value) >= event_offset(part[msg.key]):
                part[msg.key] = msg.value
        for partition, values in newest.items():
            db = self._db_for_partition(partition)
            write_local(db, split_by_offset(db, values)[0])
        for tp, offset in tp_offsets.items():
            self.set_persisted_offset(tp, offset)


class FencedTable(faust.Table):
    """A Faust table on `FencedStore`."""

    def __init__(self, *args: Any, merge_by_offset: bool = False, **kwargs: Any) -> None:
        self._merge_by_offset = merge_by_offset
        super().__init__(*args, **kwargs)

    def _new_store_by_url(self, url: Any) -> FencedStore:
        store = FencedStore(url, self.app, self, table_name=self.name, key_type=self.key_type,
                            key_serializer=self.key_serializer, value_serializer=self.value_serializer,
                            value_type=self.value_type, loop=self.loop, options=self.options)
        store.merge_by_offset = self._merge_by_offset
        return store


class BatchedTable:
    """Micro-batch reads and writes of one `FencedTable`, with the changelog bookkeeping of rules 2-3."""

    def __init__(self, app: faust.App, table: FencedTable, security: dict, bootstrap: str):
        self.app, self.table = app, table
        self.security, self.bootstrap = security, bootstrap
        self._end: dict[int, int] = {}  # changelog partition -> last offset known (read or own, contiguous)
        self._locks: dict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.foreign_records = 0  # records found in our changelog partitions that we did not write
        self.reasserted = 0  # states written again so that they stay the newest record of their key

    @property
    def topic(self) -> str:
        return self.table.changelog_topic_name

    def forget_partitions(self) -> None:
        """A rebalance: what we knew of changelog ends is re-read from the store after recovery."""
        self._end.clear()

    def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        return self.table.data._db_for_partition(partition)[keys]

    def _known_end(self, partition: int) -> int:
        if partition not in self._end:
            off = self.table.data.persisted_offset(TP(self.topic, partition))
            self._end[partition] = -1 if off is None else int(off)
        return self._end[partition]

    async def put_many(self, partition: int, items: dict[bytes, bytes | None]) -> None:
        """Changelog first (awaited), then the local store; the persisted offset only over contiguous records."""
        if not items:
            return
        async with self._locks[partition]:
            hole, newer = await self._send_and_write(partition, items)
            if newer:
                # A batch computed before a rebalance landed after the recovery that brought newer states of
                # its users (a worker resumed from a pause, a finish still in flight): the store keeps the
                # newer ones, and they are written again so that each stays the last record of its key.
                self.reasserted += len(newer)
                log.warning("changelog %s[%d]: %d states older than the stored ones were written (a batch from "
                            "before a rebalance); the stored ones written again", self.topic, partition, len(newer))
                hole = (await self._send_and_write(partition, newer))[0] or hole
        if hole:
            await self.repair(partition)

    async def _send_and_write(self, partition: int, items: dict[bytes, bytes | None]) -> tuple[bool, dict]:
        """Send, then write locally what is not older than the local state: (a hole before our records, per key
        the local state that is newer than the one sent)."""
        sent = await send_records(self.app, self.topic, partition, list(items.items()))
        metas = [await fut for fut, _n in sent]
        counts = [n for _fut, n in sent]
        db = self.table.data._db_for_partition(partition)
        newer: dict[bytes, bytes | None] = {}
        if self.table.data.merge_by_offset:
            items, newer = split_by_offset(db, items)
        write_local(db, items)
        end, hole = self._known_end(partition), False
        for meta, count in zip(metas, counts, strict=True):
            if meta.offset != end + 1:
                hole = True
                break
            end = meta.offset + count - 1
        if not hole:
            self._end[partition] = end
            self.table.data.set_persisted_offset(TP(self.topic, partition), end)
        return hole, newer

    async def check_foreign(self) -> int:
        """Compare each owned changelog partition's log end with what we know of it; repair where it is ahead."""
        consumer = self.app.consumer
        # Every changelog partition of ours, also one we have not written since the rebalance: a paused
        # worker may have written into it, and no write of ours would notice.
        tps = [tp for tp in consumer.assignment() if tp.topic == self.topic]
        if not tps:
            return 0
        ends = await asyncio.wait_for(consumer.highwaters(*tps), timeout=10.0)
        repaired = 0
        for tp, hw in ends.items():
            if self._locks[tp.partition].locked():
                continue  # a write of ours is in flight: its own landing offsets will tell a hole
            if hw is not None and hw - 1 > self._known_end(tp.partition):
                repaired += await self.repair(tp.partition)
        return repaired

    async def repair(self, partition: int) -> int:
        """Read the changelog past what we know (rule 3), merge newer states in, re-assert ours where newer."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        async with self._locks[partition]:
            start = self._known_end(partition) + 1
            tp = TopicPartition(self.topic, partition)
            reader = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None,
                                      **self.security)
            await reader.start()
            try:
                reader.assign([tp])
                end = (await reader.end_offsets([tp]))[tp]
                newest: dict[bytes, bytes | None] = {}  # per key: the state with the newest event in the range
                last: dict[bytes, bytes | None] = {}  # per key: its last record (what compaction would keep)
                if end > start:
                    reader.seek(tp, start)
                    while await reader.position(tp) < end:
                        for recs in (await reader.getmany(tp, timeout_ms=1000)).values():
                            for r in recs:
                                if r.offset >= end or r.key is None:
                                    continue
                                last[r.key] = r.value
                                if r.value is None or r.key not in newest or \
                                        event_offset(r.value) >= event_offset(newest[r.key]):
                                    newest[r.key] = r.value
            finally:
                await reader.stop()
            keys = list(last)
            local = self.get_many(partition, keys) if keys else []
            adopt, again = {}, {}
            for key, mine in zip(keys, local, strict=True):
                if last[key] is None or newest[key] is None:
                    continue  # a tombstone: the user was forgotten; the log says so already
                best = newest[key] if mine is None or event_offset(newest[key]) > event_offset(mine) else mine
                if best is not mine:
                    adopt[key] = best
                if last[key] != best:
                    again[key] = best  # the key's last record is older than the newest state: write it again
            self.foreign_records += end - start if end > start else 0
            if adopt:
                write_local(self.table.data._db_for_partition(partition), adopt)
            self._end[partition] = end - 1
            self.table.data.set_persisted_offset(TP(self.topic, partition), end - 1)
            if again:
                self.reasserted += len(again)
                log.warning("changelog %s[%d]: %d records not written by this worker in offsets %d..%d; %d keys "
                            "ended on an older state than the newest, written again (adopted %d newer)",
                            self.topic, partition, end - start, start, end - 1, len(again), len(adopt))
                await self._send_and_write(partition, again)
            elif end > start:
                log.info("changelog %s[%d]: %d records not written by this worker in offsets %d..%d (adopted %d "
                         "newer states, none older than ours)", self.topic, partition, end - start, start, end - 1,
                         len(adopt))
            return len(again)
