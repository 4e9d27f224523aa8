"""Checks of user-supplied data (`--events FILE`, `--items FILE`) before anything trains on it.

Pure: it reads the two files and nothing else (no Kafka, no torch). `read_generic` parses and checks
in one pass and returns the rows it kept with a `CheckReport`; `encoders.data.load_generic` builds the
training data from those rows (so `lsti train`, `lsti eval` and `lsti nightly` run the same checks),
and `lsti data check` prints the report.

What is read: CSV/TSV with a header line (delimiter sniffed from it), JSON lines (also Python-literal
lines such as the Amazon 2014 metadata), and MovieLens `.dat` files (`::`-separated, no header: their
columns are named as in MovieLens' CSV releases). Plain or gzip; UTF-8 (a BOM is skipped), else
latin-1. Spaces around column names and values are stripped.

What is checked: the columns (found vs expected, with a hint for common aliases such as `userId`,
`movieId`, `timestamp`, `rating`), every row (refused rows are counted by reason, the first few shown
with their line number), timestamps (milliseconds and finer are detected and converted to seconds),
ids of events missing from the items file and the reverse, duplicate (user, item, ts) rows, and
timestamp ties at the leave-one-out split boundary.
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

EVENT_TYPES: tuple[str, ...] = ("view", "click", "cart", "fav", "buy")  # the stream's vocabulary (encoders.data)
TIE_RULE = ("events of one user with the same timestamp keep the order of the events file (the earlier line "
            "is the earlier event); timestamps finer than seconds (e.g. milliseconds) order them first")
MIN_EVENTS = 3  # = encoders.split.MIN_EVENTS: users with fewer events are not evaluated
MAX_SHOWN = 5  # refused rows shown by line number; the rest are counted
LOW_OVERLAP = 0.5  # below this share of the events' items found in the items file: a loud warning
DEFAULT_MAX_REFUSED = 0.01  # more refused rows than this share: the input is refused
BOM = b"\xef\xbb\xbf"
MOVIELENS_DAT = {4: ["userId", "movieId", "rating", "timestamp"], 3: ["movieId", "title", "genres"],
                 5: ["userId", "gender", "age", "occupation", "zip"]}
UNITS = ((1e11, 1, "seconds"), (1e14, 1_000, "milliseconds"), (1e17, 1_000_000, "microseconds"),
         (math.inf, 1_000_000_000, "nanoseconds"))

# Common names of each column, compared lower-case without `_`, `-` or spaces.
ALIASES: dict[str, tuple[str, ...]] = {
    "user": ("userid", "user", "uid", "visitorid", "reviewerid", "customerid", "sessionid", "clientid",
             "memberid", "accountid", "viewerid", "readerid"),
    "item": ("itemid", "item", "iid", "movieid", "productid", "asin", "articleid", "sku", "trackid", "songid",
             "bookid", "isbn", "newsid", "contentid", "videoid", "goodsid", "parentasin"),
    "time": ("ts", "timestamp", "time", "unixreviewtime", "datetime", "date", "eventtime", "createdat",
             "timestampms", "tsms", "unixtime", "epoch", "eventts"),
    "type": ("eventtype", "event", "type", "action", "behavior", "behaviour", "behaviortype", "behaviourtype",
             "interaction", "actiontype", "interactiontype"),
    "rating": ("rating", "ratings", "overall", "score", "stars", "preference"),
    "text": ("text", "title", "name", "description", "genres", "genre", "summary", "categories", "category",
             "tags", "brand", "overview", "abstract", "plot", "feature", "features", "details"),
}
OPTION = {"user": "--user-col", "item": "--item-col", "time": "--time-col", "type": "--type-col"}


class DataError(ValueError):
    """The input cannot be used; the message is one line, fit for `error: ...`."""


@dataclass
class ColumnMap:
    """Which columns hold what. `event_type` gives every event one type (rating or review data);
    `type_map` renames raw event types (e.g. addtocart -> cart); `text` are the items file's text columns."""

    user: str = "user_id"
    item: str = "item_id"
    time: str = "ts"
    type: str = "event_type"
    event_type: str | None = None
    type_map: dict[str, str] = field(default_factory=dict)
    text: tuple[str, ...] = ("text",)

    @classmethod
    def from_options(cls, user: str | None = None, item: str | None = None, time: str | None = None,
                     type: str | None = None, event_type: str | None = None, type_map: str | None = None,
                     text: str | None = None) -> ColumnMap:
        """From the CLI's strings: `type_map` as `a=b,c=d`, `text` as `title,genres`; None keeps a default."""
        out = cls()
        for name, value in (("user", user), ("item", item), ("time", time), ("type", type)):
            if value is not None:
                setattr(out, name, value.strip())
        if event_type is not None:
            out.event_type = event_type.strip()
        if type_map:
            for pair in type_map.split(","):
                if pair.strip():
                    raw, sep, to = pair.partition("=")
                    if not sep or not raw.strip() or not to.strip():
                        raise DataError(f"--type-map wants FROM=TO pairs separated by commas, got {pair.strip()!r}")
                    out.type_map[raw.strip()] = to.strip()
        if text is not None:
            out.text = tuple(c.strip() for c in text.split(",") if c.strip())
            if not out.text:
                raise DataError("--text-cols names no column")
        return out

    def problems(self, event_types: Sequence[str]) -> list[str]:
        out = []
        if self.event_type is not None and self.event_type.lower() not in event_types:
            out.append(f"--event-type {self.event_type!r} is not an event type (one of {', '.join(event_types)})")
        bad = {k: v for k, v in self.type_map.items() if v.lower() not in event_types}
        if bad:
            out.append(f"--type-map target(s) {', '.join(map(repr, bad.values()))} not an event type "
                       f"(one of {', '.join(event_types)})")
        return out

    def to_dict(self) -> dict:
        return {"user": self.user, "item": self.item, "time": self.time,
                "type": None if self.event_type else self.type, "event_type": self.event_type,
                "type_map": dict(self.type_map), "text": list(self.text)}


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def _alias(role: str, columns: Sequence[str], taken: Sequence[str] = ()) -> str | None:
    for c in columns:
        if _norm(c) in ALIASES[role] and c not in taken:
            return c
    return None


def _to_str(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, list | tuple):
        return ", ".join(s for s in (_to_str(x) for x in v) if s)
    if isinstance(v, dict):
        return json.dumps(v, ensure_ascii=False)
    return str(v).strip()


def _looks_numeric(s: str) -> bool:
    return bool(re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", s))


def file_sha256(path: Path) -> str:
    """The file's sha256, read in 1 MiB chunks (data reports and artifact manifests name files by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


class _Source:
    """One input file: its format, encoding and columns, and its records as (line, values) pairs."""

    def __init__(self, path: Path | str, role: str):
        self.path, self.role = Path(path), role
        self.name = self.path.name
        if not self.path.is_file():
            raise DataError(f"{role} file not found: {self.path}")
        try:
            with _open_bytes(self.path) as f:
                head = f.read(1 << 16)
        except (OSError, EOFError) as e:
            raise DataError(f"{role} file {self.name} cannot be read: {e}") from None
        self.bom = head.startswith(BOM)
        self.notes: list[str] = []
        if self.bom:
            self.notes.append(f"{self.name}: UTF-8 byte order mark skipped")
        text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
        lines = text.splitlines()
        if len(head) == 1 << 16 and lines:
            lines = lines[:-1]  # the last line of the peek may be cut
        first = next((ln for ln in lines if ln.strip()), "")
        if not first:
            raise DataError(f"{role} file {self.name} is empty")
        base = self.name.lower().removesuffix(".gz")
        self.delimiter = ","
        self.header_line = True
        if base.endswith((".jsonl", ".json", ".ndjson")) or first.lstrip().startswith("{"):
            self.format = "jsonl"
            keys: dict[str, None] = {}
            for ln in lines[:200]:
                rec = self._parse_json(ln.strip())[0] if ln.strip() else None
                for k in rec or {}:
                    keys.setdefault(str(k).strip())
            self.columns = list(keys)
        elif "::" in first:
            self.format = "movielens-dat"
            parts = first.split("::")
            self.header_line = not _looks_numeric(parts[0])
            if self.header_line:
                self.columns = [p.strip() for p in parts]
            else:
                n = len(parts)
                self.columns = MOVIELENS_DAT.get(n, [f"col{i + 1}" for i in range(n)])
                self.notes.append(f"{self.name}: `::`-separated MovieLens .dat without a header: columns read as "
                                  f"{', '.join(self.columns)}")
        else:
            self.delimiter = max((",", "\t", ";", "|"), key=first.count) if any(d in first for d in ",\t;|") else ","
            self.format = {",": "csv", "\t": "tsv"}.get(self.delimiter, f"csv ({self.delimiter!r}-separated)")
            raw = next(csv.reader([first], delimiter=self.delimiter, skipinitialspace=True))
            self.columns = [c.strip().strip('"').strip() for c in raw]
            if any(c != c.strip() for c in raw) or re.search(re.escape(self.delimiter) + r" ", first):
                self.notes.append(f"{self.name}: spaces around column names stripped")
        self.encoding = "utf-8"
        self.stripped_values = 0

    @staticmethod
    def _parse_json(s: str) -> tuple[dict | None, str | None, bool]:
        """(record, problem, was a Python literal)."""
        literal = False
        try:
            rec = json.loads(s)
        except ValueError:
            try:
                rec, literal = ast.literal_eval(s), True
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return None, "not valid JSON", False
        if not isinstance(rec, dict):
            return None, "not a JSON object", False
        return rec, None, literal

    def header_is_data(self) -> bool:
        return self.format != "jsonl" and self.header_line and sum(map(_looks_numeric, self.columns)) >= 2

    def records(self, encoding: str) -> Iterator[tuple[int, dict[str, str] | None, str | None]]:
        """(line number, {column: value}, None) per row, or (line, None, why) for a row that cannot be read."""
        self.stripped_values = 0
        literal = 0
        with io.TextIOWrapper(_open_bytes(self.path), encoding=encoding, newline="") as f:
            if self.format == "jsonl":
                for line_no, line in enumerate(f, 1):
                    s = line.strip()
                    if not s:
                        continue
                    rec, problem, lit = self._parse_json(s)
                    literal += lit
                    if rec is None:
                        yield line_no, None, problem
                    else:
                        yield line_no, {str(k).strip(): _to_str(v) for k, v in rec.items()}, None
                if literal:
                    self.notes.append(f"{self.name}: {literal:,} lines are Python literals, not JSON "
                                      "(as in Amazon's 2014 metadata): read as such")
                return
            ncol = len(self.columns)
            if self.format == "movielens-dat":
                rows: Iterator = ((i, ln.rstrip("\r\n").split("::")) for i, ln in enumerate(f, 1))
            else:
                reader = csv.reader(f, delimiter=self.delimiter, skipinitialspace=True)
                rows = ((reader.line_num, r) for r in reader)
            first = True
            for line_no, row in rows:
                if first and self.header_line:
                    first = False
                    continue
                first = False
                if not row or not any(v.strip() for v in row):
                    continue
                if len(row) != ncol and not (len(row) > ncol and not any(v.strip() for v in row[ncol:])):
                    yield line_no, None, f"{len(row)} fields where the header has {ncol}"
                    continue
                values = [v.strip() for v in row[:ncol]]
                if values != row[:ncol]:
                    self.stripped_values += 1
                yield line_no, dict(zip(self.columns, values, strict=True)), None

    def scan(self, consume):
        """Run `consume(records)` over the file as UTF-8, or again as latin-1 if it is not valid UTF-8."""
        try:
            try:
                out = consume(self.records("utf-8-sig"))
            except UnicodeDecodeError:
                self.encoding = "latin-1"
                self.notes.append(f"{self.name}: not valid UTF-8, read as latin-1 (ISO-8859-1)")
                out = consume(self.records("latin-1"))
        except csv.Error as e:
            raise DataError(f"{self.role} file {self.name} is not readable CSV: {e}") from None
        except (OSError, EOFError) as e:
            raise DataError(f"{self.role} file {self.name} cannot be read: {e}") from None
        if self.stripped_values:
            self.notes.append(f"{self.name}: spaces around values stripped ({self.stripped_values:,} rows)")
        return out

    def info(self) -> dict:
        return {"name": self.name, "path": str(self.path), "sha256": file_sha256(self.path),
                "bytes": self.path.stat().st_size, "format": self.format, "encoding": self.encoding,
                "columns": list(self.columns)}


class _Refusals:
    """Refused rows of one file: counts by reason, the first few with their line numbers."""

    def __init__(self, name: str):
        self.name = name
        self.reasons: Counter[str] = Counter()
        self.first: list[tuple[int, str]] = []

    def add(self, line: int, reason: str, kind: str | None = None) -> None:
        self.reasons[kind or reason] += 1
        if len(self.first) < MAX_SHOWN:
            self.first.append((line, reason))

    @property
    def n(self) -> int:
        return sum(self.reasons.values())

    def describe(self) -> str:
        shown = "; ".join(f"line {ln}: {r}" for ln, r in self.first)
        rest = self.n - len(self.first)
        counts = ", ".join(f"{k} ({v:,})" for k, v in self.reasons.most_common())
        return f"{shown}{f'; and {rest:,} more' if rest > 0 else ''} [by reason: {counts}]"

    def to_dict(self) -> dict:
        return {"reasons": dict(self.reasons.most_common()),
                "first": [{"line": ln, "reason": r} for ln, r in self.first]}


def _parse_ts(s: str) -> tuple[float | int, bool]:
    """(value, was an ISO date); raises ValueError."""
    if re.fullmatch(r"-?\d+", s):
        return int(s), False
    try:
        v = float(s)
    except ValueError:
        try:
            d = datetime.fromisoformat(s.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(s) from None
        if d.tzinfo is None:
            d = d.replace(tzinfo=UTC)
        return d.timestamp(), True
    if not math.isfinite(v):
        raise ValueError(s)
    return v, False


@dataclass
class CheckReport:
    """What the check found; `errors` non-empty means the input is refused."""

    files: dict[str, dict] = field(default_factory=dict)
    columns: dict = field(default_factory=dict)
    rows: dict[str, dict] = field(default_factory=dict)
    refused: dict[str, dict] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def label(self) -> str:
        """The data's name in reports: `events:<stem>:<first 8 hex of the events file's sha256>`."""
        ev = self.files.get("events", {})
        stem = Path(ev.get("name", "events")).name.removesuffix(".gz").rsplit(".", 1)[0]
        return f"events:{stem}:{ev.get('sha256', '')[:8]}"

    def error_line(self) -> str:
        return "; ".join(self.errors)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "dataset": self.label, "files": self.files, "columns": self.columns,
                "rows": self.rows, "refused": self.refused, "stats": self.stats, "tie_break": TIE_RULE,
                "errors": self.errors, "warnings": self.warnings, "notes": self.notes}

    def summary(self) -> str:
        """Human-readable report (what `lsti data check` prints)."""
        out = []
        for role in ("events", "items"):
            f = self.files.get(role)
            if not f:
                continue
            r = self.rows.get(role, {})
            counts = (f"{r.get('read', 0):,} rows read, {r.get('kept', 0):,} kept, {r.get('refused', 0):,} refused"
                      if r else "not read")
            out.append(f"{role:6} {f['name']} ({f['format']}, {f['encoding']}, sha256 {f['sha256'][:12]}): {counts}")
            out.append(f"       columns found: {', '.join(f['columns'])}")
        if self.columns:
            c = self.columns
            typ = f"every row {c['event_type']!r}" if c.get("event_type") else c.get("type")
            used = f"user {c['user']}, item {c['item']}, time {c['time']}, type {typ}"
            if c.get("type_map"):
                used += " (" + ", ".join(f"{k}->{v}" for k, v in c["type_map"].items()) + ")"
            if "items" in self.files:
                used += f"; items: id {c.get('items_id') or '?'}, text {'+'.join(c['text'])}"
            out.append(f"used   {used}")
        s = self.stats
        if "users" in s:
            out.append(f"data   {s['users']:,} users, {s['items_in_events']:,} items in events"
                       + (f", {s['items_in_file']:,} in the items file ({s['overlap']:,} in both)"
                          if "items_in_file" in s else ""))
            if s.get("event_types"):
                out.append("       event types: " + ", ".join(f"{k} {v:,}" for k, v in s["event_types"].items()))
            if s.get("time_range"):
                out.append(f"       timestamps: {s['timestamp_unit']}, {s['time_range'][0]} .. {s['time_range'][1]}")
            out.append(f"       duplicate (user, item, ts) rows: {s.get('duplicates', 0):,}; users with ties at the "
                       f"split: test {s.get('ties', {}).get('test', 0):,}, validation "
                       f"{s.get('ties', {}).get('valid', 0):,} of {s.get('eval_users', 0):,} evaluated")
            out.append(f"       tie rule: {TIE_RULE}")
        for title, lines in (("note", self.notes), ("WARNING", self.warnings), ("ERROR", self.errors)):
            out += [f"{title}: {ln}" for ln in lines]
        verdict = "refused" if self.errors else ("usable, with warnings" if self.warnings else "usable")
        out.append(f"result: {verdict} ({len(self.errors)} errors, {len(self.warnings)} warnings)")
        return "\n".join(out)


@dataclass
class GenericData:
    """Kept events (file order) and item texts, plus the report. `fine_ts` is the timestamp as read (before
    conversion to seconds) and orders events that share a second."""

    users: list[str]
    items: list[str]
    types: list[str]
    ts: np.ndarray  # int64 epoch seconds
    fine_ts: np.ndarray
    texts: dict[str, str] | None
    report: CheckReport


def _item_text(rec: dict[str, str], text_cols: Sequence[str]) -> str:
    """The first text column as is, the next ones as `Name: value` (`|` lists become `, `), joined by `. `."""
    parts = []
    for i, col in enumerate(text_cols):
        v = rec.get(col, "").strip()
        if not v:
            continue
        parts.append(v if i == 0 else f"{col.replace('_', ' ').capitalize()}: {v.replace('|', ', ')}")
    return ". ".join(parts)


def _missing_columns(src: _Source, need: dict[str, str]) -> str | None:
    """One line naming the missing columns, what was found, and the options that likely fix it."""
    missing = {role: name for role, name in need.items() if name not in src.columns}
    if not missing:
        return None
    if src.header_is_data():
        return (f"{src.name}: the first line looks like data, not a header ({', '.join(src.columns[:6])}); "
                "add a header line naming the columns (e.g. user_id,item_id,event_type,ts)")
    taken = [n for n in need.values() if n in src.columns]
    hints = []
    for role in missing:
        alias = _alias(role, src.columns, taken)
        if alias:
            hints.append(f"{OPTION[role]} {alias}")
            taken.append(alias)
        elif role == "type":
            rating = _alias("rating", src.columns)
            hints.append("--event-type view" + (f" ({rating!r} is a rating: give every row one event type)"
                                                if rating else " (one type for every row) or --type-col NAME"))
    msg = (f"{src.name}: missing column{'s' if len(missing) > 1 else ''} "
           f"{', '.join(repr(n) for n in missing.values())} (columns found: {', '.join(src.columns)})")
    return msg + (f"; try {' '.join(hints)}" if hints else "")


def _scan_events(src: _Source, cols: ColumnMap, event_types: Sequence[str]):
    uc, ic, tc = cols.user, cols.item, cols.time
    ty = None if cols.event_type else cols.type
    const = cols.event_type.lower() if cols.event_type else None
    tmap = {**{k.lower(): v.lower() for k, v in cols.type_map.items()}, **cols.type_map}
    allowed = set(event_types)

    def consume(records):
        users, items, types, ts, lines = [], [], [], [], []
        ref = _Refusals(src.name)
        unknown: Counter[str] = Counter()
        read = iso = 0
        for line, rec, problem in records:
            read += 1
            if rec is None:
                ref.add(line, problem)
                continue
            u, i, t = rec.get(uc), rec.get(ic), rec.get(tc)
            if u is None or i is None or t is None or (ty and ty not in rec):
                absent = [c for c in (uc, ic, tc, ty) if c and c not in rec]
                ref.add(line, f"no field {absent[0]!r}", "missing field")
                continue
            if not u:
                ref.add(line, "empty user id")
                continue
            if not i:
                ref.add(line, "empty item id")
                continue
            if const:
                e = const
            else:
                raw = rec[ty]
                e = tmap.get(raw) or tmap.get(raw.lower()) or raw.lower()
                if e not in allowed:
                    unknown[raw] += 1
                    ref.add(line, f"unknown event type {raw!r}", "unknown event type")
                    continue
            if not t:
                ref.add(line, "empty timestamp")
                continue
            try:
                v, was_iso = _parse_ts(t)
            except ValueError:
                ref.add(line, f"timestamp {t!r} is neither a number nor an ISO date", "bad timestamp")
                continue
            iso += was_iso
            users.append(u)
            items.append(i)
            types.append(e)
            ts.append(v)
            lines.append(line)
        return users, items, types, ts, lines, ref, unknown, read, iso

    return src.scan(consume)


def _scan_items(src: _Source, id_col: str, text_cols: Sequence[str]):
    def consume(records):
        texts: dict[str, str] = {}
        ref = _Refusals(src.name)
        read = dup = empty = 0
        for line, rec, problem in records:
            read += 1
            if rec is None:
                ref.add(line, problem)
                continue
            iid = rec.get(id_col)
            if iid is None:
                ref.add(line, f"no field {id_col!r}", "missing field")
                continue
            if not iid:
                ref.add(line, "empty item id")
                continue
            text = _item_text(rec, text_cols)
            empty += not text
            dup += iid in texts
            texts[iid] = text
        return texts, ref, read, dup, empty

    return src.scan(consume)


def _canonical(iid: str) -> str:
    """An id as a number where it is one: `0007`, `7` and `7.0` all become `7` (for the mismatch hint)."""
    m = re.fullmatch(r"0*(\d+)(\.0+)?", iid)
    return (m.group(1) or "0") if m else iid


def _share(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "n/a"


def read_generic(events: Path | str, items: Path | str | None = None, cols: ColumnMap | None = None,
                 event_types: Sequence[str] = EVENT_TYPES, max_refused: float = DEFAULT_MAX_REFUSED) -> GenericData:
    """Parse and check the events (and items) files. Raises DataError only when a file cannot be opened
    at all; everything else lands in `report` (`report.errors` non-empty = refused; rows then unusable)."""
    cols = cols or ColumnMap()
    rep = CheckReport()
    rep.errors += cols.problems(event_types)
    rep.columns = cols.to_dict()
    ev = _Source(events, "events")
    it = _Source(items, "items") if items is not None else None
    empty = GenericData([], [], [], np.zeros(0, np.int64), np.zeros(0, np.int64), None, rep)

    need = {"user": cols.user, "item": cols.item, "time": cols.time}
    if not cols.event_type:
        need["type"] = cols.type
    problem = _missing_columns(ev, need)
    items_id = None
    if it is not None:
        items_id = cols.item if cols.item in it.columns else ("item_id" if "item_id" in it.columns else None)
        if items_id is None:
            alias = _alias("item", it.columns)
            rep.errors.append(f"{it.name}: no item id column {cols.item!r} (columns found: {', '.join(it.columns)})"
                              + (f"; try --item-col {alias} (it names the item column of both files; the items "
                                 "file may also call it item_id)" if alias else ""))
        missing_text = [c for c in cols.text if c not in it.columns]
        if missing_text and not it.header_is_data():
            cands = [c for c in it.columns if c != items_id and _norm(c) in ALIASES["text"]]
            cands = cands or [c for c in it.columns if c != items_id]
            rep.errors.append(f"{it.name}: missing text column{'s' if len(missing_text) > 1 else ''} "
                              f"{', '.join(map(repr, missing_text))} (columns found: {', '.join(it.columns)})"
                              + (f"; try --text-cols {','.join(cands[:3])}" if cands else ""))
        elif missing_text:
            rep.errors.append(f"{it.name}: the first line looks like data, not a header; add a header line "
                              "(e.g. item_id,text)")
        rep.columns["items_id"] = items_id
    if problem:
        rep.errors.insert(0, problem)
    rep.files["events"] = ev.info()
    if it is not None:
        rep.files["items"] = it.info()
    if rep.errors:
        rep.notes += ev.notes + (it.notes if it else [])
        return empty

    users, item_ids, types, raw_ts, lines, ref, unknown, read, iso = _scan_events(ev, cols, event_types)
    rep.files["events"]["encoding"] = ev.encoding
    rep.rows["events"] = {"read": read, "kept": len(users), "refused": ref.n}
    rep.refused["events"] = ref.to_dict()
    rep.notes += ev.notes
    type_hint = ""
    if unknown:
        top = ", ".join(f"{k!r} ({v:,})" for k, v in unknown.most_common(5))
        type_hint = (f"; event types outside {', '.join(event_types)}: {top}: map them with --type-map "
                     f"{next(iter(unknown))}=view,... or give every row one type with --event-type view")
    if ref.n:
        msg = f"{ev.name}: {ref.n:,} of {read:,} rows refused: {ref.describe()}{type_hint}"
        if not users:
            rep.errors.append(f"{ev.name}: no usable row, all {read:,} refused: {ref.describe()}{type_hint}")
        elif ref.n > max_refused * read:
            rep.errors.append(f"{msg}; that is over {max_refused:.0%} of the rows (--max-refused to accept more)")
        else:
            rep.warnings.append(msg + " (skipped)")
    if not read and not ref.n:
        rep.errors.append(f"{ev.name}: no event rows")

    texts = None
    if it is not None:
        texts, iref, iread, dup, empty_texts = _scan_items(it, items_id, cols.text)
        rep.files["items"]["encoding"] = it.encoding
        rep.rows["items"] = {"read": iread, "kept": len(texts), "refused": iref.n, "duplicate_ids": dup,
                             "empty_text": empty_texts}
        rep.refused["items"] = iref.to_dict()
        rep.notes += it.notes
        if iref.n:
            msg = f"{it.name}: {iref.n:,} of {iread:,} rows refused: {iref.describe()}"
            if not texts or iref.n > max_refused * iread:
                rep.errors.append(msg)
            else:
                rep.warnings.append(msg + " (skipped)")
        if dup:
            rep.warnings.append(f"{it.name}: {dup:,} item ids appear more than once; the last line wins")
        if empty_texts:
            rep.warnings.append(f"{it.name}: {empty_texts:,} items have an empty text")
    if rep.errors:
        return empty

    # Timestamps: seconds, or finer units (detected by magnitude) converted to seconds.
    fine = np.array(raw_ts)
    med = float(np.median(np.abs(fine))) if len(fine) else 0.0
    _, div, unit = next(u for u in UNITS if med < u[0])
    if iso:
        rep.notes.append(f"{ev.name}: {iso:,} timestamps are ISO dates (read as UTC where no zone is given)")
    if div > 1:
        rep.notes.append(f"{ev.name}: timestamps are {unit} (median {med:,.0f} > 1e11): divided by {div:,} to "
                         f"seconds; events within one second keep the order of their {unit}")
        odd = int((np.abs(fine) < med / 100).sum())
        if odd:
            rep.warnings.append(f"{ev.name}: {odd:,} timestamps are over 100x smaller than the median: mixed units?")
    ts = np.floor_divide(fine, div).astype(np.int64) if div > 1 or fine.dtype.kind == "f" else fine.astype(np.int64)
    if len(ts):
        try:
            rep.stats["time_range"] = [datetime.fromtimestamp(int(x), UTC).strftime("%Y-%m-%d %H:%M:%S")
                                       for x in (ts.min(), ts.max())]
        except (OverflowError, OSError, ValueError):
            rep.stats["time_range"] = [int(ts.min()), int(ts.max())]
    rep.stats["timestamp_unit"] = unit

    # Users, items, types.
    ucode: dict[str, int] = {}
    u_arr = np.fromiter((ucode.setdefault(u, len(ucode)) for u in users), np.int64, len(users))
    icode: dict[str, int] = {}
    i_arr = np.fromiter((icode.setdefault(i, len(icode)) for i in item_ids), np.int64, len(item_ids))
    rep.stats.update(users=len(ucode), items_in_events=len(icode), event_types=dict(Counter(types).most_common()))
    if len(ucode) and len(users) / len(ucode) < MIN_EVENTS:
        rep.warnings.append(f"{ev.name}: {len(users) / len(ucode):.1f} events per user on average; users with "
                            f"fewer than {MIN_EVENTS} events are not evaluated")

    # Duplicates and ties at the split boundary (on the timestamp as read: finer units break ties).
    fine_key = fine if fine.dtype.kind in "iu" else fine.astype(np.float64)
    order = np.lexsort((np.arange(len(u_arr)), fine_key, i_arr, u_arr))
    su, si, sf = u_arr[order], i_arr[order], fine_key[order]
    same = (su[1:] == su[:-1]) & (si[1:] == si[:-1]) & (sf[1:] == sf[:-1])
    n_dup = int(same.sum())
    rep.stats["duplicates"] = n_dup
    if n_dup:
        j = int(np.flatnonzero(same)[0])
        a, b = sorted((int(order[j]), int(order[j + 1])))
        twice = "; a share this high suggests rows written twice" if n_dup > 0.2 * len(users) else ""
        rep.warnings.append(f"{ev.name}: {n_dup:,} rows repeat an earlier row's (user, item, ts), e.g. lines "
                            f"{lines[a]:,} and {lines[b]:,} (user {users[a]!r}, item {item_ids[a]!r}); kept as "
                            f"separate events{twice}")
    order = np.lexsort((np.arange(len(u_arr)), fine_key, u_arr))
    su, sf = u_arr[order], fine_key[order]
    counts = np.bincount(u_arr, minlength=len(ucode))
    ends = np.cumsum(counts)
    ev_users = np.flatnonzero(counts >= MIN_EVENTS)
    e = ends[ev_users]
    test_ties = int((sf[e - 1] == sf[e - 2]).sum()) if len(e) else 0
    valid_ties = int((sf[e - 2] == sf[e - 3]).sum()) if len(e) else 0
    rep.stats["eval_users"] = int(len(ev_users))
    rep.stats["ties"] = {"test": test_ties, "valid": valid_ties}
    if test_ties or valid_ties:
        rep.warnings.append(
            f"{ev.name}: timestamp ties at the split boundary: {test_ties:,} of {len(ev_users):,} evaluated users "
            f"({_share(test_ties, len(ev_users))}) have their last two events at the same time, {valid_ties:,} "
            f"({_share(valid_ties, len(ev_users))}) their 2nd and 3rd last; which one is the test (or validation) "
            "target is decided by the tie rule: file order")

    # Ids of the events vs the items file.
    if texts is not None:
        ev_ids, it_ids = set(icode), set(texts)
        both = ev_ids & it_ids
        miss, unused = ev_ids - it_ids, it_ids - ev_ids
        rep.stats.update(items_in_file=len(it_ids), overlap=len(both), event_items_missing_from_items=len(miss),
                         items_without_events=len(unused))
        canon = {_canonical(x) for x in ev_ids} & {_canonical(x) for x in it_ids}
        mismatch = ""
        if len(canon) > 2 * max(1, len(both)) or (not both and canon):
            ex_e = next(x for x in sorted(ev_ids) if _canonical(x) in canon)
            ex_i = next(x for x in sorted(it_ids) if _canonical(x) == _canonical(ex_e))
            mismatch = (f"; read as numbers {len(canon):,} would match (e.g. events {ex_e!r} vs items {ex_i!r}: "
                        "ints vs zero-padded strings?), write the ids the same way in both files")
        if not both:
            rep.errors.append(f"no item id of {ev.name} is in {it.name} (e.g. events {sorted(ev_ids)[:3]}, items "
                              f"{sorted(it_ids)[:3]}){mismatch}")
        elif len(both) < LOW_OVERLAP * len(ev_ids) or mismatch:
            rep.warnings.append(f"LOW OVERLAP: only {len(both):,} of the {len(ev_ids):,} items in {ev.name} "
                                f"({_share(len(both), len(ev_ids))}) are in {it.name}; the others get the "
                                f"placeholder text 'item ID' and the catalogue holds both{mismatch}")
        elif miss:
            rep.warnings.append(f"{len(miss):,} of the {len(ev_ids):,} items in {ev.name} "
                                f"({_share(len(miss), len(ev_ids))}) are not in {it.name}: they get the placeholder "
                                f"text 'item ID' (e.g. {sorted(miss)[:3]})")
        if unused and both:
            rep.warnings.append(f"{len(unused):,} of the {len(it_ids):,} items in {it.name} "
                                f"({_share(len(unused), len(it_ids))}) never appear in {ev.name}: they are still "
                                "ranking candidates (every item of the items file is)")
    if rep.errors:
        return empty
    return GenericData(users, item_ids, types, ts, fine_key, texts, rep)


def check_files(events: Path | str, items: Path | str | None = None, cols: ColumnMap | None = None,
                event_types: Sequence[str] = EVENT_TYPES, max_refused: float = DEFAULT_MAX_REFUSED) -> CheckReport:
    """The report alone (what `lsti data check` prints)."""
    return read_generic(events, items, cols, event_types, max_refused).report
