"""`python -m streams.bench.index --json`: which FAISS CPU index the item index should use at which catalogue size.

`--backends`: instead, exact Flat search through `ItemIndex.search` (k=10, 10 excluded ids per query, as the
stream worker calls it) on the two CPU backends, faiss-cpu and blas (numpy sgemm + grouped top-k), by
catalogue size and batch size on one thread: the numbers behind `BLAS_*` in index/defaults.py.

Compares exact "Flat", "IVF{nlist},Flat" (nprobe sweep) and "HNSW32" (efSearch sweep) at dim 64 with
inner product, each built through `ItemIndex.build` as production does. Reports build time, serialized
size, QPS at batch 1 on one thread (the stream worker's setting: it searches small micro-batches with
`index_threads=1`), QPS at batch 1024 on 1 and 2 threads, and recall@10 against exact search.

Uniform noise would flatter IVF and HNSW (no clusters, no hubs), so the catalogue is synthetic but
shaped like trained item vectors: a Gaussian mixture (few hundred clusters, Zipf sizes, varying spread),
a shared "popularity" direction and per-item norm variation (the ml-1m artifact's item vectors show a
dominant common direction and a norm CV of ~0.16). Queries are user-like: mixtures of 1-3 cluster centres
(popular clusters more often) plus the common direction and noise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np

from index.item_index import ItemIndex

DIM = 64
K = 10
N_QUERIES = 1024  # one batch of 1024; recall is averaged over these
ITEMINDEX_BLAS_THRESHOLD = 16  # what ItemIndex.__init__ sets process-wide


def _faiss():
    import faiss

    return faiss


# ----------------------------------------------------------------------------------------- data


@dataclass
class Catalogue:
    vectors: np.ndarray  # [n, dim] float32
    centres: np.ndarray  # [C, dim]
    weights: np.ndarray  # [C] cluster shares (Zipf)
    common: np.ndarray  # [dim] unit vector: the shared popularity direction
    settings: dict


def make_catalogue(n: int, dim: int = DIM, n_clusters: int = 300, seed: int = 0, common_strength: float = 0.6,
                   pop_sigma: float = 0.2) -> Catalogue:
    """Clustered item vectors with Zipf cluster sizes, per-cluster spread, common direction and norm spread."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    zipf_s = 0.9
    weights = 1.0 / np.arange(1, n_clusters + 1) ** zipf_s
    weights /= weights.sum()
    spread = np.exp(rng.normal(math.log(0.5), 0.35, n_clusters)).astype(np.float32)  # noise norm per cluster
    common = rng.standard_normal(dim).astype(np.float32)
    common /= np.linalg.norm(common)
    vectors = np.empty((n, dim), np.float32)
    step = 200_000
    for s in range(0, n, step):
        m = min(step, n - s)
        cl = rng.choice(n_clusters, m, p=weights)
        noise = rng.standard_normal((m, dim)).astype(np.float32) * (spread[cl] / math.sqrt(dim))[:, None]
        pop = np.exp(rng.normal(0.0, pop_sigma, m)).astype(np.float32)  # lognormal norm factor
        # Popular items lean further along the common direction (as trained IP item vectors do).
        vectors[s : s + m] = pop[:, None] * (centres[cl] + noise + common_strength * pop[:, None] * common)
    settings = dict(n=n, dim=dim, n_clusters=n_clusters, cluster_size_zipf_s=zipf_s,
                    cluster_noise_norm="lognormal(log 0.5, 0.35)", common_direction_strength=common_strength,
                    item_norm_factor=f"lognormal(0, {pop_sigma})", seed=seed)
    return Catalogue(vectors, centres, weights, common, settings)


def make_queries(cat: Catalogue, nq: int, seed: int = 1, common: float = 0.5) -> tuple[np.ndarray, dict]:
    """User-like queries: a Dirichlet mix of 1-3 cluster centres, the common direction, and noise."""
    rng = np.random.default_rng(seed)
    dim = cat.vectors.shape[1]
    n_mix = rng.choice([1, 2, 3], nq, p=[0.4, 0.4, 0.2])
    q = np.zeros((nq, dim), np.float32)
    for i in range(nq):
        cl = rng.choice(len(cat.centres), n_mix[i], p=cat.weights, replace=False)
        w = rng.dirichlet(np.ones(n_mix[i]))
        q[i] = w @ cat.centres[cl]
    q += common * cat.common[None, :] + rng.standard_normal((nq, dim)).astype(np.float32) * (0.3 / math.sqrt(dim))
    return q, dict(n_queries=nq, centres_per_query="1/2/3 with p=.4/.4/.2, Dirichlet(1) weights",
                   common_direction=common, noise_norm=0.3, seed=seed)


# ------------------------------------------------------------------------------------- indexes


def build(vectors: np.ndarray, factory: str, train_points_per_list: int | None = None,
          ef_construction: int | None = None) -> tuple[ItemIndex, dict]:
    """Build like production (`ItemIndex.build`); for big IVF, k-means trains on a sample to bound the time."""
    faiss = _faiss()
    ids = np.arange(1, len(vectors) + 1, dtype=np.int64)
    t0 = time.perf_counter()
    note = "ItemIndex.build"
    if train_points_per_list and factory.startswith("IVF"):
        # Same steps as ItemIndex.build, except k-means samples `train_points_per_list` per centroid
        # (faiss's default is 256, i.e. every one of 1M points at nlist 4096: minutes on 2 cores).
        inner = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        faiss.extract_index_ivf(inner).cp.max_points_per_centroid = train_points_per_list
        inner.train(vectors)
        mapped = faiss.IndexIDMap2(inner)
        mapped.add_with_ids(vectors, ids)
        idx = ItemIndex(mapped, backend="faiss-cpu")
        note = f"as ItemIndex.build, k-means on {train_points_per_list} points per list"
    elif ef_construction is not None and factory.startswith("HNSW"):
        # ItemIndex.build has no knob for the graph's build-time beam; same steps with it set.
        inner = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        faiss.downcast_index(inner).hnsw.efConstruction = ef_construction
        mapped = faiss.IndexIDMap2(inner)
        mapped.add_with_ids(vectors, ids)
        idx = ItemIndex(mapped, backend="faiss-cpu")
        note = f"as ItemIndex.build, efConstruction={ef_construction}"
    else:
        idx = ItemIndex.build(vectors, ids, factory, backend="faiss-cpu")
    seconds = time.perf_counter() - t0
    nbytes = int(faiss.serialize_index(idx.cpu_index).nbytes)
    return idx, dict(build_s=round(seconds, 2), bytes=nbytes, bytes_per_item=round(nbytes / len(vectors), 1),
                     build_note=note, build_threads=faiss.omp_get_max_threads())


def set_search_param(idx: ItemIndex, nprobe: int | None = None, ef: int | None = None) -> None:
    faiss = _faiss()
    if nprobe is not None:
        faiss.extract_index_ivf(idx.cpu_index).nprobe = nprobe
    if ef is not None:
        faiss.downcast_index(idx.cpu_index.index).hnsw.efSearch = ef


def qps_single(idx: ItemIndex, queries: np.ndarray, budget_s: float, max_q: int, min_q: int = 20) -> dict:
    """Queries one at a time on one thread until the time budget (after `min_q`) or `max_q` is used up."""
    faiss = _faiss()
    faiss.omp_set_num_threads(1)
    index = idx.cpu_index
    index.search(queries[:1], K)  # warm-up
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while n < max_q:
        index.search(queries[n % len(queries) : n % len(queries) + 1], K)
        n += 1
        if time.perf_counter() - t0 > budget_s and n >= min_q:
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dict(qps=round(n / wall, 1), ms_per_query=round(1000 * wall / n, 3), n_queries=n,
                cpu_per_wall=round(cpu / wall, 2))


def qps_batch(idx: ItemIndex, queries: np.ndarray, threads: int, budget_s: float = 1.0,
              max_reps: int = 5) -> tuple[dict, np.ndarray]:
    """The whole batch in one search() on `threads` OpenMP threads, repeated within a time budget.

    The host is shared, so both the best and the median repetition are kept: best is what the code can
    do, median what a busy machine gives.
    """
    faiss = _faiss()
    faiss.omp_set_num_threads(threads)
    times, cpus, ids = [], [], None
    t_start = time.perf_counter()
    while len(times) < max_reps and (not times or time.perf_counter() - t_start < budget_s):
        t0, c0 = time.perf_counter(), time.process_time()
        _, ids = idx.cpu_index.search(queries, K)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    faiss.omp_set_num_threads(1)
    best, med = min(times), float(np.median(times))
    return dict(qps=round(len(queries) / best, 1), qps_median=round(len(queries) / med, 1), reps=len(times),
                cpu_per_wall=round(sum(cpus) / sum(times), 2)), ids


def recall_at_k(ids: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(ids, truth, strict=True))
    return round(hits / truth.size, 4)


def measure(idx: ItemIndex, queries: np.ndarray, truth: np.ndarray | None, single_budget: float,
            single_max: int, single_min: int = 20) -> tuple[dict, np.ndarray]:
    row = {"batch1_t1": qps_single(idx, queries, single_budget, single_max, single_min)}
    row["batch1024_t1"], ids = qps_batch(idx, queries, 1)
    row["batch1024_t2"], _ = qps_batch(idx, queries, 2)
    if truth is not None:
        row["recall@10"] = recall_at_k(ids, truth)
    return row, ids


# ---------------------------------------------------------------------------------------- runs


def bench_size(n: int, args: argparse.Namespace, log) -> dict:
    faiss = _faiss()
    faiss.omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    cat = make_catalogue(n, seed=args.seed, common_strength=args.common_strength, pop_sigma=args.pop_sigma)
    queries, qset = make_queries(cat, N_QUERIES, seed=args.seed + 1, common=0.5 if args.common_strength else 0.0)
    out: dict = {"n_items": n, "data": cat.settings, "queries": qset, "data_s": round(time.perf_counter() - t0, 1)}
    rows: list[dict] = []
    single_max = args.flat_single_queries if n >= 500_000 else 2000
    single_min = single_max if n >= 500_000 else 20

    # Exact search: the ground truth, plus how the BLAS threshold changes batched search.
    faiss.omp_set_num_threads(args.threads)
    idx, info = build(cat.vectors, "Flat")
    faiss.cvar.distance_compute_blas_threshold = args.blas_default
    row, truth = measure(idx, queries, None, args.single_budget, single_max, single_min)
    row.update(info, factory="Flat", params={}, **{"recall@10": 1.0})
    rows.append(row)
    log(row)
    blas: dict = {"faiss_default": args.blas_default, "itemindex": ITEMINDEX_BLAS_THRESHOLD,
                  "batch1024_faiss_default": {"t1": row["batch1024_t1"], "t2": row["batch1024_t2"]}}
    faiss.cvar.distance_compute_blas_threshold = ITEMINDEX_BLAS_THRESHOLD
    blas["batch1024_itemindex"] = {"t1": qps_batch(idx, queries, 1)[0], "t2": qps_batch(idx, queries, 2)[0]}
    blas["batch1_t1_itemindex"] = qps_single(idx, queries, args.single_budget, single_max, single_min)
    # Micro-batch sizes at one thread (the worker's setting), both thresholds: where BLAS starts to pay.
    small = {}
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        cell = {}
        for name, thr in (("faiss_default", args.blas_default), ("itemindex", ITEMINDEX_BLAS_THRESHOLD)):
            faiss.cvar.distance_compute_blas_threshold = thr
            cell[name] = qps_batch(idx, queries[:b], 1, budget_s=0.3 if n < 500_000 else 0.1, max_reps=50)[0]["qps"]
        small[str(b)] = cell
    blas["qps_by_batch_t1"] = small
    faiss.cvar.distance_compute_blas_threshold = args.blas_default
    out["flat_blas_threshold"] = blas
    log({"factory": "Flat", "blas": blas})
    del idx

    for nlist in args.nlists.get(n, []):
        faiss.omp_set_num_threads(args.threads)
        factory = f"IVF{nlist},Flat"
        sample = args.ivf_train_per_list if nlist * 256 > args.ivf_full_train_max else None
        idx, info = build(cat.vectors, factory, sample)
        # Max-inner-product assignment favours high-norm centroids: uneven lists cost search time.
        info["imbalance_factor"] = round(float(faiss.extract_index_ivf(idx.cpu_index).invlists.imbalance_factor()), 2)
        for nprobe in args.nprobes:
            if nprobe > nlist:
                break
            set_search_param(idx, nprobe=nprobe)
            row, _ = measure(idx, queries, truth, args.single_budget, 2000)
            row.update(info, factory=factory, params={"nprobe": nprobe})
            rows.append(row)
            log(row)
            if row["recall@10"] >= args.stop_recall:
                break
        del idx

    for efc in args.hnsw_efc if n in args.hnsw_sizes else []:
        faiss.omp_set_num_threads(args.threads)
        idx, info = build(cat.vectors, "HNSW32", ef_construction=None if efc == 40 else efc)
        info["efConstruction"] = faiss.downcast_index(idx.cpu_index.index).hnsw.efConstruction
        for ef in args.efs:
            set_search_param(idx, ef=ef)
            row, _ = measure(idx, queries, truth, args.single_budget, 2000)
            row.update(info, factory="HNSW32", params={"efConstruction": info["efConstruction"], "efSearch": ef})
            rows.append(row)
            log(row)
            if row["recall@10"] >= args.stop_recall:
                break
        del idx

    out["results"] = rows
    out["best_batch1_at_recall"] = {
        str(target): _best(rows, target) for target in (0.9, 0.95, 0.99)}
    out["total_s"] = round(time.perf_counter() - t0, 1)
    return out


def bench_backends(sizes: list[int], batches: list[int], budget_s: float, rounds: int, seed: int,
                   log=None) -> dict:
    """faiss-cpu vs blas through `ItemIndex.search(q, 10, exclude=[B, 10])` on one thread (threadpoolctl and
    faiss OpenMP), in `rounds` interleaved rounds per (size, batch) cell with alternating order: us per
    query, best and median round. The blas index searches every batch with numpy here
    (`blas_batches` widened), so both paths are measured everywhere."""
    faiss = _faiss()
    try:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(1)
    except ImportError:  # pragma: no cover
        limiter = None
    faiss.omp_set_num_threads(1)
    k, n_excl = 10, 10
    out: dict = {"k": k, "excluded_per_query": n_excl, "rounds": rounds, "budget_s_per_cell": budget_s,
                 "threads": 1, "sizes": []}
    for n in sizes:
        cat = make_catalogue(n, seed=seed)
        queries, _ = make_queries(cat, max(batches), seed=seed + 1)
        ids = np.arange(1, n + 1, dtype=np.int64)
        rng = np.random.default_rng(seed + 2)
        excl = rng.integers(1, n + 1, (len(queries), n_excl))
        idx = {"faiss-cpu": ItemIndex.build(cat.vectors, ids, "Flat", backend="faiss-cpu")}
        idx["blas"] = ItemIndex(idx["faiss-cpu"].cpu_index, backend="blas")
        idx["blas"].blas_batches = (1, 1 << 62)
        # Agreement on the largest batch: same ids, and the blas scores equal the float64 top-k values.
        _, fi = idx["faiss-cpu"].search(queries, k, exclude=excl)
        bs, bi = idx["blas"].search(queries, k, exclude=excl)
        exact = queries.astype(np.float64) @ cat.vectors.astype(np.float64).T
        np.put_along_axis(exact, excl - 1, -np.inf, 1)
        want = -np.sort(-exact, axis=1)[:, :k]
        size: dict = {"n_items": n, "same_ids_as_faiss": round(float((fi == bi).mean()), 4),
                      "blas_max_abs_score_error": float(np.abs(bs - want).max()), "batches": {}}
        for b in batches:
            q, e = queries[:b], excl[:b]
            times: dict[str, list[float]] = {name: [] for name in idx}
            for rnd in range(rounds):
                for name in (list(idx) if rnd % 2 == 0 else list(idx)[::-1]):
                    index = idx[name]
                    index.search(q, k, exclude=e)  # warm
                    calls, t0 = 0, time.perf_counter()
                    while True:
                        index.search(q, k, exclude=e)
                        calls += 1
                        if time.perf_counter() - t0 > budget_s / (2 * rounds):
                            break
                    times[name].append(1e6 * (time.perf_counter() - t0) / (calls * b))
            cell = {name: {"us_per_query": round(min(t), 1), "us_per_query_median": round(float(np.median(t)), 1)}
                    for name, t in times.items()}
            cell["blas_vs_faiss"] = round(cell["blas"]["us_per_query"] / cell["faiss-cpu"]["us_per_query"], 2)
            size["batches"][str(b)] = cell
            if log:
                f, bl = cell["faiss-cpu"], cell["blas"]
                log(f"  {n:>8,} items  batch {b:>4}  faiss-cpu {f['us_per_query']:>8.1f} us/q  "
                    f"blas {bl['us_per_query']:>8.1f} us/q  (blas/faiss {cell['blas_vs_faiss']:.2f}; "
                    f"medians {f['us_per_query_median']:.1f} / {bl['us_per_query_median']:.1f})")
        if log:
            log(f"  {n:>8,} items: same ids as faiss {size['same_ids_as_faiss']:.4f}, blas max |score - exact| "
                f"{size['blas_max_abs_score_error']:.2e}")
        out["sizes"].append(size)
        del idx
    out["loadavg_at_end"] = list(os.getloadavg())
    if limiter is not None:
        limiter.restore_original_limits()
    return out


def _best(rows: list[dict], target: float) -> dict | None:
    ok = [r for r in rows if r.get("recall@10", 0) >= target]
    if not ok:
        return None
    r = max(ok, key=lambda r: r["batch1_t1"]["qps"])
    return {"factory": r["factory"], "params": r["params"], "recall@10": r["recall@10"],
            "batch1_qps": r["batch1_t1"]["qps"], "bytes": r["bytes"]}


def machine_info() -> dict:
    faiss = _faiss()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        model = ""
    return dict(cpu_count=os.cpu_count(), cpu_model=model, platform=platform.platform(),
                python=platform.python_version(), numpy=np.__version__, faiss=faiss.__version__,
                faiss_compile_options=faiss.get_compile_options(), omp_max_threads=faiss.omp_get_max_threads(),
                loadavg_at_start=list(os.getloadavg()))


def _table_line(row: dict) -> str:
    if "blas" in row:
        b = row["blas"]
        small = " ".join(f"b{k}:{v['faiss_default']:.0f}/{v['itemindex']:.0f}" for k, v in b["qps_by_batch_t1"].items())
        d, i = b["batch1024_faiss_default"], b["batch1024_itemindex"]
        return (f"  Flat blas_threshold {b['faiss_default']} (faiss) vs {b['itemindex']} (ItemIndex): batch1024 QPS "
                f"t1 {d['t1']['qps']:.0f} vs {i['t1']['qps']:.0f}, t2 {d['t2']['qps']:.0f} vs {i['t2']['qps']:.0f}; "
                f"batch1 t1 {b['batch1_t1_itemindex']['qps']:.0f} with {b['itemindex']}\n"
                f"    t1 QPS by batch size (faiss default / ItemIndex): {small}")
    p = ",".join(f"{k}={v}" for k, v in row["params"].items()) or "-"
    return (f"  {row['factory']:<16} {p:<12} recall {row['recall@10']:.3f}  b1 {row['batch1_t1']['qps']:>9.1f} q/s "
            f"({row['batch1_t1']['ms_per_query']:.3f} ms, n={row['batch1_t1']['n_queries']})  "
            f"b1024 t1 {row['batch1024_t1']['qps']:>9.1f}  t2 {row['batch1024_t2']['qps']:>9.1f}  "
            f"build {row['build_s']:>6.1f}s  {row['bytes'] / 2**20:7.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--hnsw-sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--nprobes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    ap.add_argument("--hnsw-efc", type=int, nargs="+", default=[40, 128], help="efConstruction (40: faiss default)")
    ap.add_argument("--efs", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    ap.add_argument("--stop-recall", type=float, default=0.99, help="end a sweep once recall@10 reaches this")
    ap.add_argument("--single-budget", type=float, default=0.5, help="seconds of batch-1 queries per setting")
    ap.add_argument("--flat-single-queries", type=int, default=200, help="batch-1 queries for Flat at >=500k")
    ap.add_argument("--ivf-train-per-list", type=int, default=32)
    ap.add_argument("--ivf-full-train-max", type=int, default=300_000,
                    help="train k-means on every point up to this many, else sample")
    ap.add_argument("--threads", type=int, default=2, help="OpenMP threads for building")
    ap.add_argument("--common-strength", type=float, default=0.6, help="shared popularity direction (0: none)")
    ap.add_argument("--pop-sigma", type=float, default=0.2, help="lognormal sigma of item norms (0: equal norms)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", action="store_true",
                    help="compare the faiss-cpu and blas backends on Flat instead (--backend-sizes, --batches)")
    ap.add_argument("--backend-sizes", type=int, nargs="+", default=[1000, 3000, 10_000, 30_000, 100_000])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 16, 25, 48, 64, 100, 250, 500])
    ap.add_argument("--backend-budget", type=float, default=0.4, help="seconds per (size, batch) cell, both backends")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds per cell")
    args = ap.parse_args(argv)
    if args.backends:
        report = {"machine": machine_info(), "backends": bench_backends(
            args.backend_sizes, args.batches, args.backend_budget, args.rounds, args.seed,
            lambda line: print(line, file=sys.stderr, flush=True))}
        if args.json:
            print(json.dumps(report, indent=1))
        return 0
    args.blas_default = int(_faiss().cvar.distance_compute_blas_threshold)  # before any ItemIndex changes it
    # nlist around sqrt(N) and 4*sqrt(N), rounded to a power of two.
    args.nlists = {n: sorted({2 ** round(math.log2(math.sqrt(n))), 2 ** round(math.log2(4 * math.sqrt(n)))})
                   for n in args.sizes}

    def log(row: dict) -> None:
        print(_table_line(row), file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    report: dict = {"machine": machine_info(), "settings": {
        "dim": DIM, "k": K, "metric": "METRIC_INNER_PRODUCT", "n_queries": N_QUERIES,
        "built_with": "index.item_index.ItemIndex.build (IDMap2 over the factory index), backend faiss-cpu",
        "batch1": "one query per search() call from Python, faiss.omp_set_num_threads(1), "
                  f"up to {args.single_budget}s per setting (Flat at >=500k items: {args.flat_single_queries} queries)",
        "batch1024": "one search() of 1024 queries at 1 and at 2 OpenMP threads",
        "recall": "recall@10 vs exact Flat top-10 over the 1024 queries",
        "blas_threshold": f"faiss's compiled default {args.blas_default} for all rows (this faiss compares it "
                          "with n_queries*dim, so BLAS from 2000 queries at dim 64); the Flat block compares it "
                          f"with ItemIndex's {ITEMINDEX_BLAS_THRESHOLD} (BLAS for every search)",
        "nlists": {str(k): v for k, v in args.nlists.items()}, "nprobes": args.nprobes, "efSearch": args.efs,
        "stop_recall": args.stop_recall, "ivf_train": f"all points up to nlist*256 <= {args.ivf_full_train_max}, "
        f"else {args.ivf_train_per_list} per list", "build_threads": args.threads}, "sizes": []}
    for n in args.sizes:
        print(f"== {n:,} items, dim {DIM}", file=sys.stderr, flush=True)
        report["sizes"].append(bench_size(n, args, log))
    report["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"total {report['total_s']} s", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
