"""`lsti bench model`: the model path alone (`Recommender.process`), per batch size, and the item search
alone per backend: where a worker's per-event CPU goes before any Kafka.

Batches are built as the worker gets them: events split over `--partitions` partitions by a hash of
the key (0: one stream, as `lsti bench stream --systems model`), then cut into batches of each
`--batch-sizes` value; a user's events in a batch follow each other in order. Each size is timed over
`--repeat` passes with fresh states (best and all passes reported), one BLAS/FAISS thread. `--search`
adds `ItemIndex.search` alone (the worker's exclusions: k + 10 recent) for FAISS flat and the `blas`
backend at each size. Workload as `lsti bench stream`: Zipf users and items, untrained dim-64 weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from streams.bench.stream import _load, _messages, parsed_batches, replay, synthetic_artifact, zipf_stream
from streams.config import state_home


def time_process(art_path: Path, msgs: list, partitions: int, size: int, repeat: int, cap: int = 0) -> dict:
    from streams.artifacts import load_artifact
    from streams.worker.recommender import Recommender

    batches = parsed_batches(msgs, size, partitions)
    batches = batches[:cap] if cap else batches
    n = sum(map(len, batches))
    passes = [round(replay(Recommender(load_artifact(art_path, index_threads=1)), batches) / n * 1e6, 1)
              for _ in range(repeat)]
    return {"batch": size, "events": n, "batches": len(batches), "us_per_event": min(passes), "passes": passes}


def time_search(art_path: Path, size: int, repeat: int, dim: int) -> dict:
    from index import ItemIndex

    q = np.random.default_rng(0).normal(size=(size, dim)).astype(np.float32)
    exclude = np.full((size, 10), -2, np.int64)
    out = {"batch": size}
    for backend in ("faiss-cpu", "blas"):
        index = ItemIndex.load(art_path / "index.faiss", backend=backend, threads=1)
        if backend == "blas":
            index.blas_batches = (1, 1 << 30)  # numpy at every size (by default FAISS outside 4..48)
        calls = max(3, 2000 // size)
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(calls):
                index.search(q, 10, exclude=exclude)
            best = min(best, (time.perf_counter() - t0) / calls)
        out[f"{backend}_us_per_batch"] = round(best * 1e6, 1)
        out[f"{backend}_us_per_query"] = round(best / size * 1e6, 1)
    return out


def run(n: int, n_users: int, n_items: int, dim: int, partitions: int, sizes: list[int], repeat: int,
        search: bool) -> dict:
    from threadpoolctl import threadpool_limits

    limiter = threadpool_limits(1)
    art = synthetic_artifact(state_home() / "bench" / "artifacts", n_items, dim)
    users, items, types = zipf_stream(n, n_users, n_items)
    msgs = list(_messages(users, items, types, 0, ts=1_700_000_000.0))
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_start": _load()},
              "workload": {"events": n, "users": n_users, "items": n_items, "dim": dim, "partitions": partitions},
              "process": [], "search": []}
    for size in sizes:
        # Small batches: a bounded number of them (the per-event cost is what is measured).
        result["process"].append(time_process(art, msgs, partitions, size, repeat, cap=0 if size >= 100 else 400))
        if search:
            result["search"].append(time_search(art, size, repeat, dim))
    result["machine"]["load_avg_end"] = _load()
    limiter.unregister()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lsti bench model", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=50_000, help="events (default 50,000)")
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--partitions", type=int, default=4, help="split events as the worker's topic does (0: one stream)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[500], metavar="N")
    p.add_argument("--repeat", type=int, default=3, help="timed passes per size (best reported)")
    p.add_argument("--search", action="store_true", help="also time the item search alone, FAISS flat and blas")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (the default output)")
    a = p.parse_args(argv)
    print(json.dumps(run(a.n, a.users, a.items, a.dim, a.partitions, a.batch_sizes, a.repeat, a.search)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
