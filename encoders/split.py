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


class LeaveOneOut:
    """The split: `train_sequences`, then `cases('valid')` or `cases('test')`."""

    def __init__(self, data: Interactions):
        self.data = data
        counts = np.diff(data.user_offsets)
        self.eval_users = np.flatnonzero(counts >= MIN_EVENTS)

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
            if end - s >= 2:
                out.append(self._seq(u, s, end))
        return out

    def train_mask(self) -> np.ndarray:
        """Boolean mask over all events: True where the event is in the training part."""
        mask = np.zeros(len(self.data.items), dtype=bool)
        for u in range(self.data.n_users):
            mask[int(self.data.user_offsets[u]) : self.train_end(u)] = True
        return mask

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
