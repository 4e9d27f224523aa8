"""`lsti bench recovery`: how long a worker takes to be back after a crash, for N users' state.

The short-term table's changelog is filled with N real encoded states (what N users' first events
would leave there), then a worker starts (a) with an empty state folder, so it rebuilds RocksDB from
the changelog, as a replacement machine or a failover would, and (b) after a SIGKILL with its RocksDB
intact. Measured: process start to Faust's "Ready", and to the first recommendation of a new event.
"""

from __future__ import annotations

import json
import time
import uuid

import numpy as np

from streams.config import Topics, state_home


def run_recovery_bench(n_users: int = 100_000, bootstrap: str | None = None, dim: int = 64) -> dict:
    from kafka.admin import KafkaAdminClient, NewTopic

    from streams.artifacts import load_artifact
    from streams.bench.stream import synthetic_artifact
    from streams.contracts.events import event_json
    from streams.kafka.broker import scratch_broker
    from streams.kafka.tools import TopicReader, ensure_topics, producer
    from streams.worker.state import StateCodec

    home = state_home() / "bench-recovery"
    bootstrap, broker = scratch_broker(bootstrap, home / "kafka")
    run = uuid.uuid4().hex[:6]
    app_id, prefix = f"rec-{run}", f"rec-{run}."
    out: dict = {"users": n_users, "dim": dim}
    try:
        art_path = synthetic_artifact(home / "artifacts", 10_000, dim)
        art = load_artifact(art_path)
        codec = StateCodec(dim, art.weights_version)
        topics = Topics.with_prefix(prefix)
        ensure_topics(bootstrap, 4, topics)
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics([NewTopic(f"{app_id}-short-term-changelog", 4, 1,
                                      topic_configs={"cleanup.policy": "compact"})])
        admin.close()
        rng = np.random.default_rng(0)
        st = codec.empty(1)
        prod = producer(bootstrap)
        t0 = time.perf_counter()
        for u in range(n_users):
            st.h[0] = rng.standard_normal(dim).astype(np.float32) * 0.1
            st.c[0] = st.h[0]
            st.count[0], st.last_ts[0], st.last_partition[0], st.last_offset[0] = 1, 1.7e9, -1, -1
            prod.send(f"{app_id}-short-term-changelog", key=f"u{u}".encode(), value=codec.encode_one(st, 0))
        prod.flush()
        out["state_bytes_per_user"] = codec.size
        out["changelog_fill_seconds"] = round(time.perf_counter() - t0, 1)

        from streams.worker.process import WorkerProcess

        reader = TopicReader(bootstrap, topics.recommendations)
        reader.start()
        wdir = home / f"worker-{run}"
        extra = ["--app-id", app_id, "--topic-prefix", prefix]
        for case in ("empty_state_dir", "after_sigkill_local_rocksdb"):
            w = WorkerProcess(bootstrap, art_path, wdir, log_path=home / f"worker-{run}.log", extra=extra)
            t_start = time.perf_counter()
            w.start()
            w.wait_ready(timeout=600)
            ready = time.perf_counter() - t_start
            before = len(reader.records)
            prod.send(topics.events, key=b"u1", value=event_json(f"probe-{case}", "u1", "item1", "view", time.time()))
            prod.flush()
            while len(reader.records) == before and time.perf_counter() - t_start < 900:
                time.sleep(0.05)
            first = time.perf_counter() - t_start
            out[case] = {"seconds_to_ready": round(ready, 1), "seconds_to_first_recommendation": round(first, 1)}
            rec = json.loads(reader.records[-1][1])
            assert rec["event_id"] == f"probe-{case}"
            w.kill()
        reader.stop_flag.set()
        prod.close()
        du = sum(f.stat().st_size for f in wdir.rglob("*") if f.is_file())
        out["rocksdb_bytes_on_disk"] = du
    finally:
        if broker is not None:
            broker.stop()
    return out
