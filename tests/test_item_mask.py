"""Items that leave the catalogue (deleted, out of stock) are masked in the index: the top-K is exactly the
unmasked top-K with those items filtered, on every backend and for any number of them; events naming them
still apply. Live-added items are stored in states by key, so they keep their identity across versions."""

from __future__ import annotations

import numpy as np
import pytest
from test_index_blas import WIDE, _assert_topk, _exact

from index import ItemIndex
from index.defaults import BLOCKED_OVERFETCH
from streams.contracts.events import Event
from streams.worker.state import RECENT, live_item_key


def _index(backend: str, vecs: np.ndarray, ids: np.ndarray) -> ItemIndex:
    idx = ItemIndex.build(vecs, ids, backend=backend)
    idx.blas_batches = WIDE  # blas: every batch through numpy (faiss-cpu ignores it)
    return idx


@pytest.mark.parametrize("backend", ["faiss-cpu", "blas"])
@pytest.mark.parametrize("n_blocked", [1, 7, BLOCKED_OVERFETCH + 1, 600])
def test_blocked_ids_are_left_out_and_the_rest_is_the_exact_top_k(backend, n_blocked):
    rng = np.random.default_rng(n_blocked)
    n, k = 1000, 10
    vecs = rng.normal(size=(n, 16)).astype(np.float32)
    ids = np.arange(1, n + 1, dtype=np.int64)
    q = rng.normal(size=(9, 16)).astype(np.float32)
    idx = _index(backend, vecs, ids)
    cand = np.concatenate([_exact(q, vecs, ids, 3)[1].ravel(), rng.permutation(ids)])  # the best ones first
    blocked = cand[np.sort(np.unique(cand, return_index=True)[1])][:n_blocked]
    assert idx.block(blocked) == len(blocked) == idx.n_blocked
    exclude = np.full((len(q), RECENT), -2, np.int64)
    exclude[:, :4] = _exact(q, vecs, ids, 8)[1][:, 4:]  # recent items just below the best ones
    for excl in (None, exclude):
        rows = [blocked if excl is None else np.concatenate([blocked, e]) for e in exclude]
        want_s, want_i = _exact(q, vecs, ids, k, rows)
        got_s, got_i = idx.search(q, k, exclude=excl)
        _assert_topk(got_s, got_i, want_s, want_i)
        assert not np.isin(got_i, blocked).any()


def test_unblocking_restores_the_unmasked_answers():
    rng = np.random.default_rng(5)
    vecs = rng.normal(size=(300, 8)).astype(np.float32)
    idx = ItemIndex.build(vecs, np.arange(1, 301), backend="faiss-cpu")
    q = rng.normal(size=(4, 8)).astype(np.float32)
    before = idx.search(q, 10)
    idx.block(before[1][:, 0])
    assert not np.isin(idx.search(q, 10)[1], before[1][:, 0]).any()
    assert idx.block(before[1][:, 0], blocked=False) == 0
    after = idx.search(q, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])


@pytest.mark.parametrize("backend", ["faiss-cpu", "blas"])
def test_short_catalogue_with_blocked_items_pads_like_an_unmasked_one(backend):
    vecs = np.eye(5, dtype=np.float32)
    idx = _index(backend, vecs, np.arange(1, 6))
    q = np.array([[5, 4, 3, 2, 1]], np.float32)
    plain_s, plain_i = idx.search(q, 10, exclude=np.array([[2]]))
    idx.block([1, 99])  # an id not in the index is harmless
    s, i = idx.search(q, 10, exclude=np.array([[2]]))
    assert i.shape == plain_i.shape == (1, 5)
    assert i[0].tolist() == [3, 4, 5, -1, -1] and plain_i[0].tolist() == [1, 3, 4, 5, -1]
    assert np.isneginf(s[0, 3:]).all()
    idx.add(np.array([[9, 0, 0, 0, 0]], np.float32), np.array([200]))  # ids past the mask read as not blocked
    assert idx.search(q, 1)[1][0, 0] == 200


def _events(user: str, items: list[str], t0: float = 1.6e9, tag: str = "e", offset: int = 0):
    from streams.worker.recommender import Incoming

    return [Incoming(Event(f"{tag}{user}{j}", user, item, "view", t0 + 60 * j), 0, offset + j)
            for j, item in enumerate(items)]


def _items(out: bytes) -> list[tuple[str, float]]:
    import json

    return [(it["item_id"], it["score"]) for it in json.loads(out)["items"]]


def test_recommender_top_k_with_masked_items_is_the_unmasked_top_k_filtered(tiny_artifact):
    from streams.artifacts import load_artifact
    from streams.worker.recommender import Recommender

    k, masked_n = 10, 4
    plain = Recommender(load_artifact(tiny_artifact), k=k + masked_n)
    rec = Recommender(load_artifact(tiny_artifact), k=k)
    batch = _events("u1", ["i1", "i2", "i3", "i4"]) + _events("u2", ["i10", "i11"])
    want = [_items(o) for _, o in plain.process(batch, {}, {}).outputs]
    masked = [want[-1][j][0] for j in (0, 2, 5, 7)]  # in the top-K of u2's last answer
    assert rec.set_recommendable(masked + ["not-an-item"], False) == masked_n and rec.masked == masked_n
    res = rec.process(batch, {}, {})
    got = [_items(o) for _, o in res.outputs]
    assert len(got) == len(want) == len(batch)
    for g, w in zip(got, want, strict=True):
        assert g == [x for x in w if x[0] not in masked][:k]
    # An event naming a masked item is applied (a state with one more event), never dead-lettered.
    more = rec.process(_events("u2", ["i10", "i11", masked[0]], tag="m"), {}, {})
    assert more.applied == 3 and not more.dead and len(more.states) == 1
    assert not {i for o in more.outputs for i, _ in _items(o[1])} & set(masked)
    rec.set_recommendable(masked, True)
    assert rec.masked == 0
    assert [_items(o) for _, o in rec.process(batch, {}, {}).outputs][-1] == want[-1][:k]


def test_live_added_items_are_stored_by_key_and_read_back_by_any_version(tiny_artifact, tmp_path):
    """Worker A added `live-x` after its artifact's items; version B's nightly appended `nightly-a` there
    first, so B gives `live-x` another code. A state written by A names the same items when B reads it."""
    from test_items_live import nightly_like

    from streams.artifacts import load_artifact
    from streams.worker.recommender import Recommender

    n = len(load_artifact(tiny_artifact).item_ids)
    rng = np.random.default_rng(0)
    a = Recommender(load_artifact(tiny_artifact), k=100)
    a.add_items(["live-x"], rng.normal(size=(1, a.online.dim)).astype(np.float32))
    assert a.item_code["live-x"] == n
    res = a.process(_events("ux", ["i1", "live-x", "i2"]), {}, {})
    assert "live-x" not in {i for i, _ in _items(res.outputs[-1][1])}
    state = res.states["ux"]
    raw = a.codec.decode([state]).recent[0].tolist()
    assert raw[-3:] == [a.item_code["i1"], live_item_key("live-x"), a.item_code["i2"]]

    b = Recommender(load_artifact(nightly_like(tiny_artifact, tmp_path, "tiny-b", ["nightly-a"])), k=100)
    assert b.item_code["nightly-a"] == n and b.codec.tag == a.codec.tag
    b.register_live(["live-x", "i5"])  # as a swap does (control.py, Live._carry_over): keys first, then the items
    b.add_items(["live-x"], rng.normal(size=(1, b.online.dim)).astype(np.float32))
    assert b.item_code["live-x"] == n + 1
    st = b.decode_states([state])
    assert [b.item_ids[c] for c in st.recent[0][-3:]] == ["i1", "live-x", "i2"]
    out = b.process(_events("ux", ["i3"], t0=1.7e9, tag="b", offset=10), {"ux": state}, {})
    names = {i for i, _ in _items(out.outputs[0][1])}
    assert not names & {"i1", "live-x", "i2", "i3"} and "nightly-a" in names
    assert b.codec.decode([out.states["ux"]]).recent[0].tolist()[-4:] == raw[-3:] + [b.item_code["i3"]]

    # A worker that has not read `live-x` yet keeps the key as it is (it excludes nothing there).
    c = Recommender(load_artifact(tiny_artifact), k=100)
    kept = c.process(_events("ux", ["i4"], t0=1.75e9, tag="c", offset=20), {"ux": state}, {})
    assert c.codec.decode([kept.states["ux"]]).recent[0].tolist()[-4:] == raw[-3:] + [c.item_code["i4"]]


def test_a_version_masks_the_items_its_nightly_saw_leave_from_the_start(tiny_artifact):
    """`item_status` in the manifest (streams/batch/nightly.py): deleted and unavailable items are left out by a
    worker that starts on the version, before it has replayed the items topic."""
    import copy

    from streams.artifacts import load_artifact
    from streams.worker.recommender import Recommender

    art = load_artifact(tiny_artifact)
    art.manifest = copy.deepcopy(art.manifest)
    art.manifest["item_status"] = {"deleted": ["i3"], "unavailable": ["i4", "not-in-catalogue"]}
    rec = Recommender(art)
    assert rec.masked == 2
    answer = rec.recommend_user("nobody", None, None, k=48)
    assert {"i3", "i4"}.isdisjoint(i["item_id"] for i in answer["items"]) and len(answer["items"]) == 48
