"""Inner-product item index over FAISS: build, save, load, batched top-K with per-query exclusions.

A thin wrapper in the spirit of faiss/contrib: an explicit factory string ("Flat" for exact search,
"IVF1024,Flat" or "HNSW32" for large catalogues), ids are the model's item codes, and the GPU is
used when faiss-gpu sees one (`StandardGpuResources`), else exact torch-CUDA top-k, else faiss-cpu.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from index.defaults import apply_search_params, default_search_params, flat_blas_threshold

log = logging.getLogger("lsti.index")
# Before faiss is first imported (lazily, below): its loader logs at INFO each optional build it tries, and
# "Could not load library with AVX2 support due to: ModuleNotFoundError(... swigfaiss_avx2 ...)" is the
# expected fallback of a wheel without that build, not an error; warnings still show.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def _faiss():
    import faiss

    return faiss


def available_backends() -> list[str]:
    """Backends usable on this machine, best first."""
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
    out.append("faiss-cpu")
    return out


class ItemIndex:
    """Top-K by inner product; `search` over-fetches to honour exclusions (the user's recent items)."""

    def __init__(self, cpu_index, backend: str = "auto", threads: int | None = None):
        faiss = _faiss()
        if threads:
            # A stream worker searches small batches: OpenMP fan-out costs more than it saves there, and
            # spinning threads fight the worker's own event loop for the cores (measured: 59% of worker
            # time inside search with the default threads vs a few % with one).
            faiss.omp_set_num_threads(threads)
        self.cpu_index = cpu_index
        self.dim = int(cpu_index.d)
        self.backend = available_backends()[0] if backend == "auto" else backend
        self._gpu_index = None
        self._torch = None
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

    def __len__(self) -> int:
        return int(self.cpu_index.ntotal)

    def raw_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self))
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
        and drop excluded ids with one vectorised mask: no Python loop per query.
        """
        if exclude is not None and not isinstance(exclude, np.ndarray):
            width = max((len(e) for e in exclude), default=0)
            pad = np.full((len(exclude), width), -2, np.int64)
            for r, e in enumerate(exclude):
                pad[r, : len(e)] = e
            exclude = pad
        extra = 0 if exclude is None else exclude.shape[1]
        scores, ids = self.raw_search(queries, k + extra)
        if not extra:
            return scores[:, :k], ids[:, :k]
        drop = (ids[:, :, None] == exclude[:, None, :]).any(-1) | (ids < 0)
        order = np.argsort(drop, axis=1, kind="stable")[:, :k]
        out_i = np.take_along_axis(ids, order, 1)
        out_s = np.take_along_axis(scores, order, 1)
        short = np.take_along_axis(drop, order, 1)
        out_i[short] = -1
        out_s[short] = -np.inf
        return out_s, out_i

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add items (new catalogue entries between nightly rebuilds)."""
        self.cpu_index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                    np.ascontiguousarray(ids, dtype=np.int64))
        self._attach_backend()
