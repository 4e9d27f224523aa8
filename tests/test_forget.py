"""Forget a user (privacy): `lsti forget` on real workers, a real broker and its log cleaner.

After the request the user's short-term state and long-term vector are tombstoned in both changelogs;
once the broker compacts them (forced here with tiny segment and retention settings) no record keyed by
the user is left in either. The user's next event then starts a fresh state: its answer equals a brand
new user's answer to the same event.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

from test_faults import changelog_records, health, make_stream, unique_events, wait_progress

from streams.config import REPO, Topics
from streams.contracts.vectors import encode_vector
from streams.kafka.tools import TopicReader, ensure_topics, producer, publish_raw

FORGET = ["u3", "u7"]
COMPACT_NOW = {"segment.ms": "300", "min.cleanable.dirty.ratio": "0.001", "delete.retention.ms": "0",
               "min.compaction.lag.ms": "0", "max.compaction.lag.ms": "1000"}


def compact_fast(kafka: str, topics: list[str]) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType

    admin = KafkaAdminClient(bootstrap_servers=kafka)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, t, configs=COMPACT_NOW) for t in topics])
    finally:
        admin.close()


def event(user: str, item: str, ts: float, eid: str) -> tuple[bytes, bytes]:
    value = {"user_id": user, "item_id": item, "event_type": "click", "ts": ts, "event_id": eid}
    return user.encode(), json.dumps(value).encode()


def test_forgotten_users_leave_no_record_after_compaction_and_start_fresh(kafka, start_worker, namespace,
                                                                         tiny_artifact):
    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 2, topics)
    app = namespace["app_id"]
    short_cl, long_cl = f"{app}-short-term-changelog", f"{app}-long-term-changelog"
    msgs, _ = make_stream(n_users=20, n_events=600, seed=4)
    recs = TopicReader(kafka, topics.recommendations)
    recs.start()
    worker = start_worker()
    dim = 16
    publish_raw(kafka, [(u.encode(), encode_vector([0.1] * dim)) for u in FORGET + ["u1"]], topics.long_term)
    publish_raw(kafka, msgs, topics.events)
    wait_progress(lambda: len(unique_events(recs)), len(msgs), "every event to be recommended on")
    wait_progress(lambda: health(worker.web_port)["long_term_loaded"], 3, "the long-term vectors to be stored")
    compact_fast(kafka, [short_cl, long_cl])

    def keyed(users) -> int:
        """Records keyed by these users in both changelogs (states, vectors and tombstones alike)."""
        keys = {u.encode() for u in users}
        return sum(len(v) for cl in (short_cl, long_cl) for k, v in changelog_records(kafka, cl).items() if k in keys)

    assert keyed(FORGET) > 0
    out = subprocess.run([sys.executable, "-m", "streams.cli", "forget", *FORGET, "--bootstrap", kafka,
                          "--topic-prefix", namespace["prefix"]], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "forget 2 users" in out.stderr
    wait_progress(lambda: health(worker.web_port)["forgotten"], len(FORGET), "the worker to forget the users")
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.web_port}/users/u3/recommendations") as r:
        assert json.loads(r.read())["source"] == "popularity", "a forgotten user is a new user on demand too"

    # Keep the logs moving (other users' events roll segments, long-term records too) until compaction has
    # removed every record keyed by a forgotten user, tombstones included.
    prod = producer(kafka)
    wave = [0]

    def records_left() -> int:
        wave[0] += 1
        for j in range(20):
            key, value = event(f"u{10 + j % 8}", f"i{j % 40 + 1}", 1_700_000_000 + wave[0], f"w{wave[0]}-{j}")
            prod.send(topics.events, key=key, value=value)
        prod.send(topics.long_term, key=b"u1", value=encode_vector([0.1 + wave[0] * 1e-3] * dim))
        prod.flush()
        return -keyed(FORGET)

    wait_progress(records_left, 0, "the forgotten users' records to be compacted away", poll=1.0)
    assert keyed(["u1", "u10"]) > 0, "compaction keeps the other users"

    # The next event of a forgotten user starts afresh: the same answer as a new user's to the same event.
    n0 = len(unique_events(recs))
    publish_raw(kafka, [event("u3", "i5", 1_750_000_000, "again-1"), event("fresh-1", "i5", 1_750_000_000, "new-1")],
                topics.events)
    wait_progress(lambda: len(unique_events(recs)) - n0, 2, "the two answers")
    answers = {json.loads(v)["event_id"]: json.loads(v) for _, v in list(recs.records)}
    again, new = answers["again-1"], answers["new-1"]
    assert (again["items"], again["gate"]) == (new["items"], new["gate"])
    prod.close()
    recs.stop_flag.set()


def test_the_nightly_step_leaves_out_forgotten_histories():
    import numpy as np

    from encoders.data import Interactions
    from streams.batch.nightly import without_forgotten

    data = Interactions(users=np.array([0, 0, 0, 1, 1]), items=np.array([1, 2, 1, 2, 1]),
                        etypes=np.ones(5, np.int64), ts=np.array([10.0, 20.0, 30.0, 10.0, 20.0]),
                        user_ids=["u0", "u1"], item_ids=["", "a", "b"], item_texts=["", "A", "B"], name="t",
                        source={})
    out = without_forgotten(data, {"u0": 20.0, "nobody": 5.0})
    assert out.users.tolist() == [0, 1, 1] and out.ts.tolist() == [30.0, 10.0, 20.0]
    assert without_forgotten(data, {}) is data
