"""Model versions swap live without losing events; bad artifacts are refused; new items on the `items`
topic become recommendable within seconds. Real broker, real worker process."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
from test_faults import health, make_stream, unique_events, wait_progress, wait_until

from streams.artifacts import load_artifact, write_artifact
from streams.config import Topics
from streams.kafka.tools import TopicReader, ensure_topics, producer, publish_raw

pytestmark = pytest.mark.integration


def _new_version(src, version: str):
    art = load_artifact(src)
    users, longs = art.long_term()
    return write_artifact(src.parent, version, art.model, art.item_ids, art.index, users, longs,
                          {"weights_version": art.weights_version, "parent": art.version})


def test_live_swap_refuses_bad_artifacts_and_adds_items(kafka, start_worker, namespace, tiny_artifact):
    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 4, topics)
    v2 = _new_version(tiny_artifact, f"tiny-v2-{namespace['app_id']}")
    bad = v2.parent / f"{v2.name}-corrupt"
    shutil.copytree(v2, bad)
    with open(bad / "index.faiss", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    recs = TopicReader(kafka, topics.recommendations)
    recs.start()
    worker = start_worker(extra=["-k", "45"])
    msgs, _ = make_stream(n_users=30, n_events=3_000, seed=7)

    def publish_steadily() -> None:
        prod = producer(kafka)
        for j, (k, v) in enumerate(msgs):
            prod.send(topics.events, key=k, value=v)
            if j % 100 == 99:
                prod.flush()
                time.sleep(0.1)
        prod.flush()
        prod.close()

    pub = threading.Thread(target=publish_steadily)
    pub.start()
    wait_until(lambda: len(recs.records) > 600, 60, "the stream to flow")
    control = {"version": v2.name, "path": str(v2), "weights_version": "x", "ts": time.time()}
    publish_raw(kafka, [(b"model", json.dumps(control).encode())], topics.model_versions)
    pub.join()
    wait_progress(lambda: len(unique_events(recs)), len(msgs), "every event answered")
    outs = [json.loads(v) for _, v in list(recs.records)]
    versions = [o["model_version"] for o in outs]
    assert versions[0] == "tiny-v1" and versions[-1] == v2.name, "the version did not change mid-stream"
    seen_new: set[str] = set()
    for o in outs:  # per user, once the new version answered, the old one never does again
        if o["model_version"] == v2.name:
            seen_new.add(o["user_id"])
        else:
            assert o["user_id"] not in seen_new
    assert health(worker.web_port)["swaps"] == 1

    publish_raw(kafka, [(b"model", json.dumps({"version": bad.name, "path": str(bad)}).encode())],
                topics.model_versions)
    wait_until(lambda: health(worker.web_port)["refused_versions"] == 1, 30, "the corrupt version refused")
    assert health(worker.web_port)["model_version"] == v2.name
    assert "checksum mismatch for index.faiss" in worker.tail(200)

    item = {"item_id": "brand-new", "text": "A space opera number 999 with starships"}
    t0 = time.time()
    publish_raw(kafka, [(b"brand-new", json.dumps(item).encode())], topics.items)
    wait_until(lambda: health(worker.web_port)["items_added"] == 1, 60, "the new item to be indexed")
    seconds_to_live = time.time() - t0
    before = len(recs.records)
    publish_raw(kafka, [(b"u1", json.dumps({"event_id": "after-new", "user_id": "u1", "item_id": "i3",
                                            "event_type": "view", "ts": 1_700_000_000}).encode())], topics.events)
    wait_until(lambda: len(recs.records) > before, 30, "a recommendation after the new item")
    last = json.loads(recs.records[-1][1])
    recs.stop_flag.set()
    assert "brand-new" in {it["item_id"] for it in last["items"]}
    assert seconds_to_live < 30
