"""Per-user short-term state as compact bytes: one place encodes and decodes it.

Layout (little endian):
  header  <BBHIiqdI = format, n_recent, reserved, model tag, last partition, last offset,
                      last event ts, event count  (32 bytes)
  h, c    dim float32 each
  recent  RECENT int32 item codes, most recent last, 0 = empty; an item added live (on the `items` topic, not
          in the artifact) is stored as its `live_item_key` (< 0), never as the code one worker gave it
  ids     RECENT uint64 hashes of the last event ids (duplicate event_id detection)
  with explanations on (format 3 / 103, `LSTI_EXPLAIN=1`), also:
  types   RECENT uint8 event type codes of the recent items' events (255 = not known)
  ages    RECENT float32 seconds between each recent event and the last one (NaN = not known)
Every format is read whatever the codec writes, so explanations can be switched on and off.
A state written by another model (tag mismatch) is reset, with a log line, never reused silently.

Artifact codes are stable across the versions of one weights version (a nightly refresh keeps known items'
codes and appends new ones), but the codes of live-added items are not: each worker appends them after its
artifact's items in the order it read them, and a new artifact may give those codes to other items. Hence
the key, a 31-bit hash of the item id: the same in every worker and every version, and mapped back to the
reader's code when the state is decoded (streams/worker/recommender.py).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import numpy as np

FORMAT = 2
FORMAT16 = FORMAT + 100  # h and c stored as float16: a distinct format byte, never mistaken for float32
EXPLAINED = 1  # added to the format byte when the recent events' types and ages follow (formats 3 and 103)
UNKNOWN_TYPE = 255
RECENT = 10
HEADER = struct.Struct("<BBHIiqdI")


def model_tag(model_version: str) -> int:
    return zlib.crc32(model_version.encode()) & 0xFFFFFFFF


def live_item_key(item_id: str) -> int:
    """The stored form of a live-added item in `recent`: -1 .. -(2**31 - 1), from the item id alone."""
    h = int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF
    return -(h or 1)


def event_id_hash(event_id: str) -> int:
    """64-bit id fingerprint; 0 is reserved for 'empty'."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little") or 1


@dataclass
class StateBatch:
    """Decoded states of B users as arrays (new users: zeros, partition/offset -1)."""

    h: np.ndarray  # [B, dim] float32
    c: np.ndarray  # [B, dim] float32
    recent: np.ndarray  # [B, RECENT] int32
    recent_ids: np.ndarray  # [B, RECENT] uint64
    last_partition: np.ndarray  # [B] int32
    last_offset: np.ndarray  # [B] int64
    last_ts: np.ndarray  # [B] float64
    count: np.ndarray  # [B] int64
    recent_types: np.ndarray | None = None  # [B, RECENT] uint8 event type codes (UNKNOWN_TYPE: not known)
    recent_ages: np.ndarray | None = None  # [B, RECENT] float32 seconds before last_ts (NaN: not known)
    reset: int = 0  # how many states were dropped for a model mismatch


class StateCodec:
    """h and c are stored as float32 (default) or float16 (39% smaller; `lsti bench state` measures both).

    `explain`: also keep each recent item's event type and time, what a recommendation's "because" names
    (50 bytes more per user); off, the bytes are exactly the format without them."""

    def __init__(self, dim: int, model_version: str, dtype: type = np.float32, explain: bool = False):
        self.dim = dim
        self.tag = model_tag(model_version)
        self.dtype = np.dtype(dtype)
        self.explain = explain
        self.format = (FORMAT if self.dtype == np.float32 else FORMAT16) + (EXPLAINED if explain else 0)
        self._hc = 2 * dim * self.dtype.itemsize
        self.size = HEADER.size + self._hc + 12 * RECENT + (5 * RECENT if explain else 0)

    def empty(self, n: int) -> StateBatch:
        return StateBatch(
            h=np.zeros((n, self.dim), np.float32), c=np.zeros((n, self.dim), np.float32),
            recent=np.zeros((n, RECENT), np.int32), recent_ids=np.zeros((n, RECENT), np.uint64),
            last_partition=np.full(n, -1, np.int32),
            last_offset=np.full(n, -1, np.int64), last_ts=np.zeros(n, np.float64), count=np.zeros(n, np.int64),
            recent_types=np.full((n, RECENT), UNKNOWN_TYPE, np.uint8),
            recent_ages=np.full((n, RECENT), np.nan, np.float32))

    def decode(self, values: list[bytes | None]) -> StateBatch:
        """Either precision is read (so a deployment can switch LSTI_STATE_DTYPE without losing states;
        each state is rewritten in the configured one at its next event), with or without the recent
        events' details; other formats are reset."""
        out = self.empty(len(values))
        d = self.dim
        f32, f16 = (np.dtype(np.float32), 8 * d), (np.dtype(np.float16), 4 * d)
        layouts = {FORMAT: f32, FORMAT16: f16, FORMAT + EXPLAINED: f32, FORMAT16 + EXPLAINED: f16}
        for r, v in enumerate(values):
            if v is None:
                continue
            fmt, _n, _res, tag, part, off, ts, count = HEADER.unpack_from(v, 0)
            dtype, hc = layouts.get(fmt, (None, -1))
            explained = fmt in (FORMAT + EXPLAINED, FORMAT16 + EXPLAINED)
            if dtype is None or tag != self.tag or len(v) != HEADER.size + hc + (17 if explained else 12) * RECENT:
                out.reset += 1
                continue
            body = np.frombuffer(v, dtype, 2 * d, HEADER.size)
            out.h[r], out.c[r] = body[:d], body[d:]
            at = HEADER.size + hc
            out.recent[r] = np.frombuffer(v, np.int32, RECENT, at)
            out.recent_ids[r] = np.frombuffer(v, np.uint64, RECENT, at + 4 * RECENT)
            if explained:
                out.recent_types[r] = np.frombuffer(v, np.uint8, RECENT, at + 12 * RECENT)
                out.recent_ages[r] = np.frombuffer(v, np.float32, RECENT, at + 13 * RECENT)
            out.last_partition[r], out.last_offset[r], out.last_ts[r], out.count[r] = part, off, ts, count
        return out

    def encode_one(self, s: StateBatch, r: int) -> bytes:
        head = HEADER.pack(self.format, RECENT, 0, self.tag, int(s.last_partition[r]), int(s.last_offset[r]),
                           float(s.last_ts[r]), int(s.count[r]))
        hc = s.h[r].astype(self.dtype, copy=False).tobytes() + s.c[r].astype(self.dtype, copy=False).tobytes()
        out = head + hc + s.recent[r].tobytes() + s.recent_ids[r].tobytes()
        if self.explain:
            out += s.recent_types[r].tobytes() + s.recent_ages[r].astype(np.float32, copy=False).tobytes()
        return out
