"""`lsti demo`: the whole path once, on real parts.

Embedded Apache Kafka (unless --bootstrap) -> model (trained on first use, then loaded) -> FAISS
index -> a real Faust worker process -> replay of real users' histories into `events` (plus two
malformed events) -> recommendations read back from `recommendations` -> a summary.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from argparse import Namespace
from dataclasses import replace

import numpy as np

from streams.config import Topics, state_home

# The demo's training recipe when it trains on first use (`--recipe quick`). Measured on ml-1m, one
# torch thread of a 2-core machine with other jobs on it (test NDCG@10, leave-one-out, full ranking):
# 3 epochs 0.136 in 42 CPU-s, 4 epochs 0.148 in 56 CPU-s, 6 epochs 0.151 in 72 CPU-s; the `lsti train`
# defaults (dim 128, batch 64, 200-event windows) need ~20 s of both cores per epoch and reached 0.028
# in 4 minutes on a loaded machine (1 epoch). What makes it epoch-efficient: short windows (50 events:
# each step is cheap), small batches (16: many optimiser steps per epoch; batch 32 reached 0.081 and
# 16 0.115 in the same 2 epochs), dim 64 (half the cost of 128 for ~5% less), the best epoch picked on
# 1,000 validation users (a 1.6 s evaluation instead of 4.7 s), and one thread: two threads of a
# 2-core machine at load 4.5 took 280 s for what one thread did in 58 s (the threads wait on each other).
QUICK_TRAIN = {"epochs": 5, "batch_size": 16, "lr": 0.02}
QUICK_MODEL = {"dim": 64, "max_len": 50}
QUICK_VALID_USERS = 1000
FULL_FROM_MINUTES = 10.0  # --max-minutes at or above this picks the full recipe (the `lsti train` defaults)
WEAK_NDCG = 0.10  # below it the demo says that the model is weak


def _pick_users(data, n: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(data.n_users, size=min(n, data.n_users), replace=False))


def _threads_for_load() -> int:
    """Torch threads that the machine has free now: cores minus the 1-minute load average, at least 1."""
    n = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return n
    return max(1, min(n, int(n - load + 0.5)))


def demo_recipe(args: Namespace):
    """(recipe name, TrainConfig, model options, validation users for selection) of the demo's training.

    quick: QUICK_* above, one thread; full: the `lsti train` defaults, threads by the load. Training
    flags given on the command line (--epochs, --dim, --lr, ...) override either."""
    from streams.batch.train_options import train_configs

    tcfg, mcfg = train_configs(args)
    name = getattr(args, "recipe", None) or ("full" if (args.max_minutes or 0) >= FULL_FROM_MINUTES else "quick")
    threads = getattr(args, "threads", None)
    valid_users = None
    if name == "quick":
        tcfg = replace(tcfg, **{k: v for k, v in QUICK_TRAIN.items() if getattr(args, k, None) is None})
        mcfg = {**QUICK_MODEL, **mcfg}
        valid_users = QUICK_VALID_USERS
        threads = threads or 1
    tcfg = replace(tcfg, threads=threads or _threads_for_load())
    return name, tcfg, mcfg, valid_users


def _describe(name: str, tcfg, mcfg: dict, valid_users: int | None) -> str:
    dim = mcfg.get("dim", 128)
    window = mcfg.get("max_len", 200)
    sel = f"best epoch on {valid_users} validation users" if valid_users else "best epoch on validation"
    lr = tcfg.resolved("lsti").lr
    threads = f"{tcfg.threads} torch thread{'s' if tcfg.threads != 1 else ''}"
    return (f"{name} recipe: dim {dim}, batch {tcfg.batch_size}, {window}-event windows, lr {lr:g}, "
            f"up to {tcfg.epochs} epoch{'s' if tcfg.epochs != 1 else ''}, {threads}, {sel}")


def _model_quality(manifest: dict) -> tuple[dict, str]:
    """(figures for the summary JSON, one line) from the artifact's own test report, or say there is none."""
    m = manifest.get("test_metrics") or {}
    protocol = manifest.get("test_protocol", "leave-one-out by time, full ranking over all items, history masked")
    if "ndcg@10" not in m:
        return ({"model_test_ndcg@10": None, "model_test_hr@10": None},
                "no offline test figure in this artifact's manifest (it was not built by `lsti train`/the demo)")
    info = manifest.get("train_info") or {}
    how = []
    if manifest.get("recipe"):
        how.append(f"{manifest['recipe']} recipe")
    if "epochs_run" in info:
        how.append(f"{info['epochs_run']} epoch{'s' if info['epochs_run'] != 1 else ''}")
    if "train_seconds" in info:
        how.append(f"{info['train_seconds']:.0f} s of training")
    users = f" over {m['users']} users" if "users" in m else ""
    line = (f"offline test NDCG@10 {m['ndcg@10']:.4f}, HR@10 {m.get('hr@10', float('nan')):.4f}{users} "
            f"({manifest.get('dataset', '?')}, {protocol}{'; ' + ', '.join(how) if how else ''})")
    figures = {"model_test_ndcg@10": round(m["ndcg@10"], 4), "model_test_hr@10": round(m.get("hr@10", 0.0), 4),
               "model_test_protocol": protocol}
    return figures, line


def _proc_cpu_seconds(pid: int) -> float | None:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _wait_worker_ready(worker, stall: float) -> None:
    """Until the worker is ready; give up only when it has neither logged nor used CPU for `stall` s."""
    last, moved = None, time.time()
    while True:
        try:
            worker.wait_ready(timeout=2.0)  # raises at once if the worker exited
            return
        except TimeoutError:
            pass
        mark = (len(worker.log_text()), _proc_cpu_seconds(worker.proc.pid))
        if mark != last:
            last, moved = mark, time.time()
        elif time.time() - moved > stall:
            raise TimeoutError(f"worker not ready and idle (no log line, no CPU) for {stall:.0f} s; "
                               f"log:\n{worker.tail()}")


def _wait_long_term(web_port: int, expected: int, stall: float = 60.0) -> int:
    """Until the worker has loaded `expected` long-term vectors, or the count stopped moving for `stall` s."""
    import urllib.request

    loaded, moved = -1, time.time()
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/health", timeout=2) as r:
                now = json.loads(r.read())["long_term_loaded"]
            if now >= expected:
                return now
            if now != loaded:
                loaded, moved = now, time.time()
        except OSError:
            pass
        if time.time() - moved > stall:
            return max(loaded, 0)
        time.sleep(0.3)


def _wait_answers(recs, dlq, n_events: int, n_bad: int, worker, stall: float, bar=None) -> tuple[bool, int | None]:
    """Wait as long as answers keep coming: (stalled, worker exit code). Gives up only after `stall` s
    without a new recommendation or dead letter (a busy machine is slow, not stuck), or at once if the
    worker process has exited. There is no overall deadline."""
    mark, moved = None, time.time()
    while len(recs.records) < n_events or len(dlq.records) < n_bad:
        now = (len(recs.records), len(dlq.records))
        if now != mark:
            mark, moved = now, time.time()
        elif time.time() - moved > stall:
            return True, None
        if worker is not None and worker.proc.poll() is not None:
            return False, worker.proc.returncode
        if bar is not None:
            bar.n = now[0]
            bar.refresh()
        time.sleep(0.2)
    return False, None


def run_demo(args: Namespace) -> int:
    from tqdm import tqdm

    from encoders.data import load_dataset
    from streams.artifacts import default_artifacts_dir, load_artifact
    from streams.batch.build import build, find_artifact
    from streams.kafka.broker import EmbeddedKafka, find_running_broker
    from streams.kafka.tools import TopicReader, ensure_topics, producer, publish_long_term
    from streams.worker.process import WorkerProcess

    t_start = time.perf_counter()
    if not getattr(args, "verbose", False):  # kafka-python's INFO lines (connections, closes) drown the demo
        import logging

        logging.getLogger("kafka").setLevel(logging.WARNING)
    home = state_home()
    broker = None
    prod = None
    readers: list = []
    bootstrap = args.bootstrap or os.environ.get("LSTI_BOOTSTRAP") or find_running_broker(home / "kafka")
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
            recipe, tcfg, mcfg, valid_users = demo_recipe(args)
            print(f"== training the model on {args.dataset or 'your events'} (at most {args.max_minutes:g} min of "
                  f"training, then cached; {_describe(recipe, tcfg, mcfg, valid_users)})", flush=True)
            t_train = time.perf_counter()
            artifact_path = build(args.dataset, args.data_dir, args.events, args.items, train_cfg=tcfg,
                                  model_cfg=mcfg, valid_users=valid_users, recipe=recipe)
            print(f"   trained and evaluated in {time.perf_counter() - t_train:.0f} s", flush=True)
        else:
            print(f"== using model artifact {artifact_path}", flush=True)
        art = load_artifact(artifact_path)
        quality, quality_line = _model_quality(art.manifest)
        print(f"   model {art.version}: {quality_line}", flush=True)
        weak = quality["model_test_ndcg@10"] is not None and quality["model_test_ndcg@10"] < WEAK_NDCG
        if weak:
            print(f"   note: a weak model (test NDCG@10 under {WEAK_NDCG}): it recommends mostly the most popular "
                  "items; `--retrain` trains a new one with the demo's recipe", flush=True)
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
        _wait_worker_ready(worker, args.stall_seconds)
        loaded = _wait_long_term(worker.web_port, n_long, args.stall_seconds)
        print(f"   worker ready (log {worker.log_path}); {loaded} of {n_long} long-term vectors loaded", flush=True)

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
        readers = [recs, dlq]
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
        stalled, exited = _wait_answers(recs, dlq, len(events), len(bad), worker, args.stall_seconds, bar)
        t_done = time.perf_counter() - t0
        bar.n = len(recs.records)
        bar.close()
        recs.stop_flag.set()
        dlq.stop_flag.set()
        if stalled or exited is not None:
            why = (f"no new answer for {args.stall_seconds:g} s" if stalled
                   else f"the worker exited with {exited}")
            print(f"   gave up: {why}, with {len(recs.records)} of {len(events)} events answered and "
                  f"{len(dlq.records)} of {len(bad)} dead letters (worker log {worker.log_path}); last lines:\n"
                  + worker.tail(15), flush=True)

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
            "model_version": art.version, **quality, "total_seconds": round(time.perf_counter() - t_start, 1),
        }
        print("== summary")
        print(f"   events in {summary['events_in']}, recommendations out {summary['recommendations_out']}, "
              f"dead-lettered {summary['dead_lettered']} (reconciles: {summary['reconciles']})")
        print(f"   {summary['events_per_s']} events/s end to end over {summary['seconds']} s "
              f"(latency p50 {summary['latency_ms_p50']} ms, p99 {summary['latency_ms_p99']} ms, "
              f"publishing as fast as possible)")
        print(f"   online HR@10 (next event's item in the previous top-10): {summary['online_hr@10_next_event']} "
              "(over whole histories, training events included: a demo figure, not an evaluation)")
        print(f"   model {art.version}: {quality_line}")
        if weak:
            print(f"   (a weak model: test NDCG@10 under {WEAK_NDCG}; `--retrain` trains a better one)")
        print("   " + json.dumps(summary))
        return 0 if summary["reconciles"] else 1
    finally:
        for reader in readers:  # clients first, so that none of them retries against a stopped broker
            reader.stop_flag.set()
            reader.join(timeout=10)
        if prod is not None:
            prod.close(timeout=10)
        if worker is not None:
            worker.stop()
            shutil.rmtree(worker.data_dir, ignore_errors=True)
        if broker is not None:
            broker.stop()
        sys.stdout.flush()
