"""Dataset adapters: every source becomes one `Interactions` table of integer-coded events.

Item index 0 is padding everywhere, so item codes run 1..n_items. Event types share one
vocabulary with the stream contract (`EVENT_TYPES`), so a model trained offline steps the same
inputs online.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from encoders.data_check import EVENT_TYPES, TIE_RULE, ColumnMap, DataError, read_generic

log = logging.getLogger("lsti.data")
EVENT_CODE: dict[str, int] = {name: i + 1 for i, name in enumerate(EVENT_TYPES)}  # 0 = padding
TAOBAO_TYPES = {"pv": "view", "cart": "cart", "fav": "fav", "buy": "buy"}
DATASETS = ("ml-1m", "taobao", "amazon-mi")


def default_data_dir() -> Path:
    """The shared data folder beside the checkout, overridable by LSTI_DATA."""
    env = os.environ.get("LSTI_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@dataclass
class Interactions:
    """Events sorted by (user, time, original order), with id <-> code maps and item texts."""

    users: np.ndarray  # int64 user code per event, 0..n_users-1
    items: np.ndarray  # int64 item code per event, 1..n_items
    etypes: np.ndarray  # int64 event-type code per event, 1..len(EVENT_TYPES)
    ts: np.ndarray  # int64 epoch seconds
    user_ids: list[str]
    item_ids: list[str]  # item_ids[0] == "" (padding)
    item_texts: list[str]  # item_texts[0] == ""
    name: str = "custom"
    source: dict = field(default_factory=dict)  # where the data came from (files, sha256, rows, catalogue rule)
    user_offsets: np.ndarray = field(init=False)  # events of user u: [off[u], off[u+1])

    def __post_init__(self) -> None:
        order = np.lexsort((np.arange(len(self.users)), self.ts, self.users))
        for attr in ("users", "items", "etypes", "ts"):
            setattr(self, attr, np.asarray(getattr(self, attr), dtype=np.int64)[order])
        counts = np.bincount(self.users, minlength=len(self.user_ids))
        self.user_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def user_slice(self, u: int) -> slice:
        return slice(int(self.user_offsets[u]), int(self.user_offsets[u + 1]))

    def item_code(self) -> dict[str, int]:
        return {iid: i for i, iid in enumerate(self.item_ids) if i}

    @property
    def label(self) -> str:
        """The data's name in reports: the shared dataset's name, or `events:<stem>:<sha8>` for generic data."""
        return self.source.get("label", self.name)


def build_interactions(
    rows: Iterable[tuple[str, str, str, int]],
    item_texts: dict[str, str] | None = None,
    name: str = "custom",
    keep_all_items: bool = True,
) -> Interactions:
    """Code raw (user_id, item_id, event_type, ts) rows; unknown event types raise ValueError."""
    user_code: dict[str, int] = {}
    item_code: dict[str, int] = {}
    item_ids = [""]
    if item_texts and keep_all_items:
        for iid in item_texts:
            item_code[iid] = len(item_ids)
            item_ids.append(iid)
    users, items, etypes, ts = [], [], [], []
    for uid, iid, etype, t in rows:
        code = EVENT_CODE.get(etype)
        if code is None:
            raise ValueError(f"unknown event_type {etype!r} (expected one of {', '.join(EVENT_TYPES)})")
        u = user_code.setdefault(uid, len(user_code))
        i = item_code.get(iid)
        if i is None:
            i = item_code[iid] = len(item_ids)
            item_ids.append(iid)
        users.append(u)
        items.append(i)
        etypes.append(code)
        ts.append(int(t))
    texts = item_texts or {}
    return Interactions(
        users=np.array(users, dtype=np.int64),
        items=np.array(items, dtype=np.int64),
        etypes=np.array(etypes, dtype=np.int64),
        ts=np.array(ts, dtype=np.int64),
        user_ids=list(user_code),
        item_ids=item_ids,
        item_texts=[""] + [texts.get(iid, f"item {iid}") for iid in item_ids[1:]],
        name=name,
    )


def _open_text(path: Path, encoding: str = "utf-8") -> io.TextIOBase:
    if str(path).endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


def load_movielens(data_dir: Path | None = None) -> Interactions:
    """MovieLens-1M: every rating is a `view`; item text = title + genres; all 3,883 titles kept."""
    root = (data_dir or default_data_dir()) / "ml-1m"
    texts: dict[str, str] = {}
    with _open_text(root / "movies.dat", encoding="latin-1") as f:
        for line in f:
            mid, title, genres = line.rstrip("\n").split("::")
            texts[mid] = f"{title}. Genres: {genres.replace('|', ', ')}"
    ratings = root / "ratings_users1-2999.dat.gz"
    if not ratings.exists():
        ratings = root / "ratings.dat"

    def rows() -> Iterator[tuple[str, str, str, int]]:
        with _open_text(ratings) as f:
            for line in f:
                uid, mid, _rating, t = line.rstrip("\n").split("::")
                yield uid, mid, "view", int(t)

    data = build_interactions(rows(), texts, name="ml-1m")
    data.source = {"kind": "shared", "label": "ml-1m", "files": [ratings.name, "movies.dat"],
                   "catalogue": "every title of movies.dat"}
    return data


def load_taobao(data_dir: Path | None = None) -> Interactions:
    """Taobao UserBehavior: pv/cart/fav/buy -> view/cart/fav/buy; item text from its category."""
    root = (data_dir or default_data_dir()) / "taobao-userbehavior"
    path = next(iter(sorted(root.glob("UserBehavior*.csv*"))))
    texts: dict[str, str] = {}
    raw: list[tuple[str, str, str, int]] = []
    with _open_text(path) as f:
        for rec in csv.reader(f):
            uid, iid, cid, behaviour, t = rec
            texts.setdefault(iid, f"product in category {cid}")
            raw.append((uid, iid, TAOBAO_TYPES[behaviour], int(t)))
    data = build_interactions(raw, texts, name="taobao", keep_all_items=False)
    data.source = {"kind": "shared", "label": "taobao", "files": [path.name], "catalogue": "events"}
    return data


def load_amazon_mi(data_dir: Path | None = None) -> Interactions:
    """Amazon Musical Instruments 5-core: reviews become `buy` events; text from review summaries."""
    root = (data_dir or default_data_dir()) / "amazon-musical-instruments-5core"
    path = root / "reviews_Musical_Instruments_5.json.gz"
    summaries: dict[str, list[str]] = {}
    raw: list[tuple[str, str, str, int]] = []
    with _open_text(path) as f:
        for line in f:
            rec = json.loads(line)
            summaries.setdefault(rec["asin"], []).append(rec.get("summary", ""))
            raw.append((rec["reviewerID"], rec["asin"], "buy", int(rec["unixReviewTime"])))
    texts = {k: "; ".join(v[:5]) for k, v in summaries.items()}
    data = build_interactions(raw, texts, name="amazon-mi", keep_all_items=False)
    data.source = {"kind": "shared", "label": "amazon-mi", "files": [path.name], "catalogue": "events"}
    return data


def load_generic(events_path: Path, items_path: Path | None = None, cols: ColumnMap | None = None,
                 max_refused: float | None = None) -> Interactions:
    """The open format: events `user_id,item_id,event_type,ts`; items `item_id,text` (CSV, TSV, JSONL or
    MovieLens .dat, plain or gzip), other column names through `cols`. The checks of encoders.data_check
    run first: their notes and warnings are logged, a refused input raises DataError (one line)."""
    kw = {} if max_refused is None else {"max_refused": max_refused}
    got = read_generic(events_path, items_path, cols, EVENT_TYPES, **kw)
    rep = got.report
    for line in rep.notes:
        log.info("data: %s", line)
    for line in rep.warnings:
        log.warning("data: %s", line)
    if not rep.ok:
        raise DataError(rep.error_line() + " (`lsti data check` with the same options prints the full report)")
    order = range(len(got.users))
    if len(got.ts) and not np.array_equal(got.fine_ts, got.ts):
        # Finer-than-second timestamps: order by them (stably) so events within one second keep it.
        order = np.argsort(got.fine_ts, kind="stable").tolist()
    rows = ((got.users[j], got.items[j], got.types[j], int(got.ts[j])) for j in order)
    data = build_interactions(rows, got.texts or None, name=Path(events_path).stem)
    data.source = {
        "kind": "generic", "label": rep.label,
        "files": {role: {k: f[k] for k in ("name", "sha256", "bytes", "format", "encoding")}
                  for role, f in rep.files.items()},
        "rows": rep.rows, "columns": rep.columns, "timestamps": rep.stats.get("timestamp_unit", "seconds"),
        "duplicates": rep.stats.get("duplicates", 0), "split_ties": rep.stats.get("ties"),
        "catalogue": "items file + events" if got.texts else "events",
        "items_in_file": rep.stats.get("items_in_file"), "warnings": list(rep.warnings),
    }
    return data


def describe_data(data: Interactions) -> dict:
    """The `data` object of a report: what was read, which items are ranked and why, the tie rule."""
    src = dict(data.source or {"kind": "in-memory", "label": data.label, "catalogue": "events"})
    seen = np.zeros(data.n_items + 1, dtype=bool)
    seen[np.unique(data.items)] = True
    never = int(data.n_items - seen[1:].sum())
    rule = src.pop("catalogue", "events")
    n_file = src.pop("items_in_file", None)
    if rule == "items file + events" and n_file is not None:
        only = data.n_items - n_file
        text = (f"all items of the items file ({n_file:,}), of which {never:,} never appear in events"
                + (f", plus {only:,} items named only by events (placeholder text)" if only else ""))
    elif rule == "every title of movies.dat":
        text = f"every title of movies.dat ({data.n_items:,}), of which {never:,} have no event"
    else:
        text = f"every item named by at least one event ({data.n_items:,})"
    src["candidates"] = {"n": data.n_items, "never_in_events": never, "rule": text,
                         "note": "every candidate is ranked for every test case (full ranking)"}
    src["tie_break"] = TIE_RULE
    return src


def load_dataset(
    name: str | None,
    data_dir: Path | None = None,
    events: Path | None = None,
    items: Path | None = None,
    cols: ColumnMap | None = None,
    max_refused: float | None = None,
) -> Interactions:
    """Dispatch by dataset name, or the generic format (read through `cols`) when `events` is given."""
    if events is not None:
        return load_generic(Path(events), Path(items) if items else None, cols, max_refused)
    loaders = {"ml-1m": load_movielens, "taobao": load_taobao, "amazon-mi": load_amazon_mi}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(loaders)} or pass --events")
    return loaders[name](data_dir)


# -- the archive (`lsti archive`): the events a stream saw, as date-partitioned Parquet files -----------------

ARCHIVE_COLUMNS = ("user_id", "item_id", "event_type", "ts", "event_id", "partition", "offset")


@dataclass
class ItemUpdates:
    """Catalogue changes folded in order (the last change of an item decides): the latest text of every
    item added and not deleted since, the deleted items (for good, until added again) and the items
    currently unavailable. Built from `streams.contracts.items.ItemChange`-like objects (attributes
    item_id, text, deleted, available)."""

    texts: dict[str, str] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    unavailable: set[str] = field(default_factory=set)
    changes: int = 0

    @classmethod
    def fold(cls, changes: Iterable, start: ItemUpdates | None = None) -> ItemUpdates:
        out = cls(dict(start.texts), set(start.deleted), set(start.unavailable), start.changes) if start else cls()
        for ch in changes:
            iid = str(ch.item_id)
            out.changes += 1
            if ch.deleted:
                out.deleted.add(iid)
                out.texts.pop(iid, None)
                out.unavailable.discard(iid)
                continue
            if ch.text is not None:  # an addition: a deleted item comes back
                out.texts[iid] = ch.text
                out.deleted.discard(iid)
            if ch.available is not None and iid not in out.deleted:
                (out.unavailable.discard if ch.available else out.unavailable.add)(iid)
        return out

    @property
    def mentioned(self) -> set[str]:
        return set(self.texts) | self.deleted | self.unavailable


def apply_item_updates(data: Interactions, updates: ItemUpdates | None) -> Interactions:
    """`data` with the texts of `updates` and its added items appended (text only, no events); items
    deleted and named by no event are not added. Event arrays, user and known item codes are unchanged."""
    if updates is None or not (updates.texts or updates.deleted):
        return data
    texts = list(data.item_texts)
    code = data.item_code()
    item_ids = list(data.item_ids)
    for iid, text in updates.texts.items():
        if iid in code:
            texts[code[iid]] = text
        else:
            code[iid] = len(item_ids)
            item_ids.append(iid)
            texts.append(text)
    out = Interactions(users=data.users, items=data.items, etypes=data.etypes, ts=data.ts, user_ids=data.user_ids,
                       item_ids=item_ids, item_texts=texts, name=data.name, source=dict(data.source))
    out.source["item_changes"] = {"changes": updates.changes, "texts": len(updates.texts),
                                  "added": len(item_ids) - len(data.item_ids), "deleted": len(updates.deleted),
                                  "unavailable": len(updates.unavailable)}
    return out


def archive_files(folder: Path, cutoff: float | None = None) -> list[Path]:
    """The Parquet files of an archive folder (`date=YYYY-MM-DD/part-<partition>-<offset>.parquet`), in name
    order; with `cutoff`, folders of days after the cutoff's (UTC) day are skipped. Temp files (dot names)
    of a write in progress or of a crashed archive are never read."""
    from datetime import UTC, datetime

    last_day = datetime.fromtimestamp(cutoff, UTC).strftime("%Y-%m-%d") if cutoff is not None else None
    out = []
    for day in sorted(Path(folder).glob("date=*")):
        if day.is_dir() and (last_day is None or day.name.removeprefix("date=") <= last_day):
            out += sorted(p for p in day.glob("part-*.parquet") if p.is_file())
    return out


def read_archive(folder: Path | str, items_changes: Iterable | ItemUpdates | None = None,
                 cutoff: float | None = None) -> Interactions:
    """The events of an archive written by `lsti archive`, each (partition, offset) once, as `Interactions`.

    A record re-written after a crash of the archive (the same offset in two files) counts once. Events are
    ordered by time, then by where they were in Kafka (a user's events share a partition, so events of the
    same second keep their publishing order). Items come from the events; `items_changes` (the `items`
    topic, read whole) adds the texts of added items and items named by no event. Items with no text known
    here get the text "" (the nightly step keeps the base artifact's vector of a known item for it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no archive folder {folder}")
    files = archive_files(folder, cutoff)
    tables = [pq.read_table(f, columns=list(ARCHIVE_COLUMNS)) for f in files]
    schema = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("event_type", pa.string()),
                        ("ts", pa.float64()), ("event_id", pa.string()), ("partition", pa.int32()),
                        ("offset", pa.int64())])
    table = pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
    part = table.column("partition").to_numpy().astype(np.int64)
    off = table.column("offset").to_numpy().astype(np.int64)
    ts = table.column("ts").to_numpy().astype(np.float64)
    # Dedupe on (partition, offset): sort by it and keep the first of each run of equal keys.
    by_pos = np.lexsort((off, part))
    first = np.ones(len(by_pos), dtype=bool)
    first[1:] = (part[by_pos][1:] != part[by_pos][:-1]) | (off[by_pos][1:] != off[by_pos][:-1])
    keep = by_pos[first]
    order = keep[np.lexsort((off[keep], part[keep], ts[keep]))]
    rows = table.take(pa.array(order, pa.int64()))

    def codes(name: str) -> tuple[np.ndarray, list[str]]:
        enc = rows.column(name).combine_chunks().dictionary_encode()  # codes in order of first appearance
        return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary.to_pylist()

    users, user_ids = codes("user_id")
    items, names = codes("item_id")
    types, type_names = codes("event_type")
    unknown = [t for t in type_names if t not in EVENT_CODE]
    if unknown:
        raise ValueError(f"{folder}: unknown event_type {unknown[0]!r} in the archive")
    type_code = np.array([EVENT_CODE[t] for t in type_names] or [0], dtype=np.int64)
    data = Interactions(users=users, items=items + 1, etypes=type_code[types],
                        ts=np.floor(ts[order]).astype(np.int64), user_ids=user_ids, item_ids=[""] + names,
                        item_texts=[""] * (len(names) + 1), name="archive")
    data.source = {"kind": "archive", "label": f"archive:{folder.name}", "files": len(files),
                   "rows": int(len(part)), "duplicates": int(len(part) - len(keep)), "events": int(len(keep)),
                   "catalogue": "events + items topic" if items_changes is not None else "events"}
    if items_changes is not None:
        updates = items_changes if isinstance(items_changes, ItemUpdates) else ItemUpdates.fold(items_changes)
        data = apply_item_updates(data, updates)
    return data
