"""The model object the stream agent wraps: a micro-batch of events in, new states and outputs out.

Pure (no Kafka, no Faust), so unit tests and benchmarks drive it directly. Several events of one
user in a batch are applied in order, in rounds: round r steps every user's r-th event together,
so the LSTM math stays batched while each event still gets its own fresh top-K.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from encoders.data import EVENT_CODE
from streams.artifacts import Artifact
from streams.events import Event
from streams.state import RECENT, StateCodec, decode_vectors, event_id_hash


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
    def __init__(self, artifact: Artifact, k: int = 10, max_lateness: float = 0.0):
        self.artifact = artifact
        self.max_lateness = max_lateness
        self.version = artifact.version
        self.k = k
        self.online = artifact.online
        self.codec = StateCodec(artifact.model.cfg.dim, artifact.weights_version)
        self.item_code = {iid: i for i, iid in enumerate(artifact.item_ids) if i}
        self.item_ids = np.array(artifact.item_ids, dtype=object)

    def add_items(self, item_ids: list[str], vectors: np.ndarray) -> None:
        """Append items (codes continue after the last) to the maps, the online model and the index."""
        codes = np.arange(len(self.item_ids), len(self.item_ids) + len(item_ids), dtype=np.int64)
        for iid, code in zip(item_ids, codes, strict=True):
            self.item_code[iid] = int(code)
        self.item_ids = np.concatenate([self.item_ids, np.array(item_ids, dtype=object)])
        self.online.item_vecs = np.vstack([self.online.item_vecs, vectors.astype(np.float32)])
        self.artifact.index.add(vectors, codes)

    def process(self, batch: list[Incoming], states: dict[str, bytes | None],
                longs: dict[str, bytes | None]) -> BatchResult:
        """Apply `batch` (in arrival order) to the users' `states`; `longs` are long-term vectors."""
        res = BatchResult()
        per_user: dict[str, list[tuple[Incoming, int]]] = defaultdict(list)
        for inc in batch:
            code = self.item_code.get(inc.event.item_id)
            if code is None:
                res.dead.append((inc, f"unknown item_id {inc.event.item_id!r}"))
                continue
            per_user[inc.event.user_id].append((inc, code))
        if not per_user:
            return res
        users = list(per_user)
        st = self.codec.decode([states.get(u) for u in users])
        res.resets = st.reset
        long = decode_vectors([longs.get(u) for u in users], self.online.dim, self.online.long_default)
        now = time.time()
        changed = np.zeros(len(users), bool)
        redelivered: list[tuple[int, Incoming]] = []
        # Inputs of the fusion + search for every answered event, gathered over the rounds, so the
        # gate and the index search run once per batch however many events a heavy user has in it.
        ans_incs: list[Incoming] = []
        ans_h, ans_long, ans_gaps, ans_counts, ans_recent = [], [], [], [], []
        for rnd in range(max(len(v) for v in per_user.values())):
            rows, incs, codes = [], [], []
            for r, u in enumerate(users):
                evs = per_user[u]
                if rnd < len(evs):
                    inc, code = evs[rnd]
                    # Effectively-once: an event at or below the applied offset was applied already.
                    if inc.partition == st.last_partition[r] and inc.offset <= st.last_offset[r]:
                        res.duplicates += 1
                        redelivered.append((r, inc))
                        # Rewrite the state anyway: after a crash the local RocksDB can be ahead of the
                        # changelog; rewriting re-emits it, so a later owner of the partition sees it too.
                        changed[r] = True
                        continue
                    eid = event_id_hash(inc.event.event_id)
                    if eid in st.recent_ids[r]:
                        res.dead.append((inc, f"duplicate event_id {inc.event.event_id!r}"))
                        continue
                    if st.count[r] and inc.event.ts < st.last_ts[r] - self.max_lateness:
                        res.dead.append((inc, f"stale event: ts {inc.event.ts:.0f} is older than the user's last "
                                              f"applied event ({st.last_ts[r]:.0f}); replayed or too late"))
                        continue
                    st.recent_ids[r, :-1] = st.recent_ids[r, 1:]
                    st.recent_ids[r, -1] = eid
                    rows.append(r)
                    incs.append(inc)
                    codes.append(code)
            if not rows:
                continue
            idx = np.array(rows)
            codes_a = np.array(codes, np.int64)
            ts = np.array([i.event.ts for i in incs])
            first = st.count[idx] == 0
            gaps = np.where(first, 0.0, ts - st.last_ts[idx])
            etypes = np.array([EVENT_CODE[i.event.event_type] for i in incs], np.int64)
            h, c = self.online.step(st.h[idx], st.c[idx], codes_a, etypes, gaps, first)
            st.h[idx], st.c[idx] = h, c
            st.count[idx] += 1
            st.last_ts[idx] = ts
            st.last_partition[idx] = [i.partition for i in incs]
            st.last_offset[idx] = [i.offset for i in incs]
            recent = np.concatenate([st.recent[idx, 1:], codes_a[:, None].astype(np.int32)], axis=1)
            st.recent[idx] = recent
            changed[idx] = True
            res.applied += len(rows)
            ans_incs += incs
            ans_h.append(h)
            ans_long.append(long[idx])
            ans_gaps.append(gaps)
            ans_counts.append(st.count[idx].copy())
            ans_recent.append(recent)
        if redelivered:
            # Redelivered after a crash: the state already holds the event, but its recommendation may
            # have been lost with the crashed producer. Answer again with the user's current top-K.
            idx = np.array([r for r, _ in redelivered])
            ans_incs += [inc for _, inc in redelivered]
            ans_h.append(st.h[idx])
            ans_long.append(long[idx])
            ans_gaps.append(np.zeros(len(idx)))
            ans_counts.append(st.count[idx].copy())
            ans_recent.append(st.recent[idx].copy())
        if ans_incs:
            self._recommend(res, ans_incs, np.concatenate(ans_h), np.concatenate(ans_long),
                            np.concatenate(ans_gaps), np.concatenate(ans_counts), np.concatenate(ans_recent), now)
        for r in np.flatnonzero(changed):
            res.states[users[r]] = self.codec.encode_one(st, r)
        return res

    def _recommend(self, res: BatchResult, incs: list[Incoming], h: np.ndarray, long: np.ndarray,
                   gaps: np.ndarray, counts: np.ndarray, recent: np.ndarray, now: float) -> None:
        """Fuse, search the index without the users' recent items, and append one output per event."""
        uvec, gate = self.online.user_vectors(h, long, gaps, counts)
        scores, ids = self.artifact.index.search(uvec, self.k, exclude=[r_[r_ > 0] for r_ in recent])
        for j, inc in enumerate(incs):
            ok = ids[j] >= 0
            items = [{"item_id": iid, "score": round(float(s), 4)}
                     for iid, s in zip(self.item_ids[ids[j][ok]], scores[j][ok], strict=True)]
            rec = {"user_id": inc.event.user_id, "items": items, "gate": round(float(gate[j]), 4),
                   "event_id": inc.event.event_id, "model_version": self.version, "ts": now,
                   "event_ts": inc.event.ts}
            res.outputs.append((inc.event.user_id, json.dumps(rec, separators=(",", ":")).encode()))


__all__ = ["Recommender", "Incoming", "BatchResult", "RECENT"]
