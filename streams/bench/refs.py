"""Reference stream processors for `lsti bench stream`, run as their own processes on the same broker
and input topic as the LSTI worker:

- `aiokafka`: the ceiling of the stack: a plain aiokafka loop that consumes in batches, decodes each
  record and produces one record per event (batched by the producer, no Faust);
- `faust`: the floor of Faust: a trivial agent that awaits one send per event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys


async def aiokafka_loop(bootstrap: str, src: str, dst: str, group: str, n: int) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    consumer = AIOKafkaConsumer(src, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
                                enable_auto_commit=True, max_poll_records=2000)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=256 * 1024, acks=1)
    await consumer.start()
    await producer.start()
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("kind", choices=["aiokafka", "faust"])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("-n", type=int, default=10**12)
    p.add_argument("--datadir", default="/tmp/lsti-bench-faust")
    p.add_argument("--web-port", type=int, default=0)
    a = p.parse_args(argv)
    if a.kind == "aiokafka":
        asyncio.run(aiokafka_loop(a.bootstrap, a.src, a.dst, a.group, a.n))
        print("Ready", flush=True)
    else:
        faust_trivial(a.bootstrap, a.src, a.dst, a.group, a.datadir, a.web_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
