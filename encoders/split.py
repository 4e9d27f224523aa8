"""Leave-one-out by time: per user the last event is the test target, the one before it validation.

Training sees only events before the validation target, so neither target leaks into training
or into anything fitted on it (popularity counts, co-occurrence, long-term vectors).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from encoders.data import Interactions

MIN_EVENTS = 3


@dataclass
class Sequence:
    """One user's events as parallel arrays, sorted by time."""

    user: int
    items: np.ndarray
    etypes: np.ndarray
    ts: np.ndarray


@dataclass
class EvalCase:
    """Predict `target` after seeing `history` (all of the user's earlier events)."""

    history: Sequence
    target: int
    target_etype: int


def hold_out_items(data: Interactions, fraction: float, seed: int = 0) -> np.ndarray:
    """A random `fraction` of the items that have events (the cold-start experiment's new items)."""
    seen = np.unique(data.items)
    seen = seen[seen > 0]
    n = int(round(fraction * len(seen)))
    return np.sort(np.random.default_rng(seed).choice(seen, size=n, replace=False)) if n else np.zeros(0, np.int64)


class LeaveOneOut:
    """The split: `train_sequences`, then `cases('valid')` or `cases('test')`.

    `hidden_items` (cold start): every event of these items is removed from training, as if the items
    were added to the catalogue after training; evaluation histories and targets still contain them.
    """

    def __init__(self, data: Interactions, hidden_items: np.ndarray | None = None):
        self.data = data
        counts = np.diff(data.user_offsets)
        self.eval_users = np.flatnonzero(counts >= MIN_EVENTS)
        self.hidden_items = np.asarray(hidden_items if hidden_items is not None else [], dtype=np.int64)
        self._visible = None
        if len(self.hidden_items):
            self._visible = ~np.isin(data.items, self.hidden_items)

    def _seq(self, u: int, start: int, end: int) -> Sequence:
        d = self.data
        return Sequence(int(u), d.items[start:end], d.etypes[start:end], d.ts[start:end])

    def train_end(self, u: int) -> int:
        """Index one past the user's last training event."""
        s, e = int(self.data.user_offsets[u]), int(self.data.user_offsets[u + 1])
        return e - 2 if e - s >= MIN_EVENTS else e

    def train_sequences(self) -> list[Sequence]:
        out = []
        for u in range(self.data.n_users):
            s = int(self.data.user_offsets[u])
            end = self.train_end(u)
            seq = self._seq(u, s, end)
            if self._visible is not None:
                keep = self._visible[s:end]
                seq = Sequence(seq.user, seq.items[keep], seq.etypes[keep], seq.ts[keep])
            if len(seq.items) >= 2:
                out.append(seq)
        return out

    def train_mask(self) -> np.ndarray:
        """Boolean mask over all events: True where the event is in the training part."""
        mask = np.zeros(len(self.data.items), dtype=bool)
        for u in range(self.data.n_users):
            mask[int(self.data.user_offsets[u]) : self.train_end(u)] = True
        return mask if self._visible is None else mask & self._visible

    def cases(self, stage: str, target_etype: int | None = None) -> list[EvalCase]:
        """Evaluation cases; `target_etype` keeps only users whose target has that type (next-buy)."""
        if stage not in ("valid", "test"):
            raise ValueError("stage must be 'valid' or 'test'")
        back = 2 if stage == "valid" else 1
        d = self.data
        out = []
        for u in self.eval_users:
            s, e = int(d.user_offsets[u]), int(d.user_offsets[u + 1])
            t = e - back
            if target_etype is not None and d.etypes[t] != target_etype:
                continue
            out.append(EvalCase(self._seq(u, s, t), int(d.items[t]), int(d.etypes[t])))
        return out
