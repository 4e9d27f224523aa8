"""`lsti demo`: the whole path once, on real parts.

Embedded Apache Kafka (unless --bootstrap) -> model (trained on first use, then loaded) -> FAISS
index -> a real Faust worker process -> replay of real users' histories into `events` (plus two
malformed events) -> recommendations read back from `recommendations` -> a summary.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import uuid
from argparse import Namespace

import numpy as np

from streams.config import Topics, state_home


def _pick_users(data, n: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(data.n_users, size=min(n, data.n_users), replace=False))


def _wait_long_term(web_port: int, expected: int, timeout: float = 60.0) -> int:
    import urllib.request

    deadline = time.time() + timeout
    loaded = 0
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/health", timeout=2) as r:
                loaded = json.loads(r.read())["long_term_loaded"]
            if loaded >= expected:
                return loaded
        except OSError:
            pass
        time.sleep(0.3)
    return loaded


def run_demo(args: Namespace) -> int:
    from tqdm import tqdm

    from encoders.data import load_dataset
    from streams.artifacts import default_artifacts_dir, load_artifact
    from streams.batch.build import build, find_artifact
    from streams.batch.train_options import train_configs
    from streams.kafka.broker import EmbeddedKafka, find_running_broker
    from streams.kafka.tools import TopicReader, ensure_topics, producer, publish_long_term
    from streams.worker.process import WorkerProcess

    t_start = time.perf_counter()
    home = state_home()
    broker = None
    bootstrap = args.bootstrap or __import__("os").environ.get("LSTI_BOOTSTRAP") or find_running_broker(home / "kafka")
    if not bootstrap:
        print("== starting embedded Apache Kafka (KRaft, one node)", flush=True)
        shutil.rmtree(home / "demo-kafka", ignore_errors=True)
        broker = EmbeddedKafka(home / "demo-kafka")
        bootstrap = broker.start()
        print(f"   Kafka {broker.version} at {bootstrap}", flush=True)
    worker = None
    try:
        artifact_path = None if args.retrain else find_artifact(default_artifacts_dir(), dataset=args.dataset)
        if artifact_path is None:
            print(f"== training the model on {args.dataset} (at most {args.max_minutes} min; cached afterwards)",
                  flush=True)
            tcfg, mcfg = train_configs(args)
            artifact_path = build(args.dataset, args.data_dir, args.events, args.items, train_cfg=tcfg,
                                  model_cfg=mcfg)
        else:
            print(f"== using model artifact {artifact_path}", flush=True)
        art = load_artifact(artifact_path)
        m = art.manifest.get("test_metrics", {})
        print(f"   model {art.version}: offline test NDCG@10 {m.get('ndcg@10', float('nan')):.4f} "
              f"HR@10 {m.get('hr@10', float('nan')):.4f} (leave-one-out, full ranking)", flush=True)
        data = load_dataset(args.dataset, args.data_dir, args.events, args.items)
        titles = dict(zip(data.item_ids, data.item_texts, strict=True))

        run_id = uuid.uuid4().hex[:8]
        topics = Topics.with_prefix(f"demo-{run_id}.")
        ensure_topics(bootstrap, 4, topics)
        users = _pick_users(data, args.users)
        long_users, long_vecs = art.long_term()
        long_of = dict(zip(long_users, long_vecs, strict=True))
        prod = producer(bootstrap)
        n_long = publish_long_term(prod, topics.long_term, long_of, [data.user_ids[u] for u in users])

        print("== starting a Faust worker process", flush=True)
        wdir = home / f"demo-worker-{run_id}"
        worker = WorkerProcess(bootstrap, artifact_path, wdir, log_path=home / f"demo-worker-{run_id}.log",
                               extra=["--app-id", f"lsti-demo-{run_id}", "--topic-prefix", topics.events[:-6]])
        worker.start()
        worker.wait_ready()
        loaded = _wait_long_term(worker.web_port, n_long)
        print(f"   worker ready (log {worker.log_path}); {loaded} long-term vectors loaded", flush=True)

        events = []
        for u in users:
            sl = data.user_slice(u)
            for j, (i, e, t) in enumerate(zip(data.items[sl], data.etypes[sl], data.ts[sl], strict=True)):
                events.append((int(t), data.user_ids[u], data.item_ids[i], int(e), f"{data.user_ids[u]}-{j}"))
        events.sort(key=lambda r: r[0])
        from encoders.data import EVENT_TYPES
        from streams.contracts.events import event_json

        recs = TopicReader(bootstrap, topics.recommendations)
        dlq = TopicReader(bootstrap, topics.dlq)
        recs.start()
        dlq.start()
        bad = [(b"1", b"{not json"), (b"1", b'{"event_id":"x","user_id":"1","item_id":"1","event_type":"like",'
                                           b'"ts":1000000000}')]
        print(f"== replaying {len(events)} events of {len(users)} users in event-time order "
              f"(+{len(bad)} malformed ones)", flush=True)
        sent_at: dict[str, float] = {}
        t0 = time.perf_counter()
        bar = tqdm(total=len(events), desc="events -> recommendations", unit="rec", mininterval=0.5)
        for j, (t, uid, iid, e, eid) in enumerate(events):
            prod.send(topics.events, key=uid.encode(), value=event_json(eid, uid, iid, EVENT_TYPES[e - 1], t))
            sent_at[eid] = time.time()
            if j == len(events) // 2:
                for k, v in bad:
                    prod.send(topics.events, key=k, value=v)
            if args.rate:
                ahead = (j + 1) / args.rate - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            if j % 500 == 0:
                bar.n = len(recs.records)
                bar.refresh()
        prod.flush()
        t_published = time.perf_counter() - t0
        deadline = time.time() + 120
        while (len(recs.records) < len(events) or len(dlq.records) < len(bad)) and time.time() < deadline:
            bar.n = len(recs.records)
            bar.refresh()
            time.sleep(0.2)
        t_done = time.perf_counter() - t0
        bar.n = len(recs.records)
        bar.close()
        recs.stop_flag.set()
        dlq.stop_flag.set()

        parsed = [(ts, json.loads(v)) for ts, v in recs.records]
        for _ts, r in parsed[:: max(1, len(parsed) // max(1, args.show))][: args.show]:
            top = ", ".join(titles.get(it["item_id"], it["item_id"]).split(". Genres")[0] for it in r["items"][:3])
            print(f"   user {r['user_id']} after event {r['event_id']} (gate {r['gate']:.2f}): {top}, ...")
        for _ts, v in dlq.records:
            print(f"   dead letter: {json.loads(v)['reason']}")
        # Online hit rate: did the recommendation after event t contain the item of the user's next event?
        by_event = {r["event_id"]: {it["item_id"] for it in r["items"]} for _ts, r in parsed}
        hits = total = 0
        prev_of: dict[str, str] = {}
        for _t, uid, iid, _e, eid in events:
            if uid in prev_of and prev_of[uid] in by_event:
                hits += iid in by_event[prev_of[uid]]
                total += 1
            prev_of[uid] = eid
        lat = np.array([ts / 1000.0 - sent_at[r["event_id"]] for ts, r in parsed if r["event_id"] in sent_at]) * 1e3
        summary = {
            "events_in": len(events) + len(bad), "recommendations_out": len(parsed), "dead_lettered": len(dlq.records),
            "reconciles": len(events) + len(bad) == len(parsed) + len(dlq.records),
            "seconds": round(t_done, 2), "events_per_s": round(len(parsed) / t_done, 1) if t_done else 0.0,
            "publish_seconds": round(t_published, 2),
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "online_hr@10_next_event": round(hits / total, 4) if total else None,
            "model_version": art.version, "total_seconds": round(time.perf_counter() - t_start, 1),
        }
        print("== summary")
        print(f"   events in {summary['events_in']}, recommendations out {summary['recommendations_out']}, "
              f"dead-lettered {summary['dead_lettered']} (reconciles: {summary['reconciles']})")
        print(f"   {summary['events_per_s']} events/s end to end over {summary['seconds']} s "
              f"(latency p50 {summary['latency_ms_p50']} ms, p99 {summary['latency_ms_p99']} ms, "
              f"publishing as fast as possible)")
        print(f"   online HR@10 (next event's item in the previous top-10): {summary['online_hr@10_next_event']}")
        print("   " + json.dumps(summary))
        return 0 if summary["reconciles"] else 1
    finally:
        if worker is not None:
            worker.stop()
            shutil.rmtree(worker.data_dir, ignore_errors=True)
        if broker is not None:
            broker.stop()
        sys.stdout.flush()
