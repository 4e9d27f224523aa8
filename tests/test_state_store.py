"""The fenced state store on its real parts: a Faust table on RocksDB files, its changelog on the real broker.

The case the worker-level pause test met once in CI (19,982 of 20,000 events in the settled states): a batch
computed before a rebalance is written after the recovery that brought its users' newer states (written by
the partition's owner meanwhile). Its local write must not take those states back: the next events would
be applied to the older state, and the events in between lost.
"""

from __future__ import annotations

import asyncio

import pytest
from test_faults import changelog_records

from streams.worker.state_store import OFFSET_AT, OFFSET_POS, BatchedTable, FencedTable, event_offset

pytestmark = pytest.mark.integration


def state(offset: int, tag: bytes) -> bytes:
    """A state value as the store sees it: the last applied event's offset in the header, then a body."""
    value = bytearray(OFFSET_POS + 8) + tag
    OFFSET_AT.pack_into(value, OFFSET_POS, offset)
    return bytes(value)


async def _late_batch(kafka: str, datadir: str, app_id: str) -> tuple[dict, dict, int]:
    from streams.worker.batches import BatchApp

    app = BatchApp(app_id, broker=f"kafka://{kafka}", store="rocksdb://", datadir=datadir, topic_partitions=1,
                   topic_replication_factor=1, producer_linger_ms=0)
    table = app.tables.add(FencedTable(app, name="short-term", merge_by_offset=True, partitions=1, key_type=bytes,
                                       value_type=bytes, beacon=app.tables.beacon))
    store = BatchedTable(app, table, {}, kafka)
    await table.changelog_topic.maybe_declare()  # starts the app's producer
    try:
        old, new = b"u-old", b"u-new"
        # The owner's newer states, as a recovery brings them into the store (newest event wins).
        await store.put_many(0, {old: state(100, b"before"), new: state(100, b"before")})
        await store.put_many(0, {old: state(200, b"owner"), new: state(200, b"owner")})
        # A batch computed from before the owner's work lands now: one user older, one genuinely newer.
        await store.put_many(0, {old: state(150, b"late"), new: state(250, b"late")})
        stored = dict(zip([old, new], store.get_many(0, [old, new]), strict=True))
        last = {key: records[-1] for key, records in changelog_records(kafka, store.topic).items()}
        return stored, last, store.reasserted
    finally:
        await app.producer.stop()


def test_a_late_batch_never_takes_a_stored_state_back(kafka, tmp_path, namespace):
    stored, last, reasserted = asyncio.run(_late_batch(kafka, str(tmp_path / "data"), namespace["app_id"]))
    # the store keeps the newer state where the late one is older, and takes the late one where it is newer
    assert stored[b"u-old"] == state(200, b"owner")
    assert stored[b"u-new"] == state(250, b"late")
    # the changelog ends on the newest state of every key, so compaction and a recovery keep it
    assert last[b"u-old"] == state(200, b"owner"), event_offset(last[b"u-old"])
    assert last[b"u-new"] == state(250, b"late")
    assert reasserted == 1
