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
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EVENT_TYPES: tuple[str, ...] = ("view", "click", "cart", "fav", "buy")
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

    return build_interactions(rows(), texts, name="ml-1m")


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
    return build_interactions(raw, texts, name="taobao", keep_all_items=False)


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
    return build_interactions(raw, texts, name="amazon-mi", keep_all_items=False)


def _read_records(path: Path) -> Iterator[dict]:
    """Rows of a CSV (with header) or JSONL file, plain or gzip."""
    name = str(path).removesuffix(".gz")
    with _open_text(path) as f:
        if name.endswith((".jsonl", ".json", ".ndjson")):
            for line in f:
                if line.strip():
                    yield json.loads(line)
        else:
            yield from csv.DictReader(f)


def load_generic(events_path: Path, items_path: Path | None = None) -> Interactions:
    """The open format: events `user_id,item_id,event_type,ts`; items `item_id,text` (CSV or JSONL)."""
    texts: dict[str, str] = {}
    if items_path is not None:
        for rec in _read_records(items_path):
            texts[str(rec["item_id"])] = str(rec["text"])

    def rows() -> Iterator[tuple[str, str, str, int]]:
        for rec in _read_records(events_path):
            yield str(rec["user_id"]), str(rec["item_id"]), str(rec["event_type"]), int(float(rec["ts"]))

    return build_interactions(rows(), texts or None, name=Path(events_path).stem)


def load_dataset(
    name: str | None,
    data_dir: Path | None = None,
    events: Path | None = None,
    items: Path | None = None,
) -> Interactions:
    """Dispatch by dataset name, or the generic format when `events` is given."""
    if events is not None:
        return load_generic(Path(events), Path(items) if items else None)
    loaders = {"ml-1m": load_movielens, "taobao": load_taobao, "amazon-mi": load_amazon_mi}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(loaders)} or pass --events")
    return loaders[name](data_dir)
