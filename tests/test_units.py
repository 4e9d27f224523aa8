"""Unit tests: the event contract against its JSON Schema, the state codec, the FAISS index."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from jsonschema import Draft202012Validator

from index import ItemIndex
from streams.contracts.events import BadEvent, event_json, load_schema, parse_event
from streams.worker.state import RECENT, StateCodec

GOOD = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "event_type": "view", "ts": 1_600_000_000}
BAD = [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({**GOOD, "event_type": "like"}), "unknown event_type"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "item_id"}), "missing field 'item_id'"),
    (json.dumps({**GOOD, "ts": "yesterday"}), "must be a number"),
    (json.dumps({**GOOD, "ts": 12}), "too far in the past"),
    (json.dumps({**GOOD, "ts": 9_999_999_999}), "in the future"),
    (json.dumps({**GOOD, "user_id": 1.5}), "must be a string or integer"),
    (json.dumps({**GOOD, "event_id": ""}), "1..128 characters"),
]


def test_valid_event_parses_and_matches_the_schema():
    schema = Draft202012Validator(load_schema("event"))
    raw = event_json("e1", "u1", "i1", "view", 1_600_000_000)
    assert schema.is_valid(json.loads(raw))
    ev = parse_event(raw, b"u1")
    assert (ev.user_id, ev.item_id, ev.event_type, ev.ts) == ("u1", "i1", "view", 1_600_000_000.0)
    assert parse_event(json.dumps({**GOOD, "user_id": 7}).encode(), b"7").user_id == "7"


@pytest.mark.parametrize(("raw", "reason"), BAD)
def test_invalid_events_are_rejected_with_a_reason(raw, reason):
    with pytest.raises(BadEvent, match=reason):
        parse_event(raw.encode(), b"u1")


def test_parser_and_schema_agree_on_schema_level_errors():
    schema = Draft202012Validator(load_schema("event"))
    for raw, _ in BAD[2:]:
        rec = json.loads(raw)
        if rec.get("ts") == 9_999_999_999:
            continue  # "a day ahead of the clock" depends on the time of check, not expressible statically
        assert not schema.is_valid(rec), raw


def test_key_must_be_the_user_and_payload_small():
    with pytest.raises(BadEvent, match="key does not match"):
        parse_event(json.dumps(GOOD).encode(), b"u2")
    with pytest.raises(BadEvent, match="missing message key"):
        parse_event(json.dumps(GOOD).encode(), None)
    with pytest.raises(BadEvent, match="oversized"):
        parse_event(json.dumps({**GOOD, "pad": "x" * 5000}).encode(), b"u1")


def test_recommendation_schema_accepts_worker_output():
    schema = Draft202012Validator(load_schema("recommendation"))
    rec = {"user_id": "u1", "items": [{"item_id": "i1", "score": 1.5}], "gate": 0.3, "event_id": "e1",
           "model_version": "v1", "ts": 1.0, "event_ts": 1.0}
    assert schema.is_valid(rec)
    assert not schema.is_valid({**rec, "gate": 1.5})


def test_state_codec_round_trip_and_model_mismatch_resets():
    codec = StateCodec(8, "v1")
    st = codec.empty(2)
    st.h[1], st.c[1] = np.arange(8), -np.arange(8)
    st.recent[1, -1] = 42
    st.last_partition[1], st.last_offset[1], st.last_ts[1], st.count[1] = 3, 99, 1.5e9, 7
    raw = codec.encode_one(st, 1)
    assert len(raw) == codec.size == 32 + 8 * 8 + 12 * RECENT
    back = codec.decode([None, raw])
    np.testing.assert_array_equal(back.h[1], st.h[1])
    np.testing.assert_array_equal(back.c[1], st.c[1])
    assert (back.recent[1, -1], back.last_offset[1], back.count[1]) == (42, 99, 7)
    assert back.last_offset[0] == -1
    other = StateCodec(8, "v2").decode([raw])
    assert other.reset == 1 and other.count[0] == 0


def test_index_exact_top_k_with_exclusions(tmp_path):
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(200, 16)).astype(np.float32)
    ids = np.arange(1, 201)
    idx = ItemIndex.build(vecs, ids)
    q = rng.normal(size=(3, 16)).astype(np.float32)
    want = np.argsort(-(q @ vecs.T), axis=1)[:, :10] + 1
    _, got = idx.search(q, 10)
    np.testing.assert_array_equal(got, want)
    excl = [want[0, :2], np.array([], np.int64), want[2, :1]]
    _, got2 = idx.search(q, 10, exclude=excl)
    assert not set(want[0, :2]) & set(got2[0])
    np.testing.assert_array_equal(got2[1], want[1])
    np.testing.assert_array_equal(got2[0][:8], want[0, 2:10])
    idx.save(tmp_path / "i.faiss")
    _, got3 = ItemIndex.load(tmp_path / "i.faiss").search(q, 10)
    np.testing.assert_array_equal(got3, want)


def test_index_add_makes_new_items_searchable():
    vecs = np.eye(4, dtype=np.float32)
    idx = ItemIndex.build(vecs, np.arange(1, 5))
    idx.add(np.array([[0, 0, 0, 5.0]], np.float32), np.array([99]))
    _, got = idx.search(np.array([[0, 0, 0, 1.0]], np.float32), 1)
    assert got[0, 0] == 99


def test_batch_of_only_redeliveries_is_neither_applied_nor_answered_again(tiny_artifact):
    """After a crash a batch may hold only events the state already has. The state holds an event only
    after its answer was delivered, so none is applied or answered again, and the state is not rewritten."""
    from streams.artifacts import load_artifact
    from streams.contracts.events import Event
    from streams.worker.recommender import Incoming, Recommender

    rec = Recommender(load_artifact(tiny_artifact))
    first = [Incoming(Event(f"e{j}", "u1", "i1", "view", 1.6e9 + j), 0, j) for j in range(3)]
    res = rec.process(first, {}, {})
    assert res.applied == 3 and len(res.outputs) == 3
    again = rec.process(first, {"u1": res.states["u1"]}, {})
    assert again.applied == 0 and again.duplicates == 3 and again.outputs == [] and again.states == {}
    mixed = rec.process(first + [Incoming(Event("e3", "u1", "i1", "view", 1.6e9 + 3), 0, 3)],
                        {"u1": res.states["u1"]}, {})
    assert mixed.applied == 1 and mixed.duplicates == 3 and [u for u, _ in mixed.outputs] == ["u1"]


def test_state_codec_float16_variant_is_smaller_and_either_precision_reads_both():
    import numpy as np

    half, full = StateCodec(8, "v1", np.float16), StateCodec(8, "v1")
    st = half.empty(1)
    st.h[0], st.c[0], st.count[0] = np.linspace(-1, 1, 8), 0.5, 3
    raw = half.encode_one(st, 0)
    assert len(raw) == half.size == full.size - 8 * 4
    for codec in (half, full):  # a deployment switching LSTI_STATE_DTYPE keeps every state
        back = codec.decode([raw])
        np.testing.assert_allclose(back.h[0], st.h[0], atol=1e-3)
        assert back.count[0] == 3 and back.reset == 0
    np.testing.assert_array_equal(half.decode([full.encode_one(st, 0)]).c[0], st.c[0])
    # the other model's state, or a truncated one, is reset, never misread
    assert StateCodec(8, "v2").decode([raw]).reset == 1 and full.decode([raw[:-1]]).reset == 1


def test_artifacts_from_before_the_per_user_gate_still_load():
    from encoders.model import LSTIConfig, LSTIModel
    from streams.artifacts import stored_config

    old = LSTIConfig(n_items=5, dim=8, gate="dim").to_dict()
    del old["gate"]
    cfg = stored_config(old)
    assert cfg.gate == "dim"
    text = torch.zeros(6, cfg.text_dim)
    LSTIModel(cfg, text).load_state_dict(LSTIModel(LSTIConfig(n_items=5, dim=8, gate="dim"), text).state_dict())
    assert stored_config(LSTIConfig(n_items=5, dim=8).to_dict()).gate == "user"


def _one_output(inc, names, scores, ok, gate, version, now) -> bytes:
    """The per-event formula the worker used before batched formatting (the contract's reference)."""
    e = inc.event
    items = ",".join(f'{{"item_id":{nm},"score":{sc:.4f}}}' for nm, sc, keep in zip(names, scores, ok, strict=True)
                     if keep)
    return (f'{{"user_id":{json.dumps(e.user_id)},"items":[{items}],"gate":{gate:.4f},'
            f'"event_id":{json.dumps(e.event_id)},"model_version":{version},"ts":{now},'
            f'"event_ts":{e.ts!r}}}').encode()


def test_batched_output_formatting_equals_the_per_event_formula(tiny_artifact):
    """`_format_outputs` fills one %-template for the whole batch: every byte must equal the per-event
    f-string's, for full rows and rows that ran short, for ids with quotes, %, unicode and newlines."""
    from streams.artifacts import load_artifact
    from streams.contracts.events import Event
    from streams.worker.recommender import Incoming, Recommender

    rec = Recommender(load_artifact(tiny_artifact))
    users = ["u1", 'q"uote', "pct%s%d", "üñí", "new\nline", "back\\slash", 42]
    incs = [Incoming(Event(f"e{j}%%", str(u), "i1", "view", 1.6e9 + j / 7), 0, j) for j, u in enumerate(users)]
    rng = np.random.default_rng(0)
    n, k = len(incs), 5
    names = np.array([json.dumps(x) for x in ["a", 'b"', "c%", "d\u00e9", "e"]] * n, dtype=object).reshape(n, k)
    scores = rng.normal(size=(n, k)).astype(np.float32)
    scores[0, 0] = -0.0
    ok = np.ones((n, k), bool)
    ok[2, 3:] = False
    ok[5, :] = False
    gate = rng.random(n).astype(np.float32)
    version, now = json.dumps('v"1%'), "1700000000.123"
    got = rec._format_outputs(incs, names, scores, ok, gate, version, now)
    want = [_one_output(inc, names[j], scores[j], ok[j], gate[j], version, now) for j, inc in enumerate(incs)]
    assert [u for u, _ in got] == [inc.event.user_id for inc in incs]
    assert [b for _, b in got] == want
    for _, b in got:
        json.loads(b)


def test_states_are_bit_identical_however_events_are_batched(tiny_artifact):
    """The LSTM kernel steps each event from its own inputs and its user's previous state in a fixed order:
    the same events in one batch, in batches of 7 or one at a time give the same state bytes."""
    from streams.artifacts import load_artifact
    from streams.contracts.events import Event
    from streams.worker.recommender import Incoming, Recommender

    art = load_artifact(tiny_artifact)
    items = [i for i in art.item_ids if i][:12]
    rng = np.random.default_rng(3)
    incs = [Incoming(Event(f"e{j}", f"u{rng.integers(6)}", items[rng.integers(len(items))],
                           ["view", "click", "cart", "buy"][rng.integers(4)], 1.6e9 + 37.0 * j), 0, j)
            for j in range(300)]

    def states(size: int) -> dict:
        rec, out = Recommender(art), {}
        for b in range(0, len(incs), size):
            batch = incs[b : b + size]
            out.update(rec.process(batch, {i.event.user_id: out.get(i.event.user_id) for i in batch}, {}).states)
        return out

    whole = states(300)
    assert len(whole) == 6
    assert states(7) == whole
    assert states(1) == whole


def test_progress_line_splits_an_events_age_at_fetch_and_at_pickup(caplog):
    """The age of an event when applied, split where it accrued: before the consumer handed its batch out
    (publish, broker, fetch) and in Faust's queues until the agent took it."""
    import logging
    import time

    from streams.worker.metrics import Metrics

    m = Metrics()
    now = time.time()
    sent = [(now - 0.300) * 1000.0, (now - 0.200) * 1000.0]  # two events, published 300 and 200 ms ago
    m.consumed = 2
    m.observe_batch(sent, 0.01, fetched_at=now - 0.150, picked_at=now - 0.050)
    assert m.fetched_ms_sum == pytest.approx(150.0 + 50.0, abs=1e-3)  # fetched 150 and 50 ms after publishing
    assert m.queued_ms_sum == pytest.approx(2 * 100.0, abs=1e-3)  # both waited 100 ms to be taken
    with caplog.at_level(logging.INFO):
        m.log_progress(logging.getLogger("lsti.test"))
    assert "(100 when fetched, 100 more queued)" in caplog.text


def test_progress_line_counts_the_garbage_collectors_pauses(caplog):
    """A full collection stops every thread of the worker; the progress line says how long, in all and at most."""
    import gc
    import logging

    from streams.worker.metrics import Metrics

    m = Metrics()
    m.watch_gc()
    try:
        junk = [[i] for i in range(200_000)]  # something for the collector to walk
        gc.collect()
        del junk
        assert m.gc_seconds > 0 and m.gc_full >= 1 and m.gc_max_seconds <= m.gc_seconds
        m.consumed = 1
        m.observe_batch([], 0.0)
        with caplog.at_level(logging.INFO):
            m.log_progress(logging.getLogger("lsti.test"))
        assert "; gc " in caplog.text and "(longest " in caplog.text
        assert m.gc_max_seconds == 0.0  # the longest pause is per progress line
    finally:
        gc.callbacks[:] = [c for c in gc.callbacks if getattr(c, "__qualname__", "").split(".")[0] != "Metrics"]


def test_finishes_run_in_batch_order_with_a_bounded_number_waiting():
    """A partition's finishes complete in submission order whatever their own durations; the agent is held
    only once `depth` of them wait; other partitions are not held by this one."""
    import asyncio

    from streams.worker.finishes import Finishes

    async def scenario():
        done, release = [], asyncio.Event()
        fin = Finishes(depth=2)

        def finish(name, slow=False):
            async def run(prev):
                if prev is not None:
                    await prev
                if slow:
                    await release.wait()
                done.append(name)
            return run

        assert await fin.submit(0, finish("a", slow=True)) == 0.0
        assert await fin.submit(0, finish("b")) == 0.0  # chained behind a: the agent goes on
        assert await fin.submit(1, finish("x")) == 0.0  # another partition: not behind a
        await asyncio.sleep(0)
        assert done == ["x"]
        third = asyncio.ensure_future(fin.submit(0, finish("c")))  # two waiting: held until b is done
        await asyncio.sleep(0.01)
        assert not third.done()
        release.set()
        held = await third
        await fin.last(0)
        assert done == ["x", "a", "b", "c"] and held > 0.0

    asyncio.run(scenario())


def test_one_model_pass_for_a_fetch_equals_one_pass_per_batch(tiny_artifact):
    """The events agent runs the model once for all partitions' batches of a fetch (`run_model`): every
    state byte and every answer (but its send time) must be what one pass per batch gives, also when a
    user is in two batches (then it is one pass per batch) and when a batch holds no event."""
    import re

    from streams.artifacts import load_artifact
    from streams.contracts.events import Event
    from streams.worker.app import apply_isolated, run_model
    from streams.worker.recommender import Incoming, Recommender

    rec = Recommender(load_artifact(tiny_artifact))
    items = [f"i{j}" for j in range(1, 8)]
    rng = np.random.default_rng(1)

    def batch(part, users, n, base):
        return [Incoming(Event(f"e{part}-{base + j}", users[j % len(users)], items[int(rng.integers(len(items)))],
                               "view", 1.6e9 + base + j), part, base + j) for j in range(n)]

    def states_of(incs, known):
        return {inc.event.user_id: known.get(inc.event.user_id) for inc in incs}

    def strip_ts(outputs):
        return [(u, re.sub(rb'"ts":[0-9.]+', b"", out)) for u, out in outputs]

    known: dict = {}
    for rnd, base in enumerate([0, 100, 100]):  # the last round delivers the second again: all redeliveries
        batches = [batch(0, ["a", "b"], 9, base), batch(1, ["c"], 4, base), [],
                   batch(3, ["d", "e", "f"], 12, base)]
        batches[1].append(Incoming(Event(f"x{base}", "c", "no-such-item", "view", 1.6e9 + base), 1, base + 50))
        states = [states_of(incs, known) for incs in batches]
        longs = [dict.fromkeys(st) for st in states]
        got = run_model(rec, batches, states, longs)
        want = [apply_isolated(rec, incs, st, lg) if incs else None
                for incs, st, lg in zip(batches, states, longs, strict=True)]
        for g, w in zip(got, want, strict=True):
            if w is None:
                assert g.outputs == [] and g.states == {} and g.dead == [] and g.applied == g.duplicates == 0
                continue
            assert g.states == w.states
            assert strip_ts(g.outputs) == strip_ts(w.outputs)
            assert [(i.event.event_id, why) for i, why in g.dead] == [(i.event.event_id, why) for i, why in w.dead]
            assert (g.applied, g.duplicates) == (w.applied, w.duplicates)
        assert sum(g.applied for g in got) == (25 if rnd < 2 else 0)
        assert sum(g.duplicates for g in got) == (0 if rnd < 2 else 25)
        for g in got:
            known.update(g.states)
    # a user in two batches (events not keyed by user): each batch alone, its own state
    twice = [batch(0, ["a"], 3, 1000), batch(1, ["a"], 3, 1000)]
    got = run_model(rec, twice, [{"a": known["a"]}, {"a": None}], [{"a": None}, {"a": None}])
    assert got[0].states == apply_isolated(rec, twice[0], {"a": known["a"]}, {"a": None}).states
    assert got[1].states == apply_isolated(rec, twice[1], {"a": None}, {"a": None}).states
    assert run_model(rec, [[], []], [{}, {}], [{}, {}])[1].outputs == []
