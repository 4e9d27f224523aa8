"""Reference stream processors for `lsti bench stream`, run as their own processes on the same broker
and input topic as the LSTI worker:

- `aiokafka`: the ceiling of the stack: a plain aiokafka loop that consumes in batches, decodes each
  record and produces one record per event (batched by the producer, no Faust); the denominator of
  every ratio `lsti bench stream` reports, so it stays as it is;
- `aiokafka-batched`: the same loop producing each partition's outputs as whole record batches
  (`create_batch` / `send_batch`, as the worker's `send_records` does): a second, harder ceiling;
- `faust`: the floor of Faust: a trivial agent that awaits one send per event;
- `faust-batch-table`: Faust on the worker's batch path (`BatchApp`, one event per fetched partition
  batch) with the worker's fenced RocksDB table: per batch, decode every record, one table read and one
  table write per user, outputs as record batches (delivery awaited), then the range ack. Everything
  the worker does around its model, without the model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys


async def _relay_clients(bootstrap: str, src: str, group: str):
    """The two aiokafka loops' clients, started: the same settings for both, so only the sending differs."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    consumer = AIOKafkaConsumer(src, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
                                enable_auto_commit=True, max_poll_records=2000)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=256 * 1024, acks=1)
    await consumer.start()
    await producer.start()
    return consumer, producer


async def aiokafka_loop(bootstrap: str, src: str, dst: str, group: str, n: int) -> None:
    consumer, producer = await _relay_clients(bootstrap, src, group)
    done = 0
    try:
        while done < n:
            batches = await consumer.getmany(timeout_ms=100, max_records=2000)
            for records in batches.values():
                for msg in records:
                    ev = json.loads(msg.value)
                    out = json.dumps({"user_id": ev["user_id"], "event_id": ev["event_id"], "ts": ev["ts"]}).encode()
                    await producer.send(dst, value=out, key=msg.key)
                done += len(records)
        await producer.flush()
    finally:
        await producer.stop()
        await consumer.stop()


async def aiokafka_batched_loop(bootstrap: str, src: str, dst: str, group: str, n: int) -> None:
    """`aiokafka_loop`, but each fetched partition's outputs go out as record batches to the same partition."""
    consumer, producer = await _relay_clients(bootstrap, src, group)
    done, pending = 0, []
    try:
        while done < n:
            batches = await consumer.getmany(timeout_ms=100, max_records=2000)
            for tp, records in batches.items():
                batch = producer.create_batch()
                for msg in records:
                    ev = json.loads(msg.value)
                    out = json.dumps({"user_id": ev["user_id"], "event_id": ev["event_id"], "ts": ev["ts"]}).encode()
                    if batch.append(key=msg.key, value=out, timestamp=None) is None:
                        pending.append(await producer.send_batch(batch, dst, partition=tp.partition))
                        batch = producer.create_batch()
                        batch.append(key=msg.key, value=out, timestamp=None)
                if batch.record_count():
                    pending.append(await producer.send_batch(batch, dst, partition=tp.partition))
                done += len(records)
            pending = [f for f in pending if not f.done()]  # like the plain loop: delivery not awaited per batch
        for fut in pending:
            await fut
    finally:
        await producer.stop()
        await consumer.stop()


def faust_trivial(bootstrap: str, src: str, dst: str, group: str, datadir: str, web_port: int) -> None:
    import faust

    app = faust.App(group, broker=f"kafka://{bootstrap}", datadir=datadir, consumer_auto_offset_reset="earliest",
                    topic_partitions=4, topic_replication_factor=1, broker_session_timeout=3,
                    web_port=web_port, web_bind="127.0.0.1", web_host="127.0.0.1", producer_linger_ms=5)
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    src_t, dst_t = app.topic(src, **raw), app.topic(dst, **raw)

    @app.agent(src_t)
    async def relay(stream):
        async for event in stream.events():
            ev = json.loads(event.value)
            out = json.dumps({"user_id": ev["user_id"], "event_id": ev["event_id"], "ts": ev["ts"]}).encode()
            await dst_t.send(key=event.key, value=out)

    faust.Worker(app, loglevel="info", quiet=True, redirect_stdouts=False).execute_from_commandline()


def faust_batch_table(bootstrap: str, src: str, dst: str, group: str, datadir: str, web_port: int,
                      state_bytes: int = 664, batch_max: int = 500) -> None:
    """The worker's app settings, batch path, table and pipelined finishes (`streams/worker/app.py`), with no
    model."""
    import faust

    from streams.config import WorkerSettings
    from streams.worker.batches import BatchApp, ack_batch, send_records
    from streams.worker.finishes import Finishes, drop_written
    from streams.worker.state_store import OFFSET_AT, OFFSET_POS, BatchedTable, FencedTable

    app = BatchApp(group, broker=f"kafka://{bootstrap}", store="rocksdb://", datadir=datadir,
                   topic_partitions=4, topic_replication_factor=1, consumer_auto_offset_reset="earliest",
                   broker_session_timeout=10.0, broker_heartbeat_interval=1.0, broker_max_poll_records=batch_max,
                   producer_linger_ms=WorkerSettings.producer_linger_ms, producer_max_batch_size=512 * 1024,
                   stream_buffer_maxsize=WorkerSettings.stream_buffer,
                   web_port=web_port, web_bind="127.0.0.1", web_host="127.0.0.1", table_standby_replicas=0,
                   stream_wait_empty=False)
    app.batch_topics = frozenset({src})
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    src_t = app.topic(src, partitions=4, **raw)
    table = app.tables.add(FencedTable(app, name="state", merge_by_offset=True, partitions=4, key_type=bytes,
                                       value_type=bytes, beacon=app.tables.beacon))
    states = BatchedTable(app, table, {}, bootstrap)

    async def forget_changelog_ends(sender, partitions, **kwargs):
        states.forget_partitions()

    app.on_partitions_revoked.connect(forget_changelog_ends)
    blank = bytes(max(state_bytes, OFFSET_POS + 8))  # a state the size of the worker's (dim 64, float32)

    finishes = Finishes()  # the worker's pipelining: a partition's finishes chained in order, bounded
    pending: dict[int, dict[bytes, bytes]] = {}  # states computed, not yet in RocksDB (the worker's overlay)

    async def finish(event, part: int, prev, sent: list, new: dict) -> None:
        if prev is not None:
            await prev
        for fut, _n in sent:
            await fut
        await states.put_many(part, new)
        drop_written(pending[part], new)
        await ack_batch(event)

    @app.agent(src_t)
    async def relay(stream):
        async for event in stream.noack().events():
            msg = event.message
            part, outs, last = msg.partition, [], {}
            for r in msg.records:
                ev = json.loads(r.value)
                outs.append((r.key, json.dumps({"user_id": ev["user_id"], "event_id": ev["event_id"],
                                                "ts": ev["ts"]}).encode()))
                last[ev["user_id"].encode()] = r.offset
            keys = list(last)
            overlay = pending.setdefault(part, {})
            new = {}
            for key, old in zip(keys, states.get_many(part, keys), strict=True):
                old = overlay.get(key, old)
                value = bytearray(old if old is not None and len(old) == len(blank) else blank)
                OFFSET_AT.pack_into(value, OFFSET_POS, last[key])  # the newest event applied, as the worker's
                new[key] = bytes(value)
            if msg.generation_id != app.consumer_generation_id:
                continue
            sent = await send_records(app, dst, part, outs)
            overlay.update(new)
            await finishes.submit(part, lambda prev, e=event, p=part, s=sent, n=new: finish(e, p, prev, s, n))

    faust.Worker(app, loglevel="info", quiet=True, redirect_stdouts=False).execute_from_commandline()


async def paced_publisher(bootstrap: str, dst: str, rate: float, seconds: float, start: int, n_users: int,
                          n_items: int) -> None:
    """The latency run's publisher, in its own process (aiokafka, no batching delay): each event is stamped
    with the time it is handed to the client, so latency = answer's broker time - that stamp."""
    from aiokafka import AIOKafkaProducer

    from streams.bench.stream import _messages, zipf_stream

    m = int(rate * seconds)
    users, items, types = zipf_stream(m, n_users, n_items, seed=1)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
    await producer.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        for j, (u, i, ty) in enumerate(zip(users, items, types, strict=True)):
            key, value = next(_messages([u], [i], [ty], start + j))
            await producer.send(dst, key=key, value=value)
            ahead = (j + 1) / rate - (loop.time() - t0)
            if ahead > 0.001:
                await asyncio.sleep(ahead)
        await producer.flush()
    finally:
        await producer.stop()
    print(json.dumps({"published": m, "seconds": loop.time() - t0}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("kind", choices=["aiokafka", "aiokafka-batched", "faust", "faust-batch-table", "publish"])
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--src", default="")
    p.add_argument("--dst", required=True)
    p.add_argument("--group", default="")
    p.add_argument("-n", type=int, default=10**12)
    p.add_argument("--datadir", default="/tmp/lsti-bench-faust")
    p.add_argument("--web-port", type=int, default=0)
    p.add_argument("--state-bytes", type=int, default=664, help="faust-batch-table: bytes per user state")
    p.add_argument("--batch-max", type=int, default=500, help="faust-batch-table: records per fetch")
    a = p.parse_args(argv)
    if a.kind == "aiokafka":
        asyncio.run(aiokafka_loop(a.bootstrap, a.src, a.dst, a.group, a.n))
        print("Ready", flush=True)
    elif a.kind == "aiokafka-batched":
        asyncio.run(aiokafka_batched_loop(a.bootstrap, a.src, a.dst, a.group, a.n))
        print("Ready", flush=True)
    elif a.kind == "publish":
        asyncio.run(paced_publisher(a.bootstrap, a.dst, a.rate, a.seconds, a.start, a.users, a.items))
    elif a.kind == "faust-batch-table":
        faust_batch_table(a.bootstrap, a.src, a.dst, a.group, a.datadir, a.web_port, a.state_bytes, a.batch_max)
    else:
        faust_trivial(a.bootstrap, a.src, a.dst, a.group, a.datadir, a.web_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
