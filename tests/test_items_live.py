"""Items leave the catalogue live: a deletion or an out-of-stock message on the `items` topic masks the item in
every worker's index within seconds, without a restart; events naming it are still applied. Items added live
keep their identity in users' states across a hot swap to a version whose nightly gave their codes to other
items. Real broker, real worker processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_faults import health, make_stream, settled_states, unique_events, wait_progress

from streams.artifacts import load_artifact, write_artifact
from streams.config import REPO, Topics
from streams.contracts.events import event_json
from streams.kafka.tools import TopicReader, ensure_topics, publish_raw
from streams.worker.state import RECENT, live_item_key

pytestmark = pytest.mark.integration


def nightly_like(src: Path, root: Path, version: str, new_items: list[str]) -> Path:
    """A version as `lsti nightly` writes one (streams/batch/nightly.py): the base's items keep their codes,
    `new_items` are appended (small random text vectors, zero id embeddings), same weights version."""
    import torch

    from streams.batch.build import item_index_for
    from streams.batch.nightly import extend_model

    art = load_artifact(src)
    n_old, text_dim = len(art.item_ids), art.model.cfg.text_dim
    text = torch.zeros(n_old + len(new_items), text_dim)
    text[:n_old] = art.model.text
    text[n_old:] = 0.05 * torch.randn(len(new_items), text_dim, generator=torch.Generator().manual_seed(1))
    model = extend_model(art.model, text)
    users, longs = art.long_term()
    return write_artifact(Path(root), version, model, list(art.item_ids) + list(new_items), item_index_for(model),
                          users, longs, {"weights_version": art.weights_version, "parent": art.version})


def _publish_items(kafka: str, topic: str, changes: list[dict | bytes]) -> None:
    publish_raw(kafka, [(c["item_id"].encode() if isinstance(c, dict) else None,
                         json.dumps(c).encode() if isinstance(c, dict) else c) for c in changes], topic)


def _answers(recs: TopicReader, event_ids: set[str]) -> list[dict]:
    outs = [json.loads(v) for _, v in list(recs.records)]
    return [o for o in outs if o["event_id"] in event_ids]


def _named(outs: list[dict]) -> set[str]:
    return {it["item_id"] for o in outs for it in o["items"]}


def test_deleted_and_unavailable_items_are_never_recommended_but_their_events_apply(kafka, start_worker, namespace,
                                                                                    tiny_artifact):
    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 4, topics)
    recs, dlq = TopicReader(kafka, topics.recommendations), TopicReader(kafka, topics.dlq)
    recs.start()
    dlq.start()
    k = ["-k", "60"]  # more than the 50 items: every item a user has not just seen is in every answer
    workers = [start_worker("w1", extra=k), start_worker("w2", extra=k)]
    gone, out_of_stock = "i7", "i8"

    first, per_user = make_stream(n_users=12, n_events=240, seed=11)
    publish_raw(kafka, first, topics.events)
    wait_progress(lambda: len(unique_events(recs)), len(first), "the first events answered")
    before = _answers(recs, {json.loads(v)["event_id"] for _, v in first})
    assert {gone, out_of_stock} <= _named(before)

    t0 = time.time()
    for action, item in (("delete", gone), ("unavailable", out_of_stock)):  # as an operator does: the CLI
        cli = subprocess.run([sys.executable, "-m", "streams.cli", "items", action, item, "--bootstrap", kafka,
                              "--topic-prefix", namespace["prefix"]], cwd=REPO, capture_output=True, text=True)
        assert cli.returncode == 0 and "published 1 catalogue changes" in cli.stderr, cli.stderr
    _publish_items(kafka, topics.items, [b"not json", {"item_id": "i9"}])  # two malformed: skipped

    def masked_everywhere() -> int:
        return sum(min(h["items_removed"], 1) + min(h["items_unavailable"], 1) + min(h["items_malformed"], 2)
                   for h in (health(w.web_port) for w in workers))

    wait_progress(masked_everywhere, 8, "both workers to mask the items and skip the malformed records")
    seconds_to_mask = time.time() - t0
    for w in workers:
        h = health(w.web_port)
        assert (h["items_removed"], h["items_unavailable"], h["items_masked"], h["items_malformed"]) == (1, 1, 2, 2)
        log = w.log_text()  # one line per batch of changes (the two items may sit in two partitions)
        assert "ignored a malformed item" in log and "1 deleted, " in log and "1 unavailable (" in log

    # Events naming the masked items, from users who have seen them and from new ones, and plenty of others.
    second, per_user2 = make_stream(n_users=12, n_events=240, seed=12, t0=1_650_000_000)
    named = [(u.encode(), event_json(f"named-{j}", u, item, "buy", 1_650_000_000 + 3 * 240 + j))
             for j, (u, item) in enumerate([("u1", gone), ("u2", out_of_stock), ("u1", out_of_stock),
                                            ("new-user", gone)])]
    publish_raw(kafka, second + named, topics.events)
    wait_progress(lambda: len(unique_events(recs)), len(first) + len(second) + len(named), "the second events answered")
    after = _answers(recs, {json.loads(v)["event_id"] for _, v in second + named})
    assert len(after) == len(second) + len(named)
    assert not {gone, out_of_stock} & _named(after), "a masked item was recommended"
    assert not dlq.records, f"dead letters: {dlq.records[:3]}"
    states = settled_states(kafka, namespace["app_id"], tiny_artifact, len(first) + len(second) + len(named))
    for u in ("u1", "u2"):
        extra = sum(1 for key, _ in named if key == u.encode())
        assert states[u]["count"] == len(per_user.get(u, [])) + len(per_user2.get(u, [])) + extra
    assert states["new-user"]["count"] == 1

    # Back in stock: recommended again; the deleted item stays out.
    _publish_items(kafka, topics.items, [{"item_id": out_of_stock, "available": True}])
    wait_progress(lambda: sum(1 - health(w.web_port)["items_unavailable"] for w in workers), 2,
                  "both workers to unmask the item back in stock")
    third, _ = make_stream(n_users=12, n_events=120, seed=13, t0=1_700_000_000)
    publish_raw(kafka, third, topics.events)
    total = len(first) + len(second) + len(named) + len(third)
    wait_progress(lambda: len(unique_events(recs)), total, "the third events answered")
    last = _answers(recs, {json.loads(v)["event_id"] for _, v in third})
    recs.stop_flag.set()
    dlq.stop_flag.set()
    assert out_of_stock in _named(last) and gone not in _named(last) and not dlq.records
    assert all(health(w.web_port)["items_masked"] == 1 for w in workers)
    print(f"masked on both workers {seconds_to_mask:.1f} s after the message")


def test_live_added_items_keep_their_identity_across_a_hot_swap(kafka, start_worker, namespace, tiny_artifact,
                                                               tmp_path):
    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 4, topics)
    # The next version's nightly saw other new items, not ours: it appends them where the worker put `live-x`.
    v2 = nightly_like(tiny_artifact, tmp_path, f"tiny-nightly-{namespace['app_id']}", ["nightly-a", "nightly-b"])
    n = len(load_artifact(tiny_artifact).item_ids)
    recs, dlq = TopicReader(kafka, topics.recommendations), TopicReader(kafka, topics.dlq)
    recs.start()
    dlq.start()
    worker = start_worker(extra=["-k", "60"])
    _publish_items(kafka, topics.items, [{"item_id": "live-x", "text": "A space opera number 999 with starships"}])
    wait_progress(lambda: health(worker.web_port)["items_added"], 1, "the live item to be indexed")

    history = ["i1", "live-x", "i2"]
    sent: list[str] = []

    def send(items: list[str], t0: int) -> list[dict]:
        msgs = [(b"ux", event_json(f"ux-{len(sent) + j}", "ux", item, "view", t0 + 60 * j))
                for j, item in enumerate(items)]
        ids = {json.loads(v)["event_id"] for _, v in msgs}
        sent.extend(items)
        publish_raw(kafka, msgs, topics.events)
        wait_progress(lambda: len(_answers(recs, ids)), len(ids), "the user's events answered")
        return sorted(_answers(recs, ids), key=lambda o: o["event_ts"])

    out = send(history, 1_600_000_000)
    assert all(o["model_version"] == "tiny-v1" for o in out)
    assert "live-x" not in _named(out[-1:]) and "live-x" in _named(out[:1])

    control = {"version": v2.name, "path": str(v2), "weights_version": "x", "ts": time.time()}
    publish_raw(kafka, [(b"model", json.dumps(control).encode())], topics.model_versions)
    wait_progress(lambda: health(worker.web_port)["swaps"], 1, "the swap to the nightly version")
    h = health(worker.web_port)
    assert h["model_version"] == v2.name and h["items"] == n + 2  # 50 + nightly-a, nightly-b + live-x

    after = send(["i3"], 1_600_001_000)[0]
    assert after["model_version"] == v2.name
    names = _named([after])
    assert not names & {"i1", "live-x", "i2", "i3"}, "an item of the user's recent history was recommended"
    assert {"nightly-a", "nightly-b"} <= names, "a new item was excluded in place of a live-added one"
    again = send(["live-x", "i4"], 1_600_002_000)  # naming it after the swap: applied, not dead-lettered
    assert "live-x" not in _named(again) and not dlq.records, f"dead letters: {dlq.records[:3]}"

    art2 = load_artifact(v2)
    by_key = {live_item_key("live-x"): "live-x"}
    state = settled_states(kafka, namespace["app_id"], tiny_artifact, len(sent))["ux"]
    stored = [by_key[c] if c < 0 else art2.item_ids[c] if c else None for c in state["recent"]]
    assert stored == ([None] * RECENT + sent)[-RECENT:], "the stored codes name other items"
    assert state["count"] == len(sent) and np.isfinite(state["h"]).all()
    recs.stop_flag.set()
    dlq.stop_flag.set()
