"""Small generated datasets for tests: structured enough that a model can learn them, no shared data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

WALK_ITEMS = 20  # the catalogue of `walk_data`


def walk_data(n_users: int = 12, per_user: int = 10, seed: int = 0):
    """Users walk a catalogue of `WALK_ITEMS` items in order from a random start: the next item is
    predictable (an in-memory `Interactions`, for model unit tests)."""
    from encoders.data import build_interactions

    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        start = int(rng.integers(0, WALK_ITEMS))
        rows += [(f"u{u}", f"i{(start + j) % WALK_ITEMS}", "view", 1_000_000 + 60 * j) for j in range(per_user)]
    return build_interactions(rows, {f"i{i}": f"item {i}" for i in range(WALK_ITEMS)}, name="tiny")


GENRES = ["space opera", "romantic comedy", "crime thriller", "animated family film", "war drama"]


def write_fixture(folder: Path, n_users: int = 60, n_items: int = 50, per_user: int = 25,
                  seed: int = 0) -> tuple[Path, Path]:
    """events.csv + items.jsonl; each user mostly follows one genre, in a fixed order within it."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    genre_of = np.arange(n_items) % len(GENRES)
    items_path = folder / "items.jsonl"
    with open(items_path, "w") as f:
        for i in range(n_items):
            f.write(json.dumps({"item_id": f"i{i}", "text": f"A {GENRES[genre_of[i]]} number {i}"}) + "\n")
    events_path = folder / "events.csv"
    types = ["view", "view", "view", "click", "cart", "fav", "buy"]
    with open(events_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "event_type", "ts"])
        for u in range(n_users):
            g = u % len(GENRES)
            pool = np.flatnonzero(genre_of == g)
            t = 1_600_000_000 + int(rng.integers(0, 10_000))
            for j in range(per_user):
                item = pool[j % len(pool)] if rng.random() < 0.8 else int(rng.integers(0, n_items))
                t += int(rng.integers(5, 600))
                w.writerow([f"u{u}", f"i{item}", types[int(rng.integers(0, len(types)))], t])
    return events_path, items_path
