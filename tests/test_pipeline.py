"""End to end on real parts: Apache Kafka over TCP, a real Faust worker process with RocksDB tables,
the real BERT-built artifact and FAISS index. Nothing is mocked here."""

from __future__ import annotations

import base64
import json
import time
import urllib.request

import pytest

from streams.config import Topics
from streams.contracts.events import event_json
from streams.kafka.tools import TopicReader, ensure_topics, publish_raw

pytestmark = pytest.mark.integration
K = 10


def _events(n: int, users: int = 12, items: int = 50):
    out = []
    for j in range(n):
        uid = f"u{j % users}"
        out.append((uid.encode(), event_json(f"e{j}", uid, f"i{(j * 7) % items}", "view", 1_600_000_000 + j)))
    return out


def _wait(reader: TopicReader, n: int, timeout: float = 60.0) -> list[dict]:
    return [json.loads(v) for _, v in _wait_raw(reader, n, timeout)]


def _metrics(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.loads(r.read())


def _answered(kafka, start_worker, namespace, n: int, extra_env: dict | None = None):
    """Start a worker, publish `n` events, wait for their `n` recommendations: (worker, sent, got)."""
    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 4, topics)
    worker = start_worker(extra_env=extra_env)
    recs = TopicReader(kafka, topics.recommendations)
    recs.start()
    sent = _events(n)
    publish_raw(kafka, sent, topics.events)
    got = _wait(recs, len(sent))
    recs.stop_flag.set()
    return worker, sent, got


def test_n_events_give_n_recommendations(kafka, start_worker, namespace):
    worker, sent, got = _answered(kafka, start_worker, namespace, 300)
    assert len(got) == len(sent)
    assert sorted(r["event_id"] for r in got) == sorted(f"e{j}" for j in range(len(sent)))
    by_event = {f"e{j}": key.decode() for j, (key, _) in enumerate(sent)}
    for r in got:
        assert r["user_id"] == by_event[r["event_id"]]
        assert len(r["items"]) == K
        assert len({it["item_id"] for it in r["items"]}) == K
        assert 0.0 <= r["gate"] <= 1.0
        assert r["model_version"] == "tiny-v1"
    # The user's recent items are never recommended back.
    last_items = {}
    for _key, value in sent:
        ev = json.loads(value)
        last_items.setdefault(ev["user_id"], []).append(ev["item_id"])
    for r in got:
        recent_before = last_items[r["user_id"]][: int(r["event_id"][1:]) // 12 + 1][-3:]
        assert not set(recent_before) & {it["item_id"] for it in r["items"]}
    m = _metrics(worker.web_port)
    assert m["consumed"] == m["applied"] == len(sent)
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.web_port}/metrics", timeout=5) as r:
        prom = r.read().decode()
    assert f"lsti_events_applied_total {len(sent)}" in prom
    assert "lsti_event_latency_ms_bucket" in prom and "lsti_consumer_lag" in prom


def test_bad_events_are_dead_lettered_and_the_worker_keeps_going(kafka, start_worker, namespace):
    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 4, topics)
    worker = start_worker()
    recs, dlq = TopicReader(kafka, topics.recommendations), TopicReader(kafka, topics.dlq)
    recs.start()
    dlq.start()
    good = _events(40)
    bad = [
        (b"u1", b"{not json"),
        (b"u1", b'{"event_id":"b2","user_id":"u1","item_id":"i1","event_type":"like","ts":1600000000}'),
        (b"u1", b'{"event_id":"b3","user_id":"u1","item_id":"no-such-item","event_type":"view","ts":1600000000}'),
        (b"u1", b'{"event_id":"b4","user_id":"u1","event_type":"view","ts":1600000000}'),
        (b"u2", b'{"event_id":"b5","user_id":"u1","item_id":"i1","event_type":"view","ts":1600000000}'),
    ]
    publish_raw(kafka, good[:20] + bad + good[20:], topics.events)
    got = _wait(recs, len(good))
    dead = [json.loads(v) for _, v in _wait_raw(dlq, len(bad))]
    recs.stop_flag.set()
    dlq.stop_flag.set()
    assert len(got) == len(good)
    reasons = sorted(d["reason"] for d in dead)
    assert len(dead) == len(bad)
    assert any(r.startswith("malformed JSON") for r in reasons)
    assert any("unknown event_type 'like'" in r for r in reasons)
    assert any("unknown item_id 'no-such-item'" in r for r in reasons)
    assert any("missing field 'item_id'" in r for r in reasons)
    assert any("key does not match" in r for r in reasons)
    originals = {base64.b64decode(d["original_b64"]) for d in dead}
    assert originals == {v for _, v in bad}
    assert all(d["topic"] == topics.events and d["offset"] >= 0 for d in dead)
    m = _metrics(worker.web_port)
    assert m["consumed"] == m["applied"] + m["duplicates"] + m["dead_lettered"] == len(good) + len(bad)


def _wait_raw(reader: TopicReader, n: int, timeout: float = 60.0):
    deadline = time.time() + timeout
    while len(reader.records) < n and time.time() < deadline:
        time.sleep(0.1)
    return list(reader.records)


def test_exactly_once_is_refused_with_a_clear_error(kafka, tiny_artifact, tmp_path, namespace):
    """Faust's exactly_once crashed on a paused worker (ProducerFenced, then a ConsistencyError in recovery);
    the option is gone: asking for it stops the worker at start with a one-line reason."""
    from streams.worker.process import WorkerProcess

    w = WorkerProcess(kafka, tiny_artifact, tmp_path / "eos", log_path=tmp_path / "eos.log",
                      extra=["--app-id", namespace["app_id"], "--topic-prefix", namespace["prefix"]],
                      env={"LSTI_PROCESSING_GUARANTEE": "exactly_once"}).start()
    assert w.proc.wait(120) != 0
    assert "processing guarantee 'exactly_once' is not supported" in w.log_text()
