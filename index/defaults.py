"""Item-index defaults by catalogue size, taken from `python -m streams.bench.index --json` (faiss-cpu 1.15.1, dim 64,
inner product, 2 shared cores; clustered synthetic catalogue with popularity-dependent norms).

What the measurements said (batch 1 = one query per call on one thread, as the stream worker searches):
- Flat is exact, needs no training and 264 B/item (with ids); one query cost 0.58-0.82 ms at 100k items and 9.6-13.4 ms
  at 1M (runs on a shared, loaded host). Micro-batches of 4+ queries go through BLAS (see below) and cost
  up to ~4x less per query at 100k.
- IVF on inner-product vectors whose norms carry popularity is hard: a query's top-10 spreads over many
  lists, so recall >= 0.95 needed scanning 1/8-1/4 of the lists whatever nlist was. The scan is then ~N/8
  vectors either way: at 1M, IVF1024 (nprobe 128) and IVF4096 (nprobe 512) traded places between two runs
  (2.2-3.6 ms vs 2.6-4.0 ms per query), and nlist ~ sqrt(N) trains 1.4-2.4x faster (16-25 s vs 35-39 s
  even with IVF4096's k-means on a 32-per-list sample), so sqrt(N), not 4*sqrt(N).
  nprobe = nlist/8 gave recall 0.956 (100k) and 0.980 (1M) at nlist 1024, 0.989 at nlist 4096 (1M), and
  1.000 on a plain equal-norm mixture (100k), where 1/16 was already enough.
- HNSW32 is much faster at recall ~0.9 (0.015-0.23 ms) but saturates on these vectors: 0.989 (100k) and 0.949
  (1M) at efSearch 512; efConstruction 128 made it worse (0.927 at 100k, 0.855 at 1M), so faiss's 40 stays.
  Memory is 2x Flat (~536 B/item with ids).
- faiss 1.15.1 compares `distance_compute_blas_threshold` with n_queries * dim (default 128000; older faiss
  compared it with n_queries, default 20). ItemIndex's value 16 therefore forces BLAS even for one query:
  a single Flat query was 2-3.4x slower; at one thread BLAS pays from 4 queries (100k and 1M).

CPU backends for Flat, `python -m streams.bench.index --backends` (equivalently `lsti bench index --backends`)
(`ItemIndex.search(q, 10, exclude=[B, 10])` as the worker calls it, so 20 fetched; clustered catalogue as
above, dim 64; one thread via threadpoolctl and faiss.omp_set_num_threads(1); best of 4 interleaved rounds of
0.05 s; "Intel(R) Xeon(R) Processor" (OpenBLAS: SkylakeX), 2 shared cores, Linux 6.18, numpy 2.4.6 with
scipy-openblas 0.3.31, faiss-cpu 1.15.1 with its OpenBLAS 0.3.15; load average 1.85-1.91 during the run from
other jobs). Microseconds per query, faiss-cpu / blas (blas = numpy sgemm + grouped exact top-k, `BlasFlat`):

  batch       1          2          4         16        25        48        64       100       250       500
  1k      42/71      24/44      20/27      8.2/11    7.8/9.9   7.6/9.4   7.1/9.1   6.5/8.2   5.9/8.0   6.4/8.1
  3k      62/87      41/68      38/41      17/18     14/16     13/14     13/14     12/13     9.5/12    9.5/11
  10k    223/234    178/190    115/108     45/37     37/34     31/28     27/26     24/24     22/25     21/22
  30k    404/450    344/351    261/199    106/75     93/77     74/58     71/59     62/52     57/62     56/61
  100k  1151/1146  1072/915    970/563    377/207   329/233   296/273   262/239   228/256   183/220   174/220

Two earlier runs (load 1.8-2.1) agreed on the shape: blas/faiss 0.56-0.94 for 4-48 queries at 10k-100k
(two exceptions: 10k x 8 at 1.42 by best round although the medians favoured blas, 148/113 us; 100k x 25 at
1.01 with 8 MiB score chunks, i.e. 20+5 queries, before the 16 MiB now), 0.8-1.24 at 64-100, 1.1-1.35 at
250-500 (FAISS tiles 1024 rows x the batch, so its score tiles stay in cache; numpy writes the whole
[rows, batch] matrix, 16 MiB chunks), slower at 1-2 queries up to 30k (both are memory-bound scans; numpy
adds ~20 us of call overhead) and at 1k-3k everywhere. Hence `blas` by
default for Flat catalogues of 10k-100k items on CPU, answering 4..48-query batches with numpy and the
others with the FAISS flat index it keeps (`BLAS_NUMPY_BATCH`); outside that, faiss-cpu. Both exact, results
identical in the runs above (equal scores may come in either order). The "~95 us/query at 10k" that
motivated this was FAISS at its compiled-in `distance_compute_blas_threshold` (78-81 us/q at batch 25-500,
measured here), which the rows of `streams.bench.index` use; ItemIndex sets `flat_blas_threshold` (256 at
dim 64), which gives the 21-37 us/q above.
"""

from __future__ import annotations

import math

FLAT_MAX_ITEMS = 100_000  # measured: < 1 ms per single query here (0.58-0.82 ms); 1M took 9.6-13.4 ms
IVF_MIN_NLIST = 1024
IVF_PROBE_FRACTION = 8  # nprobe = nlist / 8: recall 0.956 (100k), 0.980 (1M) at nlist 1024
HNSW_EF_SEARCH = 128  # recall 0.969 at 100k, 0.908 at 1M, 0.928 plain mixture 100k (efConstruction 40)
BLAS_MIN_BATCH = 4  # Flat at 1 thread: BLAS slower for 1-2 queries, faster from 4 (100k and 1M)
INDEX_BACKEND_ENV = "LSTI_INDEX_BACKEND"  # overrides backend "auto": faiss (FAISS only, as before blas) or a name
BLAS_MIN_ITEMS = 10_000  # `blas` backend by default (CPU, Flat) from this many items: 3k was a draw, 1k faiss
BLAS_MAX_ITEMS = 100_000  # ... up to this many (the largest measured; bigger Flat catalogues stay on faiss-cpu)
BLAS_NUMPY_BATCH = (4, 48)  # `blas` searches batches of 4..48 queries with numpy, others with its FAISS index
BLAS_GROUP = 32  # rows per group of the grouped top-k: k * 32 candidates per query
BLAS_SCORE_BUDGET = 1 << 22  # score-matrix floats per sgemm (16 MiB): queries go in chunks of this / rows
BLOCKED_OVERFETCH = 64  # masked (not recommendable) items: fetch up to this many more; rows left short search again


def ivf_nlist(n_items: int) -> int:
    """nlist ~ sqrt(N) as a power of two, at least 1024 (bigger lists only add k-means and coarse cost)."""
    return max(IVF_MIN_NLIST, 2 ** round(math.log2(math.sqrt(max(n_items, 1)))))


def recommended_factory(n_items: int, min_recall: float = 0.95) -> str:
    """FAISS factory string for a catalogue of `n_items`: exact while it is cheap, else IVF for recall >= 0.95,
    or HNSW32 when ~0.9 is enough (measured 0.908-0.969 at efSearch 128, 10-20x faster than IVF)."""
    if n_items <= FLAT_MAX_ITEMS:
        return "Flat"
    if min_recall <= 0.9:
        return "HNSW32"
    return f"IVF{ivf_nlist(n_items)},Flat"


def default_search_params(factory: str, n_items: int | None = None) -> dict[str, int]:
    """Search-time knobs for `factory` (nprobe for IVF, efSearch for HNSW; none for Flat)."""
    if factory.startswith("IVF"):
        nlist = int(factory[3:].split(",")[0].split("_")[0])
        return {"nprobe": max(1, nlist // IVF_PROBE_FRACTION)}
    if factory.startswith("HNSW"):
        return {"efSearch": HNSW_EF_SEARCH}
    return {}


def apply_search_params(cpu_index, params: dict[str, int]) -> None:
    """Set `params` on the inner index of an ItemIndex's `cpu_index` (an IDMap2); both persist in write_index."""
    import faiss

    if "nprobe" in params:
        faiss.extract_index_ivf(cpu_index).nprobe = params["nprobe"]
    if "efSearch" in params:
        inner = cpu_index.index if hasattr(cpu_index, "index") else cpu_index
        faiss.downcast_index(inner).hnsw.efSearch = params["efSearch"]


def flat_blas_threshold(dim: int, min_batch: int = BLAS_MIN_BATCH, faiss_version: str | None = None) -> int:
    """Value for `faiss.cvar.distance_compute_blas_threshold` so that exact search uses BLAS from `min_batch`
    queries. faiss 1.15.1 (checked) compares it with n_queries * dim; releases before the change
    (facebookresearch/faiss#5022) compare it with n_queries: those are assumed for versions below 1.15."""
    if faiss_version is None:
        import faiss

        faiss_version = faiss.__version__
    major, minor = (int(p) for p in faiss_version.split(".")[:2])
    return min_batch * dim if (major, minor) >= (1, 15) else min_batch


__all__ = ["recommended_factory", "default_search_params", "apply_search_params", "flat_blas_threshold",
           "ivf_nlist", "FLAT_MAX_ITEMS", "INDEX_BACKEND_ENV", "BLAS_MIN_ITEMS", "BLAS_MAX_ITEMS", "BLAS_NUMPY_BATCH",
           "BLAS_GROUP", "BLAS_SCORE_BUDGET", "BLOCKED_OVERFETCH"]
