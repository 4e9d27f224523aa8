"""Explanations ("because"): each recommended item names the user's recent event whose item is most similar.

On the real trained tiny artifact (BERT text vectors, LSTM, FAISS), without Kafka: the recommender is pure.
Off, nothing changes (same answers, same state bytes); on, the state keeps the recent events' types and
times, every format is read by every codec, and each "because" is the brute-force cosine argmax.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from encoders.data import EVENT_TYPES
from streams.artifacts import load_artifact
from streams.contracts.events import parse_event
from streams.worker.recommender import Incoming, Recommender
from streams.worker.state import StateCodec


def incoming(events, start: int = 0):
    out = []
    for j, (user, item, etype, ts) in enumerate(events, start):
        raw = json.dumps({"event_id": f"x{j}", "user_id": user, "item_id": item, "event_type": etype, "ts": ts})
        out.append(Incoming(parse_event(raw.encode(), user.encode()), 0, j, raw.encode(), user.encode()))
    return out


@pytest.fixture(scope="module")
def recs(tiny_artifact):
    return Recommender(load_artifact(tiny_artifact)), Recommender(load_artifact(tiny_artifact), explain=True)


EVENTS = [("a", f"i{(7 * j) % 50}", EVENT_TYPES[j % len(EVENT_TYPES)], 1_600_000_000 + 60 * j) for j in range(14)]
EVENTS += [("b", "i3", "view", 1_600_000_100), ("b", "i9", "buy", 1_600_000_200)]


def test_off_changes_nothing_and_on_adds_only_because(recs):
    plain, explained = recs
    r0 = plain.process(incoming(EVENTS), {}, {})
    r1 = explained.process(incoming(EVENTS), {}, {})
    assert len(r0.outputs) == len(r1.outputs) == len(EVENTS)
    for (u0, o0), (u1, o1) in zip(r0.outputs, r1.outputs, strict=True):
        a, b = json.loads(o0), json.loads(o1)
        assert u0 == u1 and "because" not in json.dumps(a)
        assert [(i["item_id"], i["score"]) for i in a["items"]] == [(i["item_id"], i["score"]) for i in b["items"]]
        assert a["gate"] == b["gate"]
    codec = StateCodec(plain.codec.dim, plain.artifact.weights_version)
    assert all(len(v) == codec.size for v in r0.states.values())
    d0, d1 = plain.codec.decode(list(r0.states.values())), explained.codec.decode(list(r1.states.values()))
    np.testing.assert_array_equal(d0.h, d1.h)
    np.testing.assert_array_equal(d0.recent, d1.recent)


def test_each_because_is_the_most_similar_recent_event(recs):
    _, explained = recs
    res = explained.process(incoming(EVENTS), {}, {})
    vecs = explained.online.item_vecs
    code = explained.item_code
    history = []
    for (user, item, etype, ts), (_u, out) in zip(EVENTS, res.outputs, strict=True):
        history.append((user, item, etype, ts))
        recent = [e for e in history if e[0] == user][-10:]
        for rec in json.loads(out)["items"]:
            v = vecs[code[rec["item_id"]]]
            sims = [float(v @ vecs[code[i]] / np.linalg.norm(v) / np.linalg.norm(vecs[code[i]]))
                    for _, i, _, _ in recent]
            best = max(range(len(recent)), key=lambda r: (sims[r], r))  # ties: the later event (argmax of last-first)
            why = rec["because"]
            assert np.isclose(sims[[e[1] for e in recent].index(why["item_id"])], sims[best], atol=1e-6)
            matches = [(t, s) for _, i, t, s in recent if i == why["item_id"]]
            assert (why["event_type"], why["ts"]) in matches


def test_states_survive_switching_explanations_on_and_off(recs):
    plain, explained = recs
    first = plain.process(incoming(EVENTS[:5]), {}, {}).states  # written without details
    later = incoming(EVENTS[5:8], 5)
    res = explained.process(later, first, {})  # read by the explaining codec: old slots unknown
    st = explained.codec.decode([res.states["a"]])
    assert st.recent_types[0].tolist()[-3:] == [EVENT_TYPES.index(e[2]) + 1 for e in EVENTS[5:8]]
    assert (st.recent_types[0][:-3] == 255).all() and np.isnan(st.recent_ages[0][:-3]).all()  # empty or unknown
    assert st.recent_ages[0][-1] == 0.0 and st.recent_ages[0][-2] == 60.0
    back = plain.process(incoming(EVENTS[8:9], 8), res.states, {})  # and the plain codec reads it back
    assert plain.codec.decode([back.states["a"]]).count[0] == 9
    answer = explained.recommend_user("a", res.states["a"], None, k=5, now=1_600_001_000.0, explain=True)
    assert answer["source"] == "state" and all("because" in i for i in answer["items"])
    unknown = [i["because"] for i in answer["items"] if i["because"]["event_type"] is None]
    assert all(b["ts"] is None for b in unknown)
