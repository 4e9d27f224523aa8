"""`lsti replay --rebuild`: state for a new deployment, built from history as fast as the machine allows.

Streaming a long history through Kafka and a worker costs the full per-event path. Instead, every
user's final short-term state is computed offline with the same online model (all users stepped
together, one round per event index) and written straight into the short-term table's changelog
topic, partitioned like `events` (same key, same partitioner, same partition count). Workers that
start on an empty state folder recover it from there. Event ids are kept (their hashes), so the same
history sent again later is dead-lettered as duplicate/stale instead of being applied twice.
"""

from __future__ import annotations

import json
import time

import numpy as np

from encoders.data import EVENT_CODE
from streams.worker.state import RECENT, StateCodec, event_id_hash


def rebuild_changelog(bootstrap: str, artifact_path, records: list[dict], app_id: str = "lsti",
                      partitions: int = 4, progress: bool = True) -> dict:
    """Step each user's events (time order) and write the final states to `<app_id>-short-term-changelog`."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError
    from tqdm import tqdm

    from streams.artifacts import load_artifact
    from streams.config import kafka_python_security_from_env
    from streams.kafka.tools import normalise, producer

    t0 = time.perf_counter()
    art = load_artifact(artifact_path)
    code = {iid: i for i, iid in enumerate(art.item_ids) if i}
    per_user: dict[str, list[tuple[int, int, float, int]]] = {}
    skipped = 0
    for rec in sorted(records, key=lambda r: float(r["ts"])):
        c = code.get(str(rec["item_id"]))
        if c is None or rec["event_type"] not in EVENT_CODE:
            skipped += 1
            continue
        eid = json.loads(normalise(rec))["event_id"]
        per_user.setdefault(str(rec["user_id"]), []).append(
            (c, EVENT_CODE[rec["event_type"]], float(rec["ts"]), event_id_hash(eid)))
    users = list(per_user)
    codec = StateCodec(art.model.cfg.dim, art.weights_version)
    st = codec.empty(len(users))
    lengths = np.array([len(per_user[u]) for u in users])
    online = art.online
    for t in tqdm(range(int(lengths.max()) if len(users) else 0), desc="rebuild", unit="step", disable=not progress):
        rows = np.flatnonzero(lengths > t)
        evs = [per_user[users[r]][t] for r in rows]
        items = np.array([e[0] for e in evs])
        ts = np.array([e[2] for e in evs])
        first = st.count[rows] == 0
        gaps = np.where(first, 0.0, ts - st.last_ts[rows])
        h, c = online.step(st.h[rows], st.c[rows], items, np.array([e[1] for e in evs]), gaps, first)
        st.h[rows], st.c[rows] = h, c
        st.count[rows] += 1
        st.last_ts[rows] = ts
        st.recent[rows] = np.concatenate([st.recent[rows, 1:], items[:, None].astype(np.int32)], axis=1)
        st.recent_ids[rows] = np.concatenate(
            [st.recent_ids[rows, 1:], np.array([e[3] for e in evs], np.uint64)[:, None]], axis=1)
    computed = time.perf_counter() - t0
    topic = f"{app_id}-short-term-changelog"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **kafka_python_security_from_env())
    try:
        admin.create_topics([NewTopic(topic, partitions, 1, topic_configs={"cleanup.policy": "compact"})])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()
    prod = producer(bootstrap)
    for r, u in enumerate(users):
        prod.send(topic, key=u.encode(), value=codec.encode_one(st, r))
    prod.flush()
    prod.close()
    return {"users": len(users), "events": int(lengths.sum()), "skipped_unknown": skipped, "changelog": topic,
            "compute_seconds": round(computed, 2), "total_seconds": round(time.perf_counter() - t0, 2),
            "state_bytes_per_user": codec.size, "recent": RECENT}
