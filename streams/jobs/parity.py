"""Online = offline: replay users' histories through a running worker and compare every
recommendation with the offline model's ranking for the same event (no train/serve skew).

Offline side: the torch model (`encoders.model`) over each whole sequence at once, with the user's
long-term vector fixed as the worker holds it, the last 10 items excluded, top-K by inner product.
Online side: what the worker published on `recommendations` for each event id.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from encoders.data import EVENT_TYPES, Interactions
from encoders.model import LSTIModel, count_feature, gap_feature
from streams.worker.state import RECENT


@torch.no_grad()
def offline_topk(model: LSTIModel, items: np.ndarray, etypes: np.ndarray, ts: np.ndarray, long: np.ndarray,
                 k: int = 10) -> np.ndarray:
    """[L, k] item codes recommended after each event of one user's sequence."""
    model.eval()
    it, et, tt = (torch.from_numpy(np.asarray(a, np.int64))[None] for a in (items, etypes, ts))
    item_vecs = model.item_vectors()
    s = model.short_states(item_vecs, it, et, tt)
    n = it.shape[1]
    gaps = torch.zeros_like(tt)
    gaps[:, 1:] = tt[:, 1:] - tt[:, :-1]
    counts = torch.arange(1, n + 1)[None]
    lvec = torch.from_numpy(np.asarray(long, np.float32)).expand(1, n, -1)
    u, _ = model.fuse(s, lvec, gap_feature(gaps), count_feature(counts))
    scores = u[0] @ item_vecs.T
    scores[:, 0] = -torch.inf
    for t in range(n):
        scores[t, it[0, max(0, t - RECENT + 1) : t + 1]] = -torch.inf
    return torch.topk(scores, k, dim=1).indices.numpy()


def compare(online: dict[str, list[str]], offline: dict[str, list[str]], next_item: dict[str, str]) -> dict:
    """Share of events with the same top-K, and HR@K of the next event on both sides."""
    keys = [e for e in offline if e in online]
    same = sum(online[e] == offline[e] for e in keys)
    overlap = float(np.mean([len(set(online[e]) & set(offline[e])) / max(1, len(offline[e])) for e in keys]))
    with_next = [e for e in keys if e in next_item]
    hr_on = float(np.mean([next_item[e] in online[e] for e in with_next])) if with_next else 0.0
    hr_off = float(np.mean([next_item[e] in offline[e] for e in with_next])) if with_next else 0.0
    return {"events": len(offline), "answered": len(keys), "same_topk": same / max(1, len(keys)),
            "mean_overlap": overlap, "hr_next_online": hr_on, "hr_next_offline": hr_off}


def run_parity(bootstrap: str, artifact_path: Path, data: Interactions, users: list[int], topics, web_port: int,
               k: int = 10, timeout: float = 300.0) -> dict:
    """Publish long-term vectors, then the users' events in time order; compare with `offline_topk`."""
    import urllib.request

    from streams.artifacts import load_artifact
    from streams.contracts.events import event_json
    from streams.kafka.tools import TopicReader, producer, publish_long_term

    art = load_artifact(artifact_path)
    long_users, long_vecs = art.long_term()
    long_of = dict(zip(long_users, long_vecs, strict=True))
    default = art.online.long_default
    prod = producer(bootstrap)
    n_long = publish_long_term(prod, topics.long_term, long_of, [data.user_ids[u] for u in users])
    deadline = time.time() + 120
    while True:  # the comparison is meaningless before the worker holds every long-term vector
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/health", timeout=5) as r:
            health = json.loads(r.read())
        if health["long_term_loaded"] >= n_long:
            break
        if time.time() > deadline:
            raise TimeoutError(f"the worker loaded {health['long_term_loaded']} of {n_long} long-term vectors")
        time.sleep(0.3)
    offline: dict[str, list[str]] = {}
    next_item: dict[str, str] = {}
    events = []
    for u in users:
        sl = data.user_slice(u)
        uid = data.user_ids[u]
        items, etypes, ts = data.items[sl], data.etypes[sl], data.ts[sl]
        top = offline_topk(art.model, items, etypes, ts, long_of.get(uid, default), k)
        for j in range(len(items)):
            eid = f"p-{uid}-{j}"
            offline[eid] = [art.item_ids[c] for c in top[j]]
            if j + 1 < len(items):
                next_item[eid] = data.item_ids[items[j + 1]]
            events.append((int(ts[j]), uid, data.item_ids[items[j]], EVENT_TYPES[etypes[j] - 1], eid))
    events.sort(key=lambda e: e[0])
    reader = TopicReader(bootstrap, topics.recommendations)
    reader.start()
    for t, uid, iid, et, eid in events:
        prod.send(topics.events, key=uid.encode(), value=event_json(eid, uid, iid, et, t))
    prod.flush()
    prod.close()
    deadline = time.time() + timeout
    while len(reader.records) < len(events) and time.time() < deadline:
        time.sleep(0.2)
    reader.stop_flag.set()
    online = {}
    for _, v in list(reader.records):
        rec = json.loads(v)
        online.setdefault(rec["event_id"], [it["item_id"] for it in rec["items"]])
    return compare(online, offline, next_item)


def main_parity(args) -> int:
    """`lsti parity`: the check above on a real dataset, with its own broker and worker unless --bootstrap."""
    import os
    import uuid

    from encoders.data import load_dataset
    from streams.artifacts import default_artifacts_dir
    from streams.batch.build import find_artifact
    from streams.config import Topics, state_home
    from streams.kafka.broker import scratch_broker
    from streams.kafka.tools import ensure_topics
    from streams.worker.process import WorkerProcess

    artifact = Path(args.artifact) if args.artifact else find_artifact(default_artifacts_dir(), args.dataset)
    if artifact is None:
        raise SystemExit("error: no artifact for this dataset: run `lsti train` first or pass --artifact")
    home = state_home() / "parity"
    bootstrap, broker = scratch_broker(args.bootstrap or os.environ.get("LSTI_BOOTSTRAP"), home / "kafka")
    run = uuid.uuid4().hex[:6]
    topics = Topics.with_prefix(f"parity-{run}.")
    worker = None
    try:
        ensure_topics(bootstrap, 4, topics)
        worker = WorkerProcess(bootstrap, artifact, home / f"worker-{run}", log_path=home / f"worker-{run}.log",
                               extra=["--app-id", f"parity-{run}", "--topic-prefix", f"parity-{run}."]).start()
        worker.wait_ready()
        data = load_dataset(args.dataset, args.data_dir, args.events, args.items)
        rng = np.random.default_rng(args.seed)
        users = sorted(rng.choice(data.n_users, size=min(args.users, data.n_users), replace=False).tolist())
        t0 = time.perf_counter()
        res = run_parity(bootstrap, artifact, data, users, topics, worker.web_port)
        res.update({"dataset": data.name, "users": len(users), "artifact": artifact.name, "k": 10,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "protocol": "every event of the sampled users' full histories replayed in time order; "
                                "offline = torch model over the whole sequence with the same long-term vector "
                                "and the same last-10-items exclusion"})
        print(json.dumps(res))
        return 0 if res["same_topk"] >= 0.99 else 1
    finally:
        if worker is not None:
            worker.stop()
        if broker is not None:
            broker.stop()
