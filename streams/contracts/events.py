"""The event contract in code: parse and validate one message, or say exactly why it is rejected.

Hand-written rather than a JSON Schema validator on the hot path (an order of magnitude cheaper per
event); `tests/test_contracts.py` checks (by fuzzing) that it agrees with `schemas/event.schema.json` and
that it is total: for any bytes it returns an `Event` or raises `BadEvent`, never anything else.

Beyond the schema, the parser enforces what a schema cannot see: the payload is strict UTF-8 JSON (no
byte-order mark, no UTF-16/32, no NaN/Infinity), no object repeats a key, nesting is at most
`MAX_DEPTH` levels, the payload is at most `MAX_BYTES`, the key equals the user_id and `ts` is not more
than a day ahead of the worker's clock.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from encoders.data import EVENT_CODE

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
MIN_TS = 631152000  # 1990-01-01
MAX_FUTURE_S = 86400
MAX_BYTES = 4096
MAX_ID_LEN = 128
MAX_DEPTH = 64  # arrays/objects, the event object itself is level 1
# Integer ids must be at most MAX_ID_LEN characters in decimal (the schema's minimum/maximum); checked
# before str(), so a huge number never reaches Python's int->str digit limit.
_ID_MAX = 10**MAX_ID_LEN - 1
_ID_MIN = -(10 ** (MAX_ID_LEN - 1) - 1)
# Control characters (Unicode Cc) and lone surrogates: never in an id (the schema's `not`/`pattern`).
_BAD_ID_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(slots=True)
class Event:
    event_id: str
    user_id: str
    item_id: str
    event_type: str
    ts: float


class BadEvent(ValueError):
    """A message that breaks the contract; its text is the dead-letter reason."""


def _show(v: object, limit: int = 60) -> str:
    """repr() for a reason, clipped (a reason quotes the input, and the input may be 4 KB)."""
    r = repr(v)
    return r if len(r) <= limit else f"{r[:limit]}...({len(r)} chars)"


def _no_duplicates(pairs: list) -> dict:
    rec = dict(pairs)
    if len(rec) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise BadEvent(f"duplicate key {_show(k)} in a JSON object")
            seen.add(k)
    return rec


def _no_constant(name: str) -> None:
    raise BadEvent(f"malformed JSON: {name} is not JSON (RFC 8259 has no NaN/Infinity)")


# One decoder for every call (json.loads with hooks would build a new one each time).
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def _too_deep(obj: object) -> bool:
    """Iterative (no recursion of our own): does `obj` nest arrays/objects deeper than MAX_DEPTH?"""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > MAX_DEPTH:
            return True
        for c in o.values() if isinstance(o, dict) else o:
            if isinstance(c, dict | list):
                stack.append((c, d + 1))
    return False


def _ident(rec: dict, name: str) -> str:
    if name not in rec:
        raise BadEvent(f"missing field {name!r}")
    v = rec[name]
    if isinstance(v, str):
        s = v
        if not (s.isascii() and s.isprintable()) and (bad := _BAD_ID_CHAR.search(s)):
            c = bad.group()
            what = "invalid unicode (lone surrogate)" if "\ud800" <= c <= "\udfff" else "control character"
            raise BadEvent(f"field {name!r} holds {what} U+{ord(c):04X}")
    elif isinstance(v, bool) or not isinstance(v, int | float) or (isinstance(v, float) and not v.is_integer()):
        raise BadEvent(f"field {name!r} must be a string or integer, got {type(v).__name__} {_show(v)}")
    elif not _ID_MIN <= v <= _ID_MAX:
        raise BadEvent(f"field {name!r} must have 1..{MAX_ID_LEN} characters (integer too large)")
    else:
        s = str(v if isinstance(v, int) else int(v))  # 8000000.0 is the integer 8000000 (JSON Schema)
    if not s or len(s) > MAX_ID_LEN:
        raise BadEvent(f"field {name!r} must have 1..{MAX_ID_LEN} characters")
    return s


def parse_event(value: bytes | None, key: bytes | None = None, now: float | None = None) -> Event:
    """Decode and validate; raise BadEvent with a reason a person can act on."""
    if value is None:
        raise BadEvent("empty message (null value)")
    if not isinstance(value, bytes):
        if not isinstance(value, bytearray | memoryview):
            raise BadEvent(f"payload must be bytes, got {type(value).__name__}")
        value = bytes(value)
    if len(value) > MAX_BYTES:
        raise BadEvent(f"oversized payload: {len(value)} bytes > {MAX_BYTES}")
    try:
        text = value.decode("utf-8")  # strict: no UTF-16/32, no encoded surrogates, no invalid bytes
    except UnicodeDecodeError as exc:
        raise BadEvent(f"payload must be UTF-8 JSON: invalid UTF-8 at byte {exc.start} ({exc.reason})") from None
    if text.startswith("\ufeff"):
        raise BadEvent("payload must be UTF-8 JSON without a byte-order mark")
    try:
        rec = _DECODER.decode(text)
    except BadEvent:
        raise
    except RecursionError:
        raise BadEvent(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    except ValueError as exc:
        if "\x00" in text:
            raise BadEvent("payload must be UTF-8 JSON (it holds NUL bytes: UTF-16/UTF-32?)") from None
        raise BadEvent(f"malformed JSON: {exc}") from None
    if text.count("[") + text.count("{") > MAX_DEPTH and _too_deep(rec):
        raise BadEvent(f"nested too deeply (more than {MAX_DEPTH} levels)")
    if not isinstance(rec, dict):
        raise BadEvent(f"event must be a JSON object, got {type(rec).__name__}")
    event_id = _ident(rec, "event_id")
    user_id = _ident(rec, "user_id")
    item_id = _ident(rec, "item_id")
    if "event_type" not in rec:
        raise BadEvent("missing field 'event_type'")
    etype = rec["event_type"]
    if not isinstance(etype, str) or etype not in EVENT_CODE:
        raise BadEvent(f"unknown event_type {_show(etype)} (expected one of {', '.join(EVENT_CODE)})")
    if "ts" not in rec:
        raise BadEvent("missing field 'ts'")
    ts = rec["ts"]
    if isinstance(ts, bool) or not isinstance(ts, int | float) or ts != ts:
        raise BadEvent(f"field 'ts' must be a number (epoch seconds), got {type(ts).__name__}")
    if ts < MIN_TS:
        raise BadEvent(f"timestamp too far in the past: {_show(ts)}")
    if ts > (now if now is not None else time.time()) + MAX_FUTURE_S:
        raise BadEvent(f"timestamp in the future: {_show(ts)}")
    if key is not None and key != user_id.encode():
        raise BadEvent("message key does not match user_id (events must be keyed by user_id)")
    if key is None:
        raise BadEvent("missing message key (events must be keyed by user_id)")
    return Event(event_id, user_id, item_id, etype, float(ts))


def event_json(event_id: str, user_id: str, item_id: str, event_type: str, ts: float) -> bytes:
    """Serialise one event the way the CLIs publish it."""
    return json.dumps({"event_id": event_id, "user_id": user_id, "item_id": item_id,
                       "event_type": event_type, "ts": ts}, separators=(",", ":")).encode()


def load_schema(name: str) -> dict:
    """`event`, `recommendation` or `dead_letter`."""
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
