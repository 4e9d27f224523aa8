"""The model object the stream agent wraps: a micro-batch of events in, new states and outputs out.

Pure (no Kafka, no Faust), so unit tests and benchmarks drive it directly. Several events of one
user in a batch are applied in order, in rounds: round r steps every user's r-th event together,
so the LSTM math stays batched while each event still gets its own fresh top-K.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np

from encoders.data import EVENT_CODE
from streams.artifacts import Artifact
from streams.contracts.events import Event
from streams.contracts.vectors import decode_vectors
from streams.worker.state import RECENT, StateCodec, event_id_hash


@dataclass
class Incoming:
    """A valid event with where it came from (for dedupe and dead letters)."""

    event: Event
    partition: int
    offset: int
    raw: bytes | None = None  # the original message value, for dead letters
    key: bytes | None = None


@dataclass
class BatchResult:
    states: dict[str, bytes] = field(default_factory=dict)  # user -> new state (one write per user)
    outputs: list[tuple[str, bytes]] = field(default_factory=list)  # (user, recommendation JSON)
    dead: list[tuple[Incoming, str]] = field(default_factory=list)
    applied: int = 0  # events stepped into a state (each has an output)
    duplicates: int = 0  # redeliveries skipped (each answered again with an output)
    resets: int = 0


class Recommender:
    def __init__(self, artifact: Artifact, k: int = 10, max_lateness: float = 0.0, state_dtype: str = "float32"):
        self.artifact = artifact
        self.max_lateness = max_lateness
        self.version = artifact.version
        self.k = k
        self.online = artifact.online
        self.codec = StateCodec(artifact.model.cfg.dim, artifact.weights_version, np.dtype(state_dtype))
        self.item_code = {iid: i for i, iid in enumerate(artifact.item_ids) if i}
        self.item_ids = np.array(artifact.item_ids, dtype=object)
        self._item_json = np.array([json.dumps(i) for i in artifact.item_ids], dtype=object)

    def add_items(self, item_ids: list[str], vectors: np.ndarray) -> None:
        """Append items (codes continue after the last) to the maps, the online model and the index."""
        codes = np.arange(len(self.item_ids), len(self.item_ids) + len(item_ids), dtype=np.int64)
        for iid, code in zip(item_ids, codes, strict=True):
            self.item_code[iid] = int(code)
        self.item_ids = np.concatenate([self.item_ids, np.array(item_ids, dtype=object)])
        self._item_json = np.concatenate([self._item_json, np.array([json.dumps(i) for i in item_ids], dtype=object)])
        self.online.item_vecs = np.vstack([self.online.item_vecs, vectors.astype(np.float32)])
        self.artifact.index.add(vectors, codes)

    def process(self, batch: list[Incoming], states: dict[str, bytes | None],
                longs: dict[str, bytes | None]) -> BatchResult:
        """Apply `batch` (in arrival order) to the users' `states`; `longs` are long-term vectors.

        Three passes: (1) admission in plain Python scalars, in order: dedupe, dead letters, gaps,
        recent items, and each event's round (its rank among its user's events in the batch);
        (2) the LSTM: input gates of all events in one matmul, then one small recurrent step per round;
        (3) one fusion, one index search and the outputs for every answered event.
        """
        res = BatchResult()
        rows_of: dict[str, int] = {}
        valid: list[tuple[Incoming, int, int]] = []
        for inc in batch:
            code = self.item_code.get(inc.event.item_id)
            if code is None:
                res.dead.append((inc, f"unknown item_id {inc.event.item_id!r}"))
                continue
            r = rows_of.get(inc.event.user_id)
            if r is None:
                r = rows_of[inc.event.user_id] = len(rows_of)
            valid.append((inc, code, r))
        if not valid:
            return res
        users = list(rows_of)
        st = self.codec.decode([states.get(u) for u in users])
        res.resets = st.reset
        long = decode_vectors([longs.get(u) for u in users], self.online.dim, self.online.long_default)

        # (1) admission
        last_part, last_off = st.last_partition.tolist(), st.last_offset.tolist()
        last_ts, count = st.last_ts.tolist(), st.count.tolist()
        recent, recent_ids = st.recent.tolist(), st.recent_ids.tolist()
        rounds = [0] * len(users)
        changed = [False] * len(users)
        ev_r, ev_code, ev_type, ev_gap, ev_first, ev_round, ev_count, ev_recent, ev_inc = ([] for _ in range(9))
        for inc, code, r in valid:
            e = inc.event
            if inc.partition == last_part[r] and inc.offset <= last_off[r]:
                # Effectively-once: a redelivery (a re-read after a crash or a rebalance); the state holds it
                # already, and holds it only after its answer was delivered (the agent sends answers before
                # it writes states), so it is neither applied nor answered again.
                res.duplicates += 1
                continue
            eid = event_id_hash(e.event_id)
            if eid in recent_ids[r]:
                res.dead.append((inc, f"duplicate event_id {e.event_id!r}"))
                continue
            if count[r] and e.ts < last_ts[r] - self.max_lateness:
                res.dead.append((inc, f"stale event: ts {e.ts:.0f} is older than the user's last applied event "
                                      f"({last_ts[r]:.0f}); replayed or too late"))
                continue
            first = count[r] == 0
            ev_gap.append(0.0 if first else e.ts - last_ts[r])
            ev_first.append(first)
            recent_ids[r] = recent_ids[r][1:] + [eid]
            recent[r] = recent[r][1:] + [code]
            count[r] += 1
            last_ts[r], last_part[r], last_off[r] = e.ts, inc.partition, inc.offset
            ev_r.append(r)
            ev_code.append(code)
            ev_type.append(EVENT_CODE[e.event_type])
            ev_round.append(rounds[r])
            rounds[r] += 1
            ev_count.append(count[r])
            ev_recent.append(recent[r])
            ev_inc.append(inc)
            changed[r] = True
        st.last_partition[:], st.last_offset[:], st.last_ts[:], st.count[:] = last_part, last_off, last_ts, count
        st.recent[:] = recent
        st.recent_ids[:] = np.array(recent_ids, dtype=np.uint64)

        # (2) the LSTM, batched across users, one recurrent step per round
        n = len(ev_r)
        rows = np.array(ev_r, dtype=np.int64)
        h_ev = np.empty((n, self.online.dim), np.float32)
        if n:
            zx = self.online.input_gates(np.array(ev_code), np.array(ev_type), np.array(ev_gap), np.array(ev_first))
            rnd = np.array(ev_round)
            order = np.argsort(rnd, kind="stable")
            for ev in np.split(order, np.cumsum(np.bincount(rnd))[:-1]):
                rr = rows[ev]
                h, c = self.online.recur(zx[ev], st.h[rr], st.c[rr])
                st.h[rr], st.c[rr] = h, c
                h_ev[ev] = h
            res.applied = n

        # (3) fusion, search, outputs
        if n:
            self._recommend(res, ev_inc, h_ev, long[rows], np.array(ev_gap, np.float64), np.array(ev_count, np.int64),
                            np.array(ev_recent, np.int64).reshape(n, RECENT))
        for r in np.flatnonzero(changed):
            res.states[users[r]] = self.codec.encode_one(st, r)
        return res

    def _recommend(self, res: BatchResult, incs: list[Incoming], h: np.ndarray, long: np.ndarray,
                   gaps: np.ndarray, counts: np.ndarray, recent: np.ndarray) -> None:
        """Fuse, search the index without the users' recent items, format one output per event."""
        uvec, gate = self.online.user_vectors(h, long, gaps, counts)
        scores, ids = self.artifact.index.search(uvec, self.k, exclude=np.where(recent > 0, recent, -2))
        now = f"{time.time():.3f}"
        version = json.dumps(self.version)
        names = self._item_json[np.maximum(ids, 0)]
        for j, inc in enumerate(incs):
            e = inc.event
            items = ",".join(f'{{"item_id":{nm},"score":{sc:.4f}}}'
                             for nm, sc, ok in zip(names[j], scores[j], ids[j] >= 0, strict=True) if ok)
            out = (f'{{"user_id":{json.dumps(e.user_id)},"items":[{items}],"gate":{gate[j]:.4f},'
                   f'"event_id":{json.dumps(e.event_id)},"model_version":{version},"ts":{now},"event_ts":{e.ts!r}}}')
            res.outputs.append((e.user_id, out.encode()))


__all__ = ["Recommender", "Incoming", "BatchResult", "RECENT"]
