"""Recommendations on demand: GET /users/{id}/recommendations on real workers (real broker, RocksDB, FAISS).

The answer must come from the user's stored state, from whichever worker is asked (Faust routes it to
the owner of the user's partition), and equal what the model computes offline from the same state.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from test_faults import changelog_records, health, make_stream, unique_events, wait_progress

from streams.artifacts import load_artifact
from streams.config import Topics
from streams.kafka.tools import TopicReader, ensure_topics, publish_raw
from streams.worker.recommender import Recommender
from streams.worker.state_store import event_offset

AT = 1_700_000_000.0  # a fixed "now": the gap since the last event is part of the fusion


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_any_worker_answers_for_any_user_from_the_stored_state(kafka, start_worker, namespace, tiny_artifact):
    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 4, topics)
    msgs, _per_user = make_stream(n_users=40, n_events=1_200, seed=3)
    recs = TopicReader(kafka, topics.recommendations)
    recs.start()
    # Explanations on: the stream's answers and the HTTP ones name the recent event behind each item.
    w1, w2 = (start_worker(n, extra_env={"LSTI_EXPLAIN": "1"}) for n in ("w1", "w2"))
    publish_raw(kafka, msgs, topics.events)
    wait_progress(lambda: len(unique_events(recs)), len(msgs), "every event to be recommended on")

    def split() -> int:  # both workers own partitions, all four owned once: requests must be routed
        owned = [health(w.web_port)["partitions"] for w in (w1, w2)]
        return int(all(owned) and sorted(owned[0] + owned[1]) == [0, 1, 2, 3])

    wait_progress(split, 1, "the two workers to share the partitions")
    # The changelog holds every state once answers are out; the newest per user is what the owner serves.
    wait_progress(lambda: len(changelog_records(kafka, f"{namespace['app_id']}-short-term-changelog")), 40,
                  "every user's state in the changelog")
    stored = {k.decode(): max(v, key=event_offset)
              for k, v in changelog_records(kafka, f"{namespace['app_id']}-short-term-changelog").items()}
    offline = Recommender(load_artifact(tiny_artifact), explain=True)
    streamed = [json.loads(v) for _, v in list(recs.records)]
    assert all("because" in i for r in streamed for i in r["items"]), "stream answers explain each item"
    users = sorted(stored)[:12]
    for user in users:
        want = offline.recommend_user(user, stored[user], None, k=7, now=AT, explain=True)
        answers = [get(w.web_port, f"/users/{user}/recommendations?k=7&at={AT}&explain=1") for w in (w1, w2)]
        for status, got in answers:
            assert status == 200, got
            assert got["source"] == "state" and got["model_version"] == "tiny-v1"
            assert got["items"] == want["items"] and got["gate"] == want["gate"], (user, got, want)
        recent = offline.codec.decode([stored[user]]).recent[0]
        recent_ids = {offline.item_ids[c] for c in recent if c > 0}
        assert not recent_ids & {i["item_id"] for i in answers[0][1]["items"]}, "a recent item was recommended"
    served = health(w1.web_port)["http_requests"] + health(w2.web_port)["http_requests"]
    assert served == 2 * len(users), "each request is answered once, by the owner"

    status, new = get(w1.web_port, "/users/nobody-yet/recommendations?k=5")
    pop = offline.artifact.popularity
    assert status == 200 and new["source"] == "popularity" and new["gate"] is None
    assert [i["item_id"] for i in new["items"]] == [offline.item_ids[c] for c in sorted(
        range(1, len(pop)), key=lambda c: (-pop[c], c))[:5]]
    assert get(w2.web_port, "/users/u1/recommendations?k=0")[0] == 400
    assert get(w2.web_port, "/users/u1/recommendations?k=x")[0] == 400
    recs.stop_flag.set()
