"""`lsti nightly` on the tiny artifact: new items appended (zero id rows, searchable), known codes kept,
weights_version kept, checksums verified, a killed run resumed from its saved chunks, and the text
cache reused on a rerun."""

from __future__ import annotations

import argparse
import csv
import json
import shutil

import numpy as np
import pytest
import torch

NEW_ITEMS = {"n0": "A space opera sequel set on a frozen moon", "n1": "A crime thriller about a diamond heist",
             "n2": "An animated family film about a lost robot"}
CHANGED = ("i3", "A crime thriller remastered edition number 3")


@pytest.fixture
def nightly_inputs(tmp_path, fixture_files):
    """The generated data plus events naming new items, a changed text, a new user and one late event."""
    events, items = fixture_files
    rows = list(csv.DictReader(open(events)))
    last = max(int(r["ts"]) for r in rows)
    extra = [("u0", "n0", "view", last + 10), ("u1", "n1", "click", last + 20), ("u_new", "n2", "view", last + 30),
             ("u_new", "i2", "buy", last + 40), ("u_late", "n0", "view", last + 1000)]
    ev = tmp_path / "events.csv"
    with open(ev, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "event_type", "ts"])
        w.writerows([r["user_id"], r["item_id"], r["event_type"], r["ts"]] for r in rows)
        w.writerows(extra)
    texts = [json.loads(line) for line in open(items)]
    it = tmp_path / "items.jsonl"
    with open(it, "w") as f:
        for rec in texts:
            text = CHANGED[1] if rec["item_id"] == CHANGED[0] else rec["text"]
            f.write(json.dumps({"item_id": rec["item_id"], "text": text}) + "\n")
        for iid, text in NEW_ITEMS.items():
            f.write(json.dumps({"item_id": iid, "text": text}) + "\n")
    return {"events": ev, "items": it, "cutoff": last + 100, "root": tmp_path / "art", "cache": tmp_path / "cache",
            "work": tmp_path / "work"}


def _run(inp, base, **kw):
    from streams.batch.nightly import run_nightly

    args = dict(dataset=None, events=inp["events"], items=inp["items"], base=base, cutoff=inp["cutoff"],
                root=inp["root"], publish=False, progress=False, cache_dir=inp["cache"], work_dir=inp["work"])
    return run_nightly(**{**args, **kw})


def test_nightly_extends_catalogue_without_retraining(tiny_artifact, nightly_inputs, tmp_path):
    from encoders.text import TextEncoder
    from streams.artifacts import BadArtifact, current_version, load_artifact, verify_artifact

    base = load_artifact(tiny_artifact)
    res = _run(nightly_inputs, tiny_artifact)
    new = load_artifact(res.path)
    m = verify_artifact(res.path)

    # Known items keep their codes; new ones are appended; the model grew with them.
    n_old = len(base.item_ids)
    assert new.item_ids[:n_old] == base.item_ids
    assert sorted(new.item_ids[n_old:]) == sorted(NEW_ITEMS)
    assert new.model.cfg.n_items == len(new.item_ids) - 1 == m["n_items"]
    assert res.counts["items_new"] == len(NEW_ITEMS) and res.counts["items_changed"] == 1

    # New items: zero id embedding, BERT text vector, searchable in the index with the model's score.
    codes = [new.item_ids.index(iid) for iid in NEW_ITEMS]
    assert torch.count_nonzero(new.model.id_emb.weight[codes]) == 0
    bert = TextEncoder(cache_dir=nightly_inputs["cache"]).encode(list(NEW_ITEMS.values()), progress=False)
    assert np.allclose(new.model.text[codes].numpy(), bert, atol=1e-5)
    assert len(new.index) == new.model.cfg.n_items
    with torch.no_grad():
        vecs = new.model.item_vectors().numpy()
    scores, ids = new.index.search(vecs[codes], len(new.index))
    for r, c in enumerate(codes):
        hit = np.flatnonzero(ids[r] == c)
        assert len(hit) == 1 and np.isclose(scores[r][hit[0]], vecs[c] @ vecs[c], rtol=1e-4)

    # Unchanged texts keep the base's vectors; the changed one got a new vector; weights untouched.
    i3 = base.item_ids.index(CHANGED[0])
    unchanged = [c for c in range(1, n_old) if c != i3]
    assert torch.equal(new.model.text[unchanged], base.model.text[unchanged])
    assert not torch.allclose(new.model.text[i3], base.model.text[i3])
    assert torch.equal(new.model.id_emb.weight[:n_old], base.model.id_emb.weight)
    for name, tensor in base.model.state_dict().items():
        if name not in ("text", "id_emb.weight"):
            assert torch.equal(new.model.state_dict()[name], tensor), name

    # Manifest: same weights_version (short-term states survive), lineage, cutoff, counts, timings.
    assert new.weights_version == base.weights_version
    assert m["parent"] == base.version and m["cutoff_ts"] == nightly_inputs["cutoff"]
    assert m["counts"]["texts_encoded"] + m["counts"]["texts_cached"] == len(new.item_ids) - 1
    assert {"load_data", "encode_texts", "long_term", "index", "total"} <= set(m["timings"])

    # Long-term vectors: every user with an event up to the cutoff, none after it.
    users, longs = new.long_term()
    assert "u_new" in users and "u_late" not in users and len(users) == res.counts["users"] == 61
    assert longs.shape == (61, new.model.cfg.dim) and np.isfinite(longs).all()
    assert current_version(nightly_inputs["root"]) is None  # not published: not made CURRENT

    # A corrupted file is refused.
    bad = tmp_path / "bad"
    shutil.copytree(res.path, bad)
    blob = bytearray((bad / "long_term.npy").read_bytes())
    blob[-1] ^= 0xFF
    (bad / "long_term.npy").write_bytes(bytes(blob))
    with pytest.raises(BadArtifact):
        verify_artifact(bad)
    with pytest.raises(BadArtifact):
        load_artifact(bad)


def test_nightly_resumes_and_reuses_cache(tiny_artifact, nightly_inputs, monkeypatch):
    import streams.batch.nightly as nightly
    from encoders.split import Sequence
    from streams.artifacts import load_artifact
    from streams.batch.build import long_term_vectors

    calls = {"n": 0}

    def dies_on_second_chunk(model, seqs, batch=256):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return long_term_vectors(model, seqs, batch)

    monkeypatch.setattr(nightly, "long_term_vectors", dies_on_second_chunk)
    with pytest.raises(RuntimeError, match="killed"):
        _run(nightly_inputs, tiny_artifact, chunk_users=16)
    root = nightly_inputs["root"]
    assert not [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]  # no half version
    assert len(list(nightly_inputs["work"].glob("*/long-*.npy"))) == 1

    calls["n"] = 10  # no more failures; count the chunks computed
    res = _run(nightly_inputs, tiny_artifact, chunk_users=16)
    assert res.counts["chunks"] == 4 and res.counts["chunks_reused"] == 1 and calls["n"] == 10 + 3
    assert res.counts["texts_encoded"] == 0  # the first (killed) run filled the text cache
    assert not list(nightly_inputs["work"].glob("*/long-*.npy"))  # work folder dropped after success

    # The resumed vectors are what a straight computation gives.
    art = load_artifact(res.path)
    users, longs = art.long_term()
    rows = [r for r in csv.DictReader(open(nightly_inputs["events"]))
            if r["user_id"] == "u_new" and int(r["ts"]) <= nightly_inputs["cutoff"]]
    seq = Sequence(0, np.array([art.item_ids.index(r["item_id"]) for r in rows]),
                   np.array([{"view": 1, "click": 2, "cart": 3, "fav": 4, "buy": 5}[r["event_type"]] for r in rows]),
                   np.array([int(r["ts"]) for r in rows]))
    assert np.allclose(longs[users.index("u_new")], long_term_vectors(art.model, [seq])[0], atol=1e-5)

    again = _run(nightly_inputs, tiny_artifact)
    assert again.counts["texts_encoded"] == 0 and again.version != res.version
    assert load_artifact(again.path).item_ids == art.item_ids


def test_main_nightly_cli(tiny_artifact, nightly_inputs, capsys, monkeypatch):
    from streams.artifacts import current_version
    from streams.batch.nightly import main_nightly
    from streams.cli.main import add_nightly_args

    monkeypatch.setenv("LSTI_CACHE", str(nightly_inputs["cache"]))
    p = argparse.ArgumentParser()
    add_nightly_args(p)
    args = p.parse_args(["--events", str(nightly_inputs["events"]), "--items", str(nightly_inputs["items"]),
                         "--base", str(tiny_artifact), "--out", str(nightly_inputs["root"]), "--no-publish",
                         "--activate", "-q"])
    assert args.cutoff is None and args.base != "CURRENT"
    assert main_nightly(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["current"] and current_version(nightly_inputs["root"]) == out["version"]
    assert out["counts"]["users"] == 62  # no cutoff: the late user counts too
    # --base as a version name under --out, default CURRENT
    args = p.parse_args(["--events", str(nightly_inputs["events"]), "--items", str(nightly_inputs["items"]),
                         "--out", str(nightly_inputs["root"]), "--no-publish", "-q"])
    assert main_nightly(args) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["counts"]["items_new"] == 0 and second["counts"]["texts_encoded"] == 0


@pytest.mark.integration
def test_nightly_publishes_then_activates(tiny_artifact, nightly_inputs, kafka, namespace):
    from streams.artifacts import current_version, sha256
    from streams.config import Topics
    from streams.contracts.vectors import encode_vector
    from streams.kafka.tools import read_compacted

    res = _run(nightly_inputs, tiny_artifact, publish=True, bootstrap=kafka, topic_prefix=namespace["prefix"])
    assert res.published and res.activated and current_version(nightly_inputs["root"]) == res.version
    vecs, users = np.load(res.path / "long_term.npy"), json.loads((res.path / "users.json").read_text())
    table = read_compacted(kafka, Topics.with_prefix(namespace["prefix"]).long_term)
    assert len(table) == len(users) and table[users[0].encode()] == encode_vector(vecs[0])
    control = read_compacted(kafka, namespace["prefix"] + "model-versions")
    msg = json.loads(control[b"model"])
    assert msg["version"] == res.version and msg["path"] == str(res.path.resolve())
    assert msg["weights_version"] == res.weights_version
    assert msg["sha256_manifest"] == sha256(res.path / "manifest.json")
