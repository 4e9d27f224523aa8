"""Unit tests (no broker): the event parser is total and agrees with `schemas/event.schema.json`.

Hand-written cases for every input that used to crash the parser and for every rule of the contract,
then property-based fuzzing: arbitrary bytes, arbitrary JSON values (accept/reject must match the JSON
Schema), and nesting up to 2000 levels. "Total" means `parse_event` returns an `Event` or raises
`BadEvent`; any other exception fails these tests.
"""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from encoders.data import EVENT_TYPES
from streams.contracts.events import (
    MAX_BYTES,
    MAX_DEPTH,
    MAX_FUTURE_S,
    MIN_TS,
    BadEvent,
    Event,
    load_schema,
    parse_event,
)

NOW = 1_700_000_000.0
SCHEMA = Draft202012Validator(load_schema("event"))
HEAD = '{"event_id":"e1","user_id":"u1","item_id":"i1","event_type":"view","ts":1600000000'
GOOD = HEAD + "}"
FUZZ = settings(max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def with_field(name: str, json_value: str) -> bytes:
    """GOOD with one field's JSON text replaced (`json_value` is raw JSON, escapes and all)."""
    rec = json.loads(GOOD)
    parts = [f'"{k}":{json_value if k == name else json.dumps(v)}' for k, v in rec.items()]
    return ("{" + ",".join(parts) + "}").encode()


def parse(raw: bytes, key: bytes | None = b"u1") -> Event:
    return parse_event(raw, key, now=NOW)


def refused(raw: bytes, match: str, key: bytes | None = b"u1") -> str:
    with pytest.raises(BadEvent, match=match) as exc:
        parse(raw, key)
    return str(exc.value)


def assert_ids_encode(ev: Event) -> None:
    for s in (ev.event_id, ev.user_id, ev.item_id):
        assert isinstance(s, str) and 1 <= len(s) <= 128
        s.encode("utf-8")  # strict: raises on a lone surrogate


def depth(value: object) -> int:
    """Nesting depth of arrays/objects (a scalar is 0), iteratively."""
    best, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            best = max(best, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return best


# --- the crashers of the old parser -------------------------------------------------------------------

def test_deep_brackets_are_refused_not_a_recursion_error():
    raw = b"[" * 1500 + b"]" * 1500
    assert len(raw) < 4096
    refused(raw, "nested too deeply")


def test_a_valid_event_with_one_field_nested_1200_deep_is_refused():
    raw = (HEAD + ',"extra":' + "[" * 1200 + "]" * 1200 + "}").encode()
    assert len(raw) < 4096
    refused(raw, "nested too deeply")
    refused(with_field("item_id", "[" * 1200 + "]" * 1200), "nested too deeply")


@pytest.mark.parametrize(("field", "value"), [("user_id", r'"\ud800"'), ("event_id", r'"p-\udfff"'),
                                              ("item_id", r'"\udfff\ud800"'), ("user_id", r'"a\ud83d"')])
def test_lone_surrogates_in_ids_are_refused(field, value):
    raw = with_field(field, value)
    assert len(raw) < 4096
    reason = refused(raw, f"field '{field}' holds invalid unicode")
    assert "surrogate" in reason
    assert not SCHEMA.is_valid(json.loads(raw))


@pytest.mark.parametrize("value", ['["view"]', '{"t":"view"}', "[]", "{}", "3", "true", "null", '"VIEW"'])
def test_event_type_of_any_json_type_is_refused_not_a_type_error(value):
    raw = with_field("event_type", value)
    refused(raw, "unknown event_type")
    assert not SCHEMA.is_valid(json.loads(raw))


# --- new rules ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "dup"), [
    (HEAD + ',"user_id":"u1"}', "user_id"),                 # same value twice is still ambiguous
    (HEAD + ',"user_id":"u2"}', "user_id"),
    (HEAD + ',"ts":1600000001}', "ts"),
    (HEAD + ',"extra":{"a":1,"b":2,"a":3}}', "a"),         # anywhere, not only at the top
    (HEAD + ',"extra":[{"x":[{"k":1,"k":1}]}]}', "k"),
])
def test_duplicate_keys_are_refused_with_the_key_named(raw, dup):
    refused(raw.encode(), f"duplicate key '{dup}'")


@pytest.mark.parametrize("raw", [
    GOOD.encode("utf-16"),              # with a BOM
    GOOD.encode("utf-16-le"),           # no BOM: only NUL bytes tell
    GOOD.encode("utf-16-be"),
    GOOD.encode("utf-32"),
    GOOD.encode("utf-32-le"),
    b"\xef\xbb\xbf" + GOOD.encode(),    # UTF-8 with a byte-order mark
    GOOD.replace("u1", "\u00fc1").encode("latin-1"),      # a Latin-1 byte
    GOOD.encode().replace(b'"u1"', b'"\xed\xa0\x80"'),   # a surrogate encoded as bytes (CESU-8)
    GOOD.encode().replace(b'"i1"', b'"\xc0\xaf"'),       # overlong encoding
])
def test_payloads_that_are_not_utf8_json_are_refused(raw):
    refused(raw, "payload must be UTF-8 JSON", key=b"u1")


def test_utf8_beyond_ascii_is_accepted_and_round_trips():
    for uid in ("\u00fcser", "\u7528\u6237", "\U0001F600", "a\u00a0b"):
        ev = parse(GOOD.replace("u1", uid).encode("utf-8"), uid.encode("utf-8"))
        assert ev.user_id == uid
        assert_ids_encode(ev)
    ev = parse(with_field("user_id", r'"\ud83d\ude00"'), "\U0001F600".encode())  # a surrogate *pair* is fine
    assert ev.user_id == "\U0001F600"


@pytest.mark.parametrize("value", [r'"a\u0000b"', r'"\u0001"', r'"x\u001f"', r'"\t"', r'"line\n"',
                                   '"del\x7f"', r'"c1\u0085"', r'"\u009f"'])
def test_control_characters_in_ids_are_refused(value):
    raw = with_field("event_id", value)
    refused(raw, "field 'event_id' holds control character")
    assert not SCHEMA.is_valid(json.loads(raw))


def test_raw_control_characters_in_strings_are_malformed_json():
    refused(GOOD.replace("e1", "e\x001").encode(), "malformed JSON|must be UTF-8")
    refused(GOOD.replace("e1", "e\t1").encode(), "malformed JSON")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(constant):
    refused((HEAD + f',"extra":{constant}}}').encode(), f"{constant.lstrip('-')} is not JSON")
    refused(with_field("ts", constant), "is not JSON")


def test_an_overflowing_number_is_just_a_far_future_timestamp():
    refused(with_field("ts", "1e400"), "in the future")
    refused(with_field("ts", "-1e400"), "too far in the past")


@pytest.mark.parametrize(("value", "as_id"), [("8000000.0", "8000000"), ("8e6", "8000000"), ("-5.0", "-5"),
                                             ("0.0", "0"), ("-0.0", "0"), ("1E2", "100"), ("7", "7")])
def test_integral_floats_are_integer_ids_as_in_json_schema(value, as_id):
    raw = with_field("item_id", value)
    assert SCHEMA.is_valid(json.loads(raw))
    assert parse(raw).item_id == as_id
    assert parse(with_field("user_id", value), as_id.encode()).user_id == as_id


@pytest.mark.parametrize("value", ["1.5", "-0.25", "8000000.5", "1e-3", "true", "false", "null", "[]", "{}"])
def test_non_integral_numbers_and_other_types_stay_refused(value):
    raw = with_field("event_id", value)
    refused(raw, "must be a string or integer")
    assert not SCHEMA.is_valid(json.loads(raw))


def test_integer_ids_are_at_most_128_characters_and_huge_ones_do_not_crash():
    for ok in (10**128 - 1, -(10**127 - 1)):
        raw = with_field("item_id", str(ok))
        assert SCHEMA.is_valid(json.loads(raw))
        assert parse(raw).item_id == str(ok)
    for bad in (str(10**128), str(-(10**127)), "9" * 4000, "-" + "9" * 4000, "1e300", "-1e300", "1e308"):
        raw = with_field("item_id", bad)
        assert len(raw) <= MAX_BYTES
        refused(raw, "must have 1..128 characters")
        assert not SCHEMA.is_valid(json.loads(raw))


def test_ints_over_the_interpreters_digit_limit_are_malformed_not_a_crash():
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)
    try:
        refused(with_field("item_id", "9" * 1000), "malformed JSON|must have 1..128")
        refused(with_field("ts", "9" * 1000), "malformed JSON|in the future")
        refused(with_field("ts", "-" + "9" * 1000), "malformed JSON|too far in the past")
    finally:
        sys.set_int_max_str_digits(old)


def test_nesting_limit_is_exact_and_brackets_inside_strings_do_not_count():
    def nested(levels: int) -> bytes:  # the event object is level 1
        inner = levels - 1
        return (HEAD + ',"extra":' + "[" * inner + "]" * inner + "}").encode()

    assert parse(nested(MAX_DEPTH)).event_type == "view"
    refused(nested(MAX_DEPTH + 1), f"nested too deeply \\(more than {MAX_DEPTH} levels\\)")
    assert parse((HEAD + ',"pad":"' + "[{" * 500 + '"}').encode()).user_id == "u1"


def test_nesting_verdict_does_not_depend_on_the_callers_stack_depth():
    raw_ok = (HEAD + ',"extra":' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}").encode()
    raw_bad = (HEAD + ',"extra":' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}").encode()
    frames = sys.getrecursionlimit() - 300 - _frames()

    def at_depth(n: int, raw: bytes):
        if n > 0:
            return at_depth(n - 1, raw)
        try:
            return parse(raw)
        except BadEvent as exc:
            return exc

    assert isinstance(at_depth(frames, raw_ok), Event)
    assert "nested too deeply" in str(at_depth(frames, raw_bad))


def _frames() -> int:
    n, f = 0, sys._getframe()
    while f is not None:
        n, f = n + 1, f.f_back
    return n


def test_other_payload_types():
    assert parse(bytearray(GOOD.encode())).user_id == "u1"
    assert parse(memoryview(GOOD.encode())).user_id == "u1"
    refused(GOOD, "payload must be bytes, got str")  # type: ignore[arg-type]
    refused(None, "empty message")
    refused(b"", "malformed JSON")
    refused(b"   ", "malformed JSON")


def test_existing_checks_still_hold():
    assert parse(GOOD.encode()) == Event("e1", "u1", "i1", "view", 1_600_000_000.0)
    refused(GOOD.encode(), "key does not match", key=b"u2")
    refused(GOOD.encode(), "missing message key", key=None)
    refused((HEAD + ',"pad":"' + "x" * 5000 + '"}').encode(), "oversized payload")
    refused(with_field("ts", '"now"'), "must be a number")
    refused(with_field("ts", str(MIN_TS - 1)), "too far in the past")
    refused(with_field("ts", str(NOW + MAX_FUTURE_S + 1)), "in the future")
    refused(with_field("event_id", '""'), "1..128 characters")
    refused(with_field("event_id", json.dumps("x" * 129)), "1..128 characters")
    for field in ("event_id", "user_id", "item_id", "event_type", "ts"):
        rec = json.loads(GOOD)
        del rec[field]
        refused(json.dumps(rec).encode(), f"missing field '{field}'")


def test_reasons_quoting_the_input_are_short():
    reason = refused(with_field("event_type", json.dumps("x" * 3000)), "unknown event_type")
    assert len(reason) < 200


# --- fuzzing ------------------------------------------------------------------------------------------

def _total(raw, key) -> Event | None:
    """Returns the event, None for a BadEvent; anything else propagates and fails the test."""
    try:
        ev = parse_event(raw, key, now=NOW)
    except BadEvent as exc:
        assert str(exc)  # always a reason
        return None
    assert isinstance(ev, Event)
    assert ev.event_type in EVENT_TYPES
    assert_ids_encode(ev)
    return ev


JSONISH = st.text(alphabet='[]{}":,.-+0123456789eE \\/ubfnrtaluseNIfiy\x00\x7f\u00e9\U0001F600', max_size=400)


@st.composite
def mutated_good(draw) -> bytes:
    raw = bytearray(GOOD.encode())
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["insert", "replace", "delete"]))
        byte = draw(st.integers(0, 255))
        if op == "insert":
            raw.insert(pos, byte)
        elif pos < len(raw):
            if op == "replace":
                raw[pos] = byte
            else:
                del raw[pos]
    return bytes(raw)


@settings(FUZZ, max_examples=1000)
@given(raw=st.one_of(st.binary(max_size=5000), JSONISH.map(str.encode), mutated_good()),
       key=st.one_of(st.none(), st.just(b"u1"), st.binary(max_size=16)))
def test_fuzz_any_bytes_give_an_event_or_a_bad_event(raw, key):
    _total(raw, key)


ANY_CHAR = st.characters(exclude_categories=())  # every code point, lone surrogates included
LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                 st.text(alphabet=ANY_CHAR, max_size=12))
JSON_VALUES = st.recursive(LEAF, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                        st.dictionaries(st.text(max_size=6), kids, max_size=4)),
                           max_leaves=16)
def mostly(good, wild, one_in: int = 4):
    """`good` most of the time, `wild` one time in `one_in` (both drawn, so shrinking works)."""
    return st.tuples(st.sampled_from(range(one_in)), good, wild).map(lambda t: t[2] if t[0] == one_in - 1 else t[1])


GOOD_ID = st.one_of(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_:.", min_size=1, max_size=24),
    st.text(alphabet=st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=16),
    st.integers(),
    st.integers(-(10**18), 10**18).map(float),                             # integral floats
)
EDGY_CHAR = st.one_of(st.characters(max_codepoint=0xA0),                       # C0, DEL, C1
                      st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=()))
WILD_ID = st.one_of(
    st.text(alphabet=ANY_CHAR, max_size=8),
    st.text(alphabet=EDGY_CHAR, min_size=1, max_size=4),
    st.builds(lambda a, c, b: a + c + b, st.text(max_size=3), EDGY_CHAR, st.text(max_size=3)),
    st.builds(lambda c, n: c * n, ANY_CHAR, st.sampled_from([0, 1, 64, 127, 128, 129, 130])),  # length edges
    st.builds(lambda c, n: c * n, st.sampled_from("x\u00e9\U0001F600"), st.sampled_from([128, 129])),
    st.integers(-(10**130), 10**130),
    st.sampled_from([10**128 - 1, 10**128, -(10**127 - 1), -(10**127), 0, -1, -0.0, 1e128, 1e127]),
    st.floats(allow_nan=False, allow_infinity=False),
    JSON_VALUES,
)
GOOD_TS = st.one_of(st.floats(MIN_TS - 10, NOW + 2 * MAX_FUTURE_S, allow_nan=False),
                    st.integers(MIN_TS - 10, int(NOW) + 2 * MAX_FUTURE_S),
                    st.sampled_from([MIN_TS, MIN_TS - 1, MIN_TS - 0.5, NOW + MAX_FUTURE_S, NOW + MAX_FUTURE_S + 1]))
WILD = {
    "event_id": WILD_ID, "user_id": WILD_ID, "item_id": WILD_ID,
    "event_type": st.one_of(st.text(max_size=6), st.sampled_from([t.upper() for t in EVENT_TYPES]), JSON_VALUES),
    "ts": st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(), JSON_VALUES),
}
FIELDS = tuple(WILD)


@st.composite
def event_like(draw) -> dict:
    """A valid event, then a few fields given wild values, sometimes a few fields dropped, extra fields."""
    rec = {"event_id": draw(GOOD_ID), "user_id": draw(GOOD_ID), "item_id": draw(GOOD_ID),
           "event_type": draw(st.sampled_from(EVENT_TYPES)), "ts": draw(GOOD_TS)}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        rec[name] = draw(WILD[name])
    for name in draw(mostly(st.just(frozenset()), st.frozensets(st.sampled_from(FIELDS), min_size=1), one_in=8)):
        del rec[name]
    extra = draw(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3))
    return {**extra, **rec} if draw(st.booleans()) else {**rec, **extra}


def key_for(doc) -> bytes:
    """The key a correct producer sends: the user_id as the parser would spell it (else anything)."""
    uid = doc.get("user_id") if isinstance(doc, dict) else None
    if isinstance(uid, str):
        return uid.encode("utf-8", "surrogatepass")
    if isinstance(uid, int) and not isinstance(uid, bool) and abs(uid) < 10**200:
        return str(uid).encode()
    if isinstance(uid, float) and uid.is_integer() and abs(uid) < 1e200:
        return str(int(uid)).encode()
    return b"u1"


def encode(doc, ascii_only: bool) -> bytes:
    try:
        return json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate cannot be raw UTF-8; send it escaped
        return json.dumps(doc).encode("utf-8")


@settings(FUZZ, max_examples=1000)
@given(doc=st.one_of(event_like(), event_like(), JSON_VALUES), ascii_only=st.booleans())
def test_fuzz_parser_agrees_with_the_json_schema(doc, ascii_only):
    raw = encode(doc, ascii_only)
    value = json.loads(raw)  # what the bytes denote (a surrogate pair written escaped is one code point)
    expected = SCHEMA.is_valid(value) and len(raw) <= MAX_BYTES and depth(value) <= MAX_DEPTH
    if expected and value["ts"] > NOW + MAX_FUTURE_S:  # "a day ahead of the clock": not expressible statically
        expected = False
    ev = _total(raw, key_for(value))
    if expected:
        assert ev is not None, f"refused a schema-valid event: {parse_error(raw, key_for(value))}"
        for name in ("event_id", "user_id", "item_id"):
            v = value[name]
            assert getattr(ev, name) == (v if isinstance(v, str) else str(int(v)))
        assert (ev.event_type, ev.ts) == (value["event_type"], float(value["ts"]))
    else:
        errors = [e.message[:80] for e in SCHEMA.iter_errors(value)] if isinstance(value, dict) else "not an object"
        assert ev is None, f"accepted what the schema refuses: {errors}"


def parse_error(raw: bytes, key: bytes) -> str:
    try:
        parse_event(raw, key, now=NOW)
    except BadEvent as exc:
        return str(exc)
    return "(accepted)"


OPENERS = st.sampled_from(["[", '{"k":', "[1,", '{"a":0,"k":'])


def _close(opener: str) -> str:
    return "]" if opener.startswith("[") else "}"


@FUZZ
@given(levels=st.integers(1, 2000), pattern=st.lists(OPENERS, min_size=1, max_size=6),
       leaf=st.sampled_from(["1", '"x"', "null", "[]", "{}", "-0.0"]),
       where=st.sampled_from(["top", "extra", "event_id", "user_id", "event_type", "ts"]))
def test_fuzz_deep_nesting_gives_an_event_or_a_bad_event(levels, pattern, leaf, where):
    opens = [pattern[i % len(pattern)] for i in range(levels)]
    nested = "".join(opens) + leaf + "".join(_close(o) for o in reversed(opens))
    if where == "top":
        raw = nested.encode()
    elif where == "extra":
        raw = (HEAD + ',"extra":' + nested + "}").encode()
    else:
        raw = with_field(where, nested)
    ev = _total(raw, b"u1")
    total_depth = levels + (leaf in ("[]", "{}")) + (where != "top")
    if len(raw) <= MAX_BYTES:
        if total_depth > MAX_DEPTH:
            assert ev is None
            refused(raw, "nested too deeply")
        elif where == "extra":
            assert ev is not None, parse_error(raw, b"u1")
