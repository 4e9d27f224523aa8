"""Integration test of the embedded Apache Kafka broker (streams/kafka/broker.py).

Why these checks: produce/consume proves the broker works for clients; ``end_offsets`` guards against
brokers whose ListOffsets answer is wrong (Faust relies on it for changelog recovery); the restart on the
same data dir proves data, cluster id and ports survive a clean stop.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from streams.kafka.broker import EmbeddedKafka, find_running_broker

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("java") is None, reason="needs a JDK (java) to run the Kafka broker"),
]

N = 1000
TOPIC = "lsti-test-broker"


def _create_topic(bootstrap: str) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        admin.create_topics([NewTopic(TOPIC, num_partitions=1, replication_factor=1)], timeout_ms=10_000)
    finally:
        admin.close()


def _produce(bootstrap: str) -> None:
    from kafka import KafkaProducer

    # linger + large batch: the 1000 records leave in one batched produce request
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=2000, batch_size=1 << 20, acks="all", compression_type=None
    )
    try:
        for i in range(N):
            producer.send(TOPIC, key=str(i).encode(), value=json.dumps({"i": i}).encode())
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)


def _end_offset_and_records(bootstrap: str) -> tuple[int, list[tuple[bytes, bytes]]]:
    from kafka import KafkaConsumer, TopicPartition

    tp = TopicPartition(TOPIC, 0)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=20_000)
    try:
        end = consumer.end_offsets([tp], timeout_ms=10_000)[tp]
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        records: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + 20
        while len(records) < N and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=1000).values():
                records.extend((r.key, r.value) for r in batch)
        return end, records
    finally:
        consumer.close()


def _check(records: list[tuple[bytes, bytes]]) -> None:
    assert len(records) == N
    assert records[0] == (b"0", b'{"i": 0}')
    assert [int(k) for k, _ in records] == list(range(N))
    assert json.loads(records[-1][1]) == {"i": N - 1}


def test_embedded_broker_produce_consume_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "kafka"
    broker = EmbeddedKafka(data_dir, heap_mb=256)
    try:
        t0 = time.monotonic()
        bootstrap = broker.start(timeout=60)
        first_start = time.monotonic() - t0
        assert bootstrap == broker.bootstrap and bootstrap.startswith("127.0.0.1:")
        assert broker.alive() and broker.pid is not None
        assert find_running_broker(data_dir) == bootstrap
        state = json.loads((data_dir / "broker.json").read_text())
        assert state["pid"] == broker.pid and state["bootstrap"] == bootstrap

        _create_topic(bootstrap)
        _produce(bootstrap)
        end, records = _end_offset_and_records(bootstrap)
        assert end == N
        _check(records)

        broker.stop()
        assert not broker.alive() and broker.pid is None
        assert find_running_broker(data_dir) is None
        assert "pid" not in json.loads((data_dir / "broker.json").read_text())
        cluster_id = (data_dir / "cluster.id").read_text()

        t0 = time.monotonic()
        again = broker.start(timeout=60)
        restart = time.monotonic() - t0
        assert again == bootstrap  # the same port is reused when still free
        assert (data_dir / "cluster.id").read_text() == cluster_id
        end, records = _end_offset_and_records(again)
        assert end == N
        _check(records)
        print(f"embedded Kafka {broker.version}: first start {first_start:.1f}s, restart {restart:.1f}s")
    finally:
        broker.stop()
    assert not broker.alive()
