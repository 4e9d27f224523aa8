"""The `blas` item-index backend (numpy sgemm + grouped exact top-k) against an exact argsort and the FAISS
flat path: same ids, same -1 padding, excludes, add(), save/load, backend choice."""

from __future__ import annotations

import numpy as np
import pytest

from index import ItemIndex, available_backends
from index.defaults import BLAS_MAX_ITEMS, BLAS_MIN_ITEMS, BLAS_NUMPY_BATCH, INDEX_BACKEND_ENV
from index.item_index import BlasFlat, choose_backend

WIDE = (1, 1 << 62)  # every batch through numpy (the default window sends some to FAISS)


def _pair(vecs: np.ndarray, ids: np.ndarray) -> tuple[ItemIndex, ItemIndex]:
    faiss_idx = ItemIndex.build(vecs, ids, backend="faiss-cpu")
    blas_idx = ItemIndex.build(vecs, ids, backend="blas")
    blas_idx.blas_batches = WIDE
    return faiss_idx, blas_idx


def _exact(q: np.ndarray, vecs: np.ndarray, ids: np.ndarray, k: int, exclude=None):
    """(scores, ids) by a float64 full argsort, excluded ids dropped, -1/-inf past the catalogue."""
    s = q.astype(np.float64) @ vecs.astype(np.float64).T
    if exclude is not None:
        for r, e in enumerate(exclude):
            s[r, np.isin(ids, e)] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    out_s = np.take_along_axis(s, order, 1)
    out_i = np.where(np.isfinite(out_s), ids[order], -1)
    return out_s, out_i


def _assert_topk(got_s, got_i, want_s, want_i, atol=1e-4):
    """Same ids in the same order, except that float32 rounding may swap scores within `atol` of each other."""
    assert got_i.shape == want_i.shape
    np.testing.assert_allclose(got_s, want_s.astype(np.float32), rtol=0, atol=atol)
    diff = got_i != want_i
    if diff.any():  # only near-ties may differ: the scores at those places agree anyway (checked above)
        near = np.zeros_like(diff)
        near[:, 1:] |= np.abs(np.diff(want_s, axis=1)) < atol
        near[:, :-1] |= np.abs(np.diff(want_s, axis=1)) < atol
        assert not (diff & ~near).any(), np.argwhere(diff & ~near)


@pytest.mark.parametrize("n", [1, 5, 31, 127, 129, 300, 1000, 2049, 5003])
@pytest.mark.parametrize("k", [1, 10, 50])
def test_blas_matches_exact_argsort_and_faiss(n, k):
    rng = np.random.default_rng(n * 100 + k)
    dim = 16
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    ids = rng.permutation(10 * n + 7)[:n].astype(np.int64) + 1  # codes, not positions
    faiss_idx, blas_idx = _pair(vecs, ids)
    q = rng.standard_normal((37, dim)).astype(np.float32)
    want_s, want_i = _exact(q, vecs, ids, min(k, n))
    bs, bi = blas_idx.search(q, k)
    fs, fi = faiss_idx.search(q, k)
    _assert_topk(bs, bi, want_s, want_i)
    _assert_topk(bs, bi, fs.astype(np.float64), fi)
    assert bi.shape == fi.shape == (37, min(k, n))
    assert bs.dtype == np.float32 and bi.dtype == np.int64


@pytest.mark.parametrize("group", [1, 2, 7, 32, 128])
def test_grouped_top_k_is_exact_for_any_group_size(group):
    rng = np.random.default_rng(group)
    vecs = rng.standard_normal((1500, 8)).astype(np.float32)
    ids = np.arange(1500, dtype=np.int64)
    flat = BlasFlat(vecs, ids, group=group, score_budget=1500 * 3)  # chunks of 2-3 queries
    q = rng.standard_normal((11, 8)).astype(np.float32)
    for k in (1, 3, 40, 1500):
        s, i = flat.search(q, k)
        want_s, want_i = _exact(q, vecs, ids, k)
        _assert_topk(s, i, want_s, want_i)


@pytest.mark.parametrize("n", [3, 60, 333, 4100])
def test_excludes_match_faiss_and_exact(n):
    rng = np.random.default_rng(n)
    vecs = rng.standard_normal((n, 12)).astype(np.float32)
    ids = np.arange(1, n + 1, dtype=np.int64) * 3
    faiss_idx, blas_idx = _pair(vecs, ids)
    q = rng.standard_normal((20, 12)).astype(np.float32)
    k = 10
    _, top = _exact(q, vecs, ids, min(k, n))
    # As the worker passes them: [B, R] with -2 for "no item"; some rows exclude their own top ids.
    excl = np.full((20, 10), -2, np.int64)
    for r in range(20):
        pick = rng.choice(ids, min(r % 11, n), replace=False) if r % 2 else top[r, : r % 11]
        excl[r, : len(pick)] = pick
    want_s, want_i = _exact(q, vecs, ids, min(k, n), [e[e > 0] for e in excl])
    bs, bi = blas_idx.search(q, k, exclude=excl)
    fs, fi = faiss_idx.search(q, k, exclude=excl)
    np.testing.assert_array_equal(bi == -1, fi == -1)  # -1 padding where FAISS pads
    np.testing.assert_array_equal(np.isneginf(bs), np.isneginf(fs))
    finite = np.isfinite(want_s)
    _assert_topk(np.where(finite, bs, 0), bi, np.where(finite, want_s, 0), want_i)
    _assert_topk(np.where(finite, bs, 0), bi, np.where(finite, fs, 0).astype(np.float64), fi)
    for r in range(20):
        assert not set(bi[r]) & set(excl[r][excl[r] > 0])
    # The list form too.
    lists = [e[e > 0] for e in excl]
    _, bi2 = blas_idx.search(q, k, exclude=lists)
    _, fi2 = faiss_idx.search(q, k, exclude=lists)
    np.testing.assert_array_equal(bi2 == -1, fi2 == -1)
    np.testing.assert_array_equal(bi2, bi)


def test_add_grows_and_matches_faiss():
    rng = np.random.default_rng(7)
    dim = 16
    vecs = rng.standard_normal((130, dim)).astype(np.float32)
    ids = np.arange(1, 131, dtype=np.int64)
    faiss_idx, blas_idx = _pair(vecs, ids)
    q = rng.standard_normal((9, dim)).astype(np.float32)
    all_v, all_i = vecs, ids
    for step, m in enumerate([1, 5, 200, 3, 1000]):  # crosses several capacity doublings
        nv = rng.standard_normal((m, dim)).astype(np.float32) * (1 + step)
        ni = np.arange(1000 * (step + 1), 1000 * (step + 1) + m, dtype=np.int64)
        faiss_idx.add(nv, ni)
        blas_idx.add(nv, ni)
        all_v, all_i = np.vstack([all_v, nv]), np.concatenate([all_i, ni])
        assert len(blas_idx) == len(faiss_idx) == len(all_i) == len(blas_idx._blas)
        for k in (1, 20, 50):
            bs, bi = blas_idx.search(q, k, exclude=[all_i[-2:]] * len(q))
            fs, fi = faiss_idx.search(q, k, exclude=[all_i[-2:]] * len(q))
            want_s, want_i = _exact(q, all_v, all_i, k, [all_i[-2:]] * len(q))
            _assert_topk(bs, bi, want_s, want_i)
            _assert_topk(bs, bi, fs.astype(np.float64), fi)
    assert len(blas_idx._blas._v) % blas_idx._blas.group == 0
    assert len(blas_idx._blas._v) < 2 * len(all_i) + blas_idx._blas.group  # doubling, not one row per add


def test_add_makes_new_item_searchable_on_blas():
    idx = ItemIndex.build(np.eye(4, dtype=np.float32), np.arange(1, 5), backend="blas")
    idx.add(np.array([[0, 0, 0, 5.0]], np.float32), np.array([99]))
    for batches in (WIDE, BLAS_NUMPY_BATCH):
        idx.blas_batches = batches
        _, got = idx.search(np.array([[0, 0, 0, 1.0]], np.float32), 1)
        assert got[0, 0] == 99


def test_empty_and_short_catalogues_pad_like_faiss():
    dim = 8
    q = np.ones((3, dim), np.float32)
    # Empty: no rows at all (k capped at n = 0), with or without excludes, on both backends.
    for backend in ("blas", "faiss-cpu"):
        idx = ItemIndex.build(np.zeros((0, dim), np.float32), np.zeros(0, np.int64), backend=backend)
        assert len(idx) == 0
        s, i = idx.search(q, 5)
        assert s.shape == i.shape == (3, 0)
        s, i = idx.search(q, 5, exclude=[[1], [], [2, 3]])
        assert s.shape == i.shape == (3, 0)
    # Short: k > n gives n columns; excluding leaves -1 / -inf at the end, as FAISS does.
    vecs = np.eye(3, dim, dtype=np.float32) * np.array([[1.0], [2.0], [3.0]], np.float32)
    faiss_idx, blas_idx = _pair(vecs, np.array([10, 20, 30]))
    for exclude in (None, [[10], [], [30, 20, 10]], np.array([[20, -2], [-2, -2], [30, 10]])):
        bs, bi = blas_idx.search(q, 5, exclude=exclude)
        fs, fi = faiss_idx.search(q, 5, exclude=exclude)
        np.testing.assert_array_equal(bi, fi)
        np.testing.assert_array_equal(bs, fs)
    _, bi = blas_idx.search(q, 5, exclude=[[10], [], [30, 20, 10]])
    np.testing.assert_array_equal(bi, [[30, 20, -1], [30, 20, 10], [-1, -1, -1]])
    assert blas_idx.search(q, 0)[1].shape == (3, 0)


def test_save_load_keeps_the_faiss_artifact(tmp_path):
    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((500, 16)).astype(np.float32)
    ids = np.arange(1, 501, dtype=np.int64) * 7
    faiss_idx, blas_idx = _pair(vecs, ids)
    blas_idx.add(vecs[:3] * 2, np.array([9001, 9002, 9003]))
    blas_idx.save(tmp_path / "index.faiss")
    import faiss

    raw = faiss.read_index(str(tmp_path / "index.faiss"))  # the file is a plain FAISS index, as before
    assert raw.ntotal == 503 and type(faiss.downcast_index(raw)).__name__ == "IndexIDMap2"
    back = ItemIndex.load(tmp_path / "index.faiss", backend="blas")
    back_faiss = ItemIndex.load(tmp_path / "index.faiss", backend="faiss-cpu")
    back.blas_batches = WIDE
    q = rng.standard_normal((6, 16)).astype(np.float32)
    _, a = blas_idx.search(q, 10)
    _, b = back.search(q, 10)
    _, c = back_faiss.search(q, 10)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(b, c)


def test_batch_window_sends_other_batches_to_faiss(monkeypatch):
    rng = np.random.default_rng(5)
    vecs = rng.standard_normal((400, 8)).astype(np.float32)
    idx = ItemIndex.build(vecs, np.arange(400), backend="blas")
    lo, hi = idx.blas_batches = (4, 6)
    calls = []
    real = idx._blas.search
    monkeypatch.setattr(idx._blas, "search", lambda q, k: calls.append(len(q)) or real(q, k))
    for b in (1, 3, 4, 6, 7, 50):
        idx.search(rng.standard_normal((b, 8)).astype(np.float32), 5)
    assert calls == [4, 6]
    assert (lo, hi) == (4, 6)


def test_backend_choice(monkeypatch):
    import faiss

    monkeypatch.delenv(INDEX_BACKEND_ENV, raising=False)
    gpu = available_backends()[0] in ("faiss-gpu", "torch-cuda")
    assert "blas" in available_backends() and available_backends()[-1] == "faiss-cpu"
    rng = np.random.default_rng(1)

    def flat(n):
        idx = faiss.IndexIDMap2(faiss.IndexFlatIP(8))
        idx.add_with_ids(rng.standard_normal((n, 8)).astype(np.float32), np.arange(n))
        return idx

    mid, small = flat(BLAS_MIN_ITEMS), flat(BLAS_MIN_ITEMS - 1)
    cpu = "faiss-cpu"
    assert choose_backend(mid) == (available_backends()[0] if gpu else "blas")
    assert choose_backend(small) == (available_backends()[0] if gpu else cpu)
    assert BLAS_MAX_ITEMS >= BLAS_MIN_ITEMS
    ivf = faiss.IndexIDMap2(faiss.index_factory(8, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT))
    ivf.train(rng.standard_normal((BLAS_MIN_ITEMS, 8)).astype(np.float32))
    ivf.add_with_ids(rng.standard_normal((BLAS_MIN_ITEMS, 8)).astype(np.float32), np.arange(BLAS_MIN_ITEMS))
    l2 = faiss.IndexIDMap2(faiss.IndexFlatL2(8))
    l2.add_with_ids(rng.standard_normal((BLAS_MIN_ITEMS, 8)).astype(np.float32), np.arange(BLAS_MIN_ITEMS))
    for other in (ivf, l2):  # not exact inner product: never blas, and refused when asked for
        assert choose_backend(other) == (available_backends()[0] if gpu else cpu)
        with pytest.raises(ValueError, match="blas"):
            ItemIndex(other, backend="blas")
    # The environment overrides "auto" only; "faiss" is the choice of before (GPU, else faiss-cpu).
    monkeypatch.setenv(INDEX_BACKEND_ENV, "faiss")
    assert choose_backend(mid) == (available_backends()[0] if gpu else cpu)
    assert ItemIndex(mid).backend == (available_backends()[0] if gpu else cpu)
    assert choose_backend(mid, "blas") == "blas"
    monkeypatch.setenv(INDEX_BACKEND_ENV, "blas")
    assert ItemIndex(small).backend == "blas"
    monkeypatch.setenv(INDEX_BACKEND_ENV, "nonsense")
    with pytest.raises(ValueError, match=INDEX_BACKEND_ENV):
        choose_backend(mid)


def test_equal_scores_come_back_but_in_either_order():
    """Ties: duplicate vectors score the same; both backends return the tied set, order unspecified."""
    vecs = np.repeat(np.eye(4, dtype=np.float32), 40, axis=0)  # 160 items, 40 per distinct vector
    ids = np.arange(160, dtype=np.int64)
    faiss_idx, blas_idx = _pair(vecs, ids)
    q = np.array([[0, 0, 1.0, 0]], np.float32)
    bs, bi = blas_idx.search(q, 40)
    fs, fi = faiss_idx.search(q, 40)
    assert set(bi[0]) == set(fi[0]) == set(range(80, 120))
    np.testing.assert_array_equal(bs, fs)
