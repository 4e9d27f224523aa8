"""The model object the stream agent wraps: a micro-batch of events in, new states and outputs out.

Pure (no Kafka, no Faust), so unit tests and benchmarks drive it directly. Several events of one
user in a batch are applied in order (one compiled loop over the batch's events, `encoders/lstm_kernel.py`),
and each event still gets its own fresh top-K from one search for the whole batch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np

from encoders.data import EVENT_CODE, EVENT_TYPES
from streams.artifacts import Artifact
from streams.contracts.events import Event
from streams.contracts.vectors import decode_vectors
from streams.worker.state import RECENT, StateBatch, StateCodec, event_id_hash, live_item_key

# json.dumps of a str, without its Python-level dispatch (the same C encoder, ensure_ascii as json.dumps)
_json_str = json.encoder.encode_basestring_ascii


@dataclass(slots=True)
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
    def __init__(self, artifact: Artifact, k: int = 10, max_lateness: float = 0.0, state_dtype: str = "float32",
                 explain: bool = False):
        self.artifact = artifact
        self.max_lateness = max_lateness
        self.version = artifact.version
        self.k = k
        self.online = artifact.online
        # explain: each recommended item says which recent event of the user it is most similar to ("because");
        # the state then keeps the recent events' types and times (StateCodec); off, nothing changes.
        self.explain = explain
        self.codec = StateCodec(artifact.model.cfg.dim, artifact.weights_version, np.dtype(state_dtype), explain)
        self.item_code = {iid: i for i, iid in enumerate(artifact.item_ids) if i}
        self.item_ids = np.array(artifact.item_ids, dtype=object)
        self._item_json = np.array([json.dumps(i) for i in artifact.item_ids], dtype=object)
        # Live-added items get codes from `n_catalogue` on, in the order this worker read them; states store
        # them as keys (streams/worker/state.py, live_item_key). `_live_keys[code - n_catalogue]` is the key of
        # a live code; `_key_sorted`/`_key_code` map every key of an item the `items` topic added back to its
        # code here (that item may be in this artifact).
        self.n_catalogue = len(artifact.item_ids)
        self._live_keys = np.zeros(0, np.int32)
        self._keyed: dict[str, int] = {}
        self._key_sorted = np.zeros(0, np.int32)
        self._key_code = np.zeros(0, np.int32)
        # The catalogue changes the nightly step saw (manifest `item_status`): masked from the start, so a worker
        # (re)started on this version never recommends them while it replays the `items` topic, whose later
        # changes (an item back in stock) still apply in order.
        status = artifact.manifest.get("item_status") or {}
        self.set_recommendable([*status.get("deleted", ()), *status.get("unavailable", ())], False)

    def add_items(self, item_ids: list[str], vectors: np.ndarray) -> None:
        """Append items (codes continue after the last) to the maps, the online model and the index."""
        codes = np.arange(len(self.item_ids), len(self.item_ids) + len(item_ids), dtype=np.int64)
        for iid, code in zip(item_ids, codes, strict=True):
            self.item_code[iid] = int(code)
        self.item_ids = np.concatenate([self.item_ids, np.array(item_ids, dtype=object)])
        self._item_json = np.concatenate([self._item_json, np.array([json.dumps(i) for i in item_ids], dtype=object)])
        self.online.item_vecs = np.vstack([self.online.item_vecs, vectors.astype(np.float32)])
        self.artifact.index.add(vectors, codes)
        keys = [live_item_key(i) for i in item_ids]
        self._live_keys = np.concatenate([self._live_keys, np.array(keys, np.int32)])
        self._keyed.update(zip(item_ids, keys, strict=True))
        self._index_keys()

    def register_live(self, item_ids) -> None:
        """Items the `items` topic added, whatever their code here: a state may name them by key."""
        new = {i: live_item_key(i) for i in item_ids if i not in self._keyed}
        if new:
            self._keyed.update(new)
            self._index_keys()

    def _index_keys(self) -> None:
        ids = sorted(i for i in self._keyed if i in self.item_code)
        keys = np.array([self._keyed[i] for i in ids], np.int32)
        codes = np.array([self.item_code[i] for i in ids], np.int32)
        order = np.argsort(keys, kind="stable")  # two ids of one key (rare): the smaller id, in every worker
        keys, codes = keys[order], codes[order]
        first = np.ones(len(keys), bool)
        first[1:] = keys[1:] != keys[:-1]
        self._key_sorted, self._key_code = keys[first], codes[first]

    def decode_states(self, values: list[bytes | None]) -> StateBatch:
        """`codec.decode` with `recent` in this worker's codes: keys of live-added items mapped back (a key not
        known here yet stays as it is, < 0, which excludes nothing and is written back unchanged)."""
        st = self.codec.decode(values)
        if self._key_sorted.size:
            neg = st.recent < 0
            if neg.any():
                k = st.recent[neg]
                pos = np.minimum(np.searchsorted(self._key_sorted, k), len(self._key_sorted) - 1)
                st.recent[neg] = np.where(self._key_sorted[pos] == k, self._key_code[pos], k)
        return st

    def _recent_to_keys(self, st: StateBatch) -> None:
        """Before encoding: live-added codes of `recent` become their keys (artifact codes stay)."""
        if self._live_keys.size:
            live = (st.recent >= self.n_catalogue) & (st.recent < self.n_catalogue + len(self._live_keys))
            if live.any():
                st.recent[live] = self._live_keys[st.recent[live] - self.n_catalogue]

    def set_recommendable(self, item_ids, recommendable: bool) -> int:
        """Leave these items out of every recommendation (False) or let them back in (True): a mask in the
        index, no rebuild; events naming them are still applied. Returns how many of them are known here."""
        codes = [self.item_code[i] for i in item_ids if i in self.item_code]
        self.artifact.index.block(np.array(codes, np.int64), not recommendable)
        return len(codes)

    @property
    def masked(self) -> int:
        """Item codes left out of recommendations now."""
        return self.artifact.index.n_blocked

    def process(self, batch: list[Incoming], states: dict[str, bytes | None],
                longs: dict[str, bytes | None]) -> BatchResult:
        """Apply `batch` (in arrival order) to the users' `states`; `longs` are long-term vectors.

        Three passes: (1) admission in plain Python scalars, in order: dedupe, dead letters, gaps,
        recent items;
        (2) the LSTM: every applied event stepped in arrival order into its user's state (one compiled loop);
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
        st = self.decode_states([states.get(u) for u in users])
        res.resets = st.reset
        long = decode_vectors([longs.get(u) for u in users], self.online.dim, self.online.long_default)

        # (1) admission
        last_part, last_off = st.last_partition.tolist(), st.last_offset.tolist()
        last_ts, count = st.last_ts.tolist(), st.count.tolist()
        recent, recent_ids = st.recent.tolist(), st.recent_ids.tolist()
        explain = self.explain
        if explain:  # the recent events' types and absolute times, updated beside `recent`
            rtypes = st.recent_types.tolist()
            rts = (st.last_ts[:, None] - st.recent_ages.astype(np.float64)).tolist()
            ev_rtypes, ev_rts = [], []
        changed = [False] * len(users)
        ev_r, ev_code, ev_type, ev_gap, ev_first, ev_count, ev_recent, ev_inc = ([] for _ in range(8))
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
            if explain:
                rtypes[r] = rtypes[r][1:] + [EVENT_CODE[e.event_type]]
                rts[r] = rts[r][1:] + [e.ts]
                ev_rtypes.append(rtypes[r])
                ev_rts.append(rts[r])
            count[r] += 1
            last_ts[r], last_part[r], last_off[r] = e.ts, inc.partition, inc.offset
            ev_r.append(r)
            ev_code.append(code)
            ev_type.append(EVENT_CODE[e.event_type])
            ev_count.append(count[r])
            ev_recent.append(recent[r])
            ev_inc.append(inc)
            changed[r] = True
        st.last_partition[:], st.last_offset[:], st.last_ts[:], st.count[:] = last_part, last_off, last_ts, count
        st.recent[:] = recent
        st.recent_ids[:] = np.array(recent_ids, dtype=np.uint64)
        if explain:
            st.recent_types[:] = np.array(rtypes, np.uint8).reshape(len(users), RECENT)
            st.recent_ages[:] = (st.last_ts[:, None] - np.array(rts, np.float64).reshape(len(users), RECENT))

        # (2) the LSTM: every applied event stepped in arrival order into its user's row (one compiled loop)
        n = len(ev_r)
        rows = np.array(ev_r, dtype=np.int64)
        h_ev = self.online.step_events(st.h, st.c, rows, np.array(ev_code, np.int64), np.array(ev_type, np.int64),
                                       np.array(ev_gap, np.float64), np.array(ev_first, bool))
        res.applied = n

        # (3) fusion, search, outputs
        if n:
            details = (np.array(ev_rtypes, np.uint8).reshape(n, RECENT), np.array(ev_rts).reshape(n, RECENT)) \
                if explain else None
            self._recommend(res, ev_inc, h_ev, long[rows], np.array(ev_gap, np.float64), np.array(ev_count, np.int64),
                            np.array(ev_recent, np.int64).reshape(n, RECENT), details)
        self._recent_to_keys(st)
        for r in np.flatnonzero(changed):
            res.states[users[r]] = self.codec.encode_one(st, r)
        return res

    def _recommend(self, res: BatchResult, incs: list[Incoming], h: np.ndarray, long: np.ndarray,
                   gaps: np.ndarray, counts: np.ndarray, recent: np.ndarray,
                   details: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Fuse, search the index without the users' recent items, format one output per event."""
        uvec, gate = self.online.user_vectors(h, long, gaps, counts)
        scores, ids = self.artifact.index.search(uvec, self.k, exclude=np.where(recent > 0, recent, -2))
        now = f"{time.time():.3f}"
        version = json.dumps(self.version)
        names = self._item_json[np.maximum(ids, 0)]
        if details is None:
            res.outputs += self._format_outputs(incs, names, scores, ids >= 0, gate, version, now)
            return
        because = self._because_json(ids, recent, *details)
        for j, inc in enumerate(incs):
            e = inc.event
            items = ",".join(f'{{"item_id":{nm},"score":{sc:.4f},"because":{bc}}}'
                             for nm, sc, ok, bc in zip(names[j], scores[j], ids[j] >= 0, because[j], strict=True)
                             if ok)
            out = (f'{{"user_id":{json.dumps(e.user_id)},"items":[{items}],"gate":{gate[j]:.4f},'
                   f'"event_id":{json.dumps(e.event_id)},"model_version":{version},"ts":{now},"event_ts":{e.ts!r}}}')
            res.outputs.append((e.user_id, out.encode()))

    def _format_outputs(self, incs: list[Incoming], names: np.ndarray, scores: np.ndarray, ok: np.ndarray,
                        gate: np.ndarray, version: str, now: str) -> list[tuple[str, bytes]]:
        """One recommendation JSON per event, formatted for the whole batch at once: rows with k items share
        one %-template, filled by a single C-level `%` over every row's values, then split; rows that ran
        short (a small or masked catalogue) are formatted one by one. Same bytes either way."""
        n, k = names.shape
        users = [inc.event.user_id for inc in incs]
        full = ok.all(axis=1)
        head = '{"user_id":%s,"items":['
        tail = f'],"gate":%.4f,"event_id":%s,"model_version":{version.replace("%", "%%")},"ts":{now},"event_ts":%r}}'
        rows = np.flatnonzero(full)
        texts: list[str] = [""] * n
        if rows.size:
            template = head + ",".join(['{"item_id":%s,"score":%.4f}'] * k) + tail
            vals = np.empty((rows.size, 2 * k + 4), dtype=object)
            vals[:, 0] = [_json_str(users[j]) for j in rows]
            vals[:, 1 : 2 * k + 1 : 2] = names[rows]
            vals[:, 2 : 2 * k + 2 : 2] = scores[rows].astype(np.float64)
            vals[:, 2 * k + 1] = gate[rows].astype(np.float64)
            vals[:, 2 * k + 2] = [_json_str(incs[j].event.event_id) for j in rows]
            vals[:, 2 * k + 3] = [incs[j].event.ts for j in rows]
            filled = ("\n".join([template] * rows.size) % tuple(vals.ravel().tolist())).split("\n")
            for j, text in zip(rows.tolist(), filled, strict=True):
                texts[j] = text
        for j in np.flatnonzero(~full).tolist():
            items = ",".join(f'{{"item_id":{nm},"score":{sc:.4f}}}'
                             for nm, sc, keep in zip(names[j], scores[j], ok[j], strict=True) if keep)
            texts[j] = (head % _json_str(users[j]) + items
                        + tail % (gate[j], _json_str(incs[j].event.event_id), incs[j].event.ts))
        return list(zip(users, [t.encode() for t in texts], strict=True))

    def because(self, ids: np.ndarray, recent: np.ndarray, types: np.ndarray,
                times: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per recommended item (ids [n, k]), the user's recent event whose item is most similar to it (cosine of
        the model's item vectors): (item codes, event type codes, times, found) [n, k] each; `found` False where
        the user has no recent item this worker knows."""
        vecs = self.online.item_vecs
        ok = recent > 0
        top = vecs[np.maximum(ids, 0)]
        rec = vecs[np.maximum(recent, 0)]
        top = top / np.maximum(np.linalg.norm(top, axis=2, keepdims=True), 1e-12)
        rec = rec / np.maximum(np.linalg.norm(rec, axis=2, keepdims=True), 1e-12)
        sim = np.einsum("nkd,nrd->nkr", top, rec)
        sim = np.where(ok[:, None, :], sim, -np.inf)
        best = sim.argmax(axis=2)
        rows = np.arange(len(ids))[:, None]
        found = np.broadcast_to(ok.any(axis=1)[:, None], ids.shape) & (ids >= 0)
        return recent[rows, best], types[rows, best], times[rows, best], found

    def _because_json(self, ids, recent, types, times) -> list[list[str]]:
        codes, tcodes, ts, found = self.because(ids, recent, types, times)
        names = self._item_json[np.maximum(codes, 0)]
        out = []
        for j in range(len(ids)):
            row = []
            for nm, tc, t, ok in zip(names[j], tcodes[j].tolist(), ts[j].tolist(), found[j], strict=True):
                if not ok:
                    row.append("null")
                    continue
                et = f'"{EVENT_TYPES[tc - 1]}"' if 0 < tc <= len(EVENT_TYPES) else "null"
                row.append(f'{{"item_id":{nm},"event_type":{et},"ts":{"null" if t != t else repr(t)}}}')
            out.append(row)
        return out

    def recommend_user(self, user_id: str, state: bytes | None, long: bytes | None, k: int | None = None,
                       now: float | None = None, explain: bool = False) -> dict:
        """On demand, with no new event: the user's top-k from the stored state, fused as the stream fuses
        it, with the time since the user's last event as the gap (`now`, default the clock), the user's
        recent items excluded. Without a state: the long-term vector; without that: the most popular
        items (the model's default user where the artifact has no popularity). `source` says which."""
        k = k or self.k
        now = time.time() if now is None else now
        st = self.decode_states([state])
        vec = decode_vectors([long], self.online.dim, self.online.long_default)
        exclude = None
        if st.count[0] > 0:
            source = "state"
            gap = np.array([max(0.0, now - float(st.last_ts[0]))])
            uvec, gate = self.online.user_vectors(st.h[:1], vec, gap, st.count[:1])
            recent = st.recent[:1].astype(np.int64)
            exclude = np.where(recent > 0, recent, -2)
        elif long is not None:
            source, uvec, gate = "long-term", vec, np.zeros(1, np.float32)
        elif self.artifact.popularity is not None:
            pop = np.zeros(len(self.item_ids), np.float64)
            pop[: len(self.artifact.popularity)] = self.artifact.popularity
            pop[0] = -1.0
            pop[self.artifact.index.blocked(np.arange(len(pop)))] = -1.0  # deleted or out of stock
            order = np.argsort(-pop, kind="stable")[:k]
            return self._answer(user_id, "popularity", None, order, pop[order], now)
        else:
            source, uvec, gate = "default", self.online.long_default[None, :].astype(np.float32), np.zeros(1)
        scores, ids = self.artifact.index.search(uvec, k, exclude=exclude)
        keep = ids[0] >= 0
        out = self._answer(user_id, source, float(gate[0]), ids[0][keep], scores[0][keep], now)
        if explain and source == "state":
            times = st.last_ts[:, None] - st.recent_ages.astype(np.float64)
            because = self._because_json(ids[:, keep], st.recent[:1].astype(np.int64), st.recent_types, times)[0]
            for item, bc in zip(out["items"], because, strict=True):
                item["because"] = json.loads(bc)
        return out

    def _answer(self, user_id: str, source: str, gate: float | None, codes: np.ndarray, scores: np.ndarray,
                now: float) -> dict:
        return {"user_id": user_id, "source": source,
                "items": [{"item_id": self.item_ids[c], "score": round(float(sc), 4)}
                          for c, sc in zip(codes.tolist(), scores.tolist(), strict=True)],
                "gate": None if gate is None else round(gate, 4), "model_version": self.version,
                "ts": round(now, 3)}

__all__ = ["Recommender", "Incoming", "BatchResult", "RECENT"]
