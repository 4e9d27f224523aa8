"""Streaming correctness under faults, on real processes: SIGKILL mid-stream, failover between two
workers, fuzzed bad input, replaying a log twice. Each user's final state (read back from the table's
changelog topic in Kafka) is compared with an offline recomputation of applying each event once."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from encoders.data import EVENT_CODE
from streams.artifacts import load_artifact
from streams.config import REPO, Topics
from streams.contracts.events import event_json
from streams.kafka.tools import TopicReader, ensure_topics, producer, publish_raw
from streams.worker.state import RECENT, StateCodec, event_id_hash

pytestmark = pytest.mark.integration
TYPES = ["view", "view", "click", "cart", "fav", "buy"]


def make_stream(n_users: int, n_events: int, n_items: int = 50, seed: int = 0, t0: int = 1_600_000_000):
    """(key, value) messages in time order, and each user's events as (item, type, ts)."""
    rng = random.Random(seed)
    msgs, per_user = [], {}
    for j in range(n_events):
        uid = f"u{rng.randrange(n_users)}"
        item, etype, ts = f"i{rng.randrange(n_items)}", rng.choice(TYPES), t0 + j * 3
        msgs.append((uid.encode(), event_json(f"{seed}-{j}", uid, item, etype, ts)))
        per_user.setdefault(uid, []).append((item, etype, ts, f"{seed}-{j}"))
    return msgs, per_user


def offline_states(artifact_path, per_user: dict) -> dict[str, dict]:
    """Apply every user's events exactly once, one at a time, with the model alone (no Kafka)."""
    art = load_artifact(artifact_path)
    code = {iid: i for i, iid in enumerate(art.item_ids) if i}
    out = {}
    for uid, evs in per_user.items():
        h = np.zeros((1, art.online.dim), np.float32)
        c = np.zeros_like(h)
        last = None
        for item, etype, ts, _eid in evs:
            gap = np.array([0.0 if last is None else ts - last])
            h, c = art.online.step(h, c, np.array([code[item]]), np.array([EVENT_CODE[etype]]), gap,
                                   np.array([last is None]))
            last = ts
        ids = [event_id_hash(e[3]) for e in evs[-RECENT:]]
        items = [code[e[0]] for e in evs[-RECENT:]]
        out[uid] = {"count": len(evs), "last_ts": float(evs[-1][2]), "recent_ids": [0] * (RECENT - len(ids)) + ids,
                    "recent": [0] * (RECENT - len(items)) + items, "h": h[0], "c": c[0]}
    return out


def changelog_records(kafka: str, topic: str) -> dict[bytes, list[bytes | None]]:
    """Every record of a changelog per key, in log order (one partition per key)."""
    from kafka import KafkaConsumer, TopicPartition

    cons = KafkaConsumer(bootstrap_servers=kafka, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in (cons.partitions_for_topic(topic) or [])]
        cons.assign(tps)
        cons.seek_to_beginning(*tps)
        end = cons.end_offsets(tps)
        out: dict[bytes, list] = {}
        while any(cons.position(tp) < end[tp] for tp in tps):
            for batch in cons.poll(timeout_ms=500).values():
                for m in batch:
                    out.setdefault(m.key, []).append(m.value)
        return out
    finally:
        cons.close()


def table_states(kafka: str, app_id: str, artifact_path, last_must_be_newest: bool = True) -> dict[str, dict]:
    """Each user's state as the table defines it: the changelog record with the newest event offset
    (streams/worker/state_store.py). With `last_must_be_newest`, also the key's last record must be it
    (what compaction keeps): a zombie's older record must have been overwritten by the owner."""
    from streams.worker.state_store import event_offset

    art = load_artifact(artifact_path)
    codec = StateCodec(art.model.cfg.dim, art.weights_version)
    recs = changelog_records(kafka, f"{app_id}-short-term-changelog")
    keys = [k for k, vs in recs.items() if vs[-1] is not None]
    newest = [max(recs[k], key=event_offset) for k in keys]
    if last_must_be_newest:
        behind = [k for k, v in zip(keys, newest, strict=True) if recs[k][-1] != v]
        assert not behind, f"{len(behind)} keys whose last changelog record is not their newest state: {behind[:5]}"
    st = codec.decode(newest)
    assert st.reset == 0
    return {k.decode(): {"count": int(st.count[r]), "last_ts": float(st.last_ts[r]),
                         "recent_ids": st.recent_ids[r].tolist(), "recent": st.recent[r].tolist(),
                         "h": st.h[r], "c": st.c[r]} for r, k in enumerate(keys)}


def settled_states(kafka: str, app_id: str, artifact_path, n_events: int, idle: float = 60.0,
                   expected: dict[str, list] | None = None) -> dict[str, dict]:
    """Table states once the changelog holds every applied event and the owner repaired any foreign record;
    fails when neither moves for `idle` seconds (with `expected`, each user's events, saying which users
    fell short and the history of their changelog records)."""
    def progress():
        states = table_states(kafka, app_id, artifact_path, last_must_be_newest=False)
        return sum(s["count"] for s in states.values())

    try:
        wait_progress(progress, n_events, "the changelog to hold every applied event", idle=idle)
    except AssertionError as exc:
        if expected is None:
            raise
        raise AssertionError(f"{exc}\n{shortfall(kafka, app_id, artifact_path, expected)}") from None
    wait_progress(lambda: _repaired(kafka, app_id, artifact_path), 1, "stale changelog records to be overwritten",
                  idle=idle)
    return table_states(kafka, app_id, artifact_path)


def shortfall(kafka: str, app_id: str, artifact_path, expected: dict[str, list], show: int = 5) -> str:
    """Forensics of a state that holds fewer events than its user sent: per short user, its changelog records
    as (event offset, event count) in log order."""
    art = load_artifact(artifact_path)
    codec = StateCodec(art.model.cfg.dim, art.weights_version)
    counts = {u: s["count"] for u, s in table_states(kafka, app_id, artifact_path, last_must_be_newest=False).items()}
    short = {u: (len(evs), counts.get(u, 0)) for u, evs in expected.items() if counts.get(u, 0) < len(evs)}
    recs = changelog_records(kafka, f"{app_id}-short-term-changelog")
    lines = [f"{len(short)} users short (expected, got): {dict(list(short.items())[:20])}"]
    for u in list(short)[:show]:
        vals = [v for v in recs.get(u.encode(), []) if v is not None]
        st = codec.decode(vals) if vals else None
        hist = [] if st is None else list(zip(st.last_offset.tolist(), st.count.tolist(), strict=True))
        lines.append(f"  {u}: records (event offset, count) {hist}")
    return "\n".join(lines)


def _repaired(kafka: str, app_id: str, artifact_path) -> int:
    try:
        table_states(kafka, app_id, artifact_path)
        return 1
    except AssertionError:
        return 0


def assert_exactly_once(online: dict, offline: dict) -> None:
    """Exact, bit for bit: how many events each state holds, the last 10 event-id hashes and item codes, the
    last event time, and h and c (the LSTM kernel steps each event from its own inputs and its user's
    previous state in one fixed order, so the worker's batches and the one-at-a-time reference agree to the
    last bit: `tests/test_units.py::test_states_are_bit_identical_however_events_are_batched`)."""
    assert set(online) == set(offline)
    lost = {u: (offline[u]["count"], online[u]["count"]) for u in offline if online[u]["count"] < offline[u]["count"]}
    twice = {u: (offline[u]["count"], online[u]["count"]) for u in offline if online[u]["count"] > offline[u]["count"]}
    assert not lost, f"events lost for users (expected, got): {lost}"
    assert not twice, f"events applied twice for users (expected, got): {twice}"
    for u, want in offline.items():
        got = online[u]
        assert (got["recent_ids"], got["recent"], got["last_ts"]) == (want["recent_ids"], want["recent"],
                                                                     want["last_ts"]), u
        np.testing.assert_array_equal(got["h"], want["h"], err_msg=u)
        np.testing.assert_array_equal(got["c"], want["c"], err_msg=u)


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.loads(r.read())


def wait_progress(measure, target: int, what: str, idle: float = 90.0, poll: float = 0.2) -> None:
    """Wait until measure() >= target; fail only when it has not moved for `idle` seconds (a slow or loaded
    machine is slow, not wrong)."""
    last, since = None, time.time()
    while True:
        value = measure()
        if value >= target:
            return
        if value != last:
            last, since = value, time.time()
        elif time.time() - since > idle:
            raise AssertionError(f"no progress for {idle:.0f} s waiting for {what}: at {value} of {target}")
        time.sleep(poll)


def wait_until(pred, timeout: float, what: str) -> None:
    """For conditions with no count to follow (a log line); generous deadlines only."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def unique_events(reader: TopicReader) -> set[str]:
    return {json.loads(v)["event_id"] for _, v in list(reader.records)}


def test_sigkill_ten_times_loses_nothing_and_applies_nothing_twice(kafka, start_worker, namespace, tiny_artifact):
    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 4, topics)
    msgs, per_user = make_stream(n_users=300, n_events=20_000)
    recs = TopicReader(kafka, topics.recommendations)
    recs.start()
    # Small fetches: more batch boundaries inside a chunk, so a kill lands mid-stream even on a fast run.
    worker = start_worker(extra_env={"LSTI_BATCH_MAX": "25"})
    prod = producer(kafka)
    rng = random.Random(42)
    progress_at_kill = []  # (events answered, events published) at each kill
    chunk = len(msgs) // 10

    def consumed() -> int:
        try:
            return health(worker.web_port)["consumed"]
        except OSError:
            return 0

    for i in range(10):
        # Publish a chunk, let the worker get into it, then SIGKILL it at a random point. The trigger is the
        # worker's own count since its (re)start (no reader lag in between).
        for k, v in msgs[i * chunk : (i + 1) * chunk]:
            prod.send(topics.events, key=k, value=v)
        prod.flush()
        wait_progress(consumed, rng.randrange(25, chunk // 4), "the worker to get into the chunk", poll=0.001)
        worker.kill()
        time.sleep(1.0)  # the worker is dead: let the reader catch up before counting what it answered
        progress_at_kill.append((len(unique_events(recs)), (i + 1) * chunk))
        worker.start()
        worker.wait_ready()
    prod.close()
    wait_progress(lambda: len(unique_events(recs)), len(msgs), "every event to be recommended on")
    worker.stop()
    recs.stop_flag.set()
    mid_stream = [done for done, published in progress_at_kill if done < published]
    assert len(mid_stream) >= 8, f"kills did not land mid-stream (answered, published): {progress_at_kill}"
    online = table_states(kafka, namespace["app_id"], tiny_artifact)
    assert_exactly_once(online, offline_states(tiny_artifact, per_user))


@pytest.mark.parametrize("fault", ["LSTI_FAULT_DROP_FETCHED_AFTER", "LSTI_FAULT_SKIP_BATCH_AFTER"])
def test_a_lost_fetch_or_delivery_is_read_again(kafka, start_worker, namespace, tiny_artifact, fault):
    """Deterministic: once, a fetched run is dropped by the consumer (as for a partition paused mid-fetch),
    or a delivered batch is skipped before the agent applies it (as Faust's stream skips one while its flow
    control is off). The fetch position is past those records either way; the worker must notice the hole
    before the next batch of the partition and read it again, so every event is answered and applied once."""
    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 2, topics)
    msgs, per_user = make_stream(n_users=60, n_events=3_000, seed=5)
    recs = TopicReader(kafka, topics.recommendations)
    recs.start()
    worker = start_worker(extra_env={"LSTI_BATCH_MAX": "50", fault: "1000"})
    publish_raw(kafka, msgs, topics.events)
    wait_progress(lambda: len(unique_events(recs)), len(msgs), "every event to be recommended on")
    h = health(worker.web_port)
    worker.stop()
    recs.stop_flag.set()
    assert h["rereads"] == 1, h
    assert h["applied"] == len(msgs) and h["dead_lettered"] == 0, h
    online = table_states(kafka, namespace["app_id"], tiny_artifact)
    assert_exactly_once(online, offline_states(tiny_artifact, per_user))


def test_events_produced_in_transactions_are_all_applied_across_restarts(kafka, start_worker, namespace,
                                                                         tiny_artifact):
    """Kafka transactions leave a marker after each commit, an offset that holds no record. A worker that
    restarts at a committed offset, or seeks back over a hole, may land on one: it must cross it, not
    read it again forever, and apply every event once."""
    from kafka import KafkaProducer

    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 2, topics)
    msgs, per_user = make_stream(n_users=40, n_events=2_100, seed=9)
    recs = TopicReader(kafka, topics.recommendations)
    recs.start()
    prod = KafkaProducer(bootstrap_servers=kafka, transactional_id=f"{namespace['prefix']}tx")
    prod.init_transactions()

    def publish(part):
        for i in range(0, len(part), 7):
            prod.begin_transaction()
            for k, v in part[i:i + 7]:
                prod.send(topics.events, key=k, value=v)
            prod.commit_transaction()

    worker = start_worker(extra_env={"LSTI_BATCH_MAX": "30", "LSTI_FAULT_DROP_FETCHED_AFTER": "300"})
    third = len(msgs) // 3
    for i in range(3):
        publish(msgs[i * third:(i + 1) * third])
        wait_progress(lambda: len(unique_events(recs)), (i + 1) * third, f"part {i} to be recommended on")
        if i < 2:
            worker.stop()  # a clean stop commits what was acked: the next start seeks to that offset
            worker.start()
            worker.wait_ready()
    prod.close()
    worker.stop()
    recs.stop_flag.set()
    online = table_states(kafka, namespace["app_id"], tiny_artifact)
    assert_exactly_once(online, offline_states(tiny_artifact, per_user))


def test_failover_between_two_workers(kafka, start_worker, namespace, tiny_artifact):
    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 4, topics)
    msgs, per_user = make_stream(n_users=80, n_events=4_000, seed=1)
    recs = TopicReader(kafka, topics.recommendations)
    recs.start()
    w1, w2 = start_worker("w1"), start_worker("w2")
    publish_raw(kafka, msgs[:2000], topics.events)
    wait_progress(lambda: len(unique_events(recs)), 2000, "the first half")
    assert health(w1.web_port)["consumed"] > 0 and health(w2.web_port)["consumed"] > 0, "partitions not split"
    w2.kill()
    publish_raw(kafka, msgs[2000:], topics.events)
    wait_progress(lambda: len(unique_events(recs)), len(msgs), "the survivor to take over")
    w1.stop()
    recs.stop_flag.set()
    online = table_states(kafka, namespace["app_id"], tiny_artifact)
    assert_exactly_once(online, offline_states(tiny_artifact, per_user))


def test_workers_paused_past_their_session_lose_nothing_and_apply_nothing_twice(kafka, start_worker, namespace,
                                                                               tiny_artifact):
    """Two workers, 4 partitions, session timeout 10 s; one is SIGSTOPped for 25 s (a GC pause, a VM stall)
    and resumed, three times during 20,000 events. It resumes believing it still owns its partitions and
    writes what it had fetched: every user's final state must still equal the offline recomputation, and
    the last changelog record of every key must be its newest state (what compaction keeps)."""
    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 4, topics)
    msgs, per_user = make_stream(n_users=300, n_events=20_000, seed=11)
    recs = TopicReader(kafka, topics.recommendations)
    recs.start()
    env = {"LSTI_SESSION_TIMEOUT": "10"}
    workers = [start_worker("w1", extra_env=env), start_worker("w2", extra_env=env)]
    prod = producer(kafka)
    part = len(msgs) // 4
    for i in range(4):
        for k, v in msgs[i * part:(i + 1) * part]:
            prod.send(topics.events, key=k, value=v)
        prod.flush()
        if i == 3:
            break
        victim = workers[i % 2]
        # Freeze it while it is busy with this part: events fetched and not yet applied are in its hands.
        wait_progress(lambda: len(unique_events(recs)), i * part + part // 4, "the workers to get into the part")
        victim.pause()
        time.sleep(25)
        victim.resume()
        wait_progress(lambda: len(unique_events(recs)), (i + 1) * part, f"part {i} to be answered after a pause")
    prod.close()
    wait_progress(lambda: len(unique_events(recs)), len(msgs), "every event to be answered")
    online = settled_states(kafka, namespace["app_id"], tiny_artifact, len(msgs), expected=per_user)
    for w in workers:
        assert w.proc.poll() is None, f"a worker died:\n{w.tail()}"
    recs.stop_flag.set()
    assert_exactly_once(online, offline_states(tiny_artifact, per_user))
    logs = "".join(w.log_text() for w in workers)
    print("foreign-record repairs logged:", logs.count("not written by this worker"))


def test_a_worker_whose_fetching_stops_is_caught_and_resumed(kafka, start_worker, namespace):
    """The stall watch: fetching is stopped inside the worker the way Faust stops a partition under buffer
    pressure (fault injection, no resume); the watch must see events waiting, log the consumer's flow
    state and put the partitions back, so every event is still answered."""
    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 4, topics)
    msgs, _ = make_stream(n_users=20, n_events=600, seed=4)
    recs = TopicReader(kafka, topics.recommendations)
    recs.start()
    w = start_worker("w1", extra_env={"LSTI_FAULT_STOP_FETCH_AFTER": "100", "LSTI_STALL_AFTER": "3"})
    publish_raw(kafka, msgs[:100], topics.events)
    wait_progress(lambda: len(unique_events(recs)), 100, "the first 100")
    wait_until(lambda: "fault injection: fetching" in w.log_text(), 30, "the fault injection")
    publish_raw(kafka, msgs[100:], topics.events)
    wait_progress(lambda: len(unique_events(recs)), len(msgs), "the stalled worker to resume")
    recs.stop_flag.set()
    log = w.log_text()
    stalls = health(w.web_port)["stalls"]
    assert stalls >= 1
    time.sleep(11)  # idle now, past the 3 s threshold and two 5 s checks: an idle worker is not stalled
    assert health(w.web_port)["stalls"] == stalls
    assert "consumer stalled" in log and "resumed fetching of partitions" in log
    assert "buffer_stopped" in log  # the snapshot says which partitions were stopped


def poison(kind: int, j: int) -> bytes:
    ev = f'"event_id":"p-{j}","item_id":"i1","event_type":"view","ts":1600000000'
    return [
        b"[" * 1500 + b"]" * 1500,  # RecursionError in the decoder
        ('{"user_id":"u1",' + ev + ',"x":' + "[" * 1200 + "]" * 1200 + "}").encode(),  # deep field
        (b'{"user_id":"u1","event_id":"p-\\udfff","item_id":"i1","event_type":"view","ts":1600000000}'),
        ('{"user_id":"u1",' + ev.replace('"view"', '["view"]') + "}").encode(),  # unhashable event_type
        ('{"user_id":"u2","user_id":"u1",' + ev + "}").encode(),  # duplicate key
        ('{"user_id":"u1",' + ev + "}").encode("utf-16"),  # not UTF-8
    ][kind]


def fuzz_bad_events(n: int, seed: int = 3) -> list[tuple[bytes | None, bytes | None]]:
    rng = random.Random(seed)
    good = {"event_id": "x", "user_id": "u1", "item_id": "i1", "event_type": "view", "ts": 1_600_000_000}
    out: list[tuple[bytes | None, bytes | None]] = []
    for j in range(n):
        kind = j % 18
        rec = dict(good, event_id=f"bad-{j}")
        if kind >= 12:  # the poison messages that once crashed a batch (each under 4 KB)
            out.append((b"u1", poison(kind - 12, j)))
            continue
        if kind == 0:
            out.append((b"u1", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))))
            continue
        if kind == 1:
            out.append((b"u1", json.dumps(rec).encode()[: rng.randrange(1, 40)]))
            continue
        if kind == 2:
            rec.pop(rng.choice(list(good)))
        elif kind == 3:
            rec[rng.choice(["user_id", "item_id", "event_id"])] = rng.choice([None, 1.5, [], {}, True])
        elif kind == 4:
            rec["event_type"] = rng.choice(["like", "", "VIEW", 3, None])
        elif kind == 5:
            rec["item_id"] = f"nope-{j}"
        elif kind == 6:
            rec["ts"] = rng.choice([10**11, -5, 0, "now", None, float("nan")])
        elif kind == 7:
            rec["pad"] = "x" * 5000
        elif kind == 8:
            out.append((b"u2", json.dumps(rec).encode()))  # key != user_id
            continue
        elif kind == 9:
            out.append((b"u1", None))
            continue
        elif kind == 10:
            out.append((b"u1", json.dumps([rec]).encode()))
            continue
        elif kind == 11:
            rec["event_id"] = ""
        out.append((b"u1", json.dumps(rec).encode()))
    return out


def test_ten_thousand_fuzzed_bad_events(kafka, start_worker, namespace):
    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 4, topics)
    good, _ = make_stream(n_users=50, n_events=2_000, seed=2)
    bad = fuzz_bad_events(10_000)
    labels = [True] * len(good) + [False] * len(bad)
    random.Random(5).shuffle(labels)  # interleave, keeping the good events in time order
    g, b = iter(good), iter(bad)
    mixed = [next(g) if is_good else next(b) for is_good in labels]
    recs, dlq = TopicReader(kafka, topics.recommendations), TopicReader(kafka, topics.dlq)
    recs.start()
    dlq.start()
    worker = start_worker()
    publish_raw(kafka, mixed, topics.events)
    wait_progress(lambda: len(dlq.records) + len(recs.records), len(bad) + len(good), "all events")
    time.sleep(1.0)
    recs.stop_flag.set()
    dlq.stop_flag.set()
    assert worker.proc.poll() is None, "worker crashed"
    m = health(worker.web_port)
    assert m["consumed"] == len(mixed)
    assert m["applied"] == len(good) == len(recs.records)
    assert m["dead_lettered"] == len(bad) == len(dlq.records)
    assert m["consumed"] == m["applied"] + m["duplicates"] + m["dead_lettered"]
    reasons = [json.loads(v)["reason"] for _, v in dlq.records]
    assert all(reasons)
    assert "Traceback" not in worker.tail(400)
    kinds: dict[str, int] = {}
    for r in reasons:
        kind = r.split(":")[0].split(" (")[0]
        kind = " ".join(w for w in kind.split() if not any(ch.isdigit() for ch in w) and "'" not in w)
        kinds[kind] = kinds.get(kind, 0) + 1
    print("dead-lettered by kind:", json.dumps(dict(sorted(kinds.items(), key=lambda kv: -kv[1]))))


def test_replaying_a_log_twice_leaves_state_unchanged(kafka, start_worker, namespace, tiny_artifact, tmp_path):
    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 4, topics)
    msgs, per_user = make_stream(n_users=40, n_events=1_500, seed=4)
    log_path = tmp_path / "events.jsonl.gz"
    with gzip.open(log_path, "wt") as f:
        for _, v in reversed(msgs):  # out of order on disk: replay sorts by event time
            f.write(v.decode() + "\n")
    worker = start_worker()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "streams.cli", "replay", str(log_path), "--bootstrap", kafka, "--topic",
           topics.events, "-q"]
    subprocess.run(cmd, check=True, env=env, timeout=120)
    wait_progress(lambda: health(worker.web_port)["applied"], len(msgs), "the first replay")
    first = settled_states(kafka, namespace["app_id"], tiny_artifact, len(msgs), expected=per_user)
    assert_exactly_once(first, offline_states(tiny_artifact, per_user))
    subprocess.run(cmd, check=True, env=env, timeout=120)
    # Re-reads after a rebalance count in `consumed` too; what follows the replay is its dead letters.
    wait_progress(lambda: health(worker.web_port)["dead_lettered"], len(msgs), "the second replay")
    m = health(worker.web_port)
    assert m["applied"] == len(msgs) and m["dead_lettered"] == len(msgs)
    time.sleep(2.0)  # a rewrite, if any, would reach the changelog within the commit interval
    second = table_states(kafka, namespace["app_id"], tiny_artifact)
    for u, want in first.items():
        assert second[u]["count"] == want["count"] and second[u]["recent_ids"] == want["recent_ids"]
        np.testing.assert_array_equal(second[u]["h"], want["h"])  # the same bytes: nothing was rewritten
        np.testing.assert_array_equal(second[u]["c"], want["c"])


def test_online_recommendations_equal_offline_ranking(kafka, start_worker, namespace, tiny_artifact, fixture_files):
    """Replay every user's whole history through the pipeline: the worker's top-10 after each event must
    match the offline torch model's ranking for at least 99% of events, and HR@10 agree within 1%."""
    from encoders.data import load_generic
    from streams.jobs.parity import run_parity

    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 4, topics)
    worker = start_worker()
    data = load_generic(*fixture_files)
    res = run_parity(kafka, tiny_artifact, data, list(range(data.n_users)), topics, worker.web_port)
    assert res["answered"] == res["events"] == len(data.items)
    assert res["same_topk"] >= 0.99, (res, health(worker.web_port))
    assert abs(res["hr_next_online"] - res["hr_next_offline"]) <= 0.01, res


def test_rebuild_writes_the_states_a_worker_starts_from(kafka, start_worker, namespace, tiny_artifact, tmp_path):
    """`lsti replay --rebuild`: states computed offline, written to the changelog; a fresh worker recovers
    them, continues from them, and refuses the same history sent again."""
    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 4, topics)
    msgs, per_user = make_stream(n_users=40, n_events=1_000, seed=9)
    log_path = tmp_path / "history.jsonl"
    log_path.write_text("".join(v.decode() + "\n" for _, v in msgs))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "streams.cli", "replay", str(log_path), "--rebuild", "--bootstrap", kafka,
                    "--artifact", str(tiny_artifact), "--app-id", namespace["app_id"], "-q"],
                   check=True, env=env, timeout=120)
    rebuilt = table_states(kafka, namespace["app_id"], tiny_artifact)
    assert_exactly_once(rebuilt, offline_states(tiny_artifact, per_user))
    worker = start_worker()
    publish_raw(kafka, msgs[:50], topics.events)  # history again: refused, not applied twice
    wait_progress(lambda: health(worker.web_port)["consumed"], 50, "the resent history")
    assert health(worker.web_port)["dead_lettered"] == 50
    uid = "u1"
    new = [(uid.encode(), event_json("fresh-1", uid, "i7", "view", 1_700_000_000))]
    publish_raw(kafka, new, topics.events)
    wait_progress(lambda: health(worker.web_port)["applied"], 1, "the new event")
    per_user[uid] = per_user[uid] + [("i7", "view", 1_700_000_000, "fresh-1")]
    states = settled_states(kafka, namespace["app_id"], tiny_artifact, len(msgs) + 1)
    assert_exactly_once({uid: states[uid]}, offline_states(tiny_artifact, {uid: per_user[uid]}))


def test_property_any_bytes_on_the_topic_are_answered_or_dead_lettered(kafka, start_worker, namespace):
    """Hypothesis writes the input: arbitrary bytes, JSON-ish text and valid events interleaved, sent to a
    running worker. Each example: every valid event answered, every other message dead-lettered with a
    reason, the worker alive, and consumed = applied + duplicates + dead-lettered."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from streams.contracts.events import BadEvent, parse_event

    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 4, topics)
    recs, dlq = TopicReader(kafka, topics.recommendations), TopicReader(kafka, topics.dlq)
    recs.start()
    dlq.start()
    worker = start_worker()
    counter = iter(range(10**9))
    junk = st.one_of(st.binary(max_size=600), st.text(max_size=300).map(str.encode),
                     st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                                  lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                      max_size=4),
                                  max_leaves=12).map(lambda v: json.dumps(v).encode()))

    @settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.booleans(), junk, st.sampled_from([b"u1", b"u2", None])), min_size=50, max_size=250))
    def check(messages):
        before, sent, good = health(worker.web_port), [], set()
        for is_good, raw, key in messages:
            j = next(counter)
            if is_good:
                uid = f"h{j}"  # a new user per valid event: no ordering or duplicate rules interfere
                sent.append((uid.encode(), event_json(f"hyp-{j}", uid, "i1", "view", 1_600_000_000 + j)))
                good.add(f"hyp-{j}")
            else:
                try:
                    parse_event(raw, key)
                    continue  # junk that happens to be a valid event is not junk
                except BadEvent:
                    sent.append((key, raw))
        n_bad = len(sent) - len(good)
        publish_raw(kafka, sent, topics.events)
        wait_progress(lambda: health(worker.web_port)["consumed"] - before["consumed"], len(sent), "the example")
        after = health(worker.web_port)
        assert worker.proc.poll() is None, "worker crashed"
        assert after["applied"] - before["applied"] == len(good)
        assert after["dead_lettered"] - before["dead_lettered"] == n_bad
        assert after["consumed"] == after["applied"] + after["duplicates"] + after["dead_lettered"]
        wait_progress(lambda: len(good & unique_events(recs)), len(good), "the answers")

    check()
    recs.stop_flag.set()
    dlq.stop_flag.set()
    reasons = [json.loads(v)["reason"] for _, v in dlq.records]
    assert reasons and all(reasons)
    assert "Traceback" not in worker.tail(400)
