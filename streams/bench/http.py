"""`lsti bench http`: requests/s and latency of on-demand recommendations (GET /users/{id}/recommendations).

Two real workers share the partitions of a scratch (or given) broker; the users' states are built by
streaming events first; then a closed-loop client keeps `--concurrency` requests in flight against one
worker for `--seconds`, for users drawn uniformly, so about half of the requests are routed by Faust to
the other worker (its `table_route`). The client runs in this process on the same machine: on 2 cores
it takes CPU from the workers, so the figures are a floor. Reports requests/s, p50/p90/p99 latency,
the share answered from a stored state, errors, and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
import uuid

import numpy as np

from streams.bench.stream import _load, _messages, synthetic_artifact, zipf_stream
from streams.config import Topics, state_home


async def _client(port: int, users: list[str], concurrency: int, seconds: float, k: int) -> dict:
    import aiohttp

    lat: list[float] = []
    sources: dict[str, int] = {}
    errors: dict[str, int] = {}
    rng = random.Random(0)
    stop_at = time.perf_counter() + seconds

    async def one(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < stop_at:
            user = users[rng.randrange(len(users))]
            t0 = time.perf_counter()
            try:
                async with session.get(f"http://127.0.0.1:{port}/users/{user}/recommendations?k={k}") as r:
                    body = await r.json(content_type=None)
                    if r.status != 200:
                        errors[str(r.status)] = errors.get(str(r.status), 0) + 1
                        continue
            except (TimeoutError, aiohttp.ClientError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            lat.append(time.perf_counter() - t0)
            sources[body["source"]] = sources.get(body["source"], 0) + 1

    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(one(session) for _ in range(concurrency)))
    span = time.perf_counter() - started
    ms = np.array(lat) * 1000.0
    pct = {f"p{q}_ms": round(float(np.percentile(ms, q)), 2) if len(ms) else None for q in (50, 90, 99)}
    return {"requests": len(lat), "seconds": round(span, 2), "requests_per_s": round(len(lat) / span, 1),
            **pct, "sources": sources, "errors": errors}


def run_http_bench(n_events: int = 20_000, n_users: int = 5_000, n_items: int = 10_000, dim: int = 64,
                   concurrency: int = 8, seconds: float = 15.0, k: int = 10, bootstrap: str | None = None) -> dict:
    from streams.kafka.broker import scratch_broker
    from streams.kafka.tools import TopicReader, ensure_topics, publish_raw
    from streams.worker.process import WorkerProcess

    home = state_home() / "bench"
    home.mkdir(parents=True, exist_ok=True)
    bootstrap, broker = scratch_broker(bootstrap, home / "kafka")
    run = uuid.uuid4().hex[:6]
    result: dict = {"events": n_events, "users": n_users, "items": n_items, "dim": dim, "k": k,
                    "concurrency": concurrency, "workers": 2,
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version(), "load_avg_start": _load()}}
    fleet = []
    try:
        art = synthetic_artifact(home / "artifacts", n_items, dim)
        topics = Topics.with_prefix(f"bench-{run}.")
        ensure_topics(bootstrap, 4, topics)
        reader = TopicReader(bootstrap, topics.recommendations)
        reader.start()
        extra = ["--app-id", f"bench-{run}-http", "--topic-prefix", f"bench-{run}."]
        fleet = [WorkerProcess(bootstrap, art, home / f"{run}-http{w}", log_path=home / f"{run}-http.log",
                               extra=extra).start() for w in range(2)]
        for w in fleet:
            w.wait_ready()
        users, items, types = zipf_stream(n_events, n_users, n_items)
        publish_raw(bootstrap, _messages(users, items, types, 0, ts=1_700_000_000.0), topics.events)
        last, since = -1, time.time()
        while len(reader.records) < n_events:  # states built: every event answered (fail if stuck for 120 s)
            if len(reader.records) != last:
                last, since = len(reader.records), time.time()
            elif time.time() - since > 120:
                raise RuntimeError(f"workers stuck at {last} of {n_events} answers")
            time.sleep(0.2)
        reader.stop_flag.set()
        time.sleep(3.0)  # let the last states land and the group settle
        known = sorted({f"u{u}" for u in users})
        print(f"states of {len(known)} users built; {concurrency} clients for {seconds:.0f} s", file=sys.stderr)
        load0 = _load()[:1]
        result["http"] = asyncio.run(_client(fleet[0].web_port, known, concurrency, seconds, k))
        result["http"]["load_avg_1m"] = load0 + _load()[:1]
    finally:
        for w in fleet:
            w.stop()
        result["machine"]["load_avg_end"] = _load()
        if broker is not None:
            broker.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lsti bench http", description=__doc__.split("\n")[0])
    ap.add_argument("--bootstrap", help="Kafka bootstrap (default: a scratch embedded broker)")
    ap.add_argument("--events", type=int, default=20_000, help="events streamed first to build states")
    ap.add_argument("--users", type=int, default=5_000, help="Zipf-distributed users (default 5,000)")
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args(argv)
    out = run_http_bench(args.events, args.users, args.items, args.dim, args.concurrency, args.seconds, args.k,
                         args.bootstrap)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
