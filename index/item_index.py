"""Inner-product item index over FAISS: build, save, load, batched top-K with per-query exclusions.

A thin wrapper in the spirit of faiss/contrib: an explicit factory string ("Flat" for exact search,
"IVF1024,Flat" or "HNSW32" for large catalogues), ids are the model's item codes, and the GPU is
used when faiss-gpu sees one (`StandardGpuResources`), else exact torch-CUDA top-k, else on CPU
faiss-cpu or, for exact (Flat) catalogues, the `blas` backend: one numpy sgemm and a grouped exact
top-k (`BlasFlat`) for batches of `BLAS_NUMPY_BATCH` queries, FAISS's flat search for the others
(where that measured faster). The FAISS index stays the saved artifact (`index.faiss`) in every
case; `blas` copies its vectors at load and on `add`. Backend choice: `choose_backend` (env
`LSTI_INDEX_BACKEND` overrides "auto"; `faiss` restores the FAISS-only choice). Both are exact, but
equal scores may come back in either order, and in a different order from one backend (or batch
size) to another.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from index.defaults import (
    BLAS_GROUP,
    BLAS_MAX_ITEMS,
    BLAS_MIN_ITEMS,
    BLAS_NUMPY_BATCH,
    BLAS_SCORE_BUDGET,
    BLOCKED_OVERFETCH,
    INDEX_BACKEND_ENV,
    apply_search_params,
    default_search_params,
    flat_blas_threshold,
)

log = logging.getLogger("lsti.index")
# Before faiss is first imported (lazily, below): its loader logs at INFO each optional build it tries, and
# "Could not load library with AVX2 support due to: ModuleNotFoundError(... swigfaiss_avx2 ...)" is the
# expected fallback of a wheel without that build, not an error; warnings still show.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def _faiss():
    import faiss

    return faiss


GPU_BACKENDS = ("faiss-gpu", "torch-cuda")
BACKENDS = ("faiss-gpu", "torch-cuda", "blas", "faiss-cpu")


def available_backends() -> list[str]:
    """Backends usable on this machine, best first. `blas` (exact, Flat indexes only) comes before
    `faiss-cpu`: `choose_backend` takes it for Flat catalogues up to `BLAS_MAX_ITEMS` items."""
    out = []
    faiss = _faiss()
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        out.append("faiss-gpu")
    try:
        import torch

        if torch.cuda.is_available():
            out.append("torch-cuda")
    except ImportError:  # pragma: no cover
        pass
    out += ["blas", "faiss-cpu"]
    return out


def _exact_flat(cpu_index):
    """The inner IndexFlat of an exact inner-product index (bare or under an IDMap/IDMap2), else None
    (IVF, HNSW, L2, ...: `blas` would not return what they return)."""
    faiss = _faiss()
    inner = faiss.downcast_index(cpu_index.index if hasattr(cpu_index, "id_map") else cpu_index)
    if isinstance(inner, faiss.IndexFlat) and inner.metric_type == faiss.METRIC_INNER_PRODUCT:
        return inner
    return None


def flat_parts(cpu_index) -> tuple[np.ndarray, np.ndarray] | None:
    """(vectors [n, d] float32, ids [n] int64) of an exact inner-product Flat index, else None."""
    inner = _exact_flat(cpu_index)
    if inner is None:
        return None
    n = int(inner.ntotal)
    vectors = inner.reconstruct_n(0, n) if n else np.zeros((0, int(inner.d)), np.float32)
    if hasattr(cpu_index, "id_map"):
        ids = _faiss().vector_to_array(cpu_index.id_map).astype(np.int64)
    else:
        ids = np.arange(n, dtype=np.int64)
    return vectors, ids


def choose_backend(cpu_index, requested: str = "auto") -> str:
    """The backend for `cpu_index`. "auto": `LSTI_INDEX_BACKEND` if set ("faiss": the FAISS-only choice of
    before `blas`, i.e. the GPU if any, else faiss-cpu; or a backend name), else a GPU backend if one
    is usable, else `blas` for an exact inner-product Flat catalogue of `BLAS_MIN_ITEMS`..`BLAS_MAX_ITEMS`
    items (measured faster there for 4-48-query batches, index/defaults.py), else faiss-cpu (IVF, HNSW,
    L2, smaller or bigger Flat)."""
    if requested == "auto":
        requested = os.environ.get(INDEX_BACKEND_ENV, "").strip() or "auto"
    if requested not in ("auto", "faiss", *BACKENDS):
        raise ValueError(f"unknown index backend {requested!r} (from the argument or ${INDEX_BACKEND_ENV}); "
                         f"use auto, faiss or one of {', '.join(BACKENDS)}")
    if requested not in ("auto", "faiss"):
        return requested
    usable = available_backends()
    if usable[0] in GPU_BACKENDS:
        return usable[0]
    small_flat = BLAS_MIN_ITEMS <= cpu_index.ntotal <= BLAS_MAX_ITEMS and _exact_flat(cpu_index) is not None
    if requested == "auto" and small_flat:
        return "blas"
    return "faiss-cpu"


class BlasFlat:
    """Exact inner-product top-k over a numpy copy of the item vectors: one sgemm per chunk of queries and
    a grouped selection, no per-query Python loop.

    Rows are kept in an array whose capacity is a multiple of `group` (zero rows past `n`, grown by
    doubling on `add`). A search uses the first rows = group * L rows, L = ceil(n / group), and scores
    them as St = V @ Q.T [rows, B]; the rows past n are set to -inf. Row r belongs to group r % L, so
    the view St[group, L, B] gives each group's maximum with `group` contiguous elementwise maxima.
    Every true top-k element lies in one of the k groups with the largest maxima (an element of any
    other group is at most its group's maximum, so at most each of those k maxima: k elements at least
    as large), so the k * group scores of those groups are gathered, partitioned to the top k and sorted.
    Ties: equal scores may come in either order. Fewer than `group` rows are padding and there are more
    than k >= 1 groups, so each group holds a real row and, for k <= n, padding (id -1, -inf) never
    comes back.
    """

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, group: int = BLAS_GROUP,
                 score_budget: int = BLAS_SCORE_BUDGET):
        self.group, self.score_budget = int(group), int(score_budget)
        self.dim = int(vectors.shape[1])
        self.n = 0
        self._v = np.zeros((0, self.dim), np.float32)
        self._ids = np.zeros(0, np.int64)
        self.add(vectors, ids)

    def __len__(self) -> int:
        return self.n

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        vectors = np.asarray(vectors, np.float32).reshape(-1, self.dim)
        ids = np.asarray(ids, np.int64).reshape(-1)
        if len(vectors) != len(ids):
            raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
        end = self.n + len(vectors)
        if end > len(self._v):  # amortised doubling, capacity a multiple of the group size
            cap = max(-(-end // self.group) * self.group, 2 * len(self._v))
            v = np.zeros((cap, self.dim), np.float32)
            v[: self.n] = self._v[: self.n]
            i = np.full(cap, -1, np.int64)
            i[: self.n] = self._ids[: self.n]
            self._v, self._ids = v, i
        self._v[self.n : end] = vectors
        self._ids[self.n : end] = ids
        self.n = end

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [B, k] descending, ids [B, k]) for 1 <= k <= n (the caller caps k)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        n, g = self.n, self.group
        if not 0 < k <= n:
            raise ValueError(f"k={k} outside 1..{n}")
        groups = -(-n // g)
        rows = groups * g
        vecs = self._v[:rows]
        out_s = np.empty((len(q), k), np.float32)
        out_i = np.empty((len(q), k), np.int64)
        step = max(1, self.score_budget // rows)  # bounds the score matrix: chunks of queries
        for s in range(0, len(q), step):
            qq = q[s : s + step]
            b = len(qq)
            r = np.arange(b)[:, None]
            st = vecs @ qq.T  # [rows, b], one sgemm
            st[n:] = -np.inf
            if k >= groups:  # small catalogue: every row is a candidate
                pos = np.argpartition(st.T, rows - k, axis=1)[:, rows - k :]
                sc = st.T[r, pos]
            else:
                maxima = st.reshape(g, groups, b).max(0).T  # [b, groups]
                top = np.argpartition(maxima, groups - k, axis=1)[:, groups - k :]  # [b, k] group numbers
                grp = (top[:, None, :] + (np.arange(g) * groups)[:, None]).reshape(b, g * k)  # their rows
                cand = st.ravel().take(grp * b + r)  # [b, g * k] their scores
                sel = np.argpartition(cand, g * k - k, axis=1)[:, g * k - k :]
                pos, sc = grp[r, sel], cand[r, sel]
            order = np.argsort(-sc, axis=1, kind="stable")
            out_s[s : s + b] = sc[r, order]
            out_i[s : s + b] = self._ids[pos[r, order]]
        return out_s, out_i


class ItemIndex:
    """Top-K by inner product; `search` over-fetches to honour exclusions (the user's recent items) and the
    ids `block`ed as not recommendable (items deleted or out of stock), which stay in the index."""

    def __init__(self, cpu_index, backend: str = "auto", threads: int | None = None):
        faiss = _faiss()
        if threads:
            # A stream worker searches small batches: OpenMP fan-out costs more than it saves there, and
            # spinning threads fight the worker's own event loop for the cores (measured: 59% of worker
            # time inside search with the default threads vs a few % with one).
            faiss.omp_set_num_threads(threads)
        self.cpu_index = cpu_index
        self.dim = int(cpu_index.d)
        self.backend = choose_backend(cpu_index, backend)
        if threads and self.backend == "blas":
            _limit_blas_threads(threads)
        self._gpu_index = None
        self._torch = None
        self._blas: BlasFlat | None = None
        # `blas`: batches of this many queries (inclusive) go through numpy, others through the FAISS flat
        # index it keeps (measured faster outside this window, index/defaults.py).
        self.blas_batches = BLAS_NUMPY_BATCH
        # Not-recommendable ids: a boolean per id (ids are dense item codes) with a False sentinel past the last
        # one set, so any id, however large, reads it with one `take`; None until something is blocked.
        self._blocked: np.ndarray | None = None
        self.n_blocked = 0
        self._attach_backend()
        # Exact search through BLAS from 4 queries on (measured break-even, index/defaults.py); faiss 1.15
        # compares this value with n_queries * dim, so a bare "16" would force BLAS on single queries.
        faiss.cvar.distance_compute_blas_threshold = flat_blas_threshold(self.dim)

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, factory: str = "Flat", backend: str = "auto") -> ItemIndex:
        """Index `vectors` under `ids` (the model's item codes) with an explicit FAISS factory string."""
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        inner = faiss.index_factory(int(vectors.shape[1]), factory, faiss.METRIC_INNER_PRODUCT)
        if not inner.is_trained:
            inner.train(vectors)
        mapped = faiss.IndexIDMap2(inner)
        mapped.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
        apply_search_params(mapped, default_search_params(factory))
        return cls(mapped, backend)

    @classmethod
    def load(cls, path: Path, backend: str = "auto", threads: int | None = None) -> ItemIndex:
        return cls(_faiss().read_index(str(path)), backend, threads)

    def save(self, path: Path) -> None:
        _faiss().write_index(self.cpu_index, str(path))

    def _attach_backend(self) -> None:
        faiss = _faiss()
        if self.backend == "faiss-gpu":
            self._gpu_res = faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self.cpu_index)
        elif self.backend == "torch-cuda":
            import torch

            vectors = self.cpu_index.index.reconstruct_n(0, self.cpu_index.ntotal)  # exact only for Flat
            ids = faiss.vector_to_array(self.cpu_index.id_map).astype(np.int64)
            self._torch = (torch.from_numpy(vectors).cuda(), torch.from_numpy(ids).cuda())
        elif self.backend == "blas":
            parts = flat_parts(self.cpu_index)
            if parts is None:
                raise ValueError("the blas backend is exact inner-product search over a Flat index; this index "
                                 f"is {type(_faiss().downcast_index(self.cpu_index)).__name__} (use faiss-cpu)")
            self._blas = BlasFlat(*parts)

    def __len__(self) -> int:
        return int(self.cpu_index.ntotal)

    def raw_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self))
        if k <= 0:  # empty catalogue (or k = 0): no rows, as a too-short one gives fewer than k
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if self._blas is not None and self.blas_batches[0] <= len(q) <= self.blas_batches[1]:
            return self._blas.search(q, k)
        if self._torch is not None:
            import torch

            vecs, ids = self._torch
            scores, pos = torch.topk(torch.from_numpy(q).cuda() @ vecs.T, k, dim=1)
            return scores.cpu().numpy(), ids[pos].cpu().numpy()
        index = self._gpu_index if self._gpu_index is not None else self.cpu_index
        return index.search(q, k)

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | list[np.ndarray] | None = None):
        """(scores [B,k], ids [B,k]) without each row's `exclude` ids; -1 pads rows that run short.

        `exclude` is an int array [B, R] (negative = no item) or a list of id arrays. Over-fetch R more
        and drop excluded ids with one vectorised mask: no Python loop per query. Blocked ids (`block`) are
        left out the same way (`_search_blocked`); with none blocked, this path is untouched.
        """
        if exclude is not None and not isinstance(exclude, np.ndarray):
            width = max((len(e) for e in exclude), default=0)
            pad = np.full((len(exclude), width), -2, np.int64)
            for r, e in enumerate(exclude):
                pad[r, : len(e)] = e
            exclude = pad
        if self.n_blocked:
            return self._search_blocked(queries, k, exclude)
        extra = 0 if exclude is None else exclude.shape[1]
        scores, ids = self.raw_search(queries, k + extra)
        if not extra:
            return scores[:, :k], ids[:, :k]
        drop = (ids[:, :, None] == exclude[:, None, :]).any(-1) | (ids < 0)
        return _first_kept(scores, ids, drop, k)

    def block(self, ids: np.ndarray | list[int], blocked: bool = True) -> int:
        """Mark `ids` as not recommendable (blocked=False: recommendable again); they stay in the index and
        `search` leaves them out. Returns how many ids are blocked now."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        ids = ids[ids >= 0]
        if self._blocked is None:
            if not blocked or not ids.size:
                return self.n_blocked
            self._blocked = np.zeros(1, bool)
        if ids.size and int(ids.max()) + 1 >= len(self._blocked):  # keep the sentinel past the largest id
            grown = np.zeros(max(int(ids.max()) + 2, 2 * len(self._blocked)), bool)
            grown[: len(self._blocked)] = self._blocked
            self._blocked = grown
        self._blocked[ids] = blocked
        self.n_blocked = int(np.count_nonzero(self._blocked))
        return self.n_blocked

    def blocked(self, ids: np.ndarray) -> np.ndarray:
        """Per id, whether it is blocked (ids < 0: False)."""
        ids = np.asarray(ids, np.int64)
        if self._blocked is None:
            return np.zeros(ids.shape, bool)
        return self._blocked.take(np.clip(ids, 0, len(self._blocked) - 1)) & (ids >= 0)

    def _search_blocked(self, queries: np.ndarray, k: int, exclude: np.ndarray | None):
        """`search` with blocked ids: fetch k + R + min(blocked, BLOCKED_OVERFETCH), drop blocked and excluded
        ids with vectorised masks, and search again, with twice the depth, only the rows left short while the
        index holds more. Exact: each row gets the top k of its unblocked, unexcluded ids."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(self)
        width = min(k, n)
        out_s = np.full((len(q), width), -np.inf, np.float32)
        out_i = np.full((len(q), width), -1, np.int64)
        rows = np.arange(len(q))
        fetch = min(n, k + (0 if exclude is None else exclude.shape[1]) + min(self.n_blocked, BLOCKED_OVERFETCH))
        while rows.size and width:
            scores, ids = self.raw_search(q[rows], fetch)
            drop = (ids < 0) | self.blocked(ids)
            if exclude is not None and exclude.shape[1]:
                drop |= (ids[:, :, None] == exclude[rows][:, None, :]).any(-1)
            out_s[rows], out_i[rows] = _first_kept(scores, ids, drop, width)
            if fetch >= n:
                break
            rows = rows[(out_i[rows] < 0).any(1)]
            fetch = min(n, 2 * fetch)
        return out_s, out_i

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add items (new catalogue entries between nightly rebuilds); `blas` appends to its copy."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.cpu_index.add_with_ids(vectors, ids)
        if self._blas is not None:
            self._blas.add(vectors, ids)
        else:
            self._attach_backend()


def _limit_blas_threads(threads: int) -> None:
    """numpy's BLAS to `threads` threads (process-wide, as faiss.omp_set_num_threads above): the blas
    backend's sgemm runs there. `lsti run` already sets OPENBLAS_NUM_THREADS=1; without threadpoolctl
    installed, that variable is the only control."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return
    threadpool_limits(limits=threads, user_api="blas")


def _first_kept(scores: np.ndarray, ids: np.ndarray, drop: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first `width` candidates not dropped, in score order; -inf / -1 where a row runs short."""
    order = np.argsort(drop, axis=1, kind="stable")[:, :width]
    out_i = np.take_along_axis(ids, order, 1)
    out_s = np.take_along_axis(scores, order, 1)
    short = np.take_along_axis(drop, order, 1)
    out_i[short] = -1
    out_s[short] = -np.inf
    return out_s, out_i
